"""The reload diff: a child is kept exactly when its launch is unchanged."""

from __future__ import annotations

from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.schemas.plan import ModelPlan, Plan
from llama_smart_proxy.supervisor.service.reload_diff import diff_plans, refusal


def entry(name: str, ctx: int = 4096, aliases: tuple[str, ...] = (), placed: bool = True) -> ModelPlan:
    launch = LaunchSpec(
        model=name, file=f"/m/{name}.gguf", ctx=ctx, parallel=1, kv_unified=True,
        cache_type_k="f16", cache_type_v="f16", flash_attn="on", batch=2048, ubatch=512, gpu_layers=0,
    )  # fmt: skip
    return ModelPlan(
        name=name, aliases=list(aliases), mode="resident", priority=0,
        placement="cpu" if placed else "unplaced", reason="test", launch=launch if placed else None,
    )  # fmt: skip


def test_diff_sorts_models_into_kept_updated_changed_added_removed() -> None:
    old = Plan(models=[entry("same"), entry("alias"), entry("ctx"), entry("gone")])
    new = Plan(models=[entry("same"), entry("alias", aliases=("a",)), entry("ctx", ctx=8192), entry("new")])
    diff = diff_plans(old, new)
    assert diff.unchanged == ["same"]
    assert diff.updated == ["alias"]
    assert diff.changed == ["ctx"]
    assert diff.added == ["new"]
    assert diff.removed == ["gone"]
    assert diff.describe() == ["restart ctx", "start new", "stop gone", "update alias"]


def test_identical_plans_give_an_empty_diff() -> None:
    plan = Plan(models=[entry("a"), entry("b")])
    diff = diff_plans(plan, plan)
    assert diff.is_empty and diff.describe() == ["no change"]


def test_new_plan_that_drops_a_served_model_is_refused() -> None:
    old = Plan(models=[entry("a")])
    assert refusal(old, Plan(models=[entry("a", placed=False)])) is not None
    assert refusal(old, Plan(models=[])) is None  # removed from the config on purpose
    assert refusal(old, Plan(models=[entry("a", ctx=1)])) is None
