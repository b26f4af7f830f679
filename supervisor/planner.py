"""The placement planner: (config, inventory, memory profiles) -> Plan. Pure: no I/O, no clock.

Rules kept here (issues 4 and 13):
- no GPU is filled past its free memory minus the [gpus] reserve, and the host past its available
  RAM minus the [host] reserve, counting every resident there (on the host: the weights that stay
  there, with mmap the mapped file span, its KV cache, compute and output buffers); with
  `[host] mmap_overcommit` the mapped weights may exceed it (page cache), and the plan says by how
  much;
- a model that fits one of its allowed GPUs (judged on the empty GPU) runs on one GPU, never split;
- a split only when no single allowed GPU holds the model and it allows splitting, over as few
  GPUs as possible; `-ts` is given in layers per device, cut at layer-byte boundaries (not raw
  free memory), and every device is checked with `supervisor.memory.placement.place`;
- partial offload (the most layers that fit) and the CPU only where the model allows them;
- priority decides when not everything fits: the plan maximises, level by level from the
  highest priority, how many models get a place (residents, and on-demand models that fit next
  to the residents), then how many run whole on GPUs, then how many run partly on GPUs, then the
  fewest GPUs split over; among equal plans the policy's choice stands (pack: the fullest GPU
  that fits; spread: the emptiest);
- the result is never worse, by that order, than a greedy the planner could have tried first:
  models in plan order, or smallest first within each priority level, each taking its best place;
- an unplaced model's "short" is the fewest bytes on one device (a GPU or the host) that would
  have given it a place while every other resident keeps at least its tier;
- the same inputs give the same plan: no clock, no unordered iteration, and the search is
  bounded by counts, never by time.

How: the greedies above give a first plan. A depth-first search over the residents (in plan
order) then looks for a better one, pruning with an upper bound (what each remaining model could
still get in the room left, with the GPU room shared among them) and memoising states, with GPUs
that no remaining model tells apart (same pins, no split) folded together. Small instances (up to
SMALL_MODELS residents on SMALL_GPUS GPUs) are searched to the end, every split distribution
included (up to MAX_SPLITS_PER_SET per GPU set); larger ones within a step budget, and the plan
says when it stopped. During the search a partly offloaded model holds its smallest footprint
(the fewest layers the host can take the rest of); it grows to the most layers that fit once
everything else has its place.
"""

from __future__ import annotations

import bisect
import functools
import math
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
from llama_smart_proxy.supervisor.prompt_cache_rules import model_dir_name

HeaderSource = Literal["file", "snapshot", "missing"]
State = tuple[int, ...]  # room left on each GPU (by position in the plan's GPU list), then the host's
Guard = Callable[[State], bool]  # a test of the room left

# Instances this small are searched to the end (the property tests compare them with an exact
# oracle); SAFETY_STEPS only keeps a pathological one from running away, and says so. Larger
# instances stop after LARGE_BUDGET steps, so that 64 models plan in milliseconds and the result
# never depends on the machine's speed.
SMALL_MODELS = 8
SMALL_GPUS = 4
SAFETY_STEPS = 1_000_000
LARGE_BUDGET = 400
SHORT_STEPS = 2_000  # per probe of a "short" figure
MAX_SPLITS_PER_SET = 16  # distributions tried per GPU set in the exhaustive search
GROUP_STEPS = 100_000  # the listing of on-demand groups
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
    host: int = 0  # host bytes charged against the host's room

    @property
    def tier(self) -> int:
        return {"gpu": FULL, "split": FULL, "partial": PARTIAL, "cpu": CPU}.get(self.kind, NONE)


_UNPLACED = _Choice("unplaced")


