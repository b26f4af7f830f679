"""Which idle on-demand models to stop so that a start gets its memory; pure, no I/O.

The one rule every start follows (first start, restart, on-demand load, reload, admin): when the
memory ledger lacks bytes on some GPU, stop idle on-demand models that hold memory there, lowest
priority first, then the least recently used, and only as many as cover what is missing. A model
with requests in flight or waiting is never a candidate (the caller decides that). When even
every candidate would not cover it, nothing is stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Occupant:
    """A model whose child holds memory, as eviction sees it."""

    name: str
    bytes_by_gpu: Mapping[int, int]
    priority: int
    last_used: float
    """When it last answered a request or became ready, whichever is later (ModelEntry.idle_since)."""


def choose_victims(short_by_gpu: Mapping[int, int], candidates: Sequence[Occupant]) -> tuple[str, ...] | None:
    """The candidates to stop so that `short_by_gpu` (bytes missing per GPU) is covered, in the
    order chosen; None when stopping them all would not cover it."""
    short = {gpu: size for gpu, size in short_by_gpu.items() if size > 0}
    chosen: list[str] = []
    for model in sorted(candidates, key=lambda m: (m.priority, m.last_used, m.name)):
        if not short:
            break
        # a model that frees nothing on a GPU still short is not stopped for nothing
        if not any(model.bytes_by_gpu.get(gpu, 0) > 0 for gpu in short):
            continue
        chosen.append(model.name)
        for gpu, size in model.bytes_by_gpu.items():
            if gpu in short:
                short[gpu] -= size
        short = {gpu: size for gpu, size in short.items() if size > 0}
    return tuple(chosen) if not short else None
