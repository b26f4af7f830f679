"""The child's state table, crash-loop clock, backoff and load deadline, driven directly (no I/O)."""

from __future__ import annotations

import pytest

from llama_smart_proxy.supervisor.children.state import (
    JITTER,
    TRANSITIONS,
    ChildEvent,
    ChildState,
    CrashHistory,
    IllegalTransition,
    Liveness,
    LoadDeadline,
    next_state,
)

S, E = ChildState, ChildEvent


def test_a_start_that_becomes_healthy_then_stops_walks_the_documented_states() -> None:
    state = S.STOPPED
    walk = [state]
    for event in (E.START, E.PORT_RETRY, E.HEALTHY, E.STOP, E.EXITED):
        state = next_state(state, event)
        walk.append(state)
    assert walk == [S.STOPPED, S.STARTING, S.STARTING, S.READY, S.STOPPING, S.STOPPED]


def test_a_death_goes_to_backoff_and_a_crash_loop_to_failed_which_only_reset_leaves() -> None:
    assert next_state(S.READY, E.DIED) is S.BACKOFF
    assert next_state(S.STARTING, E.DIED) is S.BACKOFF
    assert next_state(S.BACKOFF, E.RETRY) is S.STARTING
    assert next_state(S.BACKOFF, E.STOP) is S.STOPPED
    assert next_state(S.STARTING, E.GAVE_UP) is S.FAILED
    leaving_failed = {event for (state, event) in TRANSITIONS if state is S.FAILED}
    assert leaving_failed == {E.RESET}
    assert next_state(S.FAILED, E.RESET) is S.STOPPED


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.STOPPED, E.HEALTHY), (S.READY, E.START), (S.FAILED, E.START), (S.STOPPING, E.HEALTHY),
     (S.BACKOFF, E.HEALTHY), (S.STOPPED, E.RESET)],  # fmt: skip
)
def test_an_illegal_move_raises_naming_the_state_and_the_event(state: ChildState, event: ChildEvent) -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_state(state, event)
    assert state.name in str(caught.value) and event.name in str(caught.value)


def test_every_state_is_reachable_from_stopped() -> None:
    reached, frontier = {S.STOPPED}, [S.STOPPED]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(ChildState)


def history(**overrides: float) -> CrashHistory:
    values = dict(deaths=5, window_s=10.0, delay_s=1.0, delay_max_s=60.0, stable_after_s=60.0)
    values.update(overrides)
    return CrashHistory(**values)  # type: ignore[arg-type]


def test_five_deaths_while_loading_are_a_crash_loop_however_long_the_loads_took() -> None:
    crashes = history()
    # the running clock stands still while a child loads: deaths before ready all land at 0
    verdicts = [crashes.record_death(running_clock_s=0.0, ready_for_s=0.0, jitter=0.0) for _ in range(5)]
    assert [v.crash_loop for v in verdicts] == [False, False, False, False, True]
    assert verdicts[-1].deaths_in_window == 5


def test_deaths_spread_over_more_running_time_than_the_window_are_no_crash_loop() -> None:
    crashes = history()
    verdicts = [crashes.record_death(running_clock_s=t * 3.0, ready_for_s=3.0, jitter=0.0) for t in range(10)]
    assert not any(v.crash_loop for v in verdicts)
    assert max(v.deaths_in_window for v in verdicts) == 4  # deaths at t-9, t-6, t-3, t


