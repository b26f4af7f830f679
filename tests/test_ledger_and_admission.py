"""The memory ledger and admission, driven directly: the bookkeeping that carries the runtime's
promises (reserved <= usable per GPU; in flight <= limit; every place and permit given back)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_smart_proxy.supervisor.service.admission import Admission, QueueFull
from llama_smart_proxy.supervisor.service.ledger import MemoryLedger, NoRoom

GIB = 1024**3


def test_a_reservation_that_does_not_fit_takes_nothing_and_names_the_gpu_and_bytes() -> None:
    ledger = MemoryLedger({0: 10 * GIB, 1: 10 * GIB})
    ledger.reserve("a", {0: 6 * GIB})
    with pytest.raises(NoRoom) as refused:
        ledger.reserve("b", {0: 5 * GIB, 1: 1 * GIB})
    assert refused.value.short_by_gpu == {0: 1 * GIB}
    assert "GPU 0 lacks 1024.0 MiB" in refused.value.reason and "b" in refused.value.reason
    assert ledger.reserved_by_gpu() == {0: 6 * GIB, 1: 0}  # nothing of b was taken


def test_release_gives_the_bytes_back_once() -> None:
    ledger = MemoryLedger({0: 10 * GIB})
    held = ledger.reserve("a", {0: 8 * GIB})
    held.release()
    held.release()
    assert ledger.reserved_by_gpu() == {0: 0}
    ledger.reserve("b", {0: 10 * GIB})


def test_a_cpu_model_holds_a_reservation_of_no_bytes() -> None:
    ledger = MemoryLedger({})
    held = ledger.reserve("cpu", {})
    assert list(ledger.reservations()) == [held] and held.bytes_by_gpu == {}


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 6 * GIB)), max_size=40))
def test_reserved_never_exceeds_usable_whatever_the_order(steps: list) -> None:
    ledger = MemoryLedger({0: 8 * GIB, 1: 4 * GIB})
    held = []
    for take, gpu, size in steps:
        if take or not held:
            try:
                held.append(ledger.reserve("m", {gpu % 2: size}))
            except NoRoom:
                pass
        else:
            held.pop(gpu % len(held)).release()
        for gpu_index, reserved in ledger.reserved_by_gpu().items():
            assert reserved <= ledger.usable_by_gpu[gpu_index]


def test_a_queue_place_and_a_permit_come_back_on_every_path() -> None:
    admission = Admission(limit=1, queue_limit=1)
    with pytest.raises(RuntimeError):
        with admission.queue_place():
            with admission.permit():
                raise RuntimeError("the request failed")
    assert admission.in_flight == 0 and admission.queued == 0


def test_a_full_queue_refuses_and_takes_no_place() -> None:
    admission = Admission(limit=1, queue_limit=1)
    with admission.queue_place():
        with pytest.raises(QueueFull):
            with admission.queue_place():
                pass
        assert admission.queued == 1
    assert admission.queued == 0


def test_a_lowered_limit_admits_nobody_until_enough_running_requests_end() -> None:
    admission = Admission(limit=3, queue_limit=8)
    with admission.permit(), admission.permit():
        admission.configure(limit=1, queue_limit=8)
        assert not admission.has_permit()
        with pytest.raises(RuntimeError):
            with admission.permit():
                pass
    assert admission.has_permit()
    with admission.permit():
        assert not admission.has_permit()


def test_no_limit_always_admits() -> None:
    admission = Admission(limit=0, queue_limit=0)
    with admission.permit(), admission.permit(), admission.permit():
        assert admission.has_permit() and admission.in_flight == 3
