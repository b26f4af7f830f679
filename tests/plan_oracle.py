"""An exact oracle for small planning instances, sharing no code with the planner.

It enumerates every arrangement the planner's rules allow (each resident: whole on an allowed GPU,
split over every ordered subset of its allowed GPUs at every layer cut when it fits no single
empty GPU, a partial offload of the fewest layers the host can take the rest of, the CPU, or no
place), measuring each with `place`, and scores it by the planner's order: models with a place,
then whole on GPUs, then partly on GPUs, per priority level from the highest, then the fewest GPUs
split over; on-demand models count with their best place next to the residents. Also a plain
smallest-first greedy, for the bound the planner must never fall below.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from llama_smart_proxy.schemas.config import Config, ModelSpec
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.supervisor.memory.placement import place

WHOLE, PART, CPU_ONLY, NOWHERE = 3, 2, 1, 0
HOST = -1  # the host's key in a room dict


@dataclass(frozen=True)
class Option:
    tier: int
    bytes: tuple[tuple[int, int], ...]  # (GPU index or HOST, bytes)
    split_gpus: int = 0


def rooms(config: Config, inventory: Inventory) -> dict[int, int]:
    usable = {g.index: max(0, g.free_bytes - config.gpus.reserve) for g in inventory.gpus}
    usable[HOST] = max(0, inventory.host.ram_available_bytes - config.host.reserve)
    return usable


def host_charge(config: Config, profile: MemoryProfile, gpu_layers: int, split: list[float]) -> int:
    """Host bytes a placement takes from the host's room: with [host] mmap_overcommit, less the
    mapped file span (the profile's host_mapped_bytes for the layers left on the host)."""
    estimate = place(profile, gpu_layers, split)
    mapped = 0
    if profile.host_mapped_bytes and config.host.mmap_overcommit:
        n = profile.n_layers
        mapped = profile.host_mapped_bytes[n + 1 - estimate.gpu_layers if estimate.gpus else n + 1]
    return estimate.host.total_bytes - mapped


def allowed_gpus(config: Config, inventory: Inventory, spec: ModelSpec) -> list[int]:
    present = sorted(g.index for g in inventory.gpus if g.free_bytes >= 0)
    allow = config.gpus.allow
    present = [i for i in present if not allow or i in allow]
    return present if spec.gpus is None else [i for i in present if i in spec.gpus]


def options(
    config: Config, inventory: Inventory, name: str, profile: MemoryProfile, room: Mapping[int, int], fewest_split: bool = False
) -> list[Option]:
    """Every place the rules allow for one model in `room` (the host's room decides the partial
    offload's layer count); the empty option last. `fewest_split`: splits over the fewest GPUs
    that hold the model only (a greedy needs no more)."""
    spec = config.model_spec(name)
    usable = rooms(config, inventory)
    allowed = allowed_gpus(config, inventory, spec)
    n = profile.n_layers
    out: list[Option] = []
    whole = place(profile, n + 1, [1.0])
    whole_gpu = whole.gpus[0].total_bytes
    whole_host = host_charge(config, profile, n + 1, [1.0])
    for g in allowed:
        out.append(Option(WHOLE, ((g, whole_gpu), (HOST, whole_host))))
    if spec.allow_split and not any(whole_gpu <= usable[g] for g in allowed) and n >= 1:
        for k in range(2, len(allowed) + 1):
            found = False
            for subset in itertools.combinations(allowed, k):  # the planner lists a set's GPUs in index order
                for cuts in itertools.combinations(range(1, n + 1), k - 1):
                    bounds = (0, *cuts, n + 1)
                    counts = [float(bounds[i + 1] - bounds[i]) for i in range(k)]
                    estimate = place(profile, n + 1, counts)
                    host = host_charge(config, profile, n + 1, counts)
                    parts = tuple((g, d.total_bytes) for g, d in zip(subset, estimate.gpus))
                    out.append(Option(WHOLE, (*parts, (HOST, host)), split_gpus=k))
                    found = found or fits(room, out[-1])
            if fewest_split and found:
                break
    if spec.allow_partial and n >= 1 and allowed:
        least = next((ngl for ngl in range(1, n + 1) if host_charge(config, profile, ngl, [1.0]) <= room[HOST]), None)
        if least is not None:
            gpu = place(profile, least, [1.0]).gpus[0].total_bytes
            host = host_charge(config, profile, least, [1.0])
            out += [Option(PART, ((g, gpu), (HOST, host))) for g in allowed]
    if spec.allow_cpu:
        out.append(Option(CPU_ONLY, ((HOST, host_charge(config, profile, 0, [])),)))
    out.append(Option(NOWHERE, ()))
    return out


def fits(room: Mapping[int, int], option: Option) -> bool:
    return all(room[where] >= b for where, b in option.bytes)


def take(room: Mapping[int, int], option: Option) -> dict[int, int]:
    out = dict(room)
    for where, b in option.bytes:
        out[where] -= b
    return out


def score(levels: list[int], entries: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """entries: (priority, tier, GPUs split over) per model."""
    width = len(levels)
    v = [0] * (3 * width + 1)
    for priority, tier, split in entries:
        lv = levels.index(priority)
        v[lv] += tier > NOWHERE
        v[width + lv] += tier == WHOLE
        v[2 * width + lv] += tier == PART
        v[-1] -= split
    return tuple(v)


def best_tier(config: Config, inventory: Inventory, name: str, profile: MemoryProfile, room: Mapping[int, int]) -> int:
    return max(o.tier for o in options(config, inventory, name, profile, room, fewest_split=True) if fits(room, o))


def best_score(config: Config, inventory: Inventory, profiles: Mapping[str, MemoryProfile]) -> tuple[int, ...]:
    """The best score over every arrangement (residents in the planner's order: priority, then
    name): a dynamic programme over (resident, room left), since what the rest can still score
    depends on nothing else."""
    names = sorted(profiles)
    specs = {n: config.model_spec(n) for n in names}
    levels = sorted({s.priority for s in specs.values()}, reverse=True)
    residents = sorted((n for n in names if specs[n].mode == "resident"), key=lambda n: (-specs[n].priority, n))
    on_demand = [n for n in names if specs[n].mode == "on-demand"]
    memo: dict[tuple[int, tuple[tuple[int, int], ...]], tuple[int, ...]] = {}

    def rest(i: int, room: dict[int, int]) -> tuple[int, ...]:
        key = (i, tuple(sorted(room.items())))
        if key in memo:
            return memo[key]
        if i == len(residents):
            best = score(levels, [(specs[o].priority, best_tier(config, inventory, o, profiles[o], room), 0) for o in on_demand])
        else:
            name = residents[i]
            best = None
            for option in options(config, inventory, name, profiles[name], room):
                if fits(room, option):
                    mine = score(levels, [(specs[name].priority, option.tier, option.split_gpus)])
                    total = tuple(a + b for a, b in zip(mine, rest(i + 1, take(room, option))))
                    if best is None or total > best:
                        best = total
            assert best is not None  # "no place" always fits
        memo[key] = best
        return best

    return rest(0, rooms(config, inventory))


def greedy_score(config: Config, inventory: Inventory, profiles: Mapping[str, MemoryProfile]) -> tuple[int, ...]:
    """Smallest first within each priority level, each resident taking its best tier where it
    fits, choosing among GPUs as the policy does (pack: least left after; spread: most), a split
    over the fewest GPUs, a partial offload on the GPU with the most room."""
    names = sorted(profiles)
    specs = {n: config.model_spec(n) for n in names}
    levels = sorted({s.priority for s in specs.values()}, reverse=True)
    usable = rooms(config, inventory)
    sign = 1 if config.gpus.policy == "pack" else -1

    def size(name: str) -> int:
        p = profiles[name]
        whole = place(p, p.n_layers + 1, [1.0]).gpus[0].total_bytes
        allowed = allowed_gpus(config, inventory, specs[name])
        if any(whole <= usable[g] for g in allowed) or not specs[name].allow_split or len(allowed) < 2:
            return whole
        return sum(d.total_bytes for d in place(p, p.n_layers + 1, [1.0, 1.0]).gpus)

    def preference(room: Mapping[int, int], option: Option) -> tuple[int, ...]:
        gpus = [g for g, _ in option.bytes if g != HOST]
        left = sum(room[g] - b for g, b in option.bytes if g != HOST)
        if option.tier == PART:
            return (-option.tier, 0, -room[gpus[0]], gpus[0])
        return (-option.tier, option.split_gpus, sign * left, *gpus)

    residents = sorted((n for n in names if specs[n].mode == "resident"), key=lambda n: (-specs[n].priority, size(n), n))
    room = rooms(config, inventory)
    entries = []
    for name in residents:
        fitting = [o for o in options(config, inventory, name, profiles[name], room, fewest_split=True) if fits(room, o)]
        choice = min(fitting, key=lambda o: preference(room, o))
        room = take(room, choice)
        entries.append((specs[name].priority, choice.tier, choice.split_gpus))
    on_demand = [n for n in names if specs[n].mode == "on-demand"]
    entries += [(specs[o].priority, best_tier(config, inventory, o, profiles[o], room), 0) for o in on_demand]
    return score(levels, entries)


def plan_score(config: Config, result: Plan) -> tuple[int, ...]:
    tiers = {"gpu": WHOLE, "split": WHOLE, "partial": PART, "cpu": CPU_ONLY, "unplaced": NOWHERE}
    levels = sorted({m.priority for m in result.models}, reverse=True)
    # on-demand models count by their tier alone (each is placed next to the residents on its own)
    entries = [
        (m.priority, tiers[m.placement], len(m.gpus) if m.placement == "split" and m.mode == "resident" else 0)
        for m in result.models
    ]
    return score(levels, entries)
