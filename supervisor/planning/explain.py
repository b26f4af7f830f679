"""The plan in words and rows: each model's reason, its estimate and launch, the GPU and host
tables; pure.

Rules kept here:
- every reason speaks of the room as the model's turn saw it (`SearchResult.turn`) or as every
  other model leaves it (`SearchResult.before`), in MiB a person can add up;
- a placed model's estimate is memory.placement.place()'s, and the search's bytes must equal it
  to the byte (checked here, for every model of every plan);
- the launch is what the estimate assumed: flash attention as resolved, layers and split as
  chosen, every device pinned by UUID.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.schemas.plan import GpuPlan, HostPlan, ModelPlan, ModelShare
from llama_smart_proxy.schemas.prompt_cache import model_dir_name
from llama_smart_proxy.schemas.units import MIB
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.planning.footprint import NONE, Choice, Footprint, State
from llama_smart_proxy.supervisor.planning.search import Search, SearchResult


def mib(n: int) -> str:
    """Sizes in words as the tables show them: MiB."""
    return f"{round(n / MIB):,} MiB"


def gpu_names(search: Search, positions: Iterable[int]) -> str:
    return "+".join(str(search.gpus[p].index) for p in positions)


def model_plan(
    m: Footprint, result: SearchResult, short_by_model: Mapping[str, tuple[int, str]], search: Search, config: Config
) -> ModelPlan:
    """One model's row of the plan: where, its estimate there, its launch, and why."""
    choice = result.choices[m.name]
    estimate: Estimate | None = None
    launch: LaunchSpec | None = None
    short, short_where = short_by_model.get(m.name, (0, ""))
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
        launch = launch_spec(m, choice, search, config)
    elif choice.tier == NONE and m.profile is not None and not m.allowed and not m.spec.allow_cpu:
        short = m.single_need
    return ModelPlan(
        name=m.name,
        aliases=m.spec.aliases,
        mode=m.spec.mode,
        priority=m.spec.priority,
        placement=choice.kind,
        gpus=[search.gpus[p].index for p in choice.gpus],
        gpu_layers=choice.ngl,
        n_layers=m.n,
        host_bytes=estimate.host.total_bytes if estimate else 0,
        estimate=estimate,
        header_source=m.header.source,
        header_note=m.header.note,
        short_bytes=short,
        short_of=short_where,
        fallback=choice.kind in ("partial", "cpu") and m.spec.gpus != [],
        reason=_reason(m, choice, result, search, short, short_where),
        launch=launch,
    )


def launch_spec(m: Footprint, choice: Choice, search: Search, config: Config) -> LaunchSpec:
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
        devices=[search.gpus[p].uuid for p in choice.gpus],
        # layers per device: exact under llama.cpp's float32 cut points, as llama-fit-params gives
        tensor_split=[float(c) for c in choice.counts] if several else [],
        split_mode="layer" if several else "none",
        main_gpu=0,
        args=args,
        env=env,
        slot_save_path=_slot_save_path(m.name, config) if m.spec.keep_cache else None,
    )


def _slot_save_path(model: str, config: Config) -> str:
    """keep_cache: the model's own directory under the cache root (supervisor/service/prompt_cache.py)."""
    assert config.prompt_cache.dir is not None  # schemas.config.Config requires it for keep_cache
    return str(config.prompt_cache.dir / model_dir_name(model))


