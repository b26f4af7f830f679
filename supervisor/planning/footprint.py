"""What one model takes on each device, for any layer count and split; pure, no I/O.

The search (planning/search.py) only ever asks these questions, so their arithmetic must be
memory.placement.place()'s to the byte: explain.model_plan() checks every placed model against place().

- a `State` is the room left on each GPU (by its position in the plan's GPU list), then the host's;
- a `Choice` is one place for one model: its kind, its GPUs in split order, the layers on each,
  and the bytes it takes on each device and on the host; its `tier` is what the plan's score counts;
- a `Footprint` holds one model's bytes as running sums over its layers (the output layer last),
  so that any slice of layers costs two lookups; fixed costs per device (compute buffer, CUDA
  context, projector) and host bytes are cached per (layers, devices).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

from llama_smart_proxy.schemas.config import ModelSpec
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.supervisor.planning.headers import HeaderInfo

State = tuple[int, ...]  # room left on each GPU (by position in the plan's GPU list), then the host's
Guard = Callable[[State], bool]  # a test of the room left

MAX_SPLITS_PER_SET = 16  # distributions tried per GPU set in the exhaustive search

FULL, PARTIAL, CPU, NONE = 3, 2, 1, 0


@dataclass(frozen=True)
class GpuRoom:
    """A GPU as the planner sees it: its place in the plan's list, and its room in bytes."""

    pos: int
    index: int
    uuid: str
    name: str
    total: int
    free: int
    usable: int


@dataclass(frozen=True)
class Choice:
    """One place for one model."""

    kind: Literal["gpu", "split", "partial", "cpu", "unplaced"]
    gpus: tuple[int, ...] = ()  # positions in the plan's GPU list, in split order
    counts: tuple[int, ...] = ()  # layers per device, the output layer counted on the last
    ngl: int = 0
    need: tuple[int, ...] = ()  # bytes per device
    host: int = 0  # host bytes charged against the host's room

    @property
    def tier(self) -> int:
        return {"gpu": FULL, "split": FULL, "partial": PARTIAL, "cpu": CPU}.get(self.kind, NONE)


UNPLACED = Choice("unplaced")


@dataclass
class Footprint:
    """One model as the planner sees it: its config, its memory profile, the GPUs it may use, and
    its bytes by layer."""

    spec: ModelSpec
    profile: MemoryProfile | None
    header: HeaderInfo
    allowed: tuple[int, ...]  # GPU positions this model may use
    count_mapped: bool = True  # False with [host] mmap_overcommit: mapped weights are page cache
    n: int = 0
    prefix: list[int] = field(default_factory=list)  # bytes of layers [0, i), output layer last
    weights_prefix: list[int] = field(default_factory=list)  # weights of layers [0, i) alone
    state_prefix: list[int] = field(default_factory=list)  # KV and recurrent state of layers [0, i)
    single_need: int = 0
    fits_single: bool = False
    split_ok: bool = False
    _fixed: dict[tuple[int, int, bool], int] = field(default_factory=dict)
    _totals: dict[tuple[int, int], int] = field(default_factory=dict)
    _hosts: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    partial_hosts: list[int] = field(default_factory=list)  # -host need of -ngl 1..n on one GPU

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resident(self) -> bool:
        return self.spec.mode == "resident"

    def fixed(self, k: int, d: int, partial: bool) -> int:
        """Bytes on device d of k besides its layers: compute buffer, CUDA context, projector."""
        key = (k, d, partial)
        cached = self._fixed.get(key)
        if cached is not None:
            return cached
        assert self.profile is not None
        c = self.profile.compute
        if partial:
            compute = c.gpu_partial_bytes
        elif k == 1:
            compute = c.gpu_full_bytes
        elif d == k - 1:  # the last device holds the output layer
            compute = c.gpu_split_output_bytes
        else:
            compute = c.gpu_split_other_bytes
        extra = self.profile.mmproj_bytes if d == 0 else 0
        self._fixed[key] = compute + self.profile.device_overhead_bytes + extra
        return self._fixed[key]

    def total_on_gpus(self, ngl: int, k: int) -> int:
        """All devices together; independent of how the layers are distributed."""
        total = self._totals.get((ngl, k))
        if total is None:
            partial = ngl < self.n + 1
            layers = self.prefix[self.n + 1] - self.prefix[self.n + 1 - ngl]
            total = self._totals[(ngl, k)] = layers + sum(self.fixed(k, d, partial) for d in range(k))
        return total

    def host_bytes(self, ngl: int, k: int) -> tuple[int, int]:
        """(host bytes, of which mapped weights) for -ngl ngl over k GPUs (k = 0: the CPU), as
        `place` counts them."""
        key = (ngl, k)
        cached = self._hosts.get(key)
        if cached is not None:
            return cached
        p = self.profile
        assert p is not None
        n = self.n
        first = n + 1 - ngl if k else n + 1  # layers [0, first) stay on the host
        on_host = min(first, n)
        if p.host_mapped_bytes:
            weights = mapped = p.host_mapped_bytes[first]
        else:
            weights = p.input_weights_bytes + self.weights_prefix[on_host]
            weights += p.output_weights_bytes if first == n + 1 else 0
            mapped = 0
        c = p.compute
        if k == 0 or ngl < n + 1:
            compute = c.host_cpu_only_bytes
        elif k > 1:
            compute = c.host_split_bytes
        else:
            compute = c.host_with_gpu_bytes
        total = weights + self.state_prefix[on_host] + compute + p.output_buffer_bytes
        total += p.mmproj_bytes if k == 0 else 0
        self._hosts[key] = (total, mapped)
        return total, mapped

    def host_need(self, ngl: int, k: int) -> int:
        """What a placement takes from the host's room (mapped weights too unless overcommitted)."""
        total, mapped = self.host_bytes(ngl, k)
        return total if self.count_mapped else total - mapped


