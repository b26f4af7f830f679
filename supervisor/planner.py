"""The placement planner: (config, inventory, memory profiles) -> Plan. Pure: no I/O, no clock.

Rules kept here (issue 4):
- no GPU is filled past its free memory minus the [gpus] reserve, counting every resident on it;
- a model that fits one of its allowed GPUs (judged on the empty GPU) runs on one GPU, never split;
- a split only when no single allowed GPU holds the model and it allows splitting, over as few
  GPUs as possible; `-ts` is given in layers per device, cut at layer-byte boundaries (not raw
  free memory), and every device is checked with `supervisor.memory.placement.place`;
- partial offload (the most layers that fit) and the CPU only where the model allows them;
- priority decides when not everything fits: the plan maximises, level by level from the
  highest priority, how many models get a place (residents, and on-demand models that fit next
  to the residents), then how many run whole on GPUs, then how many run partly on GPUs; among
  equal plans the policy's choice stands (pack: the fullest GPU that fits; spread: the emptiest);
- the same inputs give the same plan: no clock, no unordered iteration, and the search is
  bounded by a count of steps, never by time.

How: models are taken in order (priority, residents first, name) and each gets its preferred
option given what the earlier ones use. That first path is kept when no plan can beat it (its
score equals the bound of every model at its best alone). Otherwise a depth-first search with
memoised states and a step budget looks for a better arrangement; on small machines (up to
SMALL_MODELS residents on SMALL_GPUS GPUs) it enumerates every split and is exhaustive.
During the search a partly offloaded model holds only its smallest footprint (the output layer);
it grows to the most layers that fit once everything else has its place.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations, groupby
from typing import Literal

from llama_smart_proxy.schemas.config import Config, GpuRef, ModelSpec
from llama_smart_proxy.schemas.estimate import Estimate, MemoryProfile
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.schemas.plan import GpuPlan, HostPlan, ModelPlan, ModelShare, Plan
from llama_smart_proxy.schemas.units import MIB, format_bytes
from llama_smart_proxy.supervisor.memory.placement import place

HeaderSource = Literal["file", "snapshot", "missing"]
Guard = Callable[[tuple[int, ...]], bool]  # a test of the memory left on each GPU

# Instances this small are searched exhaustively (every split distribution is an option); the
# property tests compare them with a brute force. The budgets bound the work, so that a large
# config plans in milliseconds and the result never depends on the machine's speed.
SMALL_MODELS = 8
SMALL_GPUS = 4
SMALL_BUDGET = 100_000
LARGE_BUDGET = 1_500
MAX_SPLITS_PER_SET = 64  # distributions tried per GPU set in the exhaustive search
MAX_GROUPS = 32  # on-demand groups listed

FULL, PARTIAL, CPU, NONE = 3, 2, 1, 0


@dataclass(frozen=True)
class HeaderInfo:
    """Where a model's GGUF header came from, as the shell found it."""

    source: HeaderSource = "file"
    note: str = ""  # how the record was matched, or why there is none


@dataclass(frozen=True)
class _Gpu:
    pos: int
    index: int
    uuid: str
    name: str
    total: int
    free: int
    usable: int


@dataclass(frozen=True)
class _Choice:
    kind: Literal["gpu", "split", "partial", "cpu", "unplaced"]
    gpus: tuple[int, ...] = ()  # positions in the plan's GPU list, in split order
    counts: tuple[int, ...] = ()  # layers per device, the output layer counted on the last
    ngl: int = 0
    need: tuple[int, ...] = ()  # bytes per device

    @property
    def tier(self) -> int:
        return {"gpu": FULL, "split": FULL, "partial": PARTIAL, "cpu": CPU}.get(self.kind, NONE)


_CPU = _Choice("cpu")
_UNPLACED = _Choice("unplaced")


@dataclass
class _Model:
    spec: ModelSpec
    profile: MemoryProfile | None
    header: HeaderInfo
    allowed: tuple[int, ...]  # GPU positions this model may use
    pin_note: str = ""
    n: int = 0
    prefix: list[int] = field(default_factory=list)  # bytes of layers [0, i), output layer last
    single_need: int = 0
    foothold_need: int = 0  # the output layer alone on one GPU: the least partial offload uses
    fits_single: bool = False
    split_ok: bool = False
    _fixed: dict[tuple[int, int, bool], int] = field(default_factory=dict)
    _totals: dict[tuple[int, int], int] = field(default_factory=dict)

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


