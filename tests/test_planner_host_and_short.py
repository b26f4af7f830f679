"""Issue 13's planner cases: host RAM as a constraint, the honest "short" figure, the greedy floor,
and "why" lines that say how the GPUs stood when each model was taken (tests/planning.py sizes)."""

from __future__ import annotations

from benchmarks.planner_cases import packing_seven_on_three
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.planning.planner import plan
from llama_smart_proxy.supervisor.planning.report import verdict
from tests.planning import GIB, MIB, make_config, make_inventory, make_profile

CPU_ONLY = {"gpus": []}


def test_cpu_models_that_overfill_host_ram_are_refused_and_the_verdict_names_host_ram() -> None:
    # the case: three CPU models needing 28.6 GiB where 14 GiB is available
    profile = make_profile(n_layers=80, layer=112 * MIB, mapped=True)  # about 9.5 GiB each on the CPU
    config = make_config({"a": CPU_ONLY, "b": CPU_ONLY, "c": CPU_ONLY}, host={"reserve": "1GiB"})
    result = plan(config, make_inventory([], ram=14 * GIB), {"a": profile, "b": profile, "c": profile})
    placed = [m.name for m in result.models if m.placement == "cpu"]
    refused = [m for m in result.models if m.placement == "unplaced"]
    assert placed == ["a"] and [m.name for m in refused] == ["b", "c"]
    need = place(profile, 0, []).host.total_bytes
    for m in refused:
        assert m.short_of == "host RAM" and m.short_bytes == need - (13 * GIB - need)
        assert "of host RAM" in m.reason
    assert result.host is not None and result.host.resident_bytes <= result.host.usable_bytes
    outcome = verdict(result, strict=False)
    assert outcome.exit_code == 3 and "short of host RAM" in outcome.text


def test_mmap_overcommit_places_them_when_only_the_mapped_weights_overflow_and_says_by_how_much() -> None:
    profile = make_profile(n_layers=80, layer=112 * MIB, mapped=True)
    config = make_config({"a": CPU_ONLY, "b": CPU_ONLY, "c": CPU_ONLY}, host={"reserve": "1GiB", "mmap_overcommit": True})
    result = plan(config, make_inventory([], ram=14 * GIB), {"a": profile, "b": profile, "c": profile})
    assert all(m.placement == "cpu" for m in result.models)
    host = result.host
    assert host is not None and host.resident_bytes > host.usable_bytes
    assert host.overcommit_bytes == host.resident_bytes - host.usable_bytes and host.mapped_bytes > host.overcommit_bytes
    assert any(n.startswith("mmap overcommit ([host] mmap_overcommit = true)") for n in result.notes)
    assert verdict(result, strict=False).exit_code == 0


def test_without_mmap_weights_are_not_page_cache_and_overcommit_does_not_apply() -> None:
    profile = make_profile(n_layers=80, layer=112 * MIB)  # no mapped span: loaded with -lm none
    config = make_config({"a": CPU_ONLY, "b": CPU_ONLY}, host={"reserve": "1GiB", "mmap_overcommit": True})
    result = plan(config, make_inventory([], ram=14 * GIB), {"a": profile, "b": profile})
    assert [m.placement for m in result.models] == ["cpu", "unplaced"]


def test_a_partial_offload_counts_its_host_layers_against_host_ram() -> None:
    # 80 layers of 400 MiB on a 12 GiB GPU: the host takes the rest, more than 8 GiB of RAM holds
    config = make_config({"big": {"allow_cpu": False}}, gpus={"reserve": 0})
    profile = make_profile(n_layers=80, layer=400 * MIB, mapped=True)
    tight = plan(config, make_inventory([12 * GIB], ram=8 * GIB), {"big": profile}).model("big")
    assert tight.placement == "unplaced" and tight.short_of in ("host RAM", "GPU 0")
    roomy = plan(config, make_inventory([12 * GIB], ram=64 * GIB), {"big": profile}).model("big")
    assert roomy.placement == "partial" and roomy.host_bytes <= 63 * GIB


def test_short_is_what_moving_the_others_would_leave_it_not_its_room_next_to_them() -> None:
    # spread puts a and b on different GPUs, leaving 10.6 GiB on each; c needs 21 GiB whole, which
    # no arrangement gives it: with a and b together it would lack 2 GiB, not 10.6
    strict = {"allow_split": False, "allow_partial": False, "allow_cpu": False}
    config = make_config({"a": {"priority": 1}, "b": {"priority": 1}, "c": strict}, gpus={"reserve": 0, "policy": "spread"})
    nine, twenty_one = make_profile(n_layers=75, layer=100 * MIB), make_profile(n_layers=190, layer=100 * MIB)
    result = plan(config, make_inventory([20 * GIB, 20 * GIB]), {"a": nine, "b": nine, "c": twenty_one})
    assert result.model("a").gpus != result.model("b").gpus  # spread's choice stands
    c = result.model("c")
    whole = place(twenty_one, 191, [1.0]).gpus[0].total_bytes
    as_placed = whole - (20 * GIB - place(nine, 76, [1.0]).gpus[0].total_bytes)
    assert c.short_bytes < as_placed / 4
    assert whole - 20 * GIB <= c.short_bytes <= whole - 20 * GIB + MIB  # to the MiB
    assert c.short_of in ("GPU 0", "GPU 1")


def test_seven_models_on_three_gpus_run_six_whole_where_plan_order_runs_three() -> None:
    config, inventory, profiles = packing_seven_on_three()
    result = plan(config, inventory, profiles)
    assert sum(1 for m in result.models if m.placement == "gpu") == 6
    assert not any("stopped after" in n for n in result.notes)


def test_why_lines_give_the_gpus_as_they_stood_when_the_model_was_taken_in_mib() -> None:
    strict = {"allow_partial": False, "allow_cpu": False, "allow_split": False}
    config = make_config({"a": {**strict, "priority": 2}, "b": {**strict, "priority": 1}}, gpus={"reserve": 0})
    result = plan(config, make_inventory([12 * GIB, 10 * GIB]), {"a": make_profile(n_layers=50), "b": make_profile(n_layers=60)})
    a, b = result.model("a"), result.model("b")
    assert a.reason.startswith("a → GPU 1: needs 6,300 MiB; as it was taken, GPU 1 had 10,240 MiB usable and GPU 0 12,288 MiB")
    assert "pack takes the fullest GPU that fits (3,940 MiB left on GPU 1, 5,988 MiB on GPU 0)" in a.reason
    # b was taken after a: GPU 1 then had 3,940 MiB, not the 10,240 it started with
    assert b.reason.startswith("b → GPU 0: needs 7,380 MiB; as it was taken (after a), GPU 0 had 12,288 MiB usable")
    assert "the only allowed GPU with room for it (the others at most 3,940 MiB)" in b.reason
    assert "GiB" not in a.reason + b.reason
