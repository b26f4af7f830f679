"""The supervised child with the REAL llama-server on the tiny model: ready, stopped, nothing left;
a wrapper script that forks it; its own "couldn't bind" message recognised."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import httpx
import pytest

from llama_smart_proxy.supervisor.children.child import BIND_FAILURE, Child
from llama_smart_proxy.supervisor.children.ports import PortPool
from llama_smart_proxy.supervisor.children.process_group import group_has_live_members
from llama_smart_proxy.supervisor.children.state import ChildState
from llama_smart_proxy.supervisor.children.supervise import supervise
from tests.fakes.supervision import (
    cpu_spec,
    live_children,
    pid_alive,
    quick_settings,
    taken_port,
    wrapped_pid,
    write_forking_wrapper,
)

pytestmark = [pytest.mark.anyio, pytest.mark.llama_server]

TEST_DEADLINE_S = 30.0


def real_child(binary: Path, model: Path, ports: PortPool | None = None, **settings: object) -> Child:
    config = quick_settings(**settings)
    return Child(cpu_spec(model="tiny", file=str(model)), config, binary, ports or PortPool(config.port_range))


async def test_real_llama_server_starts_becomes_ready_stops_and_leaves_no_process(
    llama_server: Path, tiny_model: Path
) -> None:
    child = real_child(llama_server, tiny_model)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()
            pid, port = child.pid, child.port
            assert pid is not None and port is not None
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
            assert child.load_seconds is not None and child.load_seconds > 0
            assert any("model loaded" in line for line in child.log_tail)
            await child.stop()
            assert child.state is ChildState.STOPPED
            assert not pid_alive(pid)
            assert not group_has_live_members(pid)
            assert pid not in live_children()
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_stop_kills_the_real_server_forked_by_a_wrapper_script(
    llama_server: Path, tiny_model: Path, tmp_path: Path
) -> None:
    wrapper = write_forking_wrapper(tmp_path, llama_server)
    child = real_child(wrapper, tiny_model)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()
            wrapper_pid, server_pid = child.pid, wrapped_pid(child.log_tail)
            assert wrapper_pid is not None and server_pid is not None and server_pid != wrapper_pid
            assert pid_alive(server_pid)
            await child.stop()
            assert not pid_alive(wrapper_pid)
            assert not pid_alive(server_pid)


async def test_the_real_servers_bind_failure_is_recognised_and_retried_on_another_port(
    llama_server: Path, tiny_model: Path
) -> None:
    with taken_port() as port:
        ports = PortPool((port, port + 20), is_free=lambda _: True)  # the probe misses the taken port
        child = real_child(llama_server, tiny_model, ports=ports, crash_loop_deaths=1)
        with anyio.fail_after(TEST_DEADLINE_S):
            async with supervise([child]):
                await child.ensure_ready()
                assert child.port == port + 1
                assert any(BIND_FAILURE in line for line in child.log_tail)
                assert child.restarts == 0 and child.last_error is None