def plan(
    config: Config,
    inventory: Inventory,
    profiles: Mapping[str, MemoryProfile],
    headers: Mapping[str, HeaderInfo] | None = None,
    notes: Sequence[str] = (),
) -> Plan:
    """Place every model of `config` on the machine `inventory` describes.

    `profiles` maps a model name to its memory profile; a model without one (no GGUF header)
    is reported unplaced. `headers` says where each header came from; `notes` are carried into
    the plan first (the shell's findings, such as a stale recorded header).
    """
    headers = headers or {}
    gpus, gpu_notes = _usable_gpus(config, inventory)
    models: list[_Model] = []
    pin_notes: list[str] = []
    for spec in config.model_specs():
        allowed, pin_note = _allowed_gpus(spec, gpus, inventory, config)
        if pin_note:
            pin_notes.append(pin_note)
        models.append(
            _prepare(spec, profiles.get(spec.name), headers.get(spec.name, HeaderInfo()), allowed, gpus)
        )
    planner = _Planner(gpus, models, config.gpus.policy)
    result = planner.run()

    plan_notes = list(notes) + gpu_notes + pin_notes
    if not gpus:
        plan_notes.append(
            f"No GPU found ({inventory.message.rstrip('.')}): every model that allows the CPU "
            "runs there; a model that needs a GPU cannot be placed."
        )
    plan_notes += [f"inventory: {w}" for w in inventory.warnings]
    if result.groups_capped:
        plan_notes.append(
            f"Only the first {len(result.groups)} sets of on-demand models that fit together are "
            "listed; there are more."
        )
    if not result.proven:
        plan_notes.append(
            f"The search for a better arrangement stopped after {result.steps} steps; this is "
            "the best plan it found, not proven the best possible."
        )

    model_plans = {m.name: _model_plan(m, result, planner, config, inventory) for m in models}
    host = _host_plan(inventory, model_plans, models)
    plan_notes += host.notes

    gpu_plans = []
    for g in gpus:
        resident = [
            ModelShare(model=m.name, bytes=result.choices[m.name].need[i])
            for m in models
            if m.resident
            for i, p in enumerate(result.choices[m.name].gpus)
            if p == g.pos
        ]
        on_demand = [
            ModelShare(model=m.name, bytes=result.choices[m.name].need[i])
            for m in models
            if not m.resident
            for i, p in enumerate(result.choices[m.name].gpus)
            if p == g.pos
        ]
        used = sum(s.bytes for s in resident)
        gpu_plans.append(
            GpuPlan(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                total_bytes=g.total,
                free_bytes=g.free,
                reserve_bytes=config.gpus.reserve,
                usable_bytes=g.usable,
                resident=resident,
                on_demand=on_demand,
                free_after_bytes=g.usable - used,
            )
        )
    return Plan(
        policy=config.gpus.policy,
        gpus=gpu_plans,
        host=host.plan,
        models=[model_plans[name] for name in sorted(model_plans)],
        notes=plan_notes,
        on_demand_groups=result.groups,
    )


# --- inputs ------------------------------------------------------------------------------------


def _usable_gpus(config: Config, inventory: Inventory) -> tuple[list[_Gpu], list[str]]:
    notes = []
    found = sorted(inventory.gpus, key=lambda g: g.index)
    allow = config.gpus.allow
    for ref in allow:
        if not any(_matches(ref, g.index, g.uuid) for g in found):
            notes.append(f"[gpus] allow names GPU {ref}, which this machine does not have.")
    usable = []
    for g in found:
        if allow and not any(_matches(ref, g.index, g.uuid) for ref in allow):
            notes.append(f"GPU {g.index} ({g.name}) is not in [gpus] allow: not used.")
            continue
        if g.free_bytes < config.gpus.reserve:
            notes.append(
                f"GPU {g.index} has {format_bytes(g.free_bytes)} free, less than the reserve "
                f"of {format_bytes(config.gpus.reserve)}: nothing can go there."
            )
        usable.append(
            _Gpu(
                pos=len(usable),
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                total=g.total_bytes,
                free=g.free_bytes,
                usable=max(0, g.free_bytes - config.gpus.reserve),
            )
        )
    return usable, notes


def _matches(ref: GpuRef, index: int, uuid: str) -> bool:
    return ref == index if isinstance(ref, int) else ref == uuid


def _allowed_gpus(
    spec: ModelSpec, gpus: list[_Gpu], inventory: Inventory, config: Config
) -> tuple[tuple[int, ...], str]:
    if spec.gpus is None:
        return tuple(g.pos for g in gpus), ""
    allowed = []
    missing = []
    for ref in spec.gpus:
        hit = [g.pos for g in gpus if _matches(ref, g.index, g.uuid)]
        if hit:
            allowed += [p for p in hit if p not in allowed]
        else:
            present = any(_matches(ref, g.index, g.uuid) for g in inventory.gpus)
            missing.append(f"GPU {ref}" + (" (excluded by [gpus] allow)" if present else ""))
    note = ""
    if missing:
        note = (
            f"models.{spec.name}.gpus names {', '.join(missing)}, which this machine "
            "does not offer: not used."
        )
    return tuple(sorted(allowed)), note


