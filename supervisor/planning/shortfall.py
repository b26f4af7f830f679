"""How short an unplaced model is: the fewest bytes more on one device (a GPU, or the host)
that would have given it a place, every other model keeping at least the tier it has; pure.

On small instances (those the search finishes) the figure is exact to the byte: a
branch-and-bound per device in which that device has no limit (`least_extra`). On larger ones it
is what the model lacks next to the others as they were placed: enough, maybe not the fewest.
"""

from __future__ import annotations

from collections.abc import Mapping

from llama_smart_proxy.supervisor.planning.footprint import CPU, NONE, Choice, Footprint, State, device_bytes, take
from llama_smart_proxy.supervisor.planning.search import Search, SearchResult, StopSearch

SHORT_STEPS = 2_000  # per probe of a "short" figure


def shortfall(search: Search, m: Footprint, chosen: Mapping[str, Choice], room: State) -> tuple[int, str]:
    """The fewest bytes on one device (a GPU, or the host) that would have given m a place,
    every other model keeping at least its tier, and where: to the MiB on small instances
    (a search per device); on larger ones, next to the others as they were placed (enough,
    maybe not the fewest)."""
    # the on-demand models keep their own places next to the residents: the largest of them
    # on each device stays out of reach
    kept = list(room)
    for o in search.on_demand:
        if o is not m and chosen[o.name].tier > NONE:
            peak = take(room, chosen[o.name])
            kept = [min(a, b) for a, b in zip(kept, peak)]
    lacking = deficits(search, m, tuple(kept))
    if not lacking:
        return 0, ""
    if search.small:
        tiers = {o.name: chosen[o.name].tier for o in [*search.residents, *search.on_demand] if o is not m}
        for device in list(lacking):
            lacking[device] = least_extra(search, m, tiers, device, lacking[device])
    device = min(lacking, key=lambda d: (lacking[d], d))
    return lacking[device], "host RAM" if device == search.host else f"GPU {search.gpus[device].index}"


def deficits(search: Search, m: Footprint, room: State) -> dict[int, int]:
    """Per device, the bytes m lacks there for its cheapest place, next to the others as placed."""
    out: dict[int, int] = {}
    n = m.n
    host = room[search.host]

    def note(device: int, lack: int) -> None:
        if lack > 0:
            out[device] = min(out.get(device, lack), lack)

    for p in m.allowed:
        # whole on p, the host being enough; or the host short and p enough
        if m.host_need(n + 1, 1) <= host:
            note(p, m.single_need - room[p])
        elif m.single_need <= room[p]:
            note(search.host, m.host_need(n + 1, 1) - host)
        if m.spec.allow_partial and n >= 1:
            ngl = search.least_layers(m, host)
            if ngl is not None:
                note(p, device_bytes(m, ngl, (ngl,))[0] - room[p])
            elif device_bytes(m, n, (n,))[0] <= room[p]:
                note(search.host, m.host_need(n, 1) - host)
    if m.spec.allow_cpu:
        note(search.host, m.host_need(0, 0) - host)
    if not out and m.allowed:  # short on a GPU and on the host at once: the GPU's part
        p = max(m.allowed, key=lambda q: (room[q], -q))
        note(p, m.single_need - room[p])
    return out


def least_extra(search: Search, target: Footprint, tiers: Mapping[str, int], device: int, known: int) -> int:
    """The fewest bytes more on `device` with which every other model keeps at least its tier
    and target has a place (`known` is enough): a branch-and-bound over arrangements in
    which that device has no limit, keeping the one that overdraws it least (within
    SHORT_STEPS; the best found is always enough)."""
    unlimited = 1 << 62
    start = list(search.usable)
    start[device] += unlimited
    wanted = {o.name: CPU if o is target else tiers.get(o.name, NONE) for o in [*search.residents, *search.on_demand]}
    best = known
    seen: set[tuple[int, State]] = set()
    steps = 0

    def overdraft(room: State) -> int:
        return max(0, unlimited - room[device])

    def on_device(choice: Choice) -> int:
        if device == search.host:
            return choice.host
        return sum(b for p, b in zip(choice.gpus, choice.need) if p == device)

    def reachable(depth: int, room: State) -> bool:
        models = [*search.residents[depth:], *search.on_demand]
        return all(search.best_tier(m, room) >= wanted[m.name] for m in models if wanted[m.name] > NONE)

    def finish(room: State) -> int | None:
        """The overdraft once each on-demand model has its own place next to the residents."""
        worst = overdraft(room)
        for o in search.on_demand:
            least = wanted[o.name]
            if least > NONE:
                takes = [on_device(c) for c in search.options(o, room, final=False, least=least, every=False)]
                if not takes:
                    return None
                worst = max(worst, unlimited - room[device] + min(takes))
        return worst

    def visit(depth: int, room: State) -> None:
        nonlocal best, steps
        steps += 1
        if steps > SHORT_STEPS:
            raise StopSearch
        if overdraft(room) >= best or (depth, room) in seen or not reachable(depth, room):
            return
        seen.add((depth, room))
        if depth == len(search.residents):
            worst = finish(room)
            best = best if worst is None else min(best, worst)
            return
        m = search.residents[depth]
        least = wanted[m.name]
        options = [c for c in search.options(m, room, final=False, least=least, every=False) if c.tier >= least]
        for choice in sorted(options, key=on_device):  # the least on the device first
            visit(depth + 1, take(room, choice))

    try:
        visit(0, tuple(start))
    except StopSearch:
        pass
    return best if best > 0 else known  # 0 would contradict the plan: keep what is known


def shortfalls(search: Search, result: SearchResult) -> dict[str, tuple[int, str]]:
    """Every unplaced model that has a profile -> (bytes it lacks, where)."""
    return {
        m.name: shortfall(search, m, result.choices, result.before[m.name])
        for m in [*search.residents, *search.on_demand]
        if result.choices[m.name].kind == "unplaced" and m.profile is not None
    }
