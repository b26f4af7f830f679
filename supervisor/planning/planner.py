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

The steps: the inputs in planner terms (usable GPUs, each model's allowed GPUs and footprint;
planning/footprint.py), the search (planning/search.py), each unplaced model's shortfall
(planning/shortfall.py), then the plan in words and rows (planning/explain.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llama_smart_proxy.schemas.config import Config, GpuRef, ModelSpec
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.schemas.units import format_bytes
from llama_smart_proxy.supervisor.planning.explain import gpu_plans, host_plan, model_plan
from llama_smart_proxy.supervisor.planning.footprint import Footprint, GpuRoom, footprint_of
from llama_smart_proxy.supervisor.planning.headers import HeaderInfo
from llama_smart_proxy.supervisor.planning.search import Search
from llama_smart_proxy.supervisor.planning.shortfall import shortfalls


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
    models: list[Footprint] = []
    pin_notes: list[str] = []
    for spec in config.model_specs():
        allowed, pin_note = _allowed_gpus(spec, gpus, inventory, config)
        if pin_note:
            pin_notes.append(pin_note)
        models.append(
            footprint_of(
                spec, profiles.get(spec.name), headers.get(spec.name, HeaderInfo()), allowed, gpus,
                count_mapped=not config.host.mmap_overcommit,
            )
        )  # fmt: skip
    search = Search(gpus, host_room, models, config.gpus.policy)
    result = search.run()
    short = shortfalls(search, result)

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

    model_plans = {m.name: model_plan(m, result, short, search, config) for m in models}
    host = host_plan(inventory, config, model_plans, models)
    plan_notes += host.notes

    return Plan(
        policy=config.gpus.policy,
        gpus=gpu_plans(search, models, result, config),
        host=host.plan,
        models=[model_plans[name] for name in sorted(model_plans)],
        notes=plan_notes,
        on_demand_groups=result.groups,
    )


# --- inputs ------------------------------------------------------------------------------------


def _usable_gpus(config: Config, inventory: Inventory) -> tuple[list[GpuRoom], list[str]]:
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
            GpuRoom(
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
    spec: ModelSpec, gpus: list[GpuRoom], inventory: Inventory, config: Config
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