@dataclass
class _Model:
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
    host_room = max(0, inventory.host.ram_available_bytes - config.host.reserve)
    models: list[_Model] = []
    pin_notes: list[str] = []
    for spec in config.model_specs():
        allowed, pin_note = _allowed_gpus(spec, gpus, inventory, config)
        if pin_note:
            pin_notes.append(pin_note)
        models.append(
            _prepare(
                spec, profiles.get(spec.name), headers.get(spec.name, HeaderInfo()), allowed, gpus,
                count_mapped=not config.host.mmap_overcommit,
            )
        )  # fmt: skip
    planner = _Planner(gpus, host_room, models, config.gpus.policy)
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
            "the best plan it found (never worse than placing the models in order, or smallest "
            "first), not proven the best possible."
        )

    model_plans = {m.name: _model_plan(m, result, planner, config) for m in models}
    host = _host_plan(inventory, config, model_plans, models)
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
    *,
    count_mapped: bool = True,
) -> _Model:
    m = _Model(spec=spec, profile=profile, header=header, allowed=allowed, count_mapped=count_mapped)
    if profile is None:
        return m
    m.n = profile.n_layers
    sizes = [layer.weights_bytes + layer.kv_bytes + layer.recurrent_bytes for layer in profile.layers]
    # on a GPU the output layer carries the tied head's copy of the embeddings too (place())
    sizes.append(profile.output_weights_bytes + profile.tied_output_bytes)
    m.prefix = _running([0, *sizes])
    m.weights_prefix = _running([0, *(layer.weights_bytes for layer in profile.layers)])
    m.state_prefix = _running([0, *(layer.kv_bytes + layer.recurrent_bytes for layer in profile.layers)])
    m.single_need = m.total_on_gpus(m.n + 1, 1)
    m.fits_single = any(m.single_need <= gpus[p].usable for p in allowed)
    m.split_ok = spec.allow_split and not m.fits_single and len(allowed) >= 2 and m.n >= 1
    return m


def _running(values: Iterable[int]) -> list[int]:
    out: list[int] = []
    total = 0
    for v in values:
        total += v
        out.append(total)
    return out


# --- the search --------------------------------------------------------------------------------


class _Stop(Exception):
    """The search ends: its bound is reached, or its step count is spent."""


@dataclass
class _Result:
    choices: dict[str, _Choice]
    before: dict[str, State]  # what every other model leaves each model (unplaced, partial, CPU)
    turn: dict[str, State]  # the room as it stood when the model was taken
    earlier: dict[str, list[str]]  # the residents placed before it
    groups: list[list[str]]
    proven: bool
    steps: int
    short: dict[str, tuple[int, str]]  # unplaced model -> (bytes, where)
    groups_capped: bool = False


