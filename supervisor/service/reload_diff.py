"""What a reload changes: the diff between the running plan and a new one; pure, no I/O.

A model keeps its child when its LaunchSpec is unchanged: routing, aliases, mode, priority and
idle TTL are applied in place. A model whose launch changed is drained and restarted; a removed
one drained and stopped; an added resident one started. A new plan that fails to place a model the
running plan serves is refused as a whole (`refusal`), so a reload never takes a model away by
accident: remove it from the config to remove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama_smart_proxy.schemas.config import Config, ModelSpec
from llama_smart_proxy.schemas.plan import ModelPlan, Plan


@dataclass(frozen=True)
class PlanDiff:
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    """Same launch, other routing or policy (aliases, mode, priority, TTL): applied in place."""
    changed: list[str] = field(default_factory=list)
    """Launch changed: drained, then restarted as the new plan says."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.updated or self.changed or self.added or self.removed)

    def describe(self) -> list[str]:
        lines = [f"{verb} {name}" for verb, names in (
            ("restart", self.changed), ("start", self.added), ("stop", self.removed),
            ("update", self.updated)) for name in names]  # fmt: skip
        return lines or ["no change"]


def diff_plans(old: Plan, new: Plan) -> PlanDiff:
    old_models = {m.name: m for m in old.models}
    new_models = {m.name: m for m in new.models}
    diff = PlanDiff()
    for name in sorted(old_models.keys() | new_models.keys()):
        before, after = old_models.get(name), new_models.get(name)
        if before is None:
            diff.added.append(name)
        elif after is None:
            diff.removed.append(name)
        elif before.launch != after.launch:
            diff.changed.append(name)
        elif _policy(before) != _policy(after):
            diff.updated.append(name)
        else:
            diff.unchanged.append(name)
    return diff


def with_setting_changes(diff: PlanDiff, old: Config, new: Config) -> PlanDiff:
    """`diff` with the models whose serving settings (max_concurrency, idle_ttl) changed moved from
    unchanged to updated: the plan does not carry those, but a reload applies them in place."""
    moved = [
        name for name in diff.unchanged
        if _serving(old.model_spec(name)) != _serving(new.model_spec(name))
    ]  # fmt: skip
    if not moved:
        return diff
    return PlanDiff(
        unchanged=[n for n in diff.unchanged if n not in moved],
        updated=sorted(diff.updated + moved),
        changed=diff.changed,
        added=diff.added,
        removed=diff.removed,
    )


def _serving(spec: ModelSpec) -> tuple[object, ...]:
    return (spec.max_concurrency, spec.idle_ttl)


def refusal(old: Plan, new: Plan) -> str | None:
    """Why the new plan must not replace the running one, or None when it may."""
    new_models = {m.name: m for m in new.models}
    lost = [
        after.name + f" ({after.reason})"
        for before in old.models
        if before.placement != "unplaced"
        and (after := new_models.get(before.name)) is not None
        and after.placement == "unplaced"
    ]
    if lost:
        return "the new config does not place " + "; ".join(lost)
    return None


def _policy(model: ModelPlan) -> tuple[object, ...]:
    return (model.aliases, model.mode, model.priority, model.placement, model.gpus)


# Settings a running service cannot apply at once: what happens to each, in words.
DEFERRED = {
    ("proxy", "listen"): "takes effect at the next start of the service (the listening socket stays)",
    ("proxy", "max_connections"): "takes effect at the next start of the service",
    **{
        ("llama_server", key): "applies to children started from now on; running ones keep theirs"
        for key in (
            "port_range", "load_timeout", "load_stall_timeout", "stop_grace", "restart_delay",
            "restart_delay_max", "crash_loop_deaths", "crash_loop_window", "stable_after",
            "health_interval", "health_timeout", "health_failures", "stall_timeout",
        )
    },
}  # fmt: skip


def deferred_settings(old: Config, new: Config) -> list[str]:
    """The changed settings that a reload does not apply at once, each with what happens to it."""
    lines = []
    for (section, key), what in DEFERRED.items():
        before, after = getattr(getattr(old, section), key), getattr(getattr(new, section), key)
        if before != after:
            lines.append(f"{section}.{key} {_shown(before)} -> {_shown(after)}: {what}")
    return lines


def _shown(value: object) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple | list) else str(value)


@dataclass(frozen=True)
class ReloadRecord:
    """What the last reload did, for /status and the logs."""

    time: float
    ok: bool
    summary: str
    applied: tuple[str, ...] = ()
    """One line per model the reload acted on ("restart a", "start b (its start failed: ...)")."""
    deferred: tuple[str, ...] = ()
    """Changed settings that take effect only at a later start."""

    def as_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "ok": self.ok,
            "summary": self.summary,
            "applied": list(self.applied),
            "deferred": list(self.deferred),
        }
