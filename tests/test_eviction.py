"""Eviction by memory: what to stop so an on-demand model fits, as a pure decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llama_smart_proxy.supervisor.eviction import Resident, make_room

GIB = 1024**3


def resident(name: str, gib: float, gpu: int = 0, priority: int = 0, last_used: float = 0.0, evictable: bool = True) -> Resident:
    return Resident(name, {gpu: int(gib * GIB)}, priority, last_used, evictable)


def test_fits_without_stopping_anything_when_memory_allows() -> None:
    verdict = make_room({0: 4 * GIB}, {0: 10 * GIB}, [resident("a", 5)])
    assert verdict.fits and verdict.evict == ()


def test_stops_least_recently_used_idle_model_first() -> None:
    running = [resident("old", 4, last_used=1.0), resident("new", 4, last_used=2.0)]
    verdict = make_room({0: 4 * GIB}, {0: 10 * GIB}, running)
    assert verdict.fits and verdict.evict == ("old",)


def test_lower_priority_goes_before_older() -> None:
    running = [resident("old-important", 4, priority=5, last_used=1.0), resident("new-minor", 4, last_used=2.0)]
    assert make_room({0: 4 * GIB}, {0: 10 * GIB}, running).evict == ("new-minor",)


def test_never_stops_a_busy_model_and_stops_nothing_when_room_cannot_be_made() -> None:
    running = [resident("busy", 8, evictable=False), resident("idle", 1)]
    verdict = make_room({0: 4 * GIB}, {0: 10 * GIB}, running)
    assert not verdict.fits and verdict.evict == ()
    assert verdict.short_by_gpu == {0: 2 * GIB}


def test_models_on_other_gpus_are_not_stopped() -> None:
    running = [resident("elsewhere", 8, gpu=1), resident("here", 6, gpu=0)]
    verdict = make_room({0: 6 * GIB}, {0: 10 * GIB, 1: 10 * GIB}, running)
    assert verdict.evict == ("here",)


def test_split_model_needs_room_on_every_gpu() -> None:
    running = [resident("a", 6, gpu=0), resident("b", 6, gpu=1)]
    verdict = make_room({0: 5 * GIB, 1: 5 * GIB}, {0: 10 * GIB, 1: 10 * GIB}, running)
    assert set(verdict.evict) == {"a", "b"}


@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(-2, 2), st.floats(0, 100), st.booleans()), max_size=8),
    st.integers(1, 8),
)
def test_a_fitting_verdict_really_fits_and_only_stops_idle_models(models: list, need_gib: int) -> None:
    running = [resident(f"m{i}", g, priority=p, last_used=t, evictable=e) for i, (g, p, t, e) in enumerate(models)]
    verdict = make_room({0: need_gib * GIB}, {0: 16 * GIB}, running)
    stopped = set(verdict.evict)
    if verdict.fits:
        kept = sum(m.bytes_by_gpu[0] for m in running if m.name not in stopped)
        assert kept + need_gib * GIB <= 16 * GIB
        assert all(m.evictable for m in running if m.name in stopped)
    else:
        assert not stopped
        busy = sum(m.bytes_by_gpu[0] for m in running if not m.evictable)
        assert busy + need_gib * GIB > 16 * GIB  # only busy models stood in the way