class _Planner:
    def __init__(self, gpus: list[_Gpu], host_room: int, models: list[_Model], policy: str):
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

    def choice_score(self, m: _Model, choice: _Choice) -> tuple[int, ...]:
        return self.score(m, choice.tier, len(choice.gpus) if choice.kind == "split" else 0)

    def total(self, path: Sequence[_Choice], avail: State) -> tuple[int, ...]:
        """The score of residents' choices `path` (plan order) leaving `avail`, on-demand included."""
        total = self.zero
        for m, choice in zip(self.residents, path):
            total = _add(total, self.choice_score(m, choice))
        for o in self.on_demand:
            total = _add(total, self.score(o, self.best_tier(o, avail)))
        return total

    def run(self) -> _Result:
        suffix = [self.zero]
        for m in reversed(self.residents):
            suffix.append(_add(suffix[-1], self.score(m, self.alone[m.name])))
        suffix.reverse()
        od_best = self.zero
        for o in self.on_demand:
            od_best = _add(od_best, self.score(o, self.alone[o.name]))
        upper = _add(suffix[0], od_best)

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
        path: list[_Choice] = []
        steps = 0

        def visit(depth: int, avail: State, prefix: tuple[int, ...]) -> None:
            nonlocal steps, best_score, best_path
            steps += 1
            if depth == len(self.residents):
                total = prefix
                for o in self.on_demand:
                    total = _add(total, self.score(o, self.best_tier(o, avail)))
                if total > best_score:
                    best_score, best_path = total, list(path)
                if best_score == upper:
                    raise _Stop
                return
            if steps > self.budget:
                raise _Stop
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
                visit(depth + 1, _take(avail, choice), _add(prefix, self.choice_score(m, choice)))
                path.pop()

        proven = True
        if best_score != upper:
            try:
                visit(0, self.usable, self.zero)
            except _Stop:
                proven = best_score == upper
        chosen = dict(zip((m.name for m in self.residents), best_path))

        # replay in plan order: the room each model saw when it was taken
        turn: dict[str, State] = {}
        earlier: dict[str, list[str]] = {}
        avail = self.usable
        for i, m in enumerate(self.residents):
            turn[m.name] = avail
            earlier[m.name] = [r.name for r in self.residents[:i]]
            avail = _take(avail, chosen[m.name])
        avail = self.grow_partials(chosen, avail, turn)
        avail = self.fill(chosen, avail, turn)
        before = {m.name: _give(avail, chosen[m.name]) for m in self.residents}
        groups, capped, od_choices = self.place_on_demand(avail, before)
        chosen.update(od_choices)
        for o in self.on_demand:
            turn[o.name] = avail
            earlier[o.name] = []
        short = {
            m.name: self.short(m, chosen, before[m.name])
            for m in [*self.residents, *self.on_demand]
            if chosen[m.name].kind == "unplaced" and m.profile is not None
        }
        return _Result(
            choices=chosen,
            before=before,
            turn=turn,
            earlier=earlier,
            groups=groups,
            proven=proven,
            steps=steps,
            short=short,
            groups_capped=capped,
        )

    def greedy(self, order: Sequence[_Model], guard: bool = True) -> tuple[list[_Choice], State]:
        """Each model in `order` takes its first option (`guard`: keeping the room of higher-priority
        on-demand models where it can); the choices in plan order."""
        taken: dict[str, _Choice] = {}
        avail = self.usable
        for m in order:
            first = self.ordered_options(m, avail) if guard else self.options(m, avail, final=False)
            taken[m.name] = first[0]
            avail = _take(avail, taken[m.name])
        return [taken[m.name] for m in self.residents], avail

    def size(self, m: _Model) -> int:
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
            return _add(_add(prefix, suffix[depth]), od_best)
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
            running = _running(needs)
            fit = bisect.bisect_right(running, room)
            bound[self.width + lv] += fit
            room -= running[fit - 1] if fit else 0
            # a model that cannot run whole may still run partly offloaded
            bound[2 * self.width + lv] += len(needs) - fit
        for o in self.on_demand:
            bound = list(_add(tuple(bound), self.score(o, self.best_tier(o, avail))))
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

    def ordered_options(self, m: _Model, avail: State) -> list[_Choice]:
        options = self.options(m, avail, final=False)
        guarded = self.guarded.get(m.name)
        if not guarded:
            return options
        # keep the room higher-priority on-demand models need, where there is a choice
        keeps = [self.keeps_room(guarded, _take(avail, c)) for c in options]
        return [c for c, ok in zip(options, keeps) if ok] + [c for c, ok in zip(options, keeps) if not ok]

    def keeps_room(self, guarded: Iterable[tuple[_Model, int]], avail: State) -> bool:
        return all(self.best_tier(o, avail) >= tier for o, tier in guarded)

    # --- options for one model, best first ---

    def options(self, m: _Model, avail: State, final: bool, least: int = NONE, every: bool | None = None) -> list[_Choice]:
        """Every place for m in `avail`, best first; `least`: none below that tier; `every`: every
        split distribution (by default on small instances)."""
        if m.profile is None:
            return [_UNPLACED]
        out: list[_Choice] = []
        n = m.n
        host = avail[self.host]
        if m.host_need(n + 1, 1) <= host:
            singles = [p for p in m.allowed if m.single_need <= avail[p]]
            for p in self.by_policy(singles, lambda p: avail[p] - m.single_need):
                out.append(_Choice("gpu", (p,), (n + 1,), n + 1, (m.single_need,), m.host_need(n + 1, 1)))
        if m.split_ok:
            out += self.splits(m, avail, self.small if every is None else every)
        if least > PARTIAL:
            return out
        if m.spec.allow_partial and m.allowed and n >= 1:
            out += self.partials(m, avail) if final else self.footholds(m, avail)
        if least > CPU:
            return out
        if m.spec.allow_cpu and m.host_need(0, 0) <= host:
            out.append(_Choice("cpu", host=m.host_need(0, 0)))
        if least == NONE:
            out.append(_UNPLACED)
        return out

    def by_policy(self, positions: Iterable[int], left_after: Callable[[int], int]) -> list[int]:
        """pack: least left after (the fullest GPU that fits) first; spread: most left first."""
        sign = 1 if self.policy == "pack" else -1
        return sorted(positions, key=lambda p: (sign * left_after(p), p))

    def splits(self, m: _Model, avail: State, every: bool) -> list[_Choice]:
        out: list[_Choice] = []
        ngl = m.n + 1
        sign = 1 if self.policy == "pack" else -1
        for k, subsets in groupby(_split_subsets(m, avail), key=len):
            host = m.host_need(ngl, k)
            if host > avail[self.host]:
                continue
            found = []
            for subset in subsets:
                for counts in self.distributions(m, ngl, subset, avail, every=every):
                    need = _device_bytes(m, ngl, counts)
                    found.append(_Choice("split", subset, counts, ngl, need, host))
            found.sort(key=lambda c: (sign * sum(avail[p] for p in c.gpus), c.gpus))
            out += found
            if found and not every:
                break  # fewer GPUs first; more only when the search may need them
        return out

    def least_layers(self, m: _Model, host: int) -> int | None:
        """The fewest layers (-ngl) a partial offload needs so that the host holds the rest."""
        if m.n < 1:
            return None
        if not m.partial_hosts:
            # host bytes fall as layers leave for the GPU; negated, they rise, for bisect
            m.partial_hosts = [-m.host_need(ngl, 1) for ngl in range(1, m.n + 1)]
        i = bisect.bisect_left(m.partial_hosts, -host)
        return i + 1 if i < m.n else None

    def footholds(self, m: _Model, avail: State) -> list[_Choice]:
        """During the search a partial model holds its smallest footprint: the fewest layers on
        one GPU that leave the host room for the rest. It grows once every model has its place
        (grow_partials)."""
        ngl = self.least_layers(m, avail[self.host])
        if ngl is None:
            return []
        need = _device_bytes(m, ngl, (ngl,))
        host = m.host_need(ngl, 1)
        return [
            _Choice("partial", (p,), (ngl,), ngl, need, host)
            for p in sorted(m.allowed, key=lambda p: (-avail[p], p))
            if need[0] <= avail[p]
        ]

    def partials(self, m: _Model, avail: State) -> list[_Choice]:
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

    def most_layers(self, m: _Model, subset: tuple[int, ...], avail: State, guard: Guard | None = None) -> _Choice | None:
        """The most layers (-ngl) that fit on `subset` (the host taking the rest) and keep
        `guard` true of what is left."""
        k = len(subset)

        def fit(ngl: int) -> _Choice | None:
            if m.host_need(ngl, k) > avail[self.host]:
                return None
            for counts in self.distributions(m, ngl, subset, avail, every=False):
                choice = _Choice("partial", subset, counts, ngl, _device_bytes(m, ngl, counts), m.host_need(ngl, k))
                if guard is None or guard(_take(avail, choice)):
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
        self, m: _Model, ngl: int, subset: tuple[int, ...], avail: State, every: bool
    ) -> list[tuple[int, ...]]:
        """Layer counts per device that fit, the balanced one first; `every`: also every layer cut
        (when there are more than MAX_SPLITS_PER_SET, those on an even grid of cut points, the
        same whatever the room, so that more room never loses a distribution), and front-fill."""
        out = []
        balanced = _balanced(m, ngl, subset, avail)
        if balanced is not None:
            out.append(balanced)
        if every:
            for counts in _cut_grid(ngl, len(subset)):
                if counts not in out and _fits(m, ngl, counts, subset, avail):
                    out.append(counts)
        if every or balanced is None:
            front = _front_fill(m, ngl, subset, avail)
            if front is not None and front not in out:
                out.append(front)
        return out

    def best_tier(self, m: _Model, avail: State) -> int:
        """The best tier m could have alone in `avail` (what its allowed GPUs and the host have left)."""
        if m.profile is None:
            return NONE
        key = (m.name, *(avail[p] for p in m.allowed), avail[self.host])
        tier = self.tiers.get(key)
        if tier is None:
            tier = self.tiers[key] = self._best_tier(m, avail)
        return tier

    def _best_tier(self, m: _Model, avail: State) -> int:
        host = avail[self.host]
        n = m.n
        if m.host_need(n + 1, 1) <= host and any(m.single_need <= avail[p] for p in m.allowed):
            return FULL
        if m.split_ok and any(
            m.host_need(n + 1, len(s)) <= host and _front_fill(m, n + 1, s, avail) for s in _split_subsets(m, avail)
        ):
            return FULL
        if m.spec.allow_partial and n >= 1 and m.allowed:
            ngl = self.least_layers(m, host)
            if ngl is not None and any(_device_bytes(m, ngl, (ngl,))[0] <= avail[p] for p in m.allowed):
                return PARTIAL
        return CPU if m.spec.allow_cpu and m.host_need(0, 0) <= host else NONE

    # --- after the search ---

    def grow_partials(self, chosen: dict[str, _Choice], avail: State, turn: dict[str, State]) -> State:
        """Give each partly offloaded resident the most layers that fit, by priority, keeping
        every on-demand model at the tier it has next to the residents."""
        keep = [(o, self.best_tier(o, avail)) for o in self.on_demand]
        for m in self.residents:
            foothold = chosen[m.name]
            if foothold.kind != "partial":
                continue
            room = _give(avail, foothold)
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
            avail = _take(room, best)
        return avail

    def fill(self, chosen: dict[str, _Choice], avail: State, turn: dict[str, State]) -> State:
        """A resident left without a place, or on the CPU, takes a better one if the room freed by
        partial offloads growing (their host share shrinks) now holds it, keeping every on-demand
        model's tier. It can only raise the plan's score."""
        keep = [(o, self.best_tier(o, avail)) for o in self.on_demand]
        for m in self.residents:
            current = chosen[m.name]
            if current.tier > CPU:
                continue
            room = _give(avail, current)
            better = [
                c for c in self.options(m, room, final=True) if c.tier > current.tier and self.keeps_room(keep, _take(room, c))
            ]
            if better:
                turn[m.name] = room
                chosen[m.name] = better[0]
                avail = _take(room, better[0])
        return avail

    def place_on_demand(
        self, avail: State, before: dict[str, State]
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

    # --- how short an unplaced model is ---

    def short(self, m: _Model, chosen: Mapping[str, _Choice], room: State) -> tuple[int, str]:
        """The fewest bytes on one device (a GPU, or the host) that would have given m a place,
        every other model keeping at least its tier, and where: to the MiB on small instances
        (a search per device); on larger ones, next to the others as they were placed (enough,
        maybe not the fewest)."""
        # the on-demand models keep their own places next to the residents: the largest of them
        # on each device stays out of reach
        kept = list(room)
        for o in self.on_demand:
            if o is not m and chosen[o.name].tier > NONE:
                peak = _take(room, chosen[o.name])
                kept = [min(a, b) for a, b in zip(kept, peak)]
        deficits = self.deficits(m, tuple(kept))
        if not deficits:
            return 0, ""
        if self.small:
            tiers = {o.name: chosen[o.name].tier for o in [*self.residents, *self.on_demand] if o is not m}
            for device in list(deficits):
                deficits[device] = self.least_extra(m, tiers, device, deficits[device])
        device = min(deficits, key=lambda d: (deficits[d], d))
        return deficits[device], "host RAM" if device == self.host else f"GPU {self.gpus[device].index}"

    def deficits(self, m: _Model, room: State) -> dict[int, int]:
        """Per device, the bytes m lacks there for its cheapest place, next to the others as placed."""
        out: dict[int, int] = {}
        n = m.n
        host = room[self.host]

        def note(device: int, lack: int) -> None:
            if lack > 0:
                out[device] = min(out.get(device, lack), lack)

        for p in m.allowed:
            # whole on p, the host being enough; or the host short and p enough
            if m.host_need(n + 1, 1) <= host:
                note(p, m.single_need - room[p])
            elif m.single_need <= room[p]:
                note(self.host, m.host_need(n + 1, 1) - host)
            if m.spec.allow_partial and n >= 1:
                ngl = self.least_layers(m, host)
                if ngl is not None:
                    note(p, _device_bytes(m, ngl, (ngl,))[0] - room[p])
                elif _device_bytes(m, n, (n,))[0] <= room[p]:
                    note(self.host, m.host_need(n, 1) - host)
        if m.spec.allow_cpu:
            note(self.host, m.host_need(0, 0) - host)
        if not out and m.allowed:  # short on a GPU and on the host at once: the GPU's part
            p = max(m.allowed, key=lambda q: (room[q], -q))
            note(p, m.single_need - room[p])
        return out

    def least_extra(self, target: _Model, tiers: Mapping[str, int], device: int, known: int) -> int:
        """The fewest bytes more on `device` with which every other model keeps at least its tier
        and target has a place (`known` is enough): a branch-and-bound over arrangements in
        which that device has no limit, keeping the one that overdraws it least (within
        SHORT_STEPS; the best found is always enough)."""
        unlimited = 1 << 62
        start = list(self.usable)
        start[device] += unlimited
        wanted = {o.name: CPU if o is target else tiers.get(o.name, NONE) for o in [*self.residents, *self.on_demand]}
        best = known
        seen: set[tuple[int, State]] = set()
        steps = 0

        def overdraft(room: State) -> int:
            return max(0, unlimited - room[device])

        def on_device(choice: _Choice) -> int:
            if device == self.host:
                return choice.host
            return sum(b for p, b in zip(choice.gpus, choice.need) if p == device)

        def reachable(depth: int, room: State) -> bool:
            models = [*self.residents[depth:], *self.on_demand]
            return all(self.best_tier(m, room) >= wanted[m.name] for m in models if wanted[m.name] > NONE)

        def finish(room: State) -> int | None:
            """The overdraft once each on-demand model has its own place next to the residents."""
            worst = overdraft(room)
            for o in self.on_demand:
                least = wanted[o.name]
                if least > NONE:
                    takes = [on_device(c) for c in self.options(o, room, final=False, least=least, every=False)]
                    if not takes:
                        return None
                    worst = max(worst, unlimited - room[device] + min(takes))
            return worst

        def visit(depth: int, room: State) -> None:
            nonlocal best, steps
            steps += 1
            if steps > SHORT_STEPS:
                raise _Stop
            if overdraft(room) >= best or (depth, room) in seen or not reachable(depth, room):
                return
            seen.add((depth, room))
            if depth == len(self.residents):
                worst = finish(room)
                best = best if worst is None else min(best, worst)
                return
            m = self.residents[depth]
            least = wanted[m.name]
            options = [c for c in self.options(m, room, final=False, least=least, every=False) if c.tier >= least]
            for choice in sorted(options, key=on_device):  # the least on the device first
                visit(depth + 1, _take(room, choice))

        try:
            visit(0, tuple(start))
        except _Stop:
            pass
        return best if best > 0 else known  # 0 would contradict the plan: keep what is known


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


@functools.lru_cache(maxsize=None)
def _cut_grid(ngl: int, k: int) -> tuple[tuple[int, ...], ...]:
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


def _fits(m: _Model, ngl: int, counts: Sequence[int], subset: Sequence[int], avail: Sequence[int]) -> bool:
    """Whether each device of `subset` holds its share (as _device_bytes counts it)."""
    partial = ngl < m.n + 1
    start = m.n + 1 - ngl
    k = len(counts)
    for d, (c, p) in enumerate(zip(counts, subset)):
        if m.prefix[start + c] - m.prefix[start] + m.fixed(k, d, partial) > avail[p]:
            return False
        start += c
    return True


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _take(avail: State, choice: _Choice) -> State:
    """The room left once `choice` is placed (the host is the last entry)."""
    if not choice.gpus and not choice.host:
        return avail
    out = list(avail)
    for p, b in zip(choice.gpus, choice.need):
        out[p] -= b
    out[-1] -= choice.host
    return tuple(out)


def _give(avail: State, choice: _Choice) -> State:
    out = list(avail)
    for p, b in zip(choice.gpus, choice.need):
        out[p] += b
    out[-1] += choice.host
    return tuple(out)


def _groups(names: list[str], chosen: dict[str, _Choice], avail: State) -> tuple[list[list[str]], bool]:
    """The largest sets of placed on-demand models whose planned places fit together next to
    the residents (every set that cannot take one more), in name order."""
    placed = sorted(n for n in names if chosen[n].tier > NONE)
    groups: list[list[str]] = []
    steps = 0

    def fits(room: State, choice: _Choice) -> bool:
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


def _mib(n: int) -> str:
    """Sizes in words as the tables show them: MiB."""
    return f"{round(n / MIB):,} MiB"


def _gpu_names(planner: _Planner, positions: Iterable[int]) -> str:
    return "+".join(str(planner.gpus[p].index) for p in positions)


def _model_plan(m: _Model, result: _Result, planner: _Planner, config: Config) -> ModelPlan:
    choice = result.choices[m.name]
    estimate: Estimate | None = None
    launch: LaunchSpec | None = None
    short, short_where = result.short.get(m.name, (0, ""))
    if m.profile is not None and choice.tier > NONE:
        split = [float(c) for c in choice.counts] if len(choice.gpus) > 1 else [1.0] if choice.gpus else []
        estimate = place(m.profile, choice.ngl, split)
        # the search's arithmetic must be place()'s, or the capacity checks mean nothing
        totals = tuple(d.total_bytes for d in estimate.gpus)
        host = m.host_bytes(choice.ngl, len(choice.gpus))[0]
        if totals != choice.need or host != estimate.host.total_bytes:
            raise AssertionError(
                f"{m.name}: planner bytes {choice.need}, host {host} differ from place() {totals}, "
                f"host {estimate.host.total_bytes}"
            )
        launch = _launch(m, choice, planner, config)
    elif choice.tier == NONE and m.profile is not None and not m.allowed and not m.spec.allow_cpu:
        short = m.single_need
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
        short_of=short_where,
        fallback=choice.kind in ("partial", "cpu") and m.spec.gpus != [],
        reason=_reason(m, choice, result, planner, short, short_where),
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
        # the estimate assumed this (flash attention "auto" resolved as llama.cpp would), so the
        # child must run it
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
        slot_save_path=_slot_save_path(m.name, config) if m.spec.keep_cache else None,
    )


