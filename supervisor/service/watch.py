"""`serve --watch`: notice when the config (or a file it includes) has been saved.

Rules kept here:
- polling a few files' metadata four times a second costs nothing and needs no inotify library,
  and sees an editor's atomic rename (a new inode) as well as a write in place;
- the files watched are the config and whatever its `include` globs match now: a new file that
  matches is a change, and so is an included file that is gone;
- a change counts once the files have stopped changing for `debounce_s` (one save, one reload,
  however many writes the editor made), and only if they did not change while they were read;
- a save is compared with the bytes the running config was read from, not with the file as it was
  when watching began: an edit made while the first models load is applied once watching starts;
- a save whose bytes equal what runs does nothing, and so does one whose bytes equal the last
  settled save's while what runs is what ran then (a touch; a refused save, which is not retried
  until the files change); any other save is handed on, even one back to bytes tried before (a
  broken save made again, an edit reverted after a SIGHUP or /admin/reload reload);
- a settled save that is empty or does not parse as TOML is handed on with its problem, once per
  save, so that it is recorded as a refused reload; it is never applied.
"""

from __future__ import annotations

import glob
import logging
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from llama_smart_proxy.supervisor.config.load import files_digest

log = logging.getLogger("llama-smart-proxy.watch")

POLL_S = 0.25


@dataclass(frozen=True)
class FileStats:
    """The watched files and their (inode, size, mtime_ns), None when absent: cheap to compare
    every poll."""

    paths: tuple[Path, ...]
    stats: tuple[tuple[int, int, int] | None, ...]


def take_stats(paths: Sequence[Path]) -> FileStats:
    stats = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stats.append(None)
        else:
            stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return FileStats(tuple(paths), tuple(stats))


def watched_files(loaded: Loaded) -> list[Path]:
    """The config and every file its include globs match now, in the order the loader reads them."""
    files = list(loaded.files[:1])
    for pattern in loaded.include_patterns:
        for match in sorted(Path(p).absolute() for p in glob.glob(pattern)):
            if match not in files:
                files.append(match)
    return files


def content_digest(paths: Sequence[Path]) -> tuple[str, str | None, dict[Path, bytes]]:
    """(digest of every file's bytes, the first TOML syntax problem or None, the bytes read)."""
    contents: list[tuple[Path, bytes]] = []
    problem = None
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = b""
            problem = problem or f"{path}: {exc.strerror}"
        contents.append((path, data))
        if problem is None and not data.strip():
            problem = f"{path}: empty"  # editors truncate before they write: never apply that
        if problem is None:
            try:
                tomllib.loads(data.decode("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                problem = f"{path}: TOML syntax error: {exc}"
    return files_digest(contents), problem, dict(contents)


class Loaded(Protocol):
    """What the watcher needs of the running config (supervisor.config.load.LoadedConfig)."""

    @property
    def files(self) -> Sequence[Path]: ...

    @property
    def digest(self) -> str: ...

    @property
    def include_patterns(self) -> Sequence[str]: ...


async def watch_config(
    loaded: Callable[[], Loaded],
    on_change: Callable[[str | None, Mapping[Path, bytes]], Awaitable[None]],
    *,
    debounce_s: float = 0.5,
    poll_s: float = POLL_S,
) -> None:
    """Call `on_change(None, contents)` once per settled save of the watched files whose bytes
    differ from those `loaded()` was read from, and `on_change(problem, contents)` once per settled
    save that is empty or does not parse. Runs until cancelled.

    `contents` holds the bytes judged, for the reload to parse: read again, the files may be
    half-way through an editor's next write.

    `loaded` is asked again at every poll, since a reload may change what is included.
    """
    seen: FileStats | None = None  # the first poll reads the files: they may have changed since loading
    last: tuple[str, str] | None = None  # (the last settled save's digest, what ran once it was dealt with)
    while True:
        await anyio.sleep(poll_s)
        current = take_stats(watched_files(loaded()))
        if current == seen:
            continue
        # settle: wait until a whole debounce interval passes without further change
        while True:
            seen = current
            await anyio.sleep(debounce_s)
            current = take_stats(watched_files(loaded()))
            if current == seen:
                break
        digest, problem, contents = content_digest(current.paths)
        if take_stats(current.paths) != current:
            continue  # written again while it was read (an editor's next write in place): settle again
        running = loaded().digest
        if digest != running and (digest, running) != last:
            if problem is not None:
                log.warning("config changed but cannot be read as TOML, not applied: %s", problem)
            else:
                log.info("config file changed: reloading")
            await on_change(problem, contents)
            running = loaded().digest
            seen = None  # a save made during the reload is read on the next poll
        last = (digest, running)