def _prepare(
    spec: ModelSpec,
    profile: MemoryProfile | None,
    header: HeaderInfo,
    allowed: tuple[int, ...],
    gpus: list[_Gpu],
) -> _Model:
    m = _Model(spec=spec, profile=profile, header=header, allowed=allowed)
    if profile is None:
        return m
    m.n = profile.n_layers
    sizes = [layer.weights_bytes + layer.kv_bytes + layer.recurrent_bytes for layer in profile.layers]
    # on a GPU the output layer carries the tied head's copy of the embeddings too (place())
    sizes.append(profile.output_weights_bytes + profile.tied_output_bytes)
    m.prefix = [0]
    for size in sizes:
        m.prefix.append(m.prefix[-1] + size)
    m.single_need = m.total_on_gpus(m.n + 1, 1)
    m.foothold_need = _device_bytes(m, 1, (1,))[0] if m.n >= 1 else 0
    m.fits_single = any(m.single_need <= gpus[p].usable for p in allowed)
    m.split_ok = spec.allow_split and not m.fits_single and len(allowed) >= 2 and m.n >= 1
    return m


# --- the search --------------------------------------------------------------------------------


class _Budget(Exception):
    """The step budget ran out."""


class _Optimal(Exception):
    """A plan as good as the bound was found; nothing can beat it."""


@dataclass
class _Result:
    choices: dict[str, _Choice]
    before: dict[str, tuple[int, ...]]  # what the other residents leave each model
    turn: dict[str, tuple[int, ...]]  # what the residents before it (in plan order) left
    earlier: dict[str, list[str]]  # those residents
    groups: list[list[str]]
    proven: bool
    steps: int
    groups_capped: bool = False