def _slot_save_path(model: str, config: Config) -> str:
    """keep_cache: the model's own directory under the cache root (supervisor/prompt_cache.py)."""
    assert config.prompt_cache.dir is not None  # schemas.config.Config requires it for keep_cache
    return str(config.prompt_cache.dir / model_dir_name(model))


def _reason(m: _Model, choice: _Choice, result: _Result, planner: _Planner, short: int, short_where: str) -> str:
    name = m.name
    if m.profile is None:
        return f"{name} cannot be planned: {m.header.note or 'no GGUF header'}."
    avail = result.before.get(m.name, planner.usable)
    seen = result.turn.get(m.name, planner.usable)
    need = m.single_need
    gpus = planner.gpus
    after = _after(m, result, planner)

    if choice.kind == "gpu":
        p = choice.gpus[0]
        text = f"{name} → GPU {gpus[p].index}: needs {_mib(need)}; as it was taken{after}, "
        others = [q for q in m.allowed if q != p and need <= seen[q]]
        if not others:
            text += f"GPU {gpus[p].index} had {_mib(seen[p])} usable"
            if len(m.allowed) == 1:
                return text + ", its only allowed GPU."
            most = max((seen[q] for q in m.allowed if q != p), default=0)
            return text + f", the only allowed GPU with room for it (the others at most {_mib(most)})."
        preferred = planner.by_policy([p, *others], lambda q: seen[q] - need)[0]
        q = others[0] if preferred == p else preferred
        text += f"GPU {gpus[p].index} had {_mib(seen[p])} usable and GPU {gpus[q].index} {_mib(seen[q])}"
        if preferred == p and seen[p] == seen[q]:
            return text + f": both would leave {_mib(seen[p] - need)}, and the lower index goes first."
        if preferred == p:
            rule = "pack takes the fullest GPU that fits" if planner.policy == "pack" else "spread takes the emptiest GPU"
            return (
                text + f": {rule} ({_mib(seen[p] - need)} left on GPU {gpus[p].index}, "
                f"{_mib(seen[q] - need)} on GPU {gpus[q].index})."
            )
        return (
            text + f": {planner.policy} prefers GPU {gpus[q].index}, but the plan that places more "
            f"models, or more of them whole, needs that room for others."
        )

    if choice.kind == "split":
        largest = max((planner.usable[p] for p in m.allowed), default=0)
        shares = ", ".join(
            f"GPU {gpus[p].index} {c} layers {_mib(b)} of {_mib(seen[p])}"
            for p, c, b in zip(choice.gpus, choice.counts, choice.need)
        )
        return (
            f"{name} → GPUs {_gpu_names(planner, choice.gpus)}, split by layer bytes: needs "
            f"{_mib(need)} on one GPU, more than any allowed GPU can hold (largest usable "
            f"{_mib(largest)}); as it was taken{after}: {shares}."
        )

    host_total = m.host_bytes(choice.ngl, len(choice.gpus))[0] if choice.tier > NONE else 0
    if choice.kind == "partial":
        on = sum(choice.need)
        why = _why_not_whole(m, planner, avail)
        return (
            f"{name} → GPU {_gpu_names(planner, choice.gpus)}, {choice.ngl} of {m.n + 1} layers "
            f"(partial offload): {why}; the {choice.ngl} layers need {_mib(on)} there, the other "
            f"{m.n + 1 - choice.ngl} run from host RAM ({_mib(host_total)} there in all)."
        )

    if choice.kind == "cpu":
        ram = f"; {_mib(host_total)} of host RAM"
        if m.spec.gpus == []:
            return f"{name} → CPU: its config allows no GPU (gpus = []){ram}."
        if not planner.gpus:
            return f"{name} → CPU: no GPU found{ram}."
        if not m.allowed:
            return f"{name} → CPU: none of its allowed GPUs is on this machine{ram}."
        why = _why_not_whole(m, planner, avail)
        partial = "; partial offload is not allowed"
        if m.spec.allow_partial:
            partial = "; not even its fewest layers fit for partial offload"
        return f"{name} → CPU: {why}{partial}{ram}."

    # unplaced
    where = f" of {short_where}" if short_where else ""
    if any(o is not m and result.choices[o.name].tier > NONE for o in planner.on_demand):
        where += ", room kept for the on-demand models"
    mode = "" if m.resident else " (on demand)"
    host_text = _why_not_host(m, planner, avail)
    if not planner.gpus or not m.allowed:
        if not m.spec.allow_cpu:
            if not planner.gpus:
                return f"{name} cannot be placed: no GPU found and it does not allow the CPU (allow_cpu = false)."
            pins = ", ".join(str(ref) for ref in m.spec.gpus or [])
            return f"{name} cannot be placed: its gpus = [{pins}] names no GPU it may use here, and allow_cpu = false."
        return f"{name}{mode} cannot be placed: {host_text}; {_mib(short)} short{where}."
    why = _why_not_whole(m, planner, avail)
    refused = [what for what, allowed in (("partial offload", m.spec.allow_partial), ("the CPU", m.spec.allow_cpu)) if not allowed]
    tail = f"; {' and '.join(refused)} not allowed" if refused else ""
    if m.spec.allow_cpu or m.spec.allow_partial:
        tail += f"; {host_text}"
    return f"{name}{mode} cannot be placed: {why}{tail}; {_mib(short)} short{where}."


