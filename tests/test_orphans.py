"""No llama-server outlives its supervisor, and starting and stopping leaks nothing.

The supervisor here is a separate Python process (tests/fakes/run_supervisor.py) so it can be
killed with SIGKILL, as the OOM killer or `kill -9` would, without running any cleanup of ours.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from llama_smart_proxy.supervisor.children.child import Child
from llama_smart_proxy.supervisor.children.ports import PortPool
from llama_smart_proxy.supervisor.children.supervise import supervise
from tests.fakes.supervision import (
    cpu_spec,
    open_fds,
    pid_alive,
    quick_settings,
    zombie_children,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.llama_server

REPO = Path(__file__).resolve().parent.parent


def start_supervisor(llama_server: Path, model: Path, count: int, *flags: str) -> tuple[subprocess.Popen[str], list[int]]:
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.run_supervisor", str(llama_server), str(model), str(count), *flags],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert supervisor.stdout is not None
    line = supervisor.stdout.readline()  # the supervisor prints once all are ready, or exits
    if not line:
        supervisor.wait(timeout=10)
        pytest.fail(f"the supervisor exited with {supervisor.returncode} before its children were ready")
    pids = json.loads(line)["pids"]
    assert len(pids) == count and all(pid_alive(pid) for pid in pids)
    return supervisor, pids


def test_children_of_a_supervisor_killed_with_sigkill_do_not_survive_it(llama_server: Path, tiny_model: Path) -> None:
    supervisor, pids = start_supervisor(llama_server, tiny_model, 3)
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait(timeout=10)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=5, what="every child to die")


def test_without_the_death_signal_the_children_would_survive_the_supervisor(
    llama_server: Path, tiny_model: Path
) -> None:
    """The control for the test above: it fails if PR_SET_PDEATHSIG is not what kills them."""
    supervisor, pids = start_supervisor(llama_server, tiny_model, 1, "--no-death-signal")
    try:
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(timeout=10)
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=1.0, what="the child to die")
    finally:
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)  # each child leads its own group


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_hundred_start_stop_cycles_leave_no_zombie_and_no_open_file_descriptor(
    llama_server: Path, tiny_model: Path
) -> None:
    settings = quick_settings()
    child = Child(cpu_spec(model="cycled", file=str(tiny_model)), settings, llama_server, PortPool(settings.port_range))
    pids: list[int] = []
    with anyio.fail_after(180):
        async with supervise([child]):

            async def cycle() -> None:
                await child.ensure_ready()
                assert child.pid is not None
                pids.append(child.pid)
                await child.stop()

            await cycle()  # the first start opens what the event loop keeps (its child watcher)
            baseline = open_fds()
            for _ in range(99):
                await cycle()
            assert open_fds() <= baseline
    assert len(set(pids)) == 100
    assert not [pid for pid in pids if pid_alive(pid)]
    assert zombie_children() == []