class _Planner:
    def __init__(self, gpus: list[_Gpu], models: list[_Model], policy: str):
        self.gpus = gpus
        self.policy = policy
        ordered = sorted(models, key=lambda m: (-m.spec.priority, not m.resident, m.name))
        self.residents = [m for m in ordered if m.resident]
        self.on_demand = [m for m in ordered if not m.resident]
        self.usable = tuple(g.usable for g in gpus)
        self.exhaustive = len(self.residents) <= SMALL_MODELS and len(gpus) <= SMALL_GPUS
        self.budget = SMALL_BUDGET if self.exhaustive else LARGE_BUDGET
        levels = sorted({m.spec.priority for m in models}, reverse=True)
        self.level = {p: i for i, p in enumerate(levels)}
        self.width = len(levels)
        self.alone = {m.name: self.best_tier(m, self.usable) for m in ordered}
        # on-demand models a resident must leave room for: those of higher priority
        self.guarded = {
            m.name: [(o, self.alone[o.name]) for o in self.on_demand if o.spec.priority > m.spec.priority]
            for m in self.residents
        }

    # scores: one vector per plan, compared lexicographically; see the module docstring
    def score(self, m: _Model, tier: int, split_gpus: int = 0) -> tuple[int, ...]:
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

    def run(self) -> _Result:
        zero = tuple([0] * (3 * self.width + 1))
        suffix = [zero]
        for m in reversed(self.residents):
            suffix.append(_add(suffix[-1], self.score(m, self.alone[m.name])))
        suffix.reverse()
        od_best = zero
        for o in self.on_demand:
            od_best = _add(od_best, self.score(o, self.alone[o.name]))
        upper = _add(suffix[0], od_best)

        best_score: tuple[int, ...] | None = None
        best_path: list[_Choice] = []
        memo: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
        path: list[_Choice] = []
        steps = 0

        def visit(depth: int, avail: tuple[int, ...], prefix: tuple[int, ...]) -> None:
            nonlocal steps, best_score, best_path
            steps += 1
            if depth == len(self.residents):
                total = prefix
                for o in self.on_demand:
                    total = _add(total, self.score(o, self.best_tier(o, avail)))
                if best_score is None or total > best_score:
                    best_score, best_path = total, list(path)
                if total == upper:
                    raise _Optimal
                return
            if best_score is not None:
                if steps > self.budget:
                    raise _Budget
                if _add(_add(prefix, suffix[depth]), od_best) <= best_score:
                    return
            key = (depth, avail)
            seen = memo.get(key)
            if seen is not None and prefix <= seen:
                return
            memo[key] = prefix
            m = self.residents[depth]
            for choice in self.ordered_options(m, avail):
                path.append(choice)
                visit(
                    depth + 1,
                    _take(avail, choice),
                    _add(prefix, self.score(m, choice.tier, len(choice.gpus) if choice.kind == "split" else 0)),
                )
                path.pop()

        proven = True
        try:
            visit(0, self.usable, zero)
        except _Optimal:
            pass
        except _Budget:
            proven = False
        chosen = dict(zip((m.name for m in self.residents), best_path))

        avail = self.usable
        for m in self.residents:
            avail = _take(avail, chosen[m.name])
        avail = self.grow_partials(chosen, avail)
        # a choice among GPUs is explained by what the models before it left (its turn); being
        # partial, on the CPU or unplaced by what every other resident leaves it (before)
        before = {m.name: _give(avail, chosen[m.name]) for m in self.residents}
        turn: dict[str, tuple[int, ...]] = {}
        earlier: dict[str, list[str]] = {}
        replay = self.usable
        for i, m in enumerate(self.residents):
            turn[m.name] = replay
            earlier[m.name] = [r.name for r in self.residents[:i]]
            replay = _take(replay, chosen[m.name])
        groups, capped, od_choices = self.place_on_demand(avail, before)
        chosen.update(od_choices)
        for o in self.on_demand:
            turn[o.name] = avail
            earlier[o.name] = []
        return _Result(
            choices=chosen,
            before=before,
            turn=turn,
            earlier=earlier,
            groups=groups,
            proven=proven,
            steps=steps,
            groups_capped=capped,
        )

    def ordered_options(self, m: _Model, avail: tuple[int, ...]) -> list[_Choice]:
        options = self.options(m, avail, final=False)
        guarded = self.guarded[m.name]
        if not guarded:
            return options
        # keep the room higher-priority on-demand models need, where there is a choice
        keeps = [self.keeps_room(guarded, _take(avail, c)) for c in options]
        return [c for c, ok in zip(options, keeps) if ok] + [c for c, ok in zip(options, keeps) if not ok]

    def keeps_room(self, guarded: Iterable[tuple[_Model, int]], avail: tuple[int, ...]) -> bool:
        return all(self.best_tier(o, avail) >= tier for o, tier in guarded)

    # --- options for one model, best first ---

    def options(self, m: _Model, avail: tuple[int, ...], final: bool) -> list[_Choice]:
        if m.profile is None:
            return [_UNPLACED]
        out: list[_Choice] = []
        n = m.n
        singles = [p for p in m.allowed if m.single_need <= avail[p]]
        for p in self.by_policy(singles, lambda p: avail[p] - m.single_need):
            out.append(_Choice("gpu", (p,), (n + 1,), n + 1, (m.single_need,)))
        if m.split_ok:
            out += self.splits(m, avail)
        if m.spec.allow_partial and m.allowed and n >= 1:
            out += self.partials(m, avail) if final else self.footholds(m, avail)
        if m.spec.allow_cpu:
            out.append(_CPU)
        out.append(_UNPLACED)
        return out

    def by_policy(self, positions: Iterable[int], left_after: Callable[[int], int]) -> list[int]:
        """pack: least left after (the fullest GPU that fits) first; spread: most left first."""
        sign = 1 if self.policy == "pack" else -1
        return sorted(positions, key=lambda p: (sign * left_after(p), p))

    def splits(self, m: _Model, avail: tuple[int, ...]) -> list[_Choice]:
        out: list[_Choice] = []
        ngl = m.n + 1
        sign = 1 if self.policy == "pack" else -1
        for _, subsets in groupby(_split_subsets(m, avail), key=len):
            found = []
            for subset in subsets:
                for counts in self.distributions(m, ngl, subset, avail, every=self.exhaustive):
                    need = _device_bytes(m, ngl, counts)
                    found.append(_Choice("split", subset, counts, ngl, need))
            found.sort(key=lambda c: (sign * sum(avail[p] for p in c.gpus), c.gpus))
            out += found
            if found and not self.exhaustive:
                break  # fewer GPUs first; more only when the search may need them
        return out

    def footholds(self, m: _Model, avail: tuple[int, ...]) -> list[_Choice]:
        """During the search a partial model holds its smallest footprint: the output layer on
        one GPU. It grows once every model has its place (grow_partials)."""
        need = (m.foothold_need,)
        return [
            _Choice("partial", (p,), (1,), 1, need)
            for p in sorted(m.allowed, key=lambda p: (-avail[p], p))
            if m.foothold_need <= avail[p]
        ]

    def partials(self, m: _Model, avail: tuple[int, ...]) -> list[_Choice]:
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

    def most_layers(
        self, m: _Model, subset: tuple[int, ...], avail: tuple[int, ...], guard: Guard | None = None
    ) -> _Choice | None:
        """The most layers (-ngl) that fit on `subset` and keep `guard` true of what is left."""
        k = len(subset)

        def fit(ngl: int) -> tuple[int, ...] | None:
            for counts in self.distributions(m, ngl, subset, avail, every=False):
                left = _take(avail, _Choice("partial", subset, counts, ngl, _device_bytes(m, ngl, counts)))
                if guard is None or guard(left):
                    return counts
            return None

        lo, hi = k, m.n  # at least one layer per device; at most all but the input on the CPU
        if lo > hi or fit(lo) is None:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fit(mid) is not None:
                lo = mid
            else:
                hi = mid - 1
        counts = fit(lo)
        assert counts is not None
        return _Choice("partial", subset, counts, lo, _device_bytes(m, lo, counts))

    def distributions(
        self, m: _Model, ngl: int, subset: tuple[int, ...], avail: tuple[int, ...], every: bool
    ) -> list[tuple[int, ...]]:
        """Layer counts per device that fit, the balanced one first; `every`: all of them."""
        out = []
        balanced = _balanced(m, ngl, subset, avail)
        if balanced is not None:
            out.append(balanced)
        if every:
            for counts in _all_distributions(m, ngl, subset, avail):
                if counts != balanced:
                    out.append(counts)
                if len(out) >= MAX_SPLITS_PER_SET:
                    break
        elif balanced is None:
            front = _front_fill(m, ngl, subset, avail)
            if front is not None:
                out.append(front)
        return out

    def best_tier(self, m: _Model, avail: tuple[int, ...]) -> int:
        if m.profile is None:
            return NONE
        if any(m.single_need <= avail[p] for p in m.allowed):
            return FULL
        if m.split_ok and any(_front_fill(m, m.n + 1, s, avail) for s in _split_subsets(m, avail)):
            return FULL
        if m.spec.allow_partial and m.n >= 1:
            if any(m.foothold_need <= avail[p] for p in m.allowed):
                return PARTIAL
        return CPU if m.spec.allow_cpu else NONE

    # --- after the search ---

    def grow_partials(self, chosen: dict[str, _Choice], avail: tuple[int, ...]) -> tuple[int, ...]:
        """Give each partly offloaded resident the most layers that fit, by priority, keeping
        every on-demand model at the tier it has next to the residents."""
        keep = [(o, self.best_tier(o, avail)) for o in self.on_demand]
        for m in self.residents:
            foothold = chosen[m.name]
            if foothold.kind != "partial":
                continue
            room = _give(avail, foothold)
            sets = [foothold.gpus] + ([m.allowed] if m.split_ok and m.allowed != foothold.gpus else [])
            grown = [
                c
                for c in (
                    self.most_layers(m, s, room, guard=lambda a: self.keeps_room(keep, a)) for s in sets
                )
                if c is not None
            ]
            grown.sort(key=lambda c: (-c.ngl, len(c.gpus), c.gpus))
            best = grown[0] if grown else foothold
            chosen[m.name] = best
            avail = _take(room, best)
        return avail

    def place_on_demand(
        self, avail: tuple[int, ...], before: dict[str, tuple[int, ...]]
    ) -> tuple[list[list[str]], bool, dict[str, _Choice]]:
        """Each on-demand model's own place next to the residents; where it can, next to the
        higher-priority on-demand ones too, so that more of them can run together."""
        chosen: dict[str, _Choice] = {}
        shared = avail
        for o in self.on_demand:
            before[o.name] = avail
            options = self.options(o, avail, final=True)
            best = options[0]
            together = [c for c in self.options(o, shared, final=True) if c.tier == best.tier]
            if together and best.tier > NONE:
                best = together[0]
                shared = _take(shared, best)
            chosen[o.name] = best
        groups, capped = _groups([o.name for o in self.on_demand], chosen, avail)
        return groups, capped, chosen


