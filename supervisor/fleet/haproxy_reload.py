"""Put a rendered HAProxy config in place and reload HAProxy without dropping a connection.

Rules kept here:
- nothing is replaced before `haproxy -c` accepted the new config: a refused config leaves the
  running HAProxy, its config file and its error files as they were, and says why (HAProxy's
  own words);
- the config is replaced atomically (written beside it, fsynced, renamed over it); its error
  files live in a folder named after their content, so new ones never overwrite the files the
  running HAProxy names;
- a reload is SIGUSR2 to HAProxy's master (`-W`/`-Ws`, as Debian's haproxy.service runs it):
  the master starts a new worker on the new config, which takes the listening sockets over, and
  the old worker finishes the connections it holds; with the master's CLI socket (`-S`) the
  reload is waited for and a failed one reported.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from llama_smart_proxy.supervisor.errors import RuntimeFailure, UserError
from llama_smart_proxy.supervisor.fleet.haproxy_config import FILES_PREFIX, HaproxyConfig

HAPROXY = Path("/usr/sbin/haproxy")  # Debian's haproxy package
DEBIAN_PID_FILE = Path("/run/haproxy.pid")  # haproxy.service's PIDFILE (the master's pid)
DEBIAN_MASTER_SOCKET = Path("/run/haproxy-master.sock")  # haproxy.service's EXTRAOPTS -S
CHECK_TIMEOUT_S = 30.0
RELOAD_TIMEOUT_S = 10.0


class HaproxyRefused(UserError):
    """`haproxy -c` refused a generated config; nothing was replaced."""


class HaproxyReloadFailed(RuntimeFailure):
    """HAProxy's master is not running, or it did not take the new config."""


@dataclass(frozen=True)
class MasterState:
    """What the master CLI's `show proc` says: its pid, reloads done and failed, the workers."""

    pid: int
    reloads: int
    failed: int
    workers: tuple[int, ...]  # pids of the workers on the newest config (reloads 0)
    old_workers: tuple[int, ...]  # pids of workers still finishing connections of an older one


