"""What the supervisor tests share: stand-ins for llama-server, quick settings, process checks.

- `write_fake_llama_server`: the FAKE llama-server (fake_llama_server.py) as one executable that
  runs under this interpreter (its shebang would find whatever `python3` is on PATH);
- `write_forking_wrapper`: a shell wrapper that FORKS its target instead of exec'ing it, as many
  users' launch scripts do; it prints the forked pid, so a test can check that a stop reached it;
- `quick_settings`: supervision settings scaled down so each test takes about a second;
- `pid_alive`, `live_children`, `zombie_children`: looked up in /proc, since a zombie is not alive
  and this container's PID 1 does not reap orphans.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llama_smart_proxy.schemas.config import LlamaServerSettings
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.supervisor.children.ports import is_port_free

FAKE_SERVER = Path(__file__).with_name("fake_llama_server.py")
WRAPPER_PID_PREFIX = "forking-wrapper: child pid "


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def write_fake_llama_server(directory: Path) -> Path:
    return _write_script(
        directory / "fake-llama-server",
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SERVER))} "$@"\n',
    )


def write_forking_wrapper(directory: Path, target: Path) -> Path:
    return _write_script(
        directory / "forking-wrapper",
        f'{shlex.quote(str(target))} "$@" &\n'
        f'echo "{WRAPPER_PID_PREFIX}$!"\n'
        "wait $!\n",
    )


def wrapped_pid(log_lines: list[str]) -> int | None:
    """The pid the forking wrapper reported, from a child's output."""
    for line in log_lines:
        if line.startswith(WRAPPER_PID_PREFIX):
            return int(line[len(WRAPPER_PID_PREFIX) :])
    return None


# Below the kernel's ephemeral range (32768-60999), so outgoing connections rarely sit on them.
TEST_PORT_RANGE = (21000, 21999)


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port held by a listening socket, below the kernel's ephemeral range and with the
    next port free too, so that "the next port" is the test's to expect (a port the kernel picks
    may have a neighbour another connection holds)."""
    port = next(p for p in range(*TEST_PORT_RANGE) if is_port_free(p) and is_port_free(p + 1))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as is_port_free probes
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield port


def quick_settings(**overrides: object) -> LlamaServerSettings:
    values: dict[str, object] = dict(
        port_range=TEST_PORT_RANGE, stop_grace=2.0, restart_delay=0.05, restart_delay_max=0.2,
        load_timeout=20.0, load_stall_timeout=5.0, crash_loop_deaths=3, crash_loop_window=10.0,
        stable_after=60.0,
    )  # fmt: skip
    values.update(overrides)
    return LlamaServerSettings(**values)  # type: ignore[arg-type]


def cpu_spec(model: str = "fake", file: str = "/models/fake.gguf", **overrides: object) -> LaunchSpec:
    values: dict[str, object] = dict(
        model=model, file=file, ctx=512, parallel=1, kv_unified=True, cache_type_k="f16",
        cache_type_v="f16", flash_attn="auto", batch=512, ubatch=512, gpu_layers=0,
    )  # fmt: skip
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def _children_of(parent: int) -> list[tuple[int, bytes]]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None and int(fields[1]) == parent:
            found.append((int(name), fields[0]))
    return found


def live_children(parent: int | None = None) -> list[int]:
    return [pid for pid, state in _children_of(parent or os.getpid()) if state not in (b"Z", b"X")]


def zombie_children(parent: int | None = None) -> list[int]:
    return [pid for pid, state in _children_of(parent or os.getpid()) if state == b"Z"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
