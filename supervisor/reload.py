"""What a reload changes: the diff between the running plan and a new one; pure, no I/O.

A model keeps its child when its LaunchSpec is unchanged: routing, aliases, mode, priority and
idle TTL are applied in place. A model whose launch changed is drained and restarted; a removed
one drained and stopped; an added resident one started. A new plan that fails to place a model the
running plan serves is refused as a whole (`refusal`), so a reload never takes a model away by
accident: remove it from the config to remove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
