"""A plan as tables a person can check by hand: per GPU, per model, then notes and the verdict.

Rules kept here:
- every size in MiB, each rounded on its own; rows derived from others (usable, free after) are
  computed from the printed figures, and a breakdown's parts are rounded so that they add up to
  the rounded total, so the arithmetic checks by hand and stays within a few MiB of the exact
  bytes the JSON gives;
- the verdict and the exit code come from one function, `verdict`, which `plan` also uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llama_smart_proxy.schemas.estimate import DeviceMemory
from llama_smart_proxy.schemas.plan import ModelPlan, Plan
from llama_smart_proxy.schemas.units import MIB, format_bytes
from llama_smart_proxy.supervisor.errors import EXIT_FALLBACK, EXIT_OK, EXIT_UNPLACED


@dataclass(frozen=True)
class Verdict:
    exit_code: int
    text: str


def verdict(plan: Plan, strict: bool) -> Verdict:
    unplaced = [m for m in plan.models if m.placement == "unplaced"]
    fallback = [m for m in plan.models if m.fallback]
    if unplaced:
        parts = [
            f"{m.name} ({format_bytes(m.short_bytes)} short{f' of {m.short_of}' if m.short_of else ''})"
            if m.short_bytes
            else m.name
            for m in unplaced
        ]
        return Verdict(EXIT_UNPLACED, f"cannot be placed: {', '.join(parts)} (exit {EXIT_UNPLACED})")
    if strict and fallback:
        parts = [f"{m.name} ({m.placement})" for m in fallback]
        return Verdict(
            EXIT_FALLBACK, f"--strict: fell back from the GPU: {', '.join(parts)} (exit {EXIT_FALLBACK})"
        )
    extra = f"; {len(fallback)} partly or wholly on the CPU" if fallback else ""
    return Verdict(EXIT_OK, f"every model placed as its config allows{extra} (exit {EXIT_OK})")


def _mib(n: int) -> str:
    return f"{n:,}"


def aligned(table: Sequence[Sequence[str]]) -> list[str]:
    """A table's rows as lines, each column padded to its widest cell, indented by two."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def render_plan(plan: Plan, header_lines: Sequence[str] = ()) -> str:
    lines = list(header_lines)
    if plan.gpus:
        reserve = plan.gpus[0].reserve_bytes
        lines.append(f"Policy {plan.policy}; reserve {format_bytes(reserve)} per GPU. Sizes in MiB.")
    else:
        lines.append("No GPU to plan on. Sizes in MiB.")
    lines.append("")

    for g in plan.gpus:
        lines.append(f"GPU {g.index}  {g.name}  {g.uuid}")
        shares = [(s.model, round(s.bytes / MIB)) for s in g.resident]
        free = round(g.free_bytes / MIB)
        held = free - round(g.usable_bytes / MIB)  # the reserve, or all that is free if less
        usable = free - held
        width = max([len("free after"), *[len(n) + 2 for n, _ in shares]]) + 2
        rows = [("total", _mib(round(g.total_bytes / MIB))), ("free", _mib(free))]
        rows.append(("reserve" if g.usable_bytes else "reserve (more than free)", "-" + _mib(held)))
        rows.append(("usable", _mib(usable)))
        rows += [(f"  {name}", "-" + _mib(mib)) for name, mib in shares]
        rows.append(("free after", _mib(usable - sum(mib for _, mib in shares))))
        value_width = max(len(v) for _, v in rows)
        for label, value in rows:
            lines.append(f"    {label:<{width}}{value:>{value_width}}")
        for s in g.on_demand:
            lines.append(f"    (on demand: {s.model} takes {_mib(round(s.bytes / MIB))} when loaded)")
        lines.append("")

    lines.append("Models")
    table = [("model", "mode", "prio", "placement", "GPU MiB", "host MiB", "header")]
    for m in plan.models:
        table.append(
            (
                m.name,
                m.mode,
                str(m.priority),
                _placement(m),
                " + ".join(_mib(round(d.total_bytes / MIB)) for d in m.estimate.gpus) if m.estimate and m.estimate.gpus else "-",
                _mib(round(m.host_bytes / MIB)) if m.estimate else "-",
                m.header_source,
            )
        )
    for i, row in enumerate(aligned(table)):
        lines.append(row)
        if i == 0:
            continue
        m = plan.models[i - 1]
        if m.estimate is not None:
            for device in m.estimate.gpus:
                lines.append(f"      {_where(device.device, m)}: {_breakdown(device)}")
            lines.append(f"      host: {_breakdown(m.estimate.host)}")
        lines.append(f"      why: {m.reason}")
        if m.header_note and m.header_source != "missing":
            lines.append(f"      header: {m.header_note}")
    lines.append("")

    if plan.on_demand_groups:
        lines.append("On-demand models that can be loaded together next to the residents:")
        for group in plan.on_demand_groups:
            lines.append(f"  {', '.join(group)}")
        lines.append("")
    if plan.notes:
        lines.append("Notes")
        lines += [f"  - {note}" for note in plan.notes]
        lines.append("")
    return "\n".join(lines)


def _placement(m: ModelPlan) -> str:
    gpus = "+".join(str(i) for i in m.gpus)
    if m.placement == "gpu":
        return f"GPU {gpus}"
    if m.placement == "split":
        layers = "/".join(str(int(c)) for c in m.launch.tensor_split) if m.launch else "?"
        return f"GPUs {gpus}, split {layers} layers"
    if m.placement == "partial":
        return f"GPU {gpus}, {m.gpu_layers}/{m.n_layers + 1} layers"
    if m.placement == "cpu":
        return "CPU"
    where = f" of {m.short_of}" if m.short_of else ""
    return f"UNPLACED, {_mib(round(m.short_bytes / MIB))} MiB short{where}" if m.short_bytes else "UNPLACED"


def _where(device: str, m: ModelPlan) -> str:
    """'GPU0' of an estimate (its position in the placement) as the machine's GPU index."""
    position = int(device.removeprefix("GPU"))
    return f"GPU {m.gpus[position]}" if position < len(m.gpus) else device


def _breakdown(d: DeviceMemory) -> str:
    parts = [
        (label, value)
        for label, value in (
            ("weights", d.weights_bytes),
            ("KV", d.kv_bytes),
            ("recurrent", d.recurrent_bytes),
            ("compute", d.compute_bytes),
            ("output", d.output_bytes),
            ("CUDA overhead", d.overhead_bytes),
        )
        if value
    ]
    if not parts:
        return "0"
    # round the running totals so that the parts add up to the rounded total shown elsewhere
    shown, running, printed = [], 0, 0
    for label, value in parts:
        running += value
        part = round(running / MIB) - printed
        printed += part
        if part:
            shown.append(f"{label} {_mib(part)}")
    return " + ".join(shown or ["0"]) + f" = {_mib(printed)}"
