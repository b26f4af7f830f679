"""The search for the best arrangement of the resident models; pure, no I/O, no clock.

The score of a plan is one vector, compared lexicographically: level by level from the highest
priority, how many models get a place (residents, and on-demand models that fit next to the
residents), then how many run whole on GPUs, then how many run partly on GPUs, then the fewest
GPUs split over. Among equal plans the policy's choice stands (pack: the fullest GPU that fits;
spread: the emptiest).

How: greedies give a first plan (models in plan order, or smallest first within each priority
level, each taking its best place). A depth-first search over the residents (in plan order) then
looks for a better one, pruning with an upper bound (what each remaining model could still get
in the room left, with the GPU room shared among them) and memoising states, with GPUs that no
remaining model tells apart (same pins, no split) folded together. Small instances (up to
SMALL_MODELS residents on SMALL_GPUS GPUs) are searched to the end, every split distribution
included (up to footprint.MAX_SPLITS_PER_SET per GPU set); larger ones within a step budget, and the
result says when it stopped. During the search a partly offloaded model holds its smallest
footprint (the fewest layers the host can take the rest of); it grows to the most layers that
fit once everything else has its place (`grow_partials`), and a resident left without a place
or on the CPU takes a better one if that freed room holds it (`fill`). On-demand models then
take their own places next to the residents.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby

from llama_smart_proxy.supervisor.planning.footprint import (
    CPU,
    FULL,
    NONE,
    PARTIAL,
    UNPLACED,
    Choice,
    Footprint,
    GpuRoom,
    Guard,
    State,
    balanced,
    counts_fit,
    cut_grid,
    device_bytes,
    front_fill,
    give,
    running_sums,
    split_subsets,
    take,
)

# Instances this small are searched to the end (the property tests compare them with an exact
# oracle); SAFETY_STEPS only keeps a pathological one from running away, and says so. Larger
# instances stop after LARGE_BUDGET steps, so that 64 models plan in milliseconds and the result
# never depends on the machine's speed.
SMALL_MODELS = 8
SMALL_GPUS = 4
SAFETY_STEPS = 1_000_000
LARGE_BUDGET = 400
GROUP_STEPS = 100_000  # the listing of on-demand groups
MAX_GROUPS = 32  # on-demand groups listed


class StopSearch(Exception):
    """The search ends: its bound is reached, or its step count is spent."""


@dataclass
class SearchResult:
    """The chosen place of every model, and what the explanation needs of how it was found."""

    choices: dict[str, Choice]
    before: dict[str, State]  # what every other model leaves each model (unplaced, partial, CPU)
    turn: dict[str, State]  # the room as it stood when the model was taken
    earlier: dict[str, list[str]]  # the residents placed before it
    groups: list[list[str]]
    proven: bool
    steps: int
    groups_capped: bool = False


class Search:
    """One search over one machine's GPUs and host room for every model of one config."""

    def __init__(self, gpus: list[GpuRoom], host_room: int, models: list[Footprint], policy: str):
        self.gpus = gpus
        self.policy = policy
        ordered = sorted(models, key=lambda m: (-m.spec.priority, not m.resident, m.name))
        self.residents = [m for m in ordered if m.resident]
        self.on_demand = [m for m in ordered if not m.resident]
        self.usable: State = (*(g.usable for g in gpus), host_room)
        self.host = len(gpus)  # the host's index in a State
        self.small = len(self.residents) <= SMALL_MODELS and len(gpus) <= SMALL_GPUS
        self.budget = SAFETY_STEPS if self.small else LARGE_BUDGET
        levels = sorted({m.spec.priority for m in models}, reverse=True)
        self.level = {p: i for i, p in enumerate(levels)}
        self.width = len(levels)
        self.tiers: dict[tuple[object, ...], int] = {}  # best_tier by model and the room it sees
        self.alone = {m.name: self.best_tier(m, self.usable) for m in ordered}
        # on-demand models a resident must leave room for: those of higher priority
        self.guarded = {
            m.name: [(o, self.alone[o.name]) for o in self.on_demand if o.spec.priority > m.spec.priority]
            for m in self.residents
        }
        self.zero = tuple([0] * (3 * self.width + 1))
        # folding pays on small instances, searched to the end; a budgeted search rarely meets a state twice
        self.folds = [self._folds(d) if self.small else [] for d in range(len(self.residents) + 1)]

    # scores: one vector per plan, compared lexicographically (the module docstring)
    def score(self, m: Footprint, tier: int, split_gpus: int = 0) -> tuple[int, ...]:
        v = [0] * (3 * self.width + 1)
        lv = self.level[m.spec.priority]
        if tier > NONE:
            v[lv] = 1
        if tier == FULL:
            v[self.width + lv] = 1
        if tier == PARTIAL:
            v[2 * self.width + lv] = 1
        v[-1] = -split_gpus
        return tuple(v)

    def choice_score(self, m: Footprint, choice: Choice) -> tuple[int, ...]:
        return self.score(m, choice.tier, len(choice.gpus) if choice.kind == "split" else 0)

    def total(self, path: Sequence[Choice], avail: State) -> tuple[int, ...]:
        """The score of residents' choices `path` (plan order) leaving `avail`, on-demand included."""
        total = self.zero
        for m, choice in zip(self.residents, path):
            total = add_scores(total, self.choice_score(m, choice))
        for o in self.on_demand:
            total = add_scores(total, self.score(o, self.best_tier(o, avail)))
        return total

    def run(self) -> SearchResult:
        suffix = [self.zero]
        for m in reversed(self.residents):
            suffix.append(add_scores(suffix[-1], self.score(m, self.alone[m.name])))
        suffix.reverse()
        od_best = self.zero
        for o in self.on_demand:
            od_best = add_scores(od_best, self.score(o, self.alone[o.name]))
        upper = add_scores(suffix[0], od_best)

        # the greedies: plan order (the search's own first path), then smallest first
        best_path, left = self.greedy(self.residents)
        best_score = self.total(best_path, left)
        by_size = sorted(self.residents, key=lambda m: (-m.spec.priority, self.size(m), m.name))
        guards = any(self.guarded.values())
        for order, guard in ((self.residents, False), (by_size, True), (by_size, False)):
            if not guard and not guards:
                continue  # without higher-priority on-demand models a guard changes nothing
            path, left = self.greedy(order, guard)
            score = self.total(path, left)
            if score > best_score:
                best_score, best_path = score, path
        memo: dict[tuple[int, State], tuple[int, ...]] = {}
        path: list[Choice] = []
        steps = 0

        def visit(depth: int, avail: State, prefix: tuple[int, ...]) -> None:
            nonlocal steps, best_score, best_path
            steps += 1
            if depth == len(self.residents):
                total = prefix
                for o in self.on_demand:
                    total = add_scores(total, self.score(o, self.best_tier(o, avail)))
                if total > best_score:
                    best_score, best_path = total, list(path)
                if best_score == upper:
                    raise StopSearch
                return
            if steps > self.budget:
                raise StopSearch
            if self.bound(depth, avail, prefix, suffix, od_best) <= best_score:
                return
            key = (depth, self.fold(depth, avail))
            seen = memo.get(key)
            if seen is not None and prefix <= seen:
                return
            memo[key] = prefix
            m = self.residents[depth]
            for choice in self.ordered_options(m, avail):
                path.append(choice)
                visit(depth + 1, take(avail, choice), add_scores(prefix, self.choice_score(m, choice)))
                path.pop()

        proven = True
        if best_score != upper:
            try:
                visit(0, self.usable, self.zero)
            except StopSearch:
                proven = best_score == upper
        chosen = dict(zip((m.name for m in self.residents), best_path))

        # replay in plan order: the room each model saw when it was taken
        turn: dict[str, State] = {}
        earlier: dict[str, list[str]] = {}
        avail = self.usable
        for i, m in enumerate(self.residents):
            turn[m.name] = avail
            earlier[m.name] = [r.name for r in self.residents[:i]]
            avail = take(avail, chosen[m.name])
        avail = self.grow_partials(chosen, avail, turn)
        avail = self.fill(chosen, avail, turn)
        before = {m.name: give(avail, chosen[m.name]) for m in self.residents}
        groups, capped, od_choices = self.place_on_demand(avail, before)
        chosen.update(od_choices)
        for o in self.on_demand:
            turn[o.name] = avail
            earlier[o.name] = []
        return SearchResult(
            choices=chosen,
            before=before,
            turn=turn,
            earlier=earlier,
            groups=groups,
            proven=proven,
            steps=steps,
            groups_capped=capped,
        )

    def greedy(self, order: Sequence[Footprint], guard: bool = True) -> tuple[list[Choice], State]:
        """Each model in `order` takes its first option (`guard`: keeping the room of higher-priority
        on-demand models where it can); the choices in plan order."""
        taken: dict[str, Choice] = {}
        avail = self.usable
        for m in order:
            first = self.ordered_options(m, avail) if guard else self.options(m, avail, final=False)
            taken[m.name] = first[0]
            avail = take(avail, taken[m.name])
        return [taken[m.name] for m in self.residents], avail

    def size(self, m: Footprint) -> int:
        """A model's smallest whole footprint on GPUs, for the smallest-first greedy."""
        if m.profile is None:
            return 0
        if m.fits_single or not m.split_ok:
            return m.single_need
        return m.total_on_gpus(m.n + 1, 2)

    def bound(
        self, depth: int, avail: State, prefix: tuple[int, ...], suffix: list[tuple[int, ...]], od_best: tuple[int, ...]
    ) -> tuple[int, ...]:
        """An upper bound, component by component, on any plan that extends `prefix`."""
        if not self.small:
            return add_scores(add_scores(prefix, suffix[depth]), od_best)
        bound = list(prefix)
        whole: dict[int, list[int]] = {}  # level -> GPU bytes each model needs to run whole
        for m in self.residents[depth:]:
            tier = self.best_tier(m, avail)
            lv = self.level[m.spec.priority]
            if tier > NONE:
                bound[lv] += 1
            if tier == FULL:
                whole.setdefault(lv, []).append(self.size(m))
            elif tier == PARTIAL:
                bound[2 * self.width + lv] += 1
        room = sum(avail[: self.host])
        for lv in sorted(whole):
            # the GPU room is shared: at most as many run whole as their smallest needs fit in it.
            # A plan that runs that many of a higher level whole has used at least their room, so
            # the lower levels are bounded by what is left (lexicographically, the bound holds)
            needs = sorted(whole[lv])
            running = running_sums(needs)
            fit = bisect.bisect_right(running, room)
            bound[self.width + lv] += fit
            room -= running[fit - 1] if fit else 0
            # a model that cannot run whole may still run partly offloaded
            bound[2 * self.width + lv] += len(needs) - fit
        for o in self.on_demand:
            bound = list(add_scores(tuple(bound), self.score(o, self.best_tier(o, avail))))
        return tuple(bound)

    def _folds(self, depth: int) -> list[list[int]]:
        """Sets of GPU positions that no model still to place tells apart: the same pins, and
        no one of them may split (a split's device order would tell them apart)."""
        remaining = [*self.residents[depth:], *self.on_demand]
        if any(m.split_ok for m in remaining):
            return []
        classes: dict[tuple[bool, ...], list[int]] = {}
        for g in self.gpus:
            classes.setdefault(tuple(g.pos in m.allowed for m in remaining), []).append(g.pos)
        return [positions for positions in classes.values() if len(positions) > 1]

    def fold(self, depth: int, avail: State) -> State:
        folds = self.folds[depth]
        if not folds:
            return avail
        out = list(avail)
        for positions in folds:
            for p, value in zip(positions, sorted(avail[p] for p in positions)):
                out[p] = value
        return tuple(out)

    def ordered_options(self, m: Footprint, avail: State) -> list[Choice]:
        options = self.options(m, avail, final=False)
        guarded = self.guarded.get(m.name)
        if not guarded:
            return options
        # keep the room higher-priority on-demand models need, where there is a choice
        keeps = [self.keeps_room(guarded, take(avail, c)) for c in options]
        return [c for c, ok in zip(options, keeps) if ok] + [c for c, ok in zip(options, keeps) if not ok]

    def keeps_room(self, guarded: Iterable[tuple[Footprint, int]], avail: State) -> bool:
        return all(self.best_tier(o, avail) >= tier for o, tier in guarded)

    # --- options for one model, best first ---

    def options(self, m: Footprint, avail: State, final: bool, least: int = NONE, every: bool | None = None) -> list[Choice]:
        """Every place for m in `avail`, best first; `least`: none below that tier; `every`: every
        split distribution (by default on small instances)."""
        if m.profile is None:
            return [UNPLACED]
        out: list[Choice] = []
        n = m.n
        host = avail[self.host]
        if m.host_need(n + 1, 1) <= host:
            singles = [p for p in m.allowed if m.single_need <= avail[p]]
            for p in self.by_policy(singles, lambda p: avail[p] - m.single_need):
                out.append(Choice("gpu", (p,), (n + 1,), n + 1, (m.single_need,), m.host_need(n + 1, 1)))
        if m.split_ok:
            out += self.splits(m, avail, self.small if every is None else every)
        if least > PARTIAL:
            return out
        if m.spec.allow_partial and m.allowed and n >= 1:
            out += self.partials(m, avail) if final else self.footholds(m, avail)
        if least > CPU:
            return out
        if m.spec.allow_cpu and m.host_need(0, 0) <= host:
            out.append(Choice("cpu", host=m.host_need(0, 0)))
        if least == NONE:
            out.append(UNPLACED)
        return out

    def by_policy(self, positions: Iterable[int], left_after: Callable[[int], int]) -> list[int]:
        """pack: least left after (the fullest GPU that fits) first; spread: most left first."""
        sign = 1 if self.policy == "pack" else -1
        return sorted(positions, key=lambda p: (sign * left_after(p), p))

    def splits(self, m: Footprint, avail: State, every: bool) -> list[Choice]:
        out: list[Choice] = []
        ngl = m.n + 1
        sign = 1 if self.policy == "pack" else -1
        for k, subsets in groupby(split_subsets(m, avail), key=len):
            host = m.host_need(ngl, k)
            if host > avail[self.host]:
                continue
            found = []
            for subset in subsets:
                for counts in self.distributions(m, ngl, subset, avail, every=every):
                    need = device_bytes(m, ngl, counts)
                    found.append(Choice("split", subset, counts, ngl, need, host))
            found.sort(key=lambda c: (sign * sum(avail[p] for p in c.gpus), c.gpus))
            out += found
            if found and not every:
                break  # fewer GPUs first; more only when the search may need them
        return out

    def least_layers(self, m: Footprint, host: int) -> int | None:
        """The fewest layers (-ngl) a partial offload needs so that the host holds the rest."""
        if m.n < 1:
            return None
        if not m.partial_hosts:
            # host bytes fall as layers leave for the GPU; negated, they rise, for bisect
            m.partial_hosts = [-m.host_need(ngl, 1) for ngl in range(1, m.n + 1)]
        i = bisect.bisect_left(m.partial_hosts, -host)
        return i + 1 if i < m.n else None

    def footholds(self, m: Footprint, avail: State) -> list[Choice]:
        """During the search a partial model holds its smallest footprint: the fewest layers on
        one GPU that leave the host room for the rest. It grows once every model has its place
        (grow_partials)."""
        ngl = self.least_layers(m, avail[self.host])
        if ngl is None:
            return []
        need = device_bytes(m, ngl, (ngl,))
        host = m.host_need(ngl, 1)
        return [
            Choice("partial", (p,), (ngl,), ngl, need, host)
            for p in sorted(m.allowed, key=lambda p: (-avail[p], p))
            if need[0] <= avail[p]
        ]

    def partials(self, m: Footprint, avail: State) -> list[Choice]:
        """The most layers that fit, on each allowed GPU alone and (if it may split) on all."""
        sets = [(p,) for p in m.allowed]
        if m.split_ok:
            sets.append(m.allowed)
        out = []
        for subset in sets:
            choice = self.most_layers(m, subset, avail)
            if choice is not None:
                out.append(choice)
        out.sort(key=lambda c: (-c.ngl, len(c.gpus), -sum(avail[p] for p in c.gpus), c.gpus))
        return out

    def most_layers(self, m: Footprint, subset: tuple[int, ...], avail: State, guard: Guard | None = None) -> Choice | None:
        """The most layers (-ngl) that fit on `subset` (the host taking the rest) and keep
        `guard` true of what is left."""
        k = len(subset)

        def fit(ngl: int) -> Choice | None:
            if m.host_need(ngl, k) > avail[self.host]:
                return None
            for counts in self.distributions(m, ngl, subset, avail, every=False):
                choice = Choice("partial", subset, counts, ngl, device_bytes(m, ngl, counts), m.host_need(ngl, k))
                if guard is None or guard(take(avail, choice)):
                    return choice
            return None

        least = self.least_layers(m, avail[self.host]) if k == 1 else k
        lo, hi = max(k, least or k), m.n  # at least one layer per device; at most all but the input
        if lo > hi or fit(lo) is None:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fit(mid) is not None:
                lo = mid
            else:
                hi = mid - 1
        return fit(lo)

    def distributions(
        self, m: Footprint, ngl: int, subset: tuple[int, ...], avail: State, every: bool
    ) -> list[tuple[int, ...]]:
        """Layer counts per device that fit, the balanced one first; `every`: also every layer cut
        (when there are more than MAX_SPLITS_PER_SET, those on an even grid of cut points, the
        same whatever the room, so that more room never loses a distribution), and front-fill."""
        out = []
        even = balanced(m, ngl, subset, avail)
        if even is not None:
            out.append(even)
        if every:
            for counts in cut_grid(ngl, len(subset)):
                if counts not in out and counts_fit(m, ngl, counts, subset, avail):
                    out.append(counts)
        if every or even is None:
            front = front_fill(m, ngl, subset, avail)
            if front is not None and front not in out:
                out.append(front)
        return out

    def best_tier(self, m: Footprint, avail: State) -> int:
        """The best tier m could have alone in `avail` (what its allowed GPUs and the host have left)."""
        if m.profile is None:
            return NONE
        key = (m.name, *(avail[p] for p in m.allowed), avail[self.host])
        tier = self.tiers.get(key)
        if tier is None:
            tier = self.tiers[key] = self._best_tier(m, avail)
        return tier

    def _best_tier(self, m: Footprint, avail: State) -> int:
        host = avail[self.host]
        n = m.n
        if m.host_need(n + 1, 1) <= host and any(m.single_need <= avail[p] for p in m.allowed):
            return FULL
        if m.split_ok and any(
            m.host_need(n + 1, len(s)) <= host and front_fill(m, n + 1, s, avail) for s in split_subsets(m, avail)
        ):
            return FULL
        if m.spec.allow_partial and n >= 1 and m.allowed:
            ngl = self.least_layers(m, host)
            if ngl is not None and any(device_bytes(m, ngl, (ngl,))[0] <= avail[p] for p in m.allowed):
                return PARTIAL
        return CPU if m.spec.allow_cpu and m.host_need(0, 0) <= host else NONE

    # --- after the search ---

    def grow_partials(self, chosen: dict[str, Choice], avail: State, turn: dict[str, State]) -> State:
        """Give each partly offloaded resident the most layers that fit, by priority, keeping
        every on-demand model at the tier it has next to the residents."""
        keep = [(o, self.best_tier(o, avail)) for o in self.on_demand]
        for m in self.residents:
            foothold = chosen[m.name]
            if foothold.kind != "partial":
                continue
            room = give(avail, foothold)
            turn[m.name] = room  # a partial offload is sized with everything else in place
            sets = [foothold.gpus] + ([m.allowed] if m.split_ok and m.allowed != foothold.gpus else [])
            grown = [
                c
                for c in (self.most_layers(m, s, room, guard=lambda a: self.keeps_room(keep, a)) for s in sets)
                if c is not None
            ]
            grown.sort(key=lambda c: (-c.ngl, len(c.gpus), c.gpus))
            best = grown[0] if grown else foothold
            chosen[m.name] = best
            avail = take(room, best)
        return avail

    def fill(self, chosen: dict[str, Choice], avail: State, turn: dict[str, State]) -> State:
        """A resident left without a place, or on the CPU, takes a better one if the room freed by
        partial offloads growing (their host share shrinks) now holds it, keeping every on-demand
        model's tier. It can only raise the plan's score."""
        keep = [(o, self.best_tier(o, avail)) for o in self.on_demand]
        for m in self.residents:
            current = chosen[m.name]
            if current.tier > CPU:
                continue
            room = give(avail, current)
            better = [
                c for c in self.options(m, room, final=True) if c.tier > current.tier and self.keeps_room(keep, take(room, c))
            ]
            if better:
                turn[m.name] = room
                chosen[m.name] = better[0]
                avail = take(room, better[0])
        return avail

    def place_on_demand(
        self, avail: State, before: dict[str, State]
    ) -> tuple[list[list[str]], bool, dict[str, Choice]]:
        """Each on-demand model's own place next to the residents; where it can, next to the
        higher-priority on-demand ones too, so that more of them can run together."""
        chosen: dict[str, Choice] = {}
        shared = avail
        for o in self.on_demand:
            before[o.name] = avail
            options = self.options(o, avail, final=True)
            best = options[0]
            together = [c for c in self.options(o, shared, final=True) if c.tier == best.tier]
            if together and best.tier > NONE:
                best = together[0]
                shared = take(shared, best)
            chosen[o.name] = best
        groups, capped = on_demand_groups([o.name for o in self.on_demand], chosen, avail)
        return groups, capped, chosen