def footprint_of(
    spec: ModelSpec,
    profile: MemoryProfile | None,
    header: HeaderInfo,
    allowed: tuple[int, ...],
    gpus: list[GpuRoom],
    *,
    count_mapped: bool = True,
) -> Footprint:
    """A model's footprint; `allowed`: positions in `gpus` it may use."""
    m = Footprint(spec=spec, profile=profile, header=header, allowed=allowed, count_mapped=count_mapped)
    if profile is None:
        return m
    m.n = profile.n_layers
    sizes = [layer.weights_bytes + layer.kv_bytes + layer.recurrent_bytes for layer in profile.layers]
    # on a GPU the output layer carries the tied head's copy of the embeddings too (place())
    sizes.append(profile.output_weights_bytes + profile.tied_output_bytes)
    m.prefix = running_sums([0, *sizes])
    m.weights_prefix = running_sums([0, *(layer.weights_bytes for layer in profile.layers)])
    m.state_prefix = running_sums([0, *(layer.kv_bytes + layer.recurrent_bytes for layer in profile.layers)])
    m.single_need = m.total_on_gpus(m.n + 1, 1)
    m.fits_single = any(m.single_need <= gpus[p].usable for p in allowed)
    m.split_ok = spec.allow_split and not m.fits_single and len(allowed) >= 2 and m.n >= 1
    return m


def running_sums(values: Iterable[int]) -> list[int]:
    out: list[int] = []
    total = 0
    for v in values:
        total += v
        out.append(total)
    return out


# --- layer arithmetic --------------------------------------------------------------------------


