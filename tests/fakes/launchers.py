"""Executables the supervisor tests start as if they were llama-server.

- `write_fake_llama_server`: the FAKE llama-server (fake_llama_server.py) as one executable that
  runs under this interpreter (its shebang would find whatever `python3` is on PATH);
- `write_forking_wrapper`: a shell wrapper that FORKS its target instead of exec'ing it, as many
  users' launch scripts do; it prints the forked pid, so a test can check that a stop reached it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

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
