"""The planner's rules, one at a time, on hand-made profiles (sizes in MiB a person can follow).

Default profile (tests/planning.py): each layer 100 MiB weights + 8 MiB KV, output 300, compute
300 (partial 600, split non-output 150), CUDA context 300. So a model of n layers needs
108 n + 900 MiB whole on one GPU.
"""

from __future__ import annotations

from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.planning.headers import HeaderInfo
from llama_smart_proxy.supervisor.planning.planner import plan
from tests.planning import GIB, MIB, make_config, make_inventory, make_profile


def whole(n: int) -> int:
    return (108 * n + 900) * MIB


def usable_of(result: Plan, index: int) -> int:
    return next(g.usable_bytes for g in result.gpus if g.index == index)


def test_a_model_that_fits_goes_whole_on_one_gpu_and_pack_takes_the_fullest() -> None:
    config = make_config({"qwen": {}}, gpus={"reserve": "512MiB", "policy": "pack"})
    inventory = make_inventory([24 * GIB, 24 * GIB], free=[20 * GIB, 23 * GIB])
    result = plan(config, inventory, {"qwen": make_profile(n_layers=32)})
    qwen = result.model("qwen")
    assert (qwen.placement, qwen.gpus, qwen.gpu_layers) == ("gpu", [0], 33)
    assert qwen.estimate is not None and qwen.estimate.gpus[0].total_bytes == whole(32)
    assert qwen.reason == (
        "qwen → GPU 0: needs 4,356 MiB; as it was taken, GPU 0 had 19,968 MiB usable and GPU 1 23,040 MiB: "
        "pack takes the fullest GPU that fits (15,612 MiB left on GPU 0, 18,684 MiB on GPU 1)."
    )


def test_spread_takes_the_emptiest_gpu() -> None:
    config = make_config({"qwen": {}}, gpus={"reserve": "512MiB", "policy": "spread"})
    inventory = make_inventory([24 * GIB, 24 * GIB], free=[20 * GIB, 23 * GIB])
    qwen = plan(config, inventory, {"qwen": make_profile(n_layers=32)}).model("qwen")
    assert qwen.gpus == [1] and "spread takes the emptiest GPU" in qwen.reason


def test_split_happens_only_when_no_single_gpu_holds_the_model_and_over_as_few_gpus_as_possible() -> None:
    config = make_config({"big": {}}, gpus={"reserve": 0})
    inventory = make_inventory([24 * GIB] * 4)
    profile = make_profile(n_layers=80, layer=400 * MIB)  # 80 x 408 MiB: about 33 GiB
    big = plan(config, inventory, {"big": profile}).model("big")
    assert big.placement == "split" and len(big.gpus) == 2
    assert big.launch is not None and big.estimate is not None
    assert big.launch.devices == [inventory.gpus[i].uuid for i in big.gpus]
    assert big.launch.split_mode == "layer" and big.launch.gpu_layers == 81
    assert sum(big.launch.tensor_split) == 81 and all(c == int(c) for c in big.launch.tensor_split)
    # the launch reproduces the estimate through llama.cpp's rule, and each device fits
    again = place(profile, 81, big.launch.tensor_split)
    assert [d.total_bytes for d in again.gpus] == [d.total_bytes for d in big.estimate.gpus]
    assert all(d.total_bytes <= 24 * GIB for d in again.gpus)
    # equal GPUs: cut by layer bytes, the two shares differ by about a layer, not by half a model
    first, second = (d.total_bytes for d in big.estimate.gpus)
    assert abs(first - second) <= 408 * MIB + 300 * MIB
    assert "more than any allowed GPU can hold" in big.reason


def test_split_follows_each_gpus_room_not_an_even_share() -> None:
    config = make_config({"big": {}}, gpus={"reserve": 0})
    inventory = make_inventory([24 * GIB, 24 * GIB], free=[12 * GIB, 24 * GIB])
    big = plan(config, inventory, {"big": make_profile(n_layers=60, layer=400 * MIB)}).model("big")
    assert big.placement == "split" and big.launch is not None
    small_share, large_share = big.launch.tensor_split
    assert large_share > 1.5 * small_share, big.launch.tensor_split