def _reason(m: Footprint, choice: Choice, result: SearchResult, search: Search, short: int, short_where: str) -> str:
    name = m.name
    if m.profile is None:
        return f"{name} cannot be planned: {m.header.note or 'no GGUF header'}."
    avail = result.before.get(m.name, search.usable)
    seen = result.turn.get(m.name, search.usable)
    need = m.single_need
    gpus = search.gpus
    after = _after(m, result, search)

    if choice.kind == "gpu":
        p = choice.gpus[0]
        text = f"{name} → GPU {gpus[p].index}: needs {mib(need)}; as it was taken{after}, "
        others = [q for q in m.allowed if q != p and need <= seen[q]]
        if not others:
            text += f"GPU {gpus[p].index} had {mib(seen[p])} usable"
            if len(m.allowed) == 1:
                return text + ", its only allowed GPU."
            most = max((seen[q] for q in m.allowed if q != p), default=0)
            return text + f", the only allowed GPU with room for it (the others at most {mib(most)})."
        preferred = search.by_policy([p, *others], lambda q: seen[q] - need)[0]
        q = others[0] if preferred == p else preferred
        text += f"GPU {gpus[p].index} had {mib(seen[p])} usable and GPU {gpus[q].index} {mib(seen[q])}"
        if preferred == p and seen[p] == seen[q]:
            return text + f": both would leave {mib(seen[p] - need)}, and the lower index goes first."
        if preferred == p:
            rule = "pack takes the fullest GPU that fits" if search.policy == "pack" else "spread takes the emptiest GPU"
            return (
                text + f": {rule} ({mib(seen[p] - need)} left on GPU {gpus[p].index}, "
                f"{mib(seen[q] - need)} on GPU {gpus[q].index})."
            )
        return (
            text + f": {search.policy} prefers GPU {gpus[q].index}, but the plan that places more "
            f"models, or more of them whole, needs that room for others."
        )

    if choice.kind == "split":
        largest = max((search.usable[p] for p in m.allowed), default=0)
        shares = ", ".join(
            f"GPU {gpus[p].index} {c} layers {mib(b)} of {mib(seen[p])}"
            for p, c, b in zip(choice.gpus, choice.counts, choice.need)
        )
        return (
            f"{name} → GPUs {gpu_names(search, choice.gpus)}, split by layer bytes: needs "
            f"{mib(need)} on one GPU, more than any allowed GPU can hold (largest usable "
            f"{mib(largest)}); as it was taken{after}: {shares}."
        )

    host_total = m.host_bytes(choice.ngl, len(choice.gpus))[0] if choice.tier > NONE else 0
    if choice.kind == "partial":
        on = sum(choice.need)
        why = _why_not_whole(m, search, avail)
        return (
            f"{name} → GPU {gpu_names(search, choice.gpus)}, {choice.ngl} of {m.n + 1} layers "
            f"(partial offload): {why}; the {choice.ngl} layers need {mib(on)} there, the other "
            f"{m.n + 1 - choice.ngl} run from host RAM ({mib(host_total)} there in all)."
        )

    if choice.kind == "cpu":
        ram = f"; {mib(host_total)} of host RAM"
        if m.spec.gpus == []:
            return f"{name} → CPU: its config allows no GPU (gpus = []){ram}."
        if not search.gpus:
            return f"{name} → CPU: no GPU found{ram}."
        if not m.allowed:
            return f"{name} → CPU: none of its allowed GPUs is on this machine{ram}."
        why = _why_not_whole(m, search, avail)
        partial = "; partial offload is not allowed"
        if m.spec.allow_partial:
            partial = "; not even its fewest layers fit for partial offload"
        return f"{name} → CPU: {why}{partial}{ram}."

    # unplaced
    where = f" of {short_where}" if short_where else ""
    if any(o is not m and result.choices[o.name].tier > NONE for o in search.on_demand):
        where += ", room kept for the on-demand models"
    mode = "" if m.resident else " (on demand)"
    host_text = _why_not_host(m, search, avail)
    if not search.gpus or not m.allowed:
        if not m.spec.allow_cpu:
            if not search.gpus:
                return f"{name} cannot be placed: no GPU found and it does not allow the CPU (allow_cpu = false)."
            pins = ", ".join(str(ref) for ref in m.spec.gpus or [])
            return f"{name} cannot be placed: its gpus = [{pins}] names no GPU it may use here, and allow_cpu = false."
        return f"{name}{mode} cannot be placed: {host_text}; {mib(short)} short{where}."
    why = _why_not_whole(m, search, avail)
    refused = [what for what, allowed in (("partial offload", m.spec.allow_partial), ("the CPU", m.spec.allow_cpu)) if not allowed]
    tail = f"; {' and '.join(refused)} not allowed" if refused else ""
    if m.spec.allow_cpu or m.spec.allow_partial:
        tail += f"; {host_text}"
    return f"{name}{mode} cannot be placed: {why}{tail}; {mib(short)} short{where}."


def _after(m: Footprint, result: SearchResult, search: Search) -> str:
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


def _why_not_whole(m: Footprint, search: Search, avail: State) -> str:
    most = max((avail[p] for p in m.allowed), default=0)
    moved = avail[: search.host] != search.usable[: search.host]
    after = " next to the other resident models" if moved else ""
    if not m.resident:
        after = " next to the resident models"
    text = f"needs {mib(m.single_need)} on one GPU, at most {mib(most)} usable on its allowed GPUs{after}"
    if m.split_ok:
        total = m.total_on_gpus(m.n + 1, len(m.allowed))
        every = "both" if len(m.allowed) == 2 else f"all {len(m.allowed)}"
        text += f", and {mib(total)} split over {every}, where {mib(sum(avail[p] for p in m.allowed))} is usable"
    elif not m.fits_single and not m.spec.allow_split and len(m.allowed) > 1:
        text += " (splitting is not allowed)"
    if m.host_need(m.n + 1, 1) > avail[search.host]:
        text += f"; even whole on a GPU it needs {mib(m.host_need(m.n + 1, 1))} of host RAM, {mib(avail[search.host])} usable"
    return text


def _why_not_host(m: Footprint, search: Search, avail: State) -> str:
    """What the host lacks for m's CPU place (or the host part of a partial one)."""
    host = avail[search.host]
    if m.spec.allow_cpu:
        return f"on the CPU it needs {mib(m.host_need(0, 0))} of host RAM, {mib(host)} usable next to the others"
    return f"host RAM usable next to the others: {mib(host)}"


def gpu_plans(search: Search, models: Sequence[Footprint], result: SearchResult, config: Config) -> list[GpuPlan]:
    """Per GPU: what is usable, each resident model's share and what is left, and each on-demand
    model's share when it is loaded."""
    rows = []
    for g in search.gpus:
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
        rows.append(
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
    return rows


@dataclass
class HostRows:
    """The host's row of the plan, and the notes it adds."""

    plan: HostPlan
    notes: list[str]


def host_plan(inventory: Inventory, config: Config, plans: Mapping[str, ModelPlan], models: list[Footprint]) -> HostRows:
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
        f"Host RAM: the resident models need {mib(resident)} of {mib(usable)} usable "
        f"({mib(available)} available less the [host] reserve of {mib(reserve)})"
    )
    if on_demand:
        line += f"; {mib(resident + on_demand)} with every on-demand model loaded as well"
    notes.append(line + ".")
    if overcommit:
        notes.append(
            f"mmap overcommit ([host] mmap_overcommit = true): the residents' mapped weights "
            f"({mib(mapped)}) take the host {mib(overcommit)} past its usable RAM; the kernel "
            "evicts those pages and reads them from disk again, slowly."
        )
    return HostRows(
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
