"""`serve --watch`: notice when the config (or a file it includes) has been saved.

Rules kept here:
- polling a few files' metadata four times a second costs nothing and needs no inotify library,
  and sees an editor's atomic rename (a new inode) as well as a write in place;
- a change counts once the files have stopped changing for `debounce_s` (one save, one reload,
  however many writes the editor made);
- a save whose bytes equal what was last seen does nothing;
- a file that is empty or does not parse as TOML yet is a save in progress (or a typo): it is
  reported once and does not trigger a reload; the next save that parses does.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

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
    digest = hashlib.sha256()
    problem = None
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = b""
            problem = problem or f"{path}: {exc.strerror}"
        digest.update(str(path).encode() + b"\0" + data + b"\0")
        if problem is None and not data.strip():
            problem = f"{path}: empty"  # editors truncate before they write: never apply that
        if problem is None:
            try:
                tomllib.loads(data.decode("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                problem = f"{path}: {exc}"
    return digest.hexdigest(), problem


async def watch_config(
    files: Callable[[], Sequence[Path]],
    on_change: Callable[[], Awaitable[None]],
    *,
    debounce_s: float = 0.5,
    poll_s: float = POLL_S,
) -> None:
    """Call `on_change` once per settled, parseable, different save of `files()`. Runs until cancelled.

    `files` is asked again after every reload, since a reload may change what is included.
    """
    paths = list(files())
    seen = take_snapshot(paths)
    applied, _ = content_digest(paths)
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
        if digest == applied:
            continue
        if problem is not None:
            if problem != reported:
                log.warning("config changed but does not parse yet, not reloading: %s", problem)
                reported = problem
            continue
        reported = None
        applied = digest
        log.info("config file changed: reloading")
        await on_change()
        paths = list(files())
        seen = take_snapshot(paths)
        applied, _ = content_digest(paths)