def split_subsets(m: Footprint, avail: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Sets of two or more allowed GPUs, fewest first, whose room together could hold every
    layer (a per-device check follows)."""
    ngl = m.n + 1
    room = sorted((avail[p] for p in m.allowed), reverse=True)
    for k in range(2, len(m.allowed) + 1):
        total = m.total_on_gpus(ngl, k)
        if sum(room[:k]) < total:
            continue
        for subset in combinations(m.allowed, k):
            if sum(avail[p] for p in subset) >= total:
                yield subset


def device_bytes(m: Footprint, ngl: int, counts: Sequence[int]) -> tuple[int, ...]:
    """Bytes per device for -ngl ngl over len(counts) devices, as `place` counts them."""
    partial = ngl < m.n + 1
    start = m.n + 1 - ngl
    out = []
    for d, c in enumerate(counts):
        out.append(m.prefix[start + c] - m.prefix[start] + m.fixed(len(counts), d, partial))
        start += c
    return tuple(out)


def front_fill(m: Footprint, ngl: int, subset: Sequence[int], avail: Sequence[int]) -> tuple[int, ...] | None:
    """Fill each device in order with as many layers as fit, leaving one for each after it.
    A distribution exists exactly when this one fits."""
    k = len(subset)
    partial = ngl < m.n + 1
    start = m.n + 1 - ngl
    counts = []
    for d in range(k - 1):
        room = avail[subset[d]] - m.fixed(k, d, partial)
        limit = m.n + 1 - (k - 1 - d)
        end = bisect.bisect_right(m.prefix, m.prefix[start] + room, lo=start, hi=limit + 1) - 1
        if end < start + 1:
            return None
        counts.append(end - start)
        start = end
    if m.prefix[m.n + 1] - m.prefix[start] + m.fixed(k, k - 1, partial) > avail[subset[-1]]:
        return None
    counts.append(m.n + 1 - start)
    return tuple(counts)


def balanced(m: Footprint, ngl: int, subset: Sequence[int], avail: Sequence[int]) -> tuple[int, ...] | None:
    """Cut the layers so that each device's share of layer bytes follows its room (free minus
    its fixed costs); None when that does not fit."""
    k = len(subset)
    partial = ngl < m.n + 1
    first = m.n + 1 - ngl
    rooms = [avail[p] - m.fixed(k, d, partial) for d, p in enumerate(subset)]
    if k == 1:
        return (ngl,) if device_bytes(m, ngl, (ngl,))[0] <= avail[subset[0]] else None
    if min(rooms) <= 0:
        return None
    layers = m.prefix[m.n + 1] - m.prefix[first]
    total_room = sum(rooms)
    counts = []
    start = first
    cumulative = 0
    for d in range(k - 1):
        cumulative += rooms[d]
        target = m.prefix[first] + layers * cumulative // total_room
        lo, hi = start + 1, m.n + 1 - (k - 1 - d)
        end = bisect.bisect_left(m.prefix, target, lo=lo, hi=hi + 1)
        end = min(max(end, lo), hi)
        if end > lo and target - m.prefix[end - 1] < m.prefix[end] - target:
            end -= 1
        counts.append(end - start)
        start = end
    counts.append(m.n + 1 - start)
    need = device_bytes(m, ngl, counts)
    if all(b <= avail[p] for b, p in zip(need, subset)):
        return tuple(counts)
    return None


@functools.lru_cache(maxsize=None)
def cut_grid(ngl: int, k: int) -> tuple[tuple[int, ...], ...]:
    """Layer counts for k devices from every choice of k-1 cut points, or of cut points on an
    even grid when there would be more than MAX_SPLITS_PER_SET: a function of ngl and k alone."""
    points = list(range(1, ngl))
    size = len(points)
    while size > k - 1 and math.comb(size, k - 1) > MAX_SPLITS_PER_SET:
        size -= 1
    if size < len(points):
        points = sorted({points[round(i * (len(points) - 1) / max(size - 1, 1))] for i in range(size)})
    grid = []
    for cuts in combinations(points, k - 1):
        bounds = (0, *cuts, ngl)
        grid.append(tuple(bounds[i + 1] - bounds[i] for i in range(k)))
    return tuple(grid)


def counts_fit(m: Footprint, ngl: int, counts: Sequence[int], subset: Sequence[int], avail: Sequence[int]) -> bool:
    """Whether each device of `subset` holds its share (as device_bytes counts it)."""
    partial = ngl < m.n + 1
    start = m.n + 1 - ngl
    k = len(counts)
    for d, (c, p) in enumerate(zip(counts, subset)):
        if m.prefix[start + c] - m.prefix[start] + m.fixed(k, d, partial) > avail[p]:
            return False
        start += c
    return True


# --- room arithmetic ---------------------------------------------------------------------------


def take(avail: State, choice: Choice) -> State:
    """The room left once `choice` is placed (the host is the last entry)."""
    if not choice.gpus and not choice.host:
        return avail
    out = list(avail)
    for p, b in zip(choice.gpus, choice.need):
        out[p] -= b
    out[-1] -= choice.host
    return tuple(out)


def give(avail: State, choice: Choice) -> State:
    out = list(avail)
    for p, b in zip(choice.gpus, choice.need):
        out[p] += b
    out[-1] += choice.host
    return tuple(out)