def test_without_split_the_model_runs_partly_offloaded_with_the_most_layers_that_fit() -> None:
    config = make_config({"big": {"allow_split": False}}, gpus={"reserve": 0})
    inventory = make_inventory([24 * GIB, 24 * GIB])
    profile = make_profile(n_layers=80, layer=400 * MIB)
    big = plan(config, inventory, {"big": profile}).model("big")
    assert big.placement == "partial" and len(big.gpus) == 1 and big.fallback
    ngl = big.gpu_layers
    assert place(profile, ngl, [1.0]).gpus[0].total_bytes <= 24 * GIB
    assert place(profile, ngl + 1, [1.0]).gpus[0].total_bytes > 24 * GIB, "one more layer would have fitted"
    assert f"{ngl} of 81 layers (partial offload)" in big.reason
    assert big.estimate is not None and big.host_bytes == big.estimate.host.total_bytes > 0


def test_a_model_allowed_neither_partial_nor_cpu_is_unplaced_with_the_bytes_it_lacks() -> None:
    config = make_config(
        {"big": {"allow_split": False, "allow_partial": False, "allow_cpu": False}}, gpus={"reserve": "1GiB"}
    )
    inventory = make_inventory([24 * GIB])
    big = plan(config, inventory, {"big": make_profile(n_layers=80, layer=400 * MIB)}).model("big")
    need = (408 * 80 + 900) * MIB
    assert big.placement == "unplaced" and big.launch is None
    assert big.short_bytes == need - (24 * GIB - 1 * GIB)
    assert "partial offload and the CPU not allowed" in big.reason


def test_cpu_fallback_when_only_the_cpu_is_allowed() -> None:
    config = make_config({"big": {"allow_split": False, "allow_partial": False}}, gpus={"reserve": 0})
    big = plan(config, make_inventory([8 * GIB]), {"big": make_profile(n_layers=80)}).model("big")
    assert (big.placement, big.gpus, big.gpu_layers, big.fallback) == ("cpu", [], 0, True)
    assert big.launch is not None and big.launch.devices == [] and big.launch.gpu_layers == 0
    assert "partial offload is not allowed" in big.reason


def test_pins_are_respected_by_index_and_by_uuid() -> None:
    inventory = make_inventory([24 * GIB, 24 * GIB], free=[20 * GIB, 23 * GIB])
    profiles = {"a": make_profile(), "b": make_profile(), "c": make_profile()}
    config = make_config(
        {"a": {"gpus": [1]}, "b": {"gpus": [inventory.gpus[1].uuid]}, "c": {"gpus": []}},
        gpus={"policy": "pack"},
    )
    result = plan(config, inventory, profiles)
    assert result.model("a").gpus == [1] and result.model("b").gpus == [1], "pack alone would choose GPU 0"
    c = result.model("c")
    assert c.placement == "cpu" and not c.fallback and "allows no GPU (gpus = [])" in c.reason


def test_a_pin_to_a_gpu_the_machine_lacks_is_a_note_and_the_model_falls_back() -> None:
    config = make_config({"a": {"gpus": [3]}})
    result = plan(config, make_inventory([24 * GIB]), {"a": make_profile()})
    assert result.model("a").placement == "cpu"
    assert any("models.a.gpus names GPU 3" in note for note in result.notes)


def test_residents_on_one_gpu_are_counted_together_against_free_minus_reserve() -> None:
    config = make_config({"a": {}, "b": {}, "c": {}}, gpus={"reserve": "1GiB"})
    inventory = make_inventory([24 * GIB])
    profile = make_profile(n_layers=70)  # 8460 MiB each: two fit in 23 GiB, three do not
    result = plan(config, inventory, {"a": profile, "b": profile, "c": profile})
    whole_gpu = [m.name for m in result.models if m.placement == "gpu"]
    assert whole_gpu == ["a", "b"]
    c = result.model("c")
    assert c.placement == "partial"
    gpu = result.gpus[0]
    assert sum(s.bytes for s in gpu.resident) <= 23 * GIB
    assert gpu.free_after_bytes == 23 * GIB - sum(s.bytes for s in gpu.resident) >= 0
    assert "next to the other resident models" in c.reason


def test_higher_priority_wins_and_the_loser_is_reported_with_bytes_short() -> None:
    strict = {"allow_split": False, "allow_partial": False, "allow_cpu": False}
    config = make_config({"aaa": {**strict, "priority": 0}, "zzz": {**strict, "priority": 5}}, gpus={"reserve": 0})
    profile = make_profile(n_layers=120)  # 13860 MiB: one fits a 24 GiB GPU, two do not
    result = plan(config, make_inventory([24 * GIB]), {"aaa": profile, "zzz": profile})
    assert result.model("zzz").placement == "gpu"
    loser = result.model("aaa")
    assert loser.placement == "unplaced"
    assert loser.short_bytes == whole(120) - (24 * GIB - whole(120))