def _after(m: _Model, result: _Result, planner: _Planner) -> str:
    """Which models held GPU room when m was taken."""
    if not m.resident:
        return " next to the resident models"
    holders = [
        other
        for other in result.earlier.get(m.name, [])
        if result.choices[other].gpus
    ]
    if m.name in result.choices and result.choices[m.name].kind == "partial":
        return " with every other resident in place"
    return f" (after {', '.join(holders)})" if holders else ""


def _why_not_whole(m: _Model, planner: _Planner, avail: State) -> str:
    most = max((avail[p] for p in m.allowed), default=0)
    moved = avail[: planner.host] != planner.usable[: planner.host]
    after = " next to the other resident models" if moved else ""
    if not m.resident:
        after = " next to the resident models"
    text = f"needs {_mib(m.single_need)} on one GPU, at most {_mib(most)} usable on its allowed GPUs{after}"
    if m.split_ok:
        total = m.total_on_gpus(m.n + 1, len(m.allowed))
        every = "both" if len(m.allowed) == 2 else f"all {len(m.allowed)}"
        text += f", and {_mib(total)} split over {every}, where {_mib(sum(avail[p] for p in m.allowed))} is usable"
    elif not m.fits_single and not m.spec.allow_split and len(m.allowed) > 1:
        text += " (splitting is not allowed)"
    if m.host_need(m.n + 1, 1) > avail[planner.host]:
        text += f"; even whole on a GPU it needs {_mib(m.host_need(m.n + 1, 1))} of host RAM, {_mib(avail[planner.host])} usable"
    return text


