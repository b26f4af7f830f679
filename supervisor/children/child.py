"""One supervised llama-server child: start it, wait until ready, restart it with backoff, stop it.

Rules kept here:
- `Child.run()` is the child's one owner: it spawns, watches and reaps; it runs inside a task
  group of the caller's, and when that group is cancelled it stops the child before returning;
- state changes go through `Child._transition` and the table in supervisor/children/state.py only;
  callers never move the state: they say what they want (`ensure_ready`, `stop`, `reset`) and
  wait for it (`wait_for`), so no read gates a mutation (llama-swap's rule);
- ready means alive AND GET /health answered 200, polled every `HEALTH_POLL_S`; a child that exits
  while loading fails the wait at once, its last log lines in the error; the load deadline is a
  stall timer (any log line or /health change is progress) under a hard cap;
- a death (an exit we did not ask for, or a load we abandoned) restarts after a backoff, unless it
  completes a crash loop: then the state is FAILED, nothing is spawned, and the reason is kept
  until `reset()`; "couldn't bind" from the child is a taken port: retried at once on another
  port, not a death;
- every output line goes to our log as "[model] line"; the last `LOG_TAIL_LINES` stay in memory,
  in a `LogRing` the runtime may hand over to the model's next child (a reload's successor);
- while loading, the output is read for how far the load has come (`load_progress`);
- a process is spawned only with memory reserved for it (`ChildOwner.reserve`, right before the
  spawn), held until the process is reaped; no room means no spawn (REFUSED), never a guess;
- the moment the process exits, or is judged wedged or hung (`Liveness`), the child stops taking
  requests (`accepts_requests`), before its last output is drained and the death is counted;
- a ready child is probed every `health_interval`; one judged wedged or hung is killed and goes
  down the crash path (a counted death, a restart after backoff);
- the owner may prepare a loaded child before it is ready (`after_load`, counted in the load time)
  and keep what a ready child holds before a planned stop (`before_stop`, while STOPPING, so no
  request reaches it); a death skips `before_stop`.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream, Process, TaskStatus

from llama_smart_proxy.schemas.config import LlamaServerSettings
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.supervisor.children.child_request import probe_health
from llama_smart_proxy.supervisor.children.hold import Hold, NoRoom
from llama_smart_proxy.supervisor.children.launch import build_command
from llama_smart_proxy.supervisor.children.listener import group_listens_on
from llama_smart_proxy.supervisor.children.load_progress import LoadProgress, LoadStep
from llama_smart_proxy.supervisor.children.log_ring import LogRing
from llama_smart_proxy.supervisor.children.ports import NoFreePort, PortPool
from llama_smart_proxy.supervisor.children.process_group import signal_group, spawn_in_group, stop_group
from llama_smart_proxy.supervisor.children.state import (
    ChildEvent,
    ChildState,
    CrashHistory,
    Liveness,
    LoadDeadline,
    next_state,
)

log = logging.getLogger("llama-smart-proxy.process")
output_log = logging.getLogger("llama-smart-proxy.llama-server")

HEALTH_POLL_S = 0.15  # issue 5: poll /health every 100-250 ms, not once a second
FIRST_POLL_S = 0.025
"""The first polls come sooner, doubling up to HEALTH_POLL_S: a small model is ready in tens of ms."""
HEALTH_PROBE_TIMEOUT_S = 1.0  # llama-server answers /health from its HTTP thread, even mid-load
LOG_TAIL_LINES = 300  # issue 5: "the last few hundred lines" for /status and errors
ERROR_TAIL_LINES = 15
"""Lines of the child's output quoted in an error."""
MAX_LINE_BYTES = 16 * 1024
"""A longer line is cut there, so a child printing without newlines cannot grow our memory."""
OUTPUT_DRAIN_S = 0.5
"""After the child exits, how long to wait for its last lines (the pipe closes when it exits,
unless a grandchild still holds it)."""
MAX_PORT_RETRIES = 8
"""Taken ports in a row before a start counts as a death."""
BIND_FAILURE = "couldn't bind HTTP server socket"
"""What llama-server prints when its port is taken (tools/server/server-http.cpp)."""


