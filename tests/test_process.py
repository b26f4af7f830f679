"""One supervised child against the FAKE llama-server's faults: restart, crash loop, stalled load,
SIGTERM ignored, taken ports, a death while loading, and what callers see meanwhile.

Real processes and sockets throughout; the fake is used only for faults the real llama-server will
not produce on demand (tests/test_process_real.py runs the real one).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from llama_smart_proxy.supervisor.child_state import ChildState
from llama_smart_proxy.supervisor.children import supervise
from llama_smart_proxy.supervisor.listener import group_listens_on
from llama_smart_proxy.supervisor.ports import PortPool, is_port_free
from llama_smart_proxy.supervisor.process import (
    BIND_FAILURE,
    HEALTH_POLL_S,
    Child,
    ChildFailed,
    ChildStartError,
    ChildStopped,
)
from tests.fakes.supervision import (
    TEST_PORT_RANGE,
    cpu_spec,
    pid_alive,
    quick_settings,
    taken_port,
    wrapped_pid,
    write_fake_llama_server,
    write_forking_wrapper,
)

pytestmark = pytest.mark.anyio

TEST_DEADLINE_S = 20.0
"""No test here should come near this; it turns a hang into a failure."""


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_llama_server(tmp_path_factory.mktemp("fake"))


def fake_child(fake_server: Path, *, env: dict[str, str] | None = None, ports: PortPool | None = None,
               binary: Path | None = None, **settings: object) -> Child:  # fmt: skip
    config = quick_settings(**settings)
    return Child(
        cpu_spec(env=env or {}), config, binary or fake_server, ports or PortPool(config.port_range)
    )


@contextlib.contextmanager
def foreign_health_server() -> Iterator[tuple[int, list[str]]]:
    """Another program's HTTP server, answering 200 to any GET, on a test port whose next port is
    free; yields the port and the paths it was asked for."""
    asked: list[str] = []

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    port = next(p for p in range(*TEST_PORT_RANGE) if is_port_free(p) and is_port_free(p + 1))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port, asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


async def test_a_child_killed_while_idle_is_restarted_and_ready_again(fake_server: Path) -> None:
    child = fake_child(fake_server)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()
            first_pid = child.pid
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)
            await child.wait_for(lambda c: c.state is ChildState.READY and c.pid != first_pid)
            assert child.restarts == 1
            assert "killed by SIGKILL while serving" in (child.last_error or "")
            assert not pid_alive(first_pid)
            await child.ensure_ready()  # ready again: returns at once


async def test_a_child_that_exits_at_once_every_time_ends_in_a_crash_loop_and_is_not_spawned_again(
    fake_server: Path,
) -> None:
    child = fake_child(fake_server, env={"FAKE_LLAMA_EXIT_CODE": "3"}, crash_loop_deaths=3)
    failure_line = "error: FAKE failure at start"
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            errors: list[Exception] = []
            while True:
                try:
                    await child.ensure_ready()
                except ChildStartError as exc:
                    errors.append(exc)
                except ChildFailed as exc:
                    errors.append(exc)
                    break
            assert [type(e) for e in errors] == [ChildStartError, ChildStartError, ChildFailed]
            assert "exited with code 3 while loading" in str(errors[0])
            assert failure_line in str(errors[0])  # the child's last lines are in the error
            reason = str(errors[-1])
            assert "crash loop: 3 deaths" in reason and failure_line in reason

            spawned = child.log_tail.count(failure_line)
            assert spawned == 3
            # nothing is spawned any more, however long we wait (here 5 times the longest delay)
            await anyio.sleep(5 * child.settings.restart_delay_max)
            assert child.log_tail.count(failure_line) == 3
            snapshot = child.snapshot()
            assert snapshot.state == "failed" and "crash loop" in (snapshot.last_error or "")
            with pytest.raises(ChildFailed, match="crash loop"):
                await child.ensure_ready()

            child.reset()  # clears it: the next ensure_ready spawns again
            assert child.state is ChildState.STOPPED
            with pytest.raises(ChildStartError):
                await child.ensure_ready()
            assert child.log_tail.count(failure_line) == 4


async def test_a_child_that_never_becomes_healthy_hits_the_stall_deadline_and_its_whole_group_is_killed(
    fake_server: Path, tmp_path: Path
) -> None:
    wrapper = write_forking_wrapper(tmp_path, fake_server)  # a grandchild proves the group is killed
    child = fake_child(
        fake_server,
        binary=wrapper,
        env={"FAKE_LLAMA_NEVER_READY": "1", "FAKE_LLAMA_SILENT_LOAD": "1"},
        load_stall_timeout=0.6,
    )
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            spawned: list[int] = []

            async def note_wrapper_pid() -> None:
                await child.wait_for(lambda c: c.pid is not None)
                spawned.append(child.pid)  # type: ignore[arg-type]

            async with anyio.create_task_group() as tg:
                tg.start_soon(note_wrapper_pid)
                started = time.monotonic()
                with pytest.raises(ChildStartError, match="no progress while loading for 0.6 s") as caught:
                    await child.ensure_ready()
                waited = time.monotonic() - started
            grandchild = wrapped_pid(child.log_tail)
            assert spawned and grandchild is not None
            assert 0.6 <= waited < 0.6 + 1.0, waited
            assert "load_stall_timeout" in str(caught.value)
            assert not pid_alive(spawned[0]) and not pid_alive(grandchild)
            assert child.state in (ChildState.BACKOFF, ChildState.STARTING)


async def test_a_load_that_shows_progress_forever_hits_the_hard_cap(fake_server: Path) -> None:
    # the fake prints a progress line every 100 ms: the stall timer never fires, the cap does
    child = fake_child(
        fake_server, env={"FAKE_LLAMA_NEVER_READY": "1"}, load_stall_timeout=0.5, load_timeout=1.5
    )
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            started = time.monotonic()
            with pytest.raises(ChildStartError, match="still loading after 1.5 s"):
                await child.ensure_ready()
            assert 1.5 <= time.monotonic() - started < 2.5


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(fake_server: Path) -> None:
    grace = 1.0
    child = fake_child(fake_server, env={"FAKE_LLAMA_IGNORE_SIGTERM": "1"}, stop_grace=grace)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()
            pid = child.pid
            assert pid is not None
            started = time.monotonic()
            await child.stop()
            took = time.monotonic() - started
            assert grace <= took < grace + 1.0, took
            assert not pid_alive(pid)
            assert child.state is ChildState.STOPPED and child.pid is None


async def test_a_port_in_use_is_skipped_without_a_start(fake_server: Path) -> None:
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        child = fake_child(fake_server, port_range=(port, port + 20))
        with anyio.fail_after(TEST_DEADLINE_S):
            async with supervise([child]):
                await child.ensure_ready()
                assert child.port is not None and child.port != port
                assert child.restarts == 0 and child.last_error is None


async def test_a_child_that_cannot_bind_its_port_is_retried_on_another_and_no_death_is_counted(
    fake_server: Path,
) -> None:
    with taken_port() as port:
        # the probe is told every port is free, so the child itself meets the taken port,
        # as when another program binds it between our probe and the child's bind
        ports = PortPool((port, port + 20), is_free=lambda _: True)
        # a single death would be a crash loop: the retry must not count as one
        child = fake_child(fake_server, ports=ports, crash_loop_deaths=1)
        with anyio.fail_after(TEST_DEADLINE_S):
            async with supervise([child]):
                await child.ensure_ready()
                assert child.port == port + 1
                assert any(BIND_FAILURE in line and f"port: {port}" in line for line in child.log_tail)
                assert child.restarts == 0 and child.last_error is None
                assert child.state is ChildState.READY


async def test_another_programs_answer_on_the_childs_port_is_never_taken_for_the_child_being_ready(
    fake_server: Path,
) -> None:
    # bug: another program that took the port between the pool's probe and the child's bind
    # answered /health 200 before the child's "couldn't bind" line was read: the child was declared
    # ready on that port and requests went to the other program
    with foreign_health_server() as (port, probed):
        ports = PortPool((port, port + 20), is_free=lambda _: True)  # the probe misses it
        child = fake_child(fake_server, ports=ports, env={"FAKE_LLAMA_BIND_DELAY_S": "0.5"}, crash_loop_deaths=1)
        with anyio.fail_after(TEST_DEADLINE_S):
            async with supervise([child]):
                await child.ensure_ready()
                assert probed, "the other program was never asked: the test did not meet the race"
                # the next free port, or a later one where other programs hold those between
                assert child.port is not None and child.port > port
                assert child.pid is not None and group_listens_on(child.pid, child.port)
                assert child.restarts == 0 and child.last_error is None


async def test_a_child_dying_while_loading_fails_the_wait_within_one_poll_with_its_last_lines(
    fake_server: Path,
) -> None:
    child = fake_child(fake_server, env={"FAKE_LLAMA_LOAD_S": "30"}, load_stall_timeout=30.0)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            killed_at = 0.0

            async def kill_while_loading() -> None:
                nonlocal killed_at
                await child.wait_for(lambda c: any("loading tensors" in line for line in c.log_tail))
                assert child.pid is not None
                killed_at = time.monotonic()
                os.kill(child.pid, signal.SIGKILL)

            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_while_loading)
                with pytest.raises(ChildStartError) as caught:
                    await child.ensure_ready()
                noticed_after = time.monotonic() - killed_at
            assert noticed_after < HEALTH_POLL_S + 0.5, noticed_after
            message = str(caught.value)
            assert "killed by SIGKILL while loading" in message
            assert "loading tensors ... (FAKE)" in message


async def test_callers_waiting_together_share_one_start(fake_server: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    child = fake_child(fake_server, env={"FAKE_LLAMA_LOAD_S": "0.3", "FAKE_LLAMA_EVENTS": str(events)})
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(child.ensure_ready)
            starts = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "start"]
            assert len(starts) == 1 and starts[0]["pid"] == child.pid


async def test_a_stop_during_loading_releases_waiters_and_counts_no_death(fake_server: Path) -> None:
    child = fake_child(fake_server, env={"FAKE_LLAMA_LOAD_S": "30"}, crash_loop_deaths=1)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            async with anyio.create_task_group() as tg:

                async def stop_once_spawned() -> None:
                    await child.wait_for(lambda c: c.pid is not None)
                    await child.stop()

                tg.start_soon(stop_once_spawned)
                with pytest.raises(ChildStopped):
                    await child.ensure_ready()
            # no death was counted (with crash_loop_deaths=1 one would have made it FAILED)
            assert child.state is ChildState.STOPPED and child.last_error is None


async def test_leaving_the_supervision_block_stops_and_reaps_the_child(fake_server: Path) -> None:
    child = fake_child(fake_server)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()
            pid = child.pid
        assert pid is not None and not pid_alive(pid)
        assert child.state is ChildState.STOPPED
        with pytest.raises(RuntimeError, match="run"):
            await child.ensure_ready()


async def test_waiters_see_every_state_change_through_transitions(fake_server: Path) -> None:
    child = fake_child(fake_server)
    seen: list[str] = []
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):

            async def watch() -> None:
                while True:
                    count = child.transitions
                    await child.wait_for(lambda c: c.transitions > count)
                    seen.append(child.state.value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await child.ensure_ready()
                await child.stop()
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
    assert seen == ["starting", "ready", "stopping", "stopped"]


def test_a_spec_llama_server_cannot_be_given_is_refused_when_the_child_is_made(fake_server: Path) -> None:
    config = quick_settings()
    bad = cpu_spec(devices=["a", "b"], tensor_split=[1.0])
    with pytest.raises(ValueError, match="1 fractions for 2 devices"):
        Child(bad, config, fake_server, PortPool(config.port_range))


async def test_a_forked_grandchild_ignoring_sigterm_is_killed_after_the_grace_period(
    fake_server: Path, tmp_path: Path
) -> None:
    # the wrapper dies of SIGTERM at once; what it forked ignores SIGTERM and must still go
    grace = 1.0
    wrapper = write_forking_wrapper(tmp_path, fake_server)
    child = fake_child(fake_server, binary=wrapper, env={"FAKE_LLAMA_IGNORE_SIGTERM": "1"}, stop_grace=grace)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()
            grandchild = wrapped_pid(child.log_tail)
            assert grandchild is not None and pid_alive(grandchild)
            started = time.monotonic()
            await child.stop()
            took = time.monotonic() - started
            assert grace <= took < grace + 1.0, took
            assert not pid_alive(grandchild)


async def test_progress_printed_without_newlines_keeps_a_slow_load_alive(fake_server: Path) -> None:
    child = fake_child(fake_server, env={"FAKE_LLAMA_LOAD_S": "1.5", "FAKE_LLAMA_DOTS": "1"}, load_stall_timeout=0.6)
    with anyio.fail_after(TEST_DEADLINE_S):
        async with supervise([child]):
            await child.ensure_ready()  # 1.5 s of loading dots, never 0.6 s of silence
            assert child.restarts == 0 and child.last_error is None
            await child.stop()  # the dots end no line until the child's output ends
            assert any(line.startswith("..........") for line in child.log_tail)