def test_search_moves_a_model_when_the_policys_first_choice_would_strand_another() -> None:
    # spread puts "a" on the emptier GPU 0, after which "b" fits nowhere; the search swaps
    strict = {"allow_partial": False, "allow_cpu": False, "allow_split": False}
    config = make_config({"a": {**strict, "priority": 1}, "b": strict}, gpus={"reserve": 0, "policy": "spread"})
    inventory = make_inventory([10 * GIB, 6 * GIB])
    profiles = {"a": make_profile(n_layers=30), "b": make_profile(n_layers=75)}  # 4140 and 9000 MiB
    result = plan(config, inventory, profiles)
    assert result.model("a").gpus == [1] and result.model("b").gpus == [0]
    assert "spread prefers GPU 0, but the plan that places more models" in result.model("a").reason


def test_each_on_demand_model_fits_next_to_the_residents_and_groups_say_which_fit_together() -> None:
    config = make_config(
        {"res": {}, "x": {"mode": "on-demand"}, "y": {"mode": "on-demand"}}, gpus={"reserve": 0}
    )
    inventory = make_inventory([24 * GIB])
    ten, eight = make_profile(n_layers=86), make_profile(n_layers=67)  # 10188 and 8136 MiB
    result = plan(config, inventory, {"res": ten, "x": eight, "y": eight})
    assert result.model("x").placement == result.model("y").placement == "gpu"
    assert result.on_demand_groups == [["x"], ["y"]], "both together need 16 GiB of the 14 left"
    gpu = result.gpus[0]
    assert [s.model for s in gpu.resident] == ["res"] and [s.model for s in gpu.on_demand] == ["x", "y"]
    assert "next to the resident models" in result.model("x").reason

    small = make_profile(n_layers=30)
    together = plan(config, inventory, {"res": ten, "x": eight, "y": small})
    assert together.on_demand_groups == [["x", "y"]]


def test_an_on_demand_model_that_cannot_fit_next_to_the_residents_is_unplaced() -> None:
    # equal priority and only one fits: the resident keeps its place
    strict = {"allow_partial": False, "allow_cpu": False}
    config = make_config({"res": strict, "od": {**strict, "mode": "on-demand"}}, gpus={"reserve": 0})
    result = plan(config, make_inventory([24 * GIB]), {"res": make_profile(n_layers=120), "od": make_profile(n_layers=100)})
    assert result.model("res").placement == "gpu"
    od = result.model("od")
    assert od.placement == "unplaced" and od.short_bytes == whole(100) - (24 * GIB - whole(120))
    assert "(on demand) cannot be placed" in od.reason


def test_a_resident_that_allows_partial_offload_makes_room_for_an_on_demand_model() -> None:
    # more models with a place beats one model whole: the resident runs partly on the CPU
    strict = {"allow_partial": False, "allow_cpu": False}
    config = make_config({"res": {}, "od": {**strict, "mode": "on-demand"}}, gpus={"reserve": 0})
    result = plan(config, make_inventory([24 * GIB]), {"res": make_profile(n_layers=120), "od": make_profile(n_layers=100)})
    assert result.model("res").placement == "partial" and result.model("od").placement == "gpu"


def test_residents_leave_room_for_a_higher_priority_on_demand_model() -> None:
    # spread alone would put one resident on each GPU and leave no GPU for the on-demand model
    config = make_config(
        {"a": {}, "b": {}, "vision": {"mode": "on-demand", "priority": 10, "allow_partial": False, "allow_cpu": False}},
        gpus={"reserve": 0, "policy": "spread"},
    )
    inventory = make_inventory([12 * GIB, 12 * GIB])
    six, eleven = make_profile(n_layers=46), make_profile(n_layers=95)  # 5868 and 11160 MiB
    result = plan(config, inventory, {"a": six, "b": six, "vision": eleven})
    assert result.model("vision").placement == "gpu"
    assert result.model("a").gpus == result.model("b").gpus


def test_without_a_gpu_cpu_models_run_on_the_cpu_and_the_rest_are_unplaced_with_a_plain_note() -> None:
    config = make_config({"cpu-ok": {}, "gpu-only": {"allow_cpu": False}})
    inventory = make_inventory([], message="the NVML library (libnvidia-ml.so.1) is not installed")
    result = plan(config, inventory, {"cpu-ok": make_profile(), "gpu-only": make_profile()})
    assert result.gpus == []
    assert result.model("cpu-ok").placement == "cpu" and "no GPU found" in result.model("cpu-ok").reason
    gpu_only = result.model("gpu-only")
    assert gpu_only.placement == "unplaced" and "no GPU found" in gpu_only.reason
    assert any(n.startswith("No GPU found (the NVML library") for n in result.notes)


