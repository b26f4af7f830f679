"""`serve --watch`: notice when the config (or a file it includes) has been saved.

Rules kept here:
- polling a few files' metadata four times a second costs nothing and needs no inotify library,
  and sees an editor's atomic rename (a new inode) as well as a write in place;
- a change counts once the files have stopped changing for `debounce_s` (one save, one reload,
  however many writes the editor made);
- a save is compared with the bytes the running config was read from, not with the file as it was
  when watching began: an edit made while the first models load is applied once watching starts;
- a save whose bytes equal what was loaded, or what was last tried, does nothing;
- a file that is empty or does not parse as TOML yet is a save in progress (or a typo): it is
  reported once and does not trigger a reload; the next save that parses does.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from llama_smart_proxy.supervisor.config import files_digest

log = logging.getLogger("llama-smart-proxy.watch")

POLL_S = 0.25


@dataclass(frozen=True)
class Snapshot:
    stats: tuple[tuple[int, int, int] | None, ...]
    """(inode, size, mtime_ns) per file, None when absent: cheap to compare every poll."""


def take_snapshot(paths: Sequence[Path]) -> Snapshot:
    stats = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stats.append(None)
        else:
            stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return Snapshot(tuple(stats))


def content_digest(paths: Sequence[Path]) -> tuple[str, str | None]:
    """(digest of every file's bytes, the first TOML syntax problem or None)."""
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
                problem = f"{path}: {exc}"
    return files_digest(contents), problem


class Loaded(Protocol):
    """What the watcher needs of the running config (supervisor.config.LoadedConfig)."""

    @property
    def files(self) -> Sequence[Path]: ...

    @property
    def digest(self) -> str: ...


async def watch_config(
    loaded: Callable[[], Loaded],
    on_change: Callable[[], Awaitable[None]],
    *,
    debounce_s: float = 0.5,
    poll_s: float = POLL_S,
) -> None:
    """Call `on_change` once per settled, parseable save of `loaded().files` whose bytes differ from
    those `loaded()` was read from. Runs until cancelled.

    `loaded` is asked again after every reload, since a reload may change what is included.
    """
    paths = list(loaded().files)
    seen: Snapshot | None = None  # the first poll reads the files: they may have changed since loading
    tried = loaded().digest
    reported: str | None = None
    while True:
        await anyio.sleep(poll_s)
        current = take_snapshot(paths)
        if current == seen:
            continue
        # settle: wait until a whole debounce interval passes without further change
        while True:
            seen = current
            await anyio.sleep(debounce_s)
            current = take_snapshot(paths)
            if current == seen:
                break
        digest, problem = content_digest(paths)
        if digest in (tried, loaded().digest):
            continue
        if problem is not None:
            if problem != reported:
                log.warning("config changed but does not parse yet, not reloading: %s", problem)
                reported = problem
            continue
        reported = None
        tried = digest  # a refused reload is not retried until the files change again
        log.info("config file changed: reloading")
        await on_change()
        paths = list(loaded().files)
        seen = None  # a save made during the reload is read on the next poll
