"""Several children under one `supervise()` block, as `serve` runs them (FAKE llama-server)."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from llama_smart_proxy.supervisor.children.child import Child, ChildStartError
from llama_smart_proxy.supervisor.children.ports import PortPool
from llama_smart_proxy.supervisor.children.state import ChildState
from llama_smart_proxy.supervisor.children.supervise import supervise
from tests.fakes.supervision import cpu_spec, pid_alive, quick_settings, write_fake_llama_server

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_llama_server(tmp_path_factory.mktemp("fake"))


def children_loading_for(fake_server: Path, load_s: dict[str, float], **settings: object) -> list[Child]:
    config = quick_settings(**settings)
    ports = PortPool(config.port_range)
    return [
        Child(cpu_spec(model=name, env={"FAKE_LLAMA_LOAD_S": str(seconds)}), config, fake_server, ports)
        for name, seconds in load_s.items()
    ]


async def test_models_start_concurrently_and_are_announced_as_each_becomes_ready(fake_server: Path) -> None:
    loads = {"slow": 1.2, "medium": 0.8, "fast": 0.4}
    children = children_loading_for(fake_server, loads)
    announced: list[tuple[str, float]] = []
    with anyio.fail_after(20):
        async with supervise(children) as running:
            started = time.monotonic()
            results = await running.start_all(
                on_ready=lambda child: announced.append((child.name, child.load_seconds or 0.0))
            )
            took = time.monotonic() - started
            assert results == {"slow": None, "medium": None, "fast": None}
            assert [name for name, _ in announced] == ["fast", "medium", "slow"]
            for name, load_seconds in announced:
                assert load_seconds >= loads[name]
            assert took < sum(loads.values())  # one after another would take at least the sum
            assert len({child.port for child in children}) == 3
            pids = [child.pid for child in children]
        # leaving the block stopped and reaped every one
        assert all(pid is not None and not pid_alive(pid) for pid in pids)
        assert all(child.state is ChildState.STOPPED for child in children)


async def test_a_model_that_fails_to_start_is_reported_and_the_others_serve(fake_server: Path) -> None:
    config = quick_settings()
    ports = PortPool(config.port_range)
    good = Child(cpu_spec(model="good"), config, fake_server, ports)
    bad = Child(cpu_spec(model="bad", env={"FAKE_LLAMA_EXIT_CODE": "7"}), config, fake_server, ports)
    with anyio.fail_after(20):
        async with supervise([good, bad]) as running:
            results = await running.start_all()
            assert results["good"] is None
            assert isinstance(results["bad"], ChildStartError)
            assert "exited with code 7" in str(results["bad"])
            assert good.state is ChildState.READY


async def test_stopping_all_is_concurrent_so_it_takes_one_grace_period_not_one_each(fake_server: Path) -> None:
    grace = 1.0
    config = quick_settings(stop_grace=grace)
    ports = PortPool(config.port_range)
    stubborn = [
        Child(cpu_spec(model=f"stubborn{i}", env={"FAKE_LLAMA_IGNORE_SIGTERM": "1"}), config, fake_server, ports)
        for i in range(3)
    ]
    with anyio.fail_after(20):
        async with supervise(stubborn) as running:
            await running.start_all()
            pids = [child.pid for child in stubborn]
            started = time.monotonic()
        took = time.monotonic() - started
    assert grace <= took < grace + 1.0, took
    assert all(pid is not None and not pid_alive(pid) for pid in pids)


async def test_a_model_removed_at_runtime_is_stopped_and_no_longer_supervised(fake_server: Path) -> None:
    first, second = children_loading_for(fake_server, {"first": 0.0, "second": 0.0})
    with anyio.fail_after(20):
        async with supervise([first]) as running:
            await running.add(second)
            await running.start_all()
            pid = second.pid
            await running.remove("second")
            assert "second" not in running and len(running) == 1
            assert pid is not None and not pid_alive(pid)
            assert first.state is ChildState.READY
            with pytest.raises(ValueError, match="already supervised"):
                await running.add(first)
