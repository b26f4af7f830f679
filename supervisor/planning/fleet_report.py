"""A fleet plan for people: one section per host (its address, its snapshot, its plan's tables as
on one machine), then the fleet: which hosts run each model; and the fleet's verdict.

Rules kept here:
- each host's tables and verdict are planning/report.py's, unchanged;
- the fleet's exit code is the worst of its hosts' (unplaced, then --strict's fallback, then ok),
  and a replica no host can take makes it EXIT_UNPLACED.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_smart_proxy.schemas.plan import FleetPlan
from llama_smart_proxy.supervisor.errors import EXIT_FALLBACK, EXIT_OK, EXIT_UNPLACED
from llama_smart_proxy.supervisor.planning.report import Verdict, aligned, render_plan, verdict

SEVERITY = {EXIT_OK: 0, EXIT_FALLBACK: 1, EXIT_UNPLACED: 2}


def fleet_verdict(fleet: FleetPlan, strict: bool) -> Verdict:
    by_host = {host: verdict(entry.plan, strict) for host, entry in sorted(fleet.hosts.items())}
    worst = max((v.exit_code for v in by_host.values()), key=SEVERITY.__getitem__, default=EXIT_OK)
    parts = [f"{host}: {v.text}" for host, v in by_host.items() if v.exit_code != EXIT_OK]
    if fleet.unplaced:
        worst = EXIT_UNPLACED
        left = [u.model if fleet.models[u.model].replicas == 1 else f"{u.model} replica {u.replica}" for u in fleet.unplaced]
        parts.insert(0, f"no host can take {', '.join(left)}")
    if worst == EXIT_OK:
        fallback = sum(1 for entry in fleet.hosts.values() for m in entry.plan.models if m.fallback)
        extra = f"; {fallback} partly or wholly on the CPU" if fallback else ""
        return Verdict(EXIT_OK, f"every model placed on its hosts as its config allows{extra} (exit {EXIT_OK})")
    return Verdict(worst, f"{'; '.join(parts)} (exit {worst})")


def render_fleet(fleet: FleetPlan, header_lines: Sequence[str] = (), strict: bool = False) -> str:
    lines = list(header_lines)
    for host, entry in sorted(fleet.hosts.items()):
        lines.append(f"=== Host {host}  {entry.address}")
        lines.append(render_plan(entry.plan, [f"Machine: {entry.inventory}"]))
        lines.append(f"Result for {host}: {verdict(entry.plan, strict).text}")
        lines.append("")
    lines.append("=== Fleet: where each model runs")
    table = [("model", "replicas", "hosts")]
    for name, model in sorted(fleet.models.items()):
        hosts = ", ".join(f"{h} ({fleet.hosts[h].address})" for h in model.hosts) or "-"
        table.append((name, str(model.replicas), hosts if len(model.hosts) == model.replicas else f"{hosts}; UNPLACED"))
    lines += aligned(table)
    for u in fleet.unplaced:
        lines.append(f"      why: {u.reason}")
    if fleet.notes:
        lines.append("Notes")
        lines += [f"  - {note}" for note in fleet.notes]
    lines.append("")
    return "\n".join(lines)