class ChildError(Exception):
    """A model is not available; `reason` says why in words a client may see."""

    def __init__(self, model: str, reason: str):
        self.model = model
        self.reason = reason
        super().__init__(f"model {model}: {reason}")


class ChildStartError(ChildError):
    """The start being waited for failed (the child died or stalled while loading).

    The child restarts after a backoff unless this completed a crash loop.
    """


class ChildFailed(ChildError):
    """The model is in a crash loop and will not be started until `reset()`."""


class ChildStopped(ChildError):
    """The model was stopped (or its supervisor ended) while a caller waited for it."""


class ChildRefused(ChildError):
    """The start waited for could not get its memory (`reason` names the GPUs and bytes); nothing
    was spawned, and nothing will be until someone asks again."""


class ChildOwner(Protocol):
    """What a child asks of whoever runs it: memory, whether it is busy, and who to tell of changes."""

    async def reserve(self, child: Child) -> Hold:
        """Memory for one spawn; may wait for room, raises NoRoom when there can be none."""
        ...

    def activity(self, child: Child) -> tuple[bool, float]:
        """(requests in flight now, when one last received data: anyio.current_time())."""
        ...

    def changed(self, child: Child) -> None:
        """The child's state changed, or its process exited."""
        ...

    async def after_load(self, child: Child, port: int) -> None:
        """The child answers /health but takes no request yet: prepare it (restore its prompt
        cache). Counted in the load time; the owner bounds it."""
        ...

    async def before_stop(self, child: Child, port: int) -> None:
        """The ready child is about to be stopped on purpose, never after a death: keep what it
        holds (save its prompt cache). The owner bounds it."""
        ...


class _NothingHeld:
    def release(self) -> None:
        pass


class Unowned:
    """A child on its own (tests, tools): no ledger, never busy, nobody to tell."""

    async def reserve(self, child: Child) -> Hold:
        return _NothingHeld()

    def activity(self, child: Child) -> tuple[bool, float]:
        return False, 0.0

    def changed(self, child: Child) -> None:
        pass

    async def after_load(self, child: Child, port: int) -> None:
        pass

    async def before_stop(self, child: Child, port: int) -> None:
        pass


@dataclass(frozen=True)
class ChildStatus:
    """One child as /status shows it; plain values only."""

    model: str
    state: str
    pid: int | None
    port: int | None
    restarts: int
    load_seconds: float | None
    last_error: str | None
    log_tail: tuple[str, ...]


@dataclass(frozen=True)
class _Outcome:
    """How one spawn ended: stopped on request, died, its port was taken, or no memory for it."""

    kind: Literal["stopped", "died", "port_taken", "refused"]
    reason: str = ""
    ready_for_s: float = 0.0