def test_a_model_without_a_header_is_unplaced_and_says_why() -> None:
    config = make_config({"a": {}})
    note = "models.a.file /models/a.gguf is not here and the snapshot records no header for it"
    result = plan(config, make_inventory([24 * GIB]), {}, {"a": HeaderInfo("missing", note)})
    a = result.model("a")
    assert (a.placement, a.header_source, a.short_bytes) == ("unplaced", "missing", 0)
    assert note in a.reason


def test_launch_carries_the_placement_and_merges_args_and_env_global_then_model() -> None:
    config = make_config(
        {"a": {"args": ["--jinja"], "env": {"B": "model", "C": "3"}, "ctx": 8192}},
        llama_server={"args": ["--metrics"], "env": {"A": "1", "B": "global"}},
    )
    inventory = make_inventory([24 * GIB, 24 * GIB])
    launch = plan(config, inventory, {"a": make_profile()}).model("a").launch
    assert launch is not None
    assert launch.args == ["--metrics", "--jinja"]
    assert launch.env == {"A": "1", "B": "model", "C": "3"}
    assert launch.devices == [inventory.gpus[0].uuid] and launch.tensor_split == []
    assert (launch.gpu_layers, launch.split_mode, launch.main_gpu, launch.ctx) == (33, "none", 0, 8192)
    assert launch.flash_attn == "on" and launch.file == "/models/a.gguf"


def test_gpus_outside_the_allow_list_are_not_used() -> None:
    inventory = make_inventory([24 * GIB, 24 * GIB])
    config = make_config({"a": {}}, gpus={"allow": [inventory.gpus[1].uuid], "policy": "pack"})
    result = plan(config, inventory, {"a": make_profile()})
    assert [g.index for g in result.gpus] == [1] and result.model("a").gpus == [1]
    assert any("GPU 0" in n and "not in [gpus] allow" in n for n in result.notes)


def test_a_gpu_with_less_free_than_the_reserve_takes_nothing() -> None:
    config = make_config({"a": {"allow_cpu": False, "allow_partial": False}}, gpus={"reserve": "2GiB"})
    result = plan(config, make_inventory([24 * GIB], free=[1 * GIB]), {"a": make_profile(n_layers=2)})
    assert result.gpus[0].usable_bytes == 0 and result.model("a").placement == "unplaced"
    assert any("less than the reserve" in n for n in result.notes)


def test_host_ram_is_a_constraint_a_cpu_model_that_does_not_fit_is_unplaced_short_of_host_ram() -> None:
    config = make_config({"a": {"gpus": []}})
    profile = make_profile(n_layers=80, layer=400 * MIB)  # 33,491 MiB on the CPU
    result = plan(config, make_inventory([], ram=8 * GIB), {"a": profile})
    a = result.model("a")
    assert a.placement == "unplaced" and a.short_of == "host RAM"
    assert a.short_bytes == place(profile, 0, []).host.total_bytes - (8 * GIB - GIB)  # less the 1 GiB reserve
    assert "on the CPU it needs 33,491 MiB of host RAM, 7,168 MiB usable" in a.reason
    assert result.host is not None and result.host.resident_bytes == 0 and result.host.usable_bytes == 7 * GIB


def test_a_vision_projector_is_counted_on_the_first_gpu_of_a_split() -> None:
    config = make_config({"vl": {}}, gpus={"reserve": 0})
    profile = make_profile(n_layers=60, layer=400 * MIB, mmproj=2 * 1024 * MIB)
    vl = plan(config, make_inventory([16 * GIB, 16 * GIB]), {"vl": profile}).model("vl")
    assert vl.placement == "split" and vl.estimate is not None
    assert vl.estimate.gpus[0].weights_bytes > vl.estimate.gpus[1].weights_bytes - 400 * MIB
    assert all(d.total_bytes <= 16 * GIB for d in vl.estimate.gpus)


def test_sixty_four_models_on_eight_gpus_never_overcommit() -> None:
    models = {f"m{i:02d}": {"priority": i % 3, "mode": "on-demand" if i % 8 == 7 else "resident"} for i in range(64)}
    config = make_config(models, gpus={"reserve": "1GiB"})
    inventory = make_inventory([80 * GIB] * 8)
    profiles = {name: make_profile(n_layers=20 + (i * 7) % 60, layer=(150 + (i * 37) % 400) * MIB) for i, name in enumerate(models)}
    result = plan(config, inventory, profiles)
    for g in result.gpus:
        assert sum(s.bytes for s in g.resident) <= g.usable_bytes
    assert plan(config, inventory, profiles).model_dump_json() == result.model_dump_json()
