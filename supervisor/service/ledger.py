"""The memory ledger: every GPU byte the service's children use is one reservation here.

Rules kept here (the ledger promise of DESIGN.md):
- a child process is spawned only after its reservation is taken (supervisor/children/child.py asks for
  it right before the spawn), and the reservation is released only once that process is reaped;
- per GPU, reserved <= usable at every instant: `reserve` refuses what does not fit, whole;
- usable is the plan's: free memory when the inventory was taken, minus the reserve (a reload
  sets new figures; reservations already held stay until their processes are reaped);
- pure bookkeeping, no I/O and no awaits: deciding what to stop to make room is eviction's job
  (supervisor/service/eviction.py), and waiting for room the runtime's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from llama_smart_proxy.supervisor.children.hold import NoRoom


@dataclass(eq=False)
class Reservation:
    """One child process's planned bytes per GPU, held from before its spawn until it is reaped
    (a `children.hold.Hold`)."""

    id: int
    model: str
    bytes_by_gpu: Mapping[int, int]
    ledger: MemoryLedger = field(repr=False)
    released: bool = False

    def release(self) -> None:
        """Give the bytes back; idempotent."""
        if not self.released:
            self.released = True
            self.ledger._release(self)


class MemoryLedger:
    """Reservations against each GPU's usable bytes."""

    def __init__(self, usable_by_gpu: Mapping[int, int]) -> None:
        self._usable = dict(usable_by_gpu)
        self._held: dict[int, Reservation] = {}
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<MemoryLedger {len(self._held)} reservations, reserved={self.reserved_by_gpu()} usable={self._usable}>"

    @property
    def usable_by_gpu(self) -> Mapping[int, int]:
        return dict(self._usable)

    def set_usable(self, usable_by_gpu: Mapping[int, int]) -> None:
        """A reload's new figures. Reservations held stay as they are."""
        self._usable = dict(usable_by_gpu)

    def reserved_by_gpu(self) -> dict[int, int]:
        reserved = dict.fromkeys(self._usable, 0)
        for held in self._held.values():
            for gpu, size in held.bytes_by_gpu.items():
                reserved[gpu] = reserved.get(gpu, 0) + size
        return reserved

    def free_by_gpu(self) -> dict[int, int]:
        reserved = self.reserved_by_gpu()
        return {gpu: self._usable.get(gpu, 0) - reserved.get(gpu, 0) for gpu in reserved}

    def reservations(self) -> Iterator[Reservation]:
        return iter(list(self._held.values()))

    def shortfall(self, need: Mapping[int, int]) -> dict[int, int]:
        """Bytes per GPU that `need` lacks now; empty when it fits."""
        free = self.free_by_gpu()
        return {gpu: size - free.get(gpu, 0) for gpu, size in need.items() if size > free.get(gpu, 0)}

    def reserve(self, model: str, need: Mapping[int, int]) -> Reservation:
        """Take `need` (bytes per GPU) for one process of `model`, or raise NoRoom taking nothing."""
        short = self.shortfall(need)
        if short:
            raise NoRoom(model, short)
        reservation = Reservation(next(self._ids), model, {g: b for g, b in need.items() if b > 0}, self)
        self._held[reservation.id] = reservation
        return reservation

    def _release(self, reservation: Reservation) -> None:
        self._held.pop(reservation.id, None)