_STOPPED = _Outcome("stopped")


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Child:
    """One model's llama-server, supervised. Run `run()` in a task group, then ask for it.

    >>> async with anyio.create_task_group() as tg:
    ...     await tg.start(child.run)
    ...     await child.ensure_ready()
    """

    def __init__(
        self,
        spec: LaunchSpec,
        settings: LlamaServerSettings,
        binary: Path,
        ports: PortPool,
        *,
        owner: ChildOwner | None = None,
        rng: random.Random | None = None,
        log: LogRing | None = None,
    ):
        self.spec = spec
        self.settings = settings
        self.binary = binary
        self.ports = ports
        self._owner: ChildOwner = owner or Unowned()
        # a spec llama-server cannot be given fails here, where its owner can report it, and not
        # inside run(), where it would end the task group of every model
        build_command(spec, binary=binary, port=ports.first, settings=settings)
        self._rng = rng or random.Random()
        self._state = ChildState.STOPPED
        self._transitions = 0
        self._changed: anyio.Event | None = None
        self._running = False
        self._want_up = False
        self._phase: anyio.CancelScope | None = None
        self._crashes = CrashHistory(
            deaths=settings.crash_loop_deaths,
            window_s=settings.crash_loop_window,
            delay_s=settings.restart_delay,
            delay_max_s=settings.restart_delay_max,
            stable_after_s=settings.stable_after,
        )
        self._attempts = 0
        self._failed_attempt = 0
        self._refused_attempt = 0
        self._process_alive = False
        self._stops = 0
        self._restarts = 0
        self._next_delay_s = 0.0
        self._pid: int | None = None
        self._port: int | None = None
        self._last_error: str | None = None
        self._load_seconds: float | None = None
        self._ready_since: float | None = None
        self._ready_total_s = 0.0
        self._tail = log if log is not None else LogRing(LOG_TAIL_LINES)
        self._load_progress = LoadProgress()
        self._starting_since: float | None = None
        self._retry_at: float | None = None
        self._lines_seen = 0
        self._last_output = 0.0
        self._bind_failed = False

    # ---- what callers read

    @property
    def name(self) -> str:
        return self.spec.model

    @property
    def state(self) -> ChildState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def is_supervised(self) -> bool:
        """Whether `run()` owns the child now (before it starts, and after it ends, nothing may)."""
        return self._running

    @property
    def accepts_requests(self) -> bool:
        """Ready, and its process neither exited nor judged wedged: requests may go to `port`."""
        return self._state is ChildState.READY and self._process_alive

    @property
    def ready_since(self) -> float | None:
        """time.monotonic() when it last became ready; None while it is not ready."""
        return self._ready_since

    @property
    def port(self) -> int | None:
        """The port the child listens on; None when no child is running."""
        return self._port

    @property
    def restarts(self) -> int:
        """Spawns after a death (port retries and deliberate starts do not count)."""
        return self._restarts

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def load_seconds(self) -> float | None:
        """From spawn to ready, for the last load that became ready."""
        return self._load_seconds

    @property
    def log_tail(self) -> list[str]:
        return list(self._tail)

    @property
    def log(self) -> LogRing:
        """Its output lines, numbered, for readers that wait for the next one."""
        return self._tail

    @property
    def starting_since(self) -> float | None:
        """Unix time this start began (memory wait, spawn and load); None unless starting."""
        return self._starting_since if self._state is ChildState.STARTING else None

    @property
    def load_step(self) -> LoadStep | None:
        """How far the load has come, from its output; None unless starting."""
        return self._load_progress.step if self._state is ChildState.STARTING else None

    @property
    def retry_at(self) -> float | None:
        """Unix time of the next restart after a death; None unless waiting for one."""
        return self._retry_at if self._state is ChildState.BACKOFF else None

    @property
    def transitions(self) -> int:
        """How many state changes so far: wait for `transitions > n` to see the next one."""
        return self._transitions

    def status(self, tail_lines: int = 20) -> ChildStatus:
        tail = tuple(self._tail)[-tail_lines:] if tail_lines > 0 else ()
        return ChildStatus(
            model=self.name,
            state=self._state.value,
            pid=self._pid,
            port=self._port,
            restarts=self._restarts,
            load_seconds=self._load_seconds,
            last_error=self._last_error,
            log_tail=tail,
        )

    def __repr__(self) -> str:
        return (
            f"<Child {self.name} {self._state.value} pid={self._pid} port={self._port} "
            f"restarts={self._restarts}>"
        )

    # ---- what callers ask

    async def wait_for(self, predicate: Callable[[Child], bool]) -> None:
        """Return once `predicate(self)` holds, checked after every state change and output line."""
        while not predicate(self):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def ensure_ready(self) -> None:
        """Start the child if it is not up and wait until it is ready.

        Raises ChildFailed in a crash loop, ChildStartError when the start waited for fails (a
        restart follows after a backoff), ChildStopped when it is stopped meanwhile.
        """
        self._check_running()
        if self._state is ChildState.READY:
            return
        if self._state is ChildState.FAILED:
            raise ChildFailed(self.name, self._last_error or "failed")
        attempt = self.start_soon()

        def settled(child: Child) -> bool:
            return (
                child._state in (ChildState.READY, ChildState.FAILED)
                or child._failed_attempt >= attempt
                or child._refused_attempt >= attempt
                or not child._want_up
                or not child._running
            )

        await self.wait_for(settled)
        if self._state is ChildState.READY:
            return
        if self._state is ChildState.FAILED:
            raise ChildFailed(self.name, self._last_error or "failed")
        if self._refused_attempt >= attempt:
            raise ChildRefused(self.name, self._last_error or "no memory")
        if self._failed_attempt >= attempt:
            raise ChildStartError(self.name, self._last_error or "the start failed")
        raise ChildStopped(self.name, "stopped while waiting for it to become ready")

    def start_soon(self) -> int:
        """Want the child up, without waiting; returns the start attempt that will bring it up
        (the one under way, else the next), to ask `refused()` about. A FAILED child stays down."""
        self._check_running()
        attempt = self._attempts if self._state is ChildState.STARTING else self._attempts + 1
        if self._state is not ChildState.FAILED:
            self._want_up = True
            self._notify()
        return attempt

    def refused(self, attempt: int) -> str | None:
        """Why start `attempt` got no memory (nothing was spawned), or None."""
        return self._last_error if self._refused_attempt >= attempt else None

    async def stop(self) -> None:
        """Stop the child (SIGTERM, stop_grace, SIGKILL, reaped) and keep it down; idempotent."""
        self._want_up = False
        self._notify()
        if self._state in (ChildState.STOPPED, ChildState.FAILED):
            return
        stops = self._stops
        if self._phase is not None:
            self._phase.cancel()
        await self.wait_for(
            lambda c: c._stops > stops or c._state is ChildState.FAILED or not c._running
        )

    def reset(self) -> None:
        """Forget past deaths; a FAILED child becomes STOPPED and may be started again."""
        self._crashes.clear()
        if self._state is ChildState.FAILED:
            self._transition(ChildEvent.RESET)
            log.info("model %s: crash loop cleared", self.name)

    # ---- the owner

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the child until cancelled: start it when wanted, restart it, stop it at the end."""
        if self._running:
            raise RuntimeError(f"{self!r}: run() is already running")
        self._running = True
        try:
            task_status.started()
            while True:
                await self.wait_for(lambda c: c._want_up and c._state is ChildState.STOPPED)
                await self._supervise()
        finally:
            self._running = False
            self._want_up = False
            self._notify()

    def _check_running(self) -> None:
        if not self._running:
            raise RuntimeError(f"{self!r}: start run() in a task group first")

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _transition(self, event: ChildEvent) -> None:
        new = next_state(self._state, event)
        now = time.monotonic()
        if self._state is ChildState.READY and self._ready_since is not None:
            self._ready_total_s += now - self._ready_since
            self._ready_since = None
        if new is ChildState.READY:
            self._ready_since = now
        if new is ChildState.STOPPED:
            self._stops += 1
        if new is ChildState.STARTING and self._state is not ChildState.STARTING:
            self._starting_since = time.time()
        log.debug("model %s: %s --%s--> %s", self.name, self._state.value, event.value, new.value)
        self._state = new
        self._transitions += 1
        self._notify()
        self._owner.changed(self)

    def _running_clock(self) -> float:
        """Seconds this child has been ready, over all its lives: the crash-loop clock."""
        current = time.monotonic() - self._ready_since if self._ready_since is not None else 0.0
        return self._ready_total_s + current

    async def _supervise(self) -> None:
        """From STOPPED (wanted up) until STOPPED again or FAILED."""
        self._attempts += 1
        self._transition(ChildEvent.START)
        port_retries = 0
        try:
            while True:
                outcome = await self._spawn_and_watch()
                if outcome.kind == "stopped":
                    return
                if outcome.kind == "refused":
                    self._want_up = False
                    self._refused_attempt = self._attempts
                    self._last_error = outcome.reason
                    log.warning("model %s: not started: %s", self.name, outcome.reason)
                    self._transition(ChildEvent.REFUSED)
                    return
                if outcome.kind == "port_taken" and port_retries < MAX_PORT_RETRIES:
                    port_retries += 1
                    log.warning("model %s: %s; retrying on another port", self.name, outcome.reason)
                    self._transition(ChildEvent.PORT_RETRY)
                    continue
                port_retries = 0
                if not self._after_death(outcome):
                    return
                with anyio.CancelScope() as backoff:
                    self._phase = backoff
                    if not self._want_up:
                        backoff.cancel()
                    await anyio.sleep(self._next_delay_s)
                self._phase = None
                if not self._want_up:
                    self._transition(ChildEvent.STOP)
                    return
                self._attempts += 1
                self._restarts += 1
                self._transition(ChildEvent.RETRY)
        finally:
            self._phase = None
            if self._state is ChildState.BACKOFF:  # cancelled from outside while waiting
                self._transition(ChildEvent.STOP)

    def _after_death(self, outcome: _Outcome) -> bool:
        """Count a death; False when it completes a crash loop (the child is FAILED then)."""
        decision = self._crashes.record_death(
            self._running_clock(), outcome.ready_for_s, self._rng.random()
        )
        if self._state is ChildState.STARTING:
            self._failed_attempt = self._attempts
        if decision.crash_loop:
            self._want_up = False
            self._last_error = (
                f"crash loop: {decision.deaths_in_window} deaths within "
                f"{self.settings.crash_loop_window:g} s of running time; not restarted until "
                f"reset. Last: {outcome.reason}"
            )
            log.error("model %s: %s", self.name, self._last_error)
            self._transition(ChildEvent.GAVE_UP)
            return False
        self._last_error = outcome.reason
        self._next_delay_s = decision.delay_s
        self._retry_at = time.time() + decision.delay_s
        log.warning(
            "model %s: %s; restarting in %.3g s", self.name, outcome.reason, decision.delay_s
        )
        self._transition(ChildEvent.DIED)
        return True

    async def _spawn_and_watch(self) -> _Outcome:
        """One child process from its memory reservation to reaped; the state is STARTING on entry.

        The reservation is taken before the spawn and released only after the reap."""
        hold: Hold | None = None
        try:
            with anyio.CancelScope() as phase:
                self._phase = phase
                if not self._want_up:
                    phase.cancel()
                try:
                    hold = await self._owner.reserve(self)
                except NoRoom as exc:
                    return _Outcome("refused", exc.reason)
                finally:
                    self._phase = None
            if hold is None:  # stopped while it waited for memory: nothing was spawned
                self._transition(ChildEvent.STOP)
                self._transition(ChildEvent.EXITED)
                return _STOPPED
            return await self._spawn_holding()
        except BaseException:
            if self._state is ChildState.STARTING:  # cancelled from outside before any spawn
                self._transition(ChildEvent.STOP)
                self._transition(ChildEvent.EXITED)
            raise
        finally:
            if hold is not None:
                hold.release()

    async def _spawn_holding(self) -> _Outcome:
        """One child process from spawn to reaped, its memory already reserved."""
        try:
            port = self.ports.acquire()
        except NoFreePort as exc:
            return _Outcome("died", str(exc))
        command = build_command(self.spec, binary=self.binary, port=port, settings=self.settings)
        if self.spec.slot_save_path is not None:
            # llama-server refuses to start when --slot-save-path is not a directory (build 11434)
            try:
                await anyio.to_thread.run_sync(partial(os.makedirs, self.spec.slot_save_path, exist_ok=True))
            except OSError as exc:
                self.ports.release(port)
                return _Outcome("died", f"cannot create its --slot-save-path (prompt_cache.dir): {exc}")
        self._bind_failed = False
        self._load_progress = LoadProgress()
        first_line = self._lines_seen
        started = time.monotonic()
        try:
            process = await spawn_in_group(command)
        except OSError as exc:
            self.ports.release(port)
            return _Outcome("died", f"cannot start {self.binary}: {exc}")
        self._pid, self._port = process.pid, port
        self._process_alive = True
        log.info(
            "model %s: started pid %d on port %d (CUDA_VISIBLE_DEVICES=%r): %s",
            self.name, process.pid, port, command.env["CUDA_VISIBLE_DEVICES"], shlex.join(command.argv),
        )  # fmt: skip
        exited = anyio.Event()
        output_done = anyio.Event()
        outcome: _Outcome | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_output, process.stdout, output_done)
                tg.start_soon(self._watch_exit, process, exited)
                try:
                    with anyio.CancelScope() as phase:
                        self._phase = phase
                        if not self._want_up:
                            phase.cancel()
                        outcome = await self._load(process, port, started, exited, output_done, first_line)
                        if outcome is None:
                            outcome = await self._serve(process, port, started, exited, output_done, first_line)
                    if phase.cancelled_caught:
                        outcome = None  # a stop: whatever the child did meanwhile is no death
                except BaseException:
                    outcome = None  # cancelled from outside: the child is stopped, not dead
                    raise
                finally:
                    self._phase = None
                    with anyio.CancelScope(shield=True):
                        if outcome is None and self._state in (ChildState.STARTING, ChildState.READY):
                            planned = self._state is ChildState.READY and not exited.is_set()
                            self._transition(ChildEvent.STOP)  # no request reaches it from here
                            if planned:
                                await self._call_owner(self._owner.before_stop, port)
                        await stop_group(process, self.settings.stop_grace)
                        with anyio.move_on_after(OUTPUT_DRAIN_S):
                            await output_done.wait()
                        tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await process.aclose()
            self.ports.release(port)
            self._pid = self._port = None
            self._process_alive = False
            if self._state is ChildState.STOPPING:
                self._transition(ChildEvent.EXITED)
        return outcome or _STOPPED

    async def _load(
        self,
        process: Process,
        port: int,
        started: float,
        exited: anyio.Event,
        output_done: anyio.Event,
        first_line: int,
    ) -> _Outcome | None:
        """Wait until /health answers 200 (None), or say why the load ended otherwise."""
        deadline = LoadDeadline(started, self.settings.load_stall_timeout, self.settings.load_timeout)
        last_status: int | None = None
        foreign_answer_logged = False
        interval = FIRST_POLL_S
        while True:
            if exited.is_set():
                await self._await_last_output(output_done)
                if self._bind_failed:
                    return _Outcome("port_taken", f"port {port} is taken (llama-server: {BIND_FAILURE})")
                return _Outcome(
                    "died",
                    f"llama-server {describe_exit(process.returncode)} while loading"
                    + self._quote_output(first_line),
                )
            status = await self._probe_unless_exited(port, exited)
            # a 200 from a port our child failed to bind comes from some other program
            if status == 200 and not exited.is_set() and not self._bind_failed:
                if await anyio.to_thread.run_sync(group_listens_on, process.pid, port) is not False:
                    return None
                if not foreign_answer_logged:
                    foreign_answer_logged = True
                    log.warning("model %s: another program answers on port %d; waiting for llama-server", self.name, port)
            now = time.monotonic()
            if status != last_status:
                deadline.progress(now)
                last_status = status
            deadline.progress(self._last_output)
            reason = deadline.expired(now)
            if reason is not None and not exited.is_set():
                return _Outcome("died", reason + self._quote_output(first_line))
            with anyio.move_on_after(interval):
                await exited.wait()
            interval = min(interval * 2, HEALTH_POLL_S)

    async def _serve(
        self,
        process: Process,
        port: int,
        started: float,
        exited: anyio.Event,
        output_done: anyio.Event,
        first_line: int,
    ) -> _Outcome:
        """Ready until the child exits on its own, or is killed for failing its liveness probes."""
        await self._call_owner(self._owner.after_load, port)
        self._load_seconds = time.monotonic() - started
        self._transition(ChildEvent.HEALTHY)
        log.info("model %s: ready in %.1f s on port %d", self.name, self._load_seconds, self._port)
        wedged = await self._watch_liveness(port, exited)
        if wedged is not None:
            self._process_alive = False
            self._owner.changed(self)
            log.error("model %s: %s; killing it", self.name, wedged)
            signal_group(process.pid, signal.SIGKILL)  # a stopped process would not act on SIGTERM
            await exited.wait()
        ready_for = time.monotonic() - (self._ready_since or started)
        await self._await_last_output(output_done)
        reason = wedged or f"llama-server {describe_exit(process.returncode)} while serving"
        return _Outcome("died", reason + self._quote_output(first_line), ready_for_s=ready_for)

    async def _watch_liveness(self, port: int, exited: anyio.Event) -> str | None:
        """Probe the ready child until it exits (None) or is judged wedged or hung (why)."""
        settings = self.settings
        liveness = Liveness(failures=settings.health_failures, stall_s=settings.stall_timeout)
        failure: str | None = None
        async with anyio.create_task_group() as race:

            async def probe_forever() -> None:
                nonlocal failure
                while failure is None:
                    await anyio.sleep(settings.health_interval)
                    busy, progress_at = self._owner.activity(self)
                    # /slots is answered by the inference loop, /health by an HTTP thread
                    path = "/slots" if busy else "/health"
                    status = await probe_health(port, path=path, timeout_s=settings.health_timeout)
                    failure = liveness.probed(
                        anyio.current_time(), busy=busy, answered=status is not None, progress_at=progress_at
                    )
                race.cancel_scope.cancel()

            race.start_soon(probe_forever)
            await exited.wait()
            race.cancel_scope.cancel()
        return failure

    async def _call_owner(self, hook: Callable[[Child, int], Awaitable[None]], port: int) -> None:
        """An owner's hook never ends supervision: a bug there is logged, and the start or stop goes on."""
        try:
            await hook(self, port)
        except Exception:
            log.exception("model %s: %s failed", self.name, hook.__name__)

    async def _probe_unless_exited(self, port: int, exited: anyio.Event) -> int | None:
        """Probe /health, but give up the moment the child exits: a port taken by another program
        may accept the probe and never answer it."""
        status: int | None = None
        async with anyio.create_task_group() as race:

            async def probe() -> None:
                nonlocal status
                status = await probe_health(port, timeout_s=HEALTH_PROBE_TIMEOUT_S)
                race.cancel_scope.cancel()

            race.start_soon(probe)
            await exited.wait()
            race.cancel_scope.cancel()
        return status

    async def _watch_exit(self, process: Process, exited: anyio.Event) -> None:
        await process.wait()
        self._process_alive = False  # before its output is drained: take no request meanwhile
        exited.set()
        self._notify()
        self._owner.changed(self)

    async def _await_last_output(self, output_done: anyio.Event) -> None:
        """The child has exited: wait a moment for its last output lines (OUTPUT_DRAIN_S)."""
        with anyio.move_on_after(OUTPUT_DRAIN_S):
            await output_done.wait()

    async def _read_output(self, stream: ByteReceiveStream | None, done: anyio.Event) -> None:
        pending = b""
        try:
            if stream is None:
                return
            while True:
                try:
                    pending += await stream.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    break
                # any byte is load progress: llama.cpp prints its loading dots without a newline
                self._last_output = time.monotonic()
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._on_line(line)
                self._load_progress.feed_partial(pending)
                while len(pending) > MAX_LINE_BYTES:
                    self._on_line(pending[:MAX_LINE_BYTES])
                    pending = pending[MAX_LINE_BYTES:]
            if pending:
                self._on_line(pending)
        finally:
            done.set()

    def _on_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._tail.append(line)
        self._load_progress.feed_line(line)
        self._lines_seen += 1
        if BIND_FAILURE in line:
            self._bind_failed = True
        output_log.info("[%s] %s", self.name, line)
        self._notify()

    def _quote_output(self, first_line: int) -> str:
        """The last lines this spawn printed, for an error message."""
        count = min(self._lines_seen - first_line, ERROR_TAIL_LINES, len(self._tail))
        if count <= 0:
            return " (it printed nothing)"
        lines = list(self._tail)[-count:]
        return "; last output:\n" + "\n".join(f"  {line}" for line in lines)
