"""Which idle on-demand models to stop so another one fits; pure, no I/O.

Memory decides, never a count: a model may start when, on every GPU of its planned placement,
the bytes already committed to running models plus its own estimate stay within the GPU's usable
bytes (free at planning time minus the reserve). Candidates are running on-demand models that
share a GPU with it; a model with requests in flight is never a candidate (its callers wait).
Lowest priority goes first, then the least recently used, and stopping ends as soon as the model
fits. When even every candidate would not make room, nothing is stopped: the caller waits for a
busy model to become idle instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """A running child as eviction sees it."""

    name: str
    bytes_by_gpu: Mapping[int, int]
    priority: int
    last_used: float
    evictable: bool
    """On-demand and idle (no request in flight or queued)."""


@dataclass(frozen=True)
class Verdict:
    fits: bool
    evict: tuple[str, ...] = ()
    short_by_gpu: Mapping[int, int] | None = None
    """When it cannot fit even after every possible eviction: bytes missing per GPU."""


def make_room(
    need: Mapping[int, int], usable: Mapping[int, int], running: Sequence[Resident]
) -> Verdict:
    """What to stop so that `need` (bytes per GPU) fits next to `running`."""
    committed = {gpu: 0 for gpu in need}
    for model in running:
        for gpu, size in model.bytes_by_gpu.items():
            if gpu in committed:
                committed[gpu] += size

    def over() -> dict[int, int]:
        excess = {g: committed[g] + need[g] - usable.get(g, 0) for g in need}
        return {g: bytes_ for g, bytes_ in excess.items() if bytes_ > 0}

    if not over():
        return Verdict(fits=True)
    candidates = sorted(
        (m for m in running if m.evictable and any(g in need for g in m.bytes_by_gpu)),
        key=lambda m: (m.priority, m.last_used, m.name),
    )
    chosen: list[str] = []
    for model in candidates:
        if not over():
            break
        # skip a model that frees nothing on a GPU still short
        if not any(model.bytes_by_gpu.get(g, 0) > 0 for g in over()):
            continue
        chosen.append(model.name)
        for gpu, size in model.bytes_by_gpu.items():
            if gpu in committed:
                committed[gpu] -= size
    still_over = over()
    if still_over:
        return Verdict(fits=False, short_by_gpu=still_over)
    return Verdict(fits=True, evict=tuple(chosen))