# --- layer arithmetic --------------------------------------------------------------------------


def _split_subsets(m: _Model, avail: Sequence[int]) -> Iterator[tuple[int, ...]]:
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


def _device_bytes(m: _Model, ngl: int, counts: Sequence[int]) -> tuple[int, ...]:
    """Bytes per device for -ngl ngl over len(counts) devices, as `place` counts them."""
    partial = ngl < m.n + 1
    start = m.n + 1 - ngl
    out = []
    for d, c in enumerate(counts):
        out.append(m.prefix[start + c] - m.prefix[start] + m.fixed(len(counts), d, partial))
        start += c
    return tuple(out)


def _front_fill(m: _Model, ngl: int, subset: Sequence[int], avail: Sequence[int]) -> tuple[int, ...] | None:
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


def _balanced(m: _Model, ngl: int, subset: Sequence[int], avail: Sequence[int]) -> tuple[int, ...] | None:
    """Cut the layers so that each device's share of layer bytes follows its room (free minus
    its fixed costs); None when that does not fit."""
    k = len(subset)
    partial = ngl < m.n + 1
    first = m.n + 1 - ngl
    rooms = [avail[p] - m.fixed(k, d, partial) for d, p in enumerate(subset)]
    if k == 1:
        return (ngl,) if _device_bytes(m, ngl, (ngl,))[0] <= avail[subset[0]] else None
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
    need = _device_bytes(m, ngl, counts)
    if all(b <= avail[p] for b, p in zip(need, subset)):
        return tuple(counts)
    return None


