"""The supervised child's state table and the arithmetic of its restarts; pure, no I/O, no awaits.

Rules kept here:
- the states are an Enum and every legal move is one row of `TRANSITIONS`; anything else raises
  `IllegalTransition` naming the state and the event (supervisor/children/child.py is the only caller);
- a crash loop is s6-permafailon's rule: `deaths` deaths within `window` seconds, where the clock
  counts only time the child was ready (serving): load time and restart delays do not count, so a
  model that takes minutes to load is judged like one that takes a second;
- the restart delay doubles from `delay` to `delay_max` and starts over once the child had been
  ready `stable_after` seconds before it died; jitter only shortens it (by up to `JITTER`), so the
  configured maximum is a true maximum;
- a load has two deadlines: a stall timer reset by any progress (a log line, a change in /health)
  and a hard cap, as ollama's `OLLAMA_LOAD_TIMEOUT` does (research/perf_reliability.md §3);
- a ready child is alive while it answers its probes (`Liveness`): an idle one must answer
  GET /health, a busy one must show progress (data to a request, or an answer to GET /slots, which
  llama-server gives from its inference loop between two batches) within the stall time.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ChildState(enum.Enum):
    """A supervised child's state. Clients see it as `proxy.backends.ModelState` (which adds
    UNPLACED, for a model without a child); that type is kept apart on purpose, its docstring says why."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


class ChildEvent(enum.Enum):
    START = "start"
    """Someone wants the model up and it is stopped."""
    PORT_RETRY = "port_retry"
    """The child could not bind its port: start again at once on another, not a crash."""
    HEALTHY = "healthy"
    """The child is alive and /health answered 200."""
    DIED = "died"
    """The child exited on its own or was killed for a stalled load; a restart will follow."""
    GAVE_UP = "gave_up"
    """A death that completes a crash loop: no more spawns until reset."""
    RETRY = "retry"
    """The restart delay has passed."""
    STOP = "stop"
    """Someone wants the model down."""
    EXITED = "exited"
    """The stopping child is gone and reaped."""
    RESET = "reset"
    """Clear a crash loop."""
    REFUSED = "refused"
    """The memory ledger has no room for the start and waiting cannot make any: nothing spawned."""


S, E = ChildState, ChildEvent
TRANSITIONS: dict[tuple[ChildState, ChildEvent], ChildState] = {
    (S.STOPPED, E.START): S.STARTING,
    (S.STARTING, E.PORT_RETRY): S.STARTING,
    (S.STARTING, E.HEALTHY): S.READY,
    (S.STARTING, E.DIED): S.BACKOFF,
    (S.STARTING, E.GAVE_UP): S.FAILED,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.STARTING, E.REFUSED): S.STOPPED,
    (S.READY, E.DIED): S.BACKOFF,
    (S.READY, E.GAVE_UP): S.FAILED,
    (S.READY, E.STOP): S.STOPPING,
    (S.BACKOFF, E.RETRY): S.STARTING,
    (S.BACKOFF, E.STOP): S.STOPPED,
    (S.STOPPING, E.EXITED): S.STOPPED,
    (S.FAILED, E.RESET): S.STOPPED,
}
del S, E


class IllegalTransition(RuntimeError):
    def __init__(self, state: ChildState, event: ChildEvent):
        self.state = state
        self.event = event
        super().__init__(f"event {event.name} is not allowed in state {state.name}")


def next_state(state: ChildState, event: ChildEvent) -> ChildState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


JITTER = 0.2
"""A restart delay is shortened by up to this fraction, so children that died together spread out."""


@dataclass(frozen=True)
class RestartDecision:
    """What one death means: a crash loop, or a restart after `delay_s`."""

    crash_loop: bool
    delay_s: float
    deaths_in_window: int


@dataclass
class CrashHistory:
    """Deaths on the running clock (seconds the child was ready), and the backoff exponent."""

    deaths: int
    window_s: float
    delay_s: float
    delay_max_s: float
    stable_after_s: float
    exponent: int = 0
    _death_clock: deque[float] = field(default_factory=deque)

    def record_death(self, running_clock_s: float, ready_for_s: float, jitter: float) -> RestartDecision:
        """Count a death at `running_clock_s`; `ready_for_s` is how long this child had been ready.

        `jitter` in [0, 1) picks where in the jitter band the delay falls.
        """
        if ready_for_s >= self.stable_after_s:
            self.exponent = 0
        self._death_clock.append(running_clock_s)
        while self._death_clock and self._death_clock[0] <= running_clock_s - self.window_s:
            self._death_clock.popleft()
        in_window = len(self._death_clock)
        delay = min(self.delay_s * 2.0**self.exponent, self.delay_max_s) * (1.0 - JITTER * jitter)
        self.exponent += 1
        return RestartDecision(crash_loop=in_window >= self.deaths, delay_s=delay, deaths_in_window=in_window)

    def clear(self) -> None:
        self.exponent = 0
        self._death_clock.clear()


@dataclass
class LoadDeadline:
    """When a load has gone on too long: no progress for `stall_s`, or `cap_s` in all."""

    started: float
    stall_s: float
    cap_s: float
    last_progress: float = field(init=False)

    def __post_init__(self) -> None:
        self.last_progress = self.started

    def progress(self, now: float) -> None:
        self.last_progress = max(self.last_progress, now)

    def expired(self, now: float) -> str | None:
        """Why the load must be abandoned at `now`, or None while it may go on."""
        if now - self.started >= self.cap_s:
            return f"still loading after {self.cap_s:g} s (llama_server.load_timeout)"
        if now - self.last_progress >= self.stall_s:
            return (
                f"no progress while loading for {self.stall_s:g} s (llama_server.load_stall_timeout)"
            )
        return None


@dataclass
class Liveness:
    """Whether a ready child still works, judged from its probes and its requests' progress.

    Slow is not hung: a long prompt sends no data for minutes, but llama-server's inference loop
    still answers GET /slots between two batches. So an idle child is wedged after `failures`
    unanswered GET /health probes in a row (a stopped or deadlocked process), and a busy one is hung
    once `stall_s` pass with neither data for any of its requests nor an answer to GET /slots.
    /health alone cannot tell: llama-server answers it from an HTTP thread even while inference
    hangs. A busy child's /health misses do not count: its HTTP threads may all hold requests.
    """

    failures: int
    stall_s: float
    misses: int = 0
    last_progress: float = 0.0
    busy: bool = False

    def probed(self, now: float, *, busy: bool, answered: bool, progress_at: float = 0.0) -> str | None:
        """Record one probe's outcome at `now`; why the child must be restarted, or None.

        `busy`: requests are in flight; `progress_at`: when one of them last received data.
        """
        if busy and not self.busy:
            self.last_progress = now  # a busy period starts with a clean clock
        self.busy = busy
        self.last_progress = max(self.last_progress, progress_at)
        if answered:
            self.misses = 0
            self.last_progress = now
            return None
        if busy:
            if now - self.last_progress >= self.stall_s:
                return (
                    f"hung: it held requests with no data sent and no answer to GET /slots for "
                    f"{self.stall_s:g} s (llama_server.stall_timeout)"
                )
            return None
        self.misses += 1
        if self.misses >= self.failures:
            return (
                f"wedged: {self.misses} health probes in a row got no answer "
                f"(llama_server.health_failures)"
            )
        return None