def check_config(path: Path, haproxy: Path = HAPROXY, shown_as: str | None = None) -> str:
    """Run `haproxy -c -f path`; its warnings on success, `HaproxyRefused` with its alerts if not
    (`path` written as `shown_as` in them)."""
    try:
        done = subprocess.run([str(haproxy), "-c", "-f", str(path)], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except FileNotFoundError:
        raise HaproxyRefused(f"{haproxy}: not found; install HAProxy (Debian: apt-get install haproxy)") from None
    output = (done.stdout + done.stderr).strip()
    if shown_as is not None:
        output = output.replace(str(path), shown_as)
    if done.returncode != 0:
        raise HaproxyRefused(f"haproxy -c refused the new config (nothing was replaced):\n{output}")
    return output


def install_config(config: HaproxyConfig, path: Path, haproxy: Path = HAPROXY) -> Path:
    """Write `config` to `path` (and its error files beside it), checked first, atomically;
    returns `path`. The error folder the replaced config named is removed once the new one is in
    (the running HAProxy read its files when it started; other configs' folders are left alone)."""
    previous, _ = _replace_checked(config, path, haproxy)
    _remove_files_dirs(path.parent, _files_dirs_named(previous) - {config.files_dir})
    return path


def _replace_checked(config: HaproxyConfig, path: Path, haproxy: Path) -> tuple[str | None, bool]:
    """Put `config` at `path` once `haproxy -c` accepts it: (the text it replaced, whether its
    error folder was written now)."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    created = _write_files(config, folder)
    staged = folder / f".{path.name}.new-{os.getpid()}"
    try:
        _write_synced(staged, config.text.encode())
        # default-path config: staged beside `path`, it names the same error files
        check_config(staged, haproxy, shown_as=f"{path} (new)")
    except BaseException:
        staged.unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder / config.files_dir, ignore_errors=True)
        raise
    previous = path.read_text() if path.exists() else None
    os.replace(staged, path)
    _sync_folder(folder)
    return previous, created


def read_master_pid(pid_file: Path) -> int:
    """The master's pid from its pid file (`-p`), checked alive."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise HaproxyReloadFailed(f"{pid_file}: no HAProxy master pid there ({exc}); is HAProxy running?") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise HaproxyReloadFailed(f"{pid_file}: HAProxy's master (pid {pid}) is not running") from None
    except PermissionError:
        pass  # running as another user: the signal below says whether we may reload it
    return pid


def reload_haproxy(pid_file: Path, master_socket: Path | None = None, timeout_s: float = RELOAD_TIMEOUT_S) -> MasterState | None:
    """SIGUSR2 to the master named in `pid_file`. With `master_socket`, wait until a new worker
    runs and return the master's state; a reload the master reports failed raises."""
    pid = read_master_pid(pid_file)
    try:
        before = master_state(master_socket) if master_socket else None
    except OSError as exc:
        raise HaproxyReloadFailed(f"{master_socket}: cannot reach HAProxy's master CLI ({exc})") from None
    try:
        os.kill(pid, signal.SIGUSR2)
    except PermissionError:
        raise HaproxyReloadFailed(f"may not signal HAProxy's master (pid {pid}): run as its user or root") from None
    if master_socket is None or before is None:
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = master_state(master_socket)
        except OSError:
            state = None  # the master re-executes itself: its socket is briefly gone
        if state is not None:
            if state.failed > before.failed:
                raise HaproxyReloadFailed(f"HAProxy's master (pid {pid}) failed to load the new config; it keeps the old one")
            if state.reloads > before.reloads and state.workers and not set(state.workers) & set(before.workers):
                return state
        if time.monotonic() > deadline:
            raise HaproxyReloadFailed(f"HAProxy's master (pid {pid}) did not start a new worker within {timeout_s:g} s")
        time.sleep(0.05)


def apply_config(
    config: HaproxyConfig,
    path: Path,
    *,
    pid_file: Path | None = None,
    master_socket: Path | None = None,
    haproxy: Path = HAPROXY,
) -> MasterState | None:
    """Install `config` at `path` (checked, atomic), then reload the master in `pid_file`, if
    given. A reload the master reports failed (a new address it cannot bind, say) puts the old
    file back, so that the file on disk is what HAProxy runs, and raises."""
    if pid_file is None:
        install_config(config, path, haproxy)
        return None
    read_master_pid(pid_file)  # not running: say so before anything is replaced
    previous, created = _replace_checked(config, path, haproxy)
    try:
        state = reload_haproxy(pid_file, master_socket)
    except HaproxyReloadFailed:
        if previous is not None:
            staged = path.parent / f".{path.name}.old-{os.getpid()}"
            _write_synced(staged, previous.encode())
            os.replace(staged, path)
            _sync_folder(path.parent)
        if created:
            shutil.rmtree(path.parent / config.files_dir, ignore_errors=True)
        raise
    _remove_files_dirs(path.parent, _files_dirs_named(previous) - {config.files_dir})
    return state


def master_state(master_socket: Path, timeout_s: float = 2.0) -> MasterState:
    """`show proc` on the master CLI, parsed."""
    return parse_show_proc(master_command(master_socket, "show proc", timeout_s))


def master_command(master_socket: Path, command: str, timeout_s: float = 2.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(master_socket))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)  # the master CLI answers, then closes, once our side is done
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


_PROC_LINE = re.compile(r"^(\d+)\s+(master|worker)\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?", re.M)


def parse_show_proc(text: str) -> MasterState:
    """The master CLI's `show proc` table (HAProxy 2.6) → `MasterState`."""
    master: tuple[int, int, int] | None = None
    workers, old = [], []
    for pid, kind, reloads, failed in _PROC_LINE.findall(text):
        if kind == "master":
            master = (int(pid), int(reloads), int(failed or 0))
        elif int(reloads) == 0:
            workers.append(int(pid))
        else:
            old.append(int(pid))
    if master is None:
        raise HaproxyReloadFailed(f"unexpected answer to `show proc` from HAProxy's master: {text[:200]!r}")
    return MasterState(master[0], master[1], master[2], tuple(workers), tuple(old))


# ---- files


def _write_files(config: HaproxyConfig, folder: Path) -> bool:
    """The error folder, written whole under a temporary name then renamed; False if it was
    already there (its name is its content's digest)."""
    target = folder / config.files_dir
    if target.is_dir():
        return False
    staging = folder / f".{config.files_dir}.new-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name, data in config.files.items():
            relative = Path(name).relative_to(config.files_dir)
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            _write_synced(staging / relative, data)
        staging.mkdir(exist_ok=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _files_dirs_named(text: str | None) -> set[str]:
    """The error folders of ours a config's text names."""
    return set(re.findall(rf"\b({re.escape(FILES_PREFIX)}[0-9a-f]+)/", text or ""))


def _remove_files_dirs(folder: Path, names: set[str]) -> None:
    for name in names:
        shutil.rmtree(folder / name, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, 0o644)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