def test_restart_delay_doubles_up_to_the_maximum_and_jitter_only_shortens_it() -> None:
    crashes = history(deaths=100, delay_s=1.0, delay_max_s=10.0)
    delays = [crashes.record_death(0.0, 0.0, jitter=0.0).delay_s for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    jittered = crashes.record_death(0.0, 0.0, jitter=0.999).delay_s
    assert 10.0 * (1 - JITTER) <= jittered < 10.0


def test_a_child_ready_for_stable_after_restarts_from_the_first_delay() -> None:
    crashes = history(deaths=100, stable_after_s=30.0)
    for _ in range(4):
        crashes.record_death(0.0, 0.0, jitter=0.0)
    assert crashes.record_death(0.0, ready_for_s=29.0, jitter=0.0).delay_s == 16.0
    assert crashes.record_death(0.0, ready_for_s=30.0, jitter=0.0).delay_s == 1.0


def test_clear_forgets_deaths_and_backoff() -> None:
    crashes = history(deaths=2)
    crashes.record_death(0.0, 0.0, jitter=0.0)
    crashes.record_death(0.0, 0.0, jitter=0.0)
    crashes.clear()
    verdict = crashes.record_death(0.0, 0.0, jitter=0.0)
    assert not verdict.crash_loop and verdict.delay_s == 1.0


def test_load_deadline_is_a_stall_timer_reset_by_progress_under_a_hard_cap() -> None:
    deadline = LoadDeadline(started=100.0, stall_s=5.0, cap_s=20.0)
    assert deadline.expired(104.9) is None
    assert "load_stall_timeout" in (deadline.expired(105.0) or "")
    for t in range(104, 116, 4):
        deadline.progress(float(t))
        assert deadline.expired(t + 4.9) is None
    assert "load_timeout" in (deadline.expired(120.0) or "")


def test_progress_from_the_past_does_not_move_the_stall_timer_back() -> None:
    deadline = LoadDeadline(started=100.0, stall_s=5.0, cap_s=60.0)
    deadline.progress(103.0)
    deadline.progress(90.0)  # a log line from an earlier spawn
    assert deadline.last_progress == 103.0


def test_an_idle_child_is_wedged_after_the_configured_misses_in_a_row() -> None:
    liveness = Liveness(failures=3, stall_s=60.0)
    assert liveness.probed(1.0, busy=False, answered=False) is None
    assert liveness.probed(2.0, busy=False, answered=False) is None
    assert liveness.probed(3.0, busy=False, answered=True) is None  # an answer clears the count
    assert liveness.probed(4.0, busy=False, answered=False) is None
    assert liveness.probed(5.0, busy=False, answered=False) is None
    reason = liveness.probed(6.0, busy=False, answered=False)
    assert reason is not None and "wedged" in reason and "health_failures" in reason


def test_a_busy_child_that_answers_slots_is_slow_not_hung_however_long_it_sends_nothing() -> None:
    liveness = Liveness(failures=1, stall_s=10.0)
    for now in range(1, 100, 5):
        assert liveness.probed(float(now), busy=True, answered=True) is None


def test_a_busy_child_with_data_flowing_is_not_hung_though_its_probes_get_no_answer() -> None:
    # every HTTP thread of llama-server may hold a request: the probe waits, the data flows
    liveness = Liveness(failures=1, stall_s=10.0)
    for now in range(1, 100, 5):
        assert liveness.probed(float(now), busy=True, answered=False, progress_at=now - 1.0) is None


def test_a_busy_child_with_no_data_and_no_answer_is_hung_after_the_stall_time() -> None:
    liveness = Liveness(failures=1, stall_s=10.0)
    assert liveness.probed(100.0, busy=True, answered=False, progress_at=0.0) is None  # the busy clock starts
    assert liveness.probed(105.0, busy=True, answered=False, progress_at=0.0) is None
    reason = liveness.probed(110.0, busy=True, answered=False, progress_at=0.0)
    assert reason is not None and "hung" in reason and "stall_timeout" in reason


def test_refused_start_goes_back_to_stopped() -> None:
    assert next_state(S.STARTING, E.REFUSED) is S.STOPPED


def test_every_child_state_is_a_state_clients_can_be_shown() -> None:
    # proxy.backends.ModelState is kept apart from ChildState on purpose (its docstring says why);
    # the runtime converts by value, so every child state needs its counterpart there
    from llama_smart_proxy.supervisor.proxy.backends import ModelState

    assert {state.value for state in ChildState} <= {state.value for state in ModelState}