def _why_not_host(m: _Model, planner: _Planner, avail: State) -> str:
    """What the host lacks for m's CPU place (or the host part of a partial one)."""
    host = avail[planner.host]
    if m.spec.allow_cpu:
        return f"on the CPU it needs {_mib(m.host_need(0, 0))} of host RAM, {_mib(host)} usable next to the others"
    return f"host RAM usable next to the others: {_mib(host)}"


@dataclass
class _HostResult:
    plan: HostPlan
    notes: list[str]


def _host_plan(inventory: Inventory, config: Config, plans: Mapping[str, ModelPlan], models: list[_Model]) -> _HostResult:
    resident = sum(plans[m.name].host_bytes for m in models if m.resident)
    on_demand = sum(plans[m.name].host_bytes for m in models if not m.resident)
    mapped = sum(
        m.host_bytes(plans[m.name].gpu_layers, len(plans[m.name].gpus))[1]
        for m in models
        if m.resident and plans[m.name].estimate is not None
    )
    available = inventory.host.ram_available_bytes
    reserve = config.host.reserve
    usable = max(0, available - reserve)
    overcommit = max(0, resident - usable) if config.host.mmap_overcommit else 0
    notes = []
    line = (
        f"Host RAM: the resident models need {_mib(resident)} of {_mib(usable)} usable "
        f"({_mib(available)} available less the [host] reserve of {_mib(reserve)})"
    )
    if on_demand:
        line += f"; {_mib(resident + on_demand)} with every on-demand model loaded as well"
    notes.append(line + ".")
    if overcommit:
        notes.append(
            f"mmap overcommit ([host] mmap_overcommit = true): the residents' mapped weights "
            f"({_mib(mapped)}) take the host {_mib(overcommit)} past its usable RAM; the kernel "
            "evicts those pages and reads them from disk again, slowly."
        )
    return _HostResult(
        plan=HostPlan(
            ram_total_bytes=inventory.host.ram_total_bytes,
            ram_available_bytes=available,
            cpu_count=inventory.host.cpu_count,
            reserve_bytes=reserve,
            usable_bytes=usable,
            resident_bytes=resident,
            with_on_demand_bytes=resident + on_demand,
            mapped_bytes=mapped,
            overcommit_bytes=overcommit,
        ),
        notes=notes,
    )