def add_scores(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))



def on_demand_groups(names: list[str], chosen: dict[str, Choice], avail: State) -> tuple[list[list[str]], bool]:
    """The largest sets of placed on-demand models whose planned places fit together next to
    the residents (every set that cannot take one more), in name order."""
    placed = sorted(n for n in names if chosen[n].tier > NONE)
    groups: list[list[str]] = []
    steps = 0

    def fits(room: State, choice: Choice) -> bool:
        return room[-1] >= choice.host and all(room[p] >= b for p, b in zip(choice.gpus, choice.need))

    def walk(i: int, room: State, taken: list[str]) -> bool:
        nonlocal steps
        steps += 1
        if len(groups) >= MAX_GROUPS or steps > GROUP_STEPS:
            return False
        if i == len(placed):
            if taken and all(n in taken or not fits(room, chosen[n]) for n in placed):
                groups.append(list(taken))
            return True
        name = placed[i]
        ok = True
        if fits(room, chosen[name]):
            ok = walk(i + 1, take(room, chosen[name]), taken + [name])
            # leaving it out only matters if a later model then fits instead
            if ok and any(not fits(take(room, chosen[name]), chosen[n]) for n in placed[i + 1 :]):
                ok = walk(i + 1, room, taken)
        else:
            ok = walk(i + 1, room, taken)
        return ok

    complete = walk(0, avail, [])
    return groups, not complete