def _all_distributions(m: _Model, ngl: int, subset: Sequence[int], avail: Sequence[int]) -> Iterable[tuple[int, ...]]:
    k = len(subset)
    partial = ngl < m.n + 1
    fixed = [m.fixed(k, d, partial) for d in range(k)]

    def walk(d: int, start: int, counts: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
        if d == k - 1:
            if m.prefix[m.n + 1] - m.prefix[start] + fixed[d] <= avail[subset[d]]:
                yield counts + (m.n + 1 - start,)
            return
        for end in range(start + 1, m.n + 1 - (k - 1 - d) + 1):
            if m.prefix[end] - m.prefix[start] + fixed[d] > avail[subset[d]]:
                break
            yield from walk(d + 1, end, counts + (end - start,))

    yield from walk(0, m.n + 1 - ngl, ())


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _take(avail: tuple[int, ...], choice: _Choice) -> tuple[int, ...]:
    if not choice.gpus:
        return avail
    out = list(avail)
    for p, b in zip(choice.gpus, choice.need):
        out[p] -= b
    return tuple(out)


def _give(avail: tuple[int, ...], choice: _Choice) -> tuple[int, ...]:
    out = list(avail)
    for p, b in zip(choice.gpus, choice.need):
        out[p] += b
    return tuple(out)


def _groups(
    names: list[str], chosen: dict[str, _Choice], avail: tuple[int, ...]
) -> tuple[list[list[str]], bool]:
    """The largest sets of placed on-demand models whose planned places fit together next to
    the residents (every set that cannot take one more), in name order."""
    placed = sorted(n for n in names if chosen[n].tier > NONE)
    groups: list[list[str]] = []
    steps = 0

    def fits(room: tuple[int, ...], choice: _Choice) -> bool:
        return all(room[p] >= b for p, b in zip(choice.gpus, choice.need))

    def walk(i: int, room: tuple[int, ...], taken: list[str]) -> bool:
        nonlocal steps
        steps += 1
        if len(groups) >= MAX_GROUPS or steps > SMALL_BUDGET:
            return False
        if i == len(placed):
            if taken and all(n in taken or not fits(room, chosen[n]) for n in placed):
                groups.append(list(taken))
            return True
        name = placed[i]
        ok = True
        if fits(room, chosen[name]):
            ok = walk(i + 1, _take(room, chosen[name]), taken + [name])
            # leaving it out only matters if a later model then fits instead
            if ok and any(not fits(_take(room, chosen[name]), chosen[n]) for n in placed[i + 1 :]):
                ok = walk(i + 1, room, taken)
        else:
            ok = walk(i + 1, room, taken)
        return ok

    complete = walk(0, avail, [])
    return groups, not complete


# --- the plan, in words --------------------------------------------------------------------------


def _gpu_names(planner: _Planner, positions: Iterable[int]) -> str:
    return "+".join(str(planner.gpus[p].index) for p in positions)


def _model_plan(m: _Model, result: _Result, planner: _Planner, config: Config, inventory: Inventory) -> ModelPlan:
    choice = result.choices[m.name]
    estimate: Estimate | None = None
    launch: LaunchSpec | None = None
    short = 0
    if m.profile is not None and choice.tier > NONE:
        split = [float(c) for c in choice.counts] if len(choice.gpus) > 1 else [1.0] if choice.gpus else []
        estimate = place(m.profile, choice.ngl, split)
        # the search's arithmetic must be place()'s, or the capacity checks mean nothing
        totals = tuple(d.total_bytes for d in estimate.gpus)
        if totals != choice.need:
            raise AssertionError(f"{m.name}: planner bytes {choice.need} differ from place() {totals}")
        launch = _launch(m, choice, planner, config)
    elif choice.tier == NONE:
        short = _short(m, result.before.get(m.name, planner.usable), planner)
    return ModelPlan(
        name=m.name,
        aliases=m.spec.aliases,
        mode=m.spec.mode,
        priority=m.spec.priority,
        placement=choice.kind,
        gpus=[planner.gpus[p].index for p in choice.gpus],
        gpu_layers=choice.ngl,
        n_layers=m.n,
        host_bytes=estimate.host.total_bytes if estimate else 0,
        estimate=estimate,
        header_source=m.header.source,
        header_note=m.header.note,
        short_bytes=short,
        fallback=choice.kind in ("partial", "cpu") and m.spec.gpus != [],
        reason=_reason(m, choice, result, planner, inventory, short),
        launch=launch,
    )


def _launch(m: _Model, choice: _Choice, planner: _Planner, config: Config) -> LaunchSpec:
    assert m.profile is not None
    s = m.profile.settings
    several = len(choice.gpus) > 1
    args, env = config.child_extras(m.spec)
    return LaunchSpec(
        model=m.name,
        file=str(m.spec.file),
        mmproj=str(m.spec.mmproj) if m.spec.mmproj else None,
        ctx=m.spec.ctx,
        parallel=s.parallel,
        kv_unified=s.kv_unified,
        cache_type_k=s.cache_type_k,
        cache_type_v=s.cache_type_v,
        # the estimate assumed this, so the child must run it
        flash_attn="on" if s.flash_attn else "off",
        batch=s.batch,
        ubatch=s.ubatch,
        gpu_layers=choice.ngl,
        devices=[planner.gpus[p].uuid for p in choice.gpus],
        # layers per device: exact under llama.cpp's float32 cut points, as llama-fit-params gives
        tensor_split=[float(c) for c in choice.counts] if several else [],
        split_mode="layer" if several else "none",
        main_gpu=0,
        args=args,
        env=env,
    )


def _short(m: _Model, avail: tuple[int, ...], planner: _Planner) -> int:
    """For an unplaced model: the fewest bytes that would have given it a place."""
    if m.profile is None:
        return 0
    if not m.allowed:
        return m.single_need
    gaps = [m.single_need - max(avail[p] for p in m.allowed)]
    if m.split_ok:
        gaps.append(m.total_on_gpus(m.n + 1, len(m.allowed)) - sum(avail[p] for p in m.allowed))
    if m.spec.allow_partial and m.n >= 1:
        gaps.append(m.foothold_need - max(avail[p] for p in m.allowed))
    return max(1, min(gaps))


def _reason(
    m: _Model, choice: _Choice, result: _Result, planner: _Planner, inventory: Inventory, short: int
) -> str:
    fb = format_bytes
    name = m.name
    if m.profile is None:
        return f"{name} cannot be planned: {m.header.note or 'no GGUF header'}."
    avail = result.before.get(m.name, planner.usable)
    need = m.single_need
    gpus = planner.gpus
    header = ""

    if choice.kind == "gpu":
        p = choice.gpus[0]
        seen = result.turn[m.name]
        sharing = [
            other for other in result.earlier[m.name] if p in result.choices[other].gpus
        ]
        text = f"{name} → GPU {gpus[p].index}: needs {fb(need)}, {fb(seen[p])} usable there"
        if sharing:
            text += f" after {', '.join(sharing)}"
        elif not m.resident:
            text += " next to the resident models"
        others = [q for q in m.allowed if q != p and need <= seen[q]]
        if not others:
            if len(m.allowed) == 1:
                text += "; its only allowed GPU"
            elif m.allowed:
                text += "; the only allowed GPU with room for it"
        else:
            preferred = planner.by_policy([p, *others], lambda q: seen[q] - need)[0]
            q = others[0] if preferred == p else preferred
            here, there = _two(seen[p] - need, seen[q] - need)
            if preferred == p and seen[p] == seen[q]:
                text += f"; GPU {gpus[q].index} would leave the same {here}, and the lower index goes first"
            elif preferred == p and planner.policy == "pack":
                text += f"; pack takes the fullest GPU that fits ({here} left here, {there} on GPU {gpus[q].index})"
            elif preferred == p:
                text += f"; spread takes the emptiest GPU ({here} left here, {there} on GPU {gpus[q].index})"
            else:
                text += (
                    f"; GPU {gpus[q].index} would fit too and {planner.policy} prefers it, but the "
                    "plan that places more models, or more of them whole, puts it here"
                )
        return text + header + "."

    if choice.kind == "split":
        largest = max((planner.usable[p] for p in m.allowed), default=0)
        shares = ", ".join(
            f"GPU {gpus[p].index} {c} layers {fb(b)} of {fb(avail[p])}"
            for p, c, b in zip(choice.gpus, choice.counts, choice.need)
        )
        return (
            f"{name} → GPUs {_gpu_names(planner, choice.gpus)}, split by layer bytes: needs "
            f"{fb(need)} on one GPU, more than any allowed GPU can hold (largest usable "
            f"{fb(largest)}); {shares}."
        )

    if choice.kind == "partial":
        on = sum(choice.need)
        why = _why_not_whole(m, planner, avail)
        return (
            f"{name} → GPU {_gpu_names(planner, choice.gpus)}, {choice.ngl} of {m.n + 1} layers "
            f"(partial offload): {why}; the {choice.ngl} layers need {fb(on)} there, the other "
            f"{m.n + 1 - choice.ngl} run from host RAM."
        )

    if choice.kind == "cpu":
        if m.spec.gpus == []:
            return f"{name} → CPU: its config allows no GPU (gpus = [])."
        if not planner.gpus:
            return f"{name} → CPU: no GPU found."
        if not m.allowed:
            return f"{name} → CPU: none of its allowed GPUs is on this machine."
        why = _why_not_whole(m, planner, avail)
        partial = "" if m.spec.allow_partial else "; partial offload is not allowed"
        if m.spec.allow_partial:
            partial = "; not even its output layer fits for partial offload"
        return f"{name} → CPU: {why}{partial}."

    # unplaced
    if not planner.gpus:
        return f"{name} cannot be placed: no GPU found and it does not allow the CPU (allow_cpu = false)."
    if not m.allowed:
        pins = ", ".join(str(ref) for ref in m.spec.gpus or [])
        return f"{name} cannot be placed: its gpus = [{pins}] names no GPU it may use here, and allow_cpu = false."
    why = _why_not_whole(m, planner, avail)
    refused = [
        what
        for what, allowed in (
            ("partial offload", m.spec.allow_partial),
            ("the CPU", m.spec.allow_cpu),
        )
        if not allowed
    ]
    mode = "" if m.resident else " (on demand)"
    tail = f"; {' and '.join(refused)} not allowed" if refused else ""
    return f"{name}{mode} cannot be placed: {why}{tail}; {fb(short)} short."


def _two(a: int, b: int) -> tuple[str, str]:
    """Two sizes for a comparison, in MiB when GiB to one decimal would show them equal."""
    if format_bytes(a) != format_bytes(b):
        return format_bytes(a), format_bytes(b)
    return f"{round(a / MIB):,} MiB", f"{round(b / MIB):,} MiB"


def _why_not_whole(m: _Model, planner: _Planner, avail: tuple[int, ...]) -> str:
    fb = format_bytes
    most = max((avail[p] for p in m.allowed), default=0)
    moved = avail != planner.usable
    after = " next to the other resident models" if moved else ""
    if not m.resident:
        after = " next to the resident models"
    text = f"needs {fb(m.single_need)} on one GPU, at most {fb(most)} usable on its allowed GPUs{after}"
    if m.split_ok:
        total = m.total_on_gpus(m.n + 1, len(m.allowed))
        every = "both" if len(m.allowed) == 2 else f"all {len(m.allowed)}"
        text += f", and {fb(total)} split over {every}, where {fb(sum(avail[p] for p in m.allowed))} is usable"
    elif not m.fits_single and not m.spec.allow_split and len(m.allowed) > 1:
        text += " (splitting is not allowed)"
    return text


@dataclass
class _HostResult:
    plan: HostPlan
    notes: list[str]


def _host_plan(inventory: Inventory, plans: Mapping[str, ModelPlan], models: list[_Model]) -> _HostResult:
    resident = sum(plans[m.name].host_bytes for m in models if m.resident)
    on_demand = sum(plans[m.name].host_bytes for m in models if not m.resident)
    available = inventory.host.ram_available_bytes
    notes = []
    fb = format_bytes
    line = f"Host RAM: the resident models need {fb(resident)} of {fb(available)} available"
    if on_demand:
        line += f" ({fb(resident + on_demand)} with every on-demand model loaded as well)"
    notes.append(line + ".")
    if resident > available:
        notes.append(
            f"Warning: the resident models need {fb(resident - available)} more host RAM than is "
            "available; with mmap the weights page in from disk, slowly."
        )
    return _HostResult(
        plan=HostPlan(
            ram_total_bytes=inventory.host.ram_total_bytes,
            ram_available_bytes=available,
            cpu_count=inventory.host.cpu_count,
            resident_bytes=resident,
            with_on_demand_bytes=resident + on_demand,
        ),
        notes=notes,
    )
