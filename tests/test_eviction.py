"""Eviction by memory: which idle on-demand models to stop so a start gets its bytes, as a pure
decision over what the ledger lacks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llama_smart_proxy.supervisor.service.eviction import Occupant, choose_victims

GIB = 1024**3


def occupant(name: str, gib: float, gpu: int = 0, priority: int = 0, last_used: float = 0.0) -> Occupant:
    return Occupant(name, {gpu: int(gib * GIB)}, priority, last_used)


def test_nothing_is_stopped_when_nothing_is_missing() -> None:
    assert choose_victims({}, [occupant("a", 5)]) == ()
    assert choose_victims({0: 0}, [occupant("a", 5)]) == ()


def test_stops_least_recently_used_idle_model_first() -> None:
    candidates = [occupant("old", 4, last_used=1.0), occupant("new", 4, last_used=2.0)]
    assert choose_victims({0: 2 * GIB}, candidates) == ("old",)


def test_lower_priority_goes_before_older() -> None:
    candidates = [occupant("old-important", 4, priority=5, last_used=1.0), occupant("new-minor", 4, last_used=2.0)]
    assert choose_victims({0: 2 * GIB}, candidates) == ("new-minor",)


def test_stops_only_as_many_as_cover_the_shortfall() -> None:
    candidates = [occupant("a", 1, last_used=1), occupant("b", 1, last_used=2), occupant("c", 1, last_used=3)]
    assert choose_victims({0: int(1.5 * GIB)}, candidates) == ("a", "b")


def test_stops_nothing_when_every_candidate_together_is_not_enough() -> None:
    assert choose_victims({0: 4 * GIB}, [occupant("idle", 1), occupant("other", 2)]) is None


def test_models_on_other_gpus_are_not_stopped() -> None:
    candidates = [occupant("elsewhere", 8, gpu=1, last_used=0), occupant("here", 6, gpu=0, last_used=5)]
    assert choose_victims({0: 1 * GIB}, candidates) == ("here",)


def test_split_start_needs_room_on_every_gpu() -> None:
    candidates = [occupant("a", 6, gpu=0), occupant("b", 6, gpu=1)]
    assert set(choose_victims({0: GIB, 1: GIB}, candidates) or ()) == {"a", "b"}


@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1), st.integers(-2, 2), st.floats(0, 100)), max_size=8),
    st.dictionaries(st.integers(0, 1), st.integers(0, 12 * GIB), max_size=2),
)
def test_a_choice_covers_the_shortfall_and_none_means_nothing_could(models: list, short: dict) -> None:
    candidates = [Occupant(f"m{i}", {gpu: gib * GIB}, p, t) for i, (gib, gpu, p, t) in enumerate(models)]
    victims = choose_victims(short, candidates)
    freed = {gpu: 0 for gpu in short}
    for c in candidates:
        if victims is None or c.name in victims:
            for gpu, size in c.bytes_by_gpu.items():
                if gpu in freed:
                    freed[gpu] += size
    covered = all(freed[gpu] >= size for gpu, size in short.items())
    if victims is None:
        assert not covered  # even every candidate together would not have been enough
    else:
        assert covered
        assert len(set(victims)) == len(victims)
        # no victim is stopped for nothing: each frees bytes on a GPU that was short
        by_name = {c.name: c for c in candidates}
        assert all(any(by_name[v].bytes_by_gpu.get(g, 0) > 0 for g in short if short[g] > 0) for v in victims)
