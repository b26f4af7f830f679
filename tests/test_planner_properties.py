"""Properties of the planner over random machines and model sets (hypothesis).

tests/plan_oracle.py shares no code with the planner: it enumerates every arrangement the rules
allow, measuring each with `place`, for the best score; and it plays a plain smallest-first greedy.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.planner_cases import ADVERSARIAL, sixty_four_models
from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.planning.planner import plan
from tests.plan_oracle import HOST, best_score, greedy_score, host_charge, plan_score, rooms
from tests.planning import GIB, MIB, make_config, make_inventory, make_profile

SIZES_MIB = st.integers(min_value=1, max_value=40).map(lambda k: k * 256)


@st.composite
def instances(
    draw: st.DrawFn, max_models: int = 6, max_gpus: int = 3, max_layers: int = 5, splits: bool = True
) -> tuple[Config, Inventory, dict[str, MemoryProfile]]:
    n_gpus = draw(st.integers(0, max_gpus))
    totals = [draw(st.sampled_from([8, 12, 16, 24])) * 1024 * MIB for _ in range(n_gpus)]
    free = [t - draw(st.integers(0, 8)) * 512 * MIB for t in totals]
    ram = draw(st.sampled_from([4, 8, 16, 32, 64])) * GIB
    inventory = make_inventory(totals, free=[max(0, f) for f in free], ram=ram)
    n_models = draw(st.integers(1, max_models))
    tables = {}
    profiles = {}
    for i in range(n_models):
        name = f"m{i}"
        table: dict[str, object] = {
            "allow_split": splits and draw(st.booleans()),
            "allow_partial": draw(st.booleans()),
            "allow_cpu": draw(st.booleans()),
            "priority": draw(st.integers(0, 2)),
            "mode": draw(st.sampled_from(["resident", "resident", "resident", "on-demand"])),
        }
        if n_gpus and draw(st.integers(0, 3)) == 0:
            table["gpus"] = sorted(draw(st.sets(st.integers(0, n_gpus - 1), max_size=n_gpus)))
        tables[name] = table
        n_layers = draw(st.integers(1, max_layers))
        profiles[name] = make_profile(
            f"/models/{name}.gguf",
            layers=[draw(SIZES_MIB) * MIB // 4 for _ in range(n_layers)],
            kv=draw(st.sampled_from([0, 64, 256])) * MIB,
            output=draw(st.sampled_from([128, 512, 1024])) * MIB,
            compute=draw(st.sampled_from([128, 512])) * MIB,
            partial_compute=draw(st.sampled_from([128, 1024])) * MIB,
            split_other=draw(st.sampled_from([64, 512])) * MIB,
            overhead=draw(st.sampled_from([0, 256])) * MIB,
            mmproj=draw(st.sampled_from([0, 0, 768])) * MIB,
            tied=draw(st.sampled_from([0, 0, 384])) * MIB,
            mapped=draw(st.booleans()),
        )
    gpus = {"reserve": draw(st.sampled_from([0, 512 * MIB])), "policy": draw(st.sampled_from(["pack", "spread"]))}
    host = {"reserve": draw(st.sampled_from([0, GIB])), "mmap_overcommit": draw(st.booleans())}
    return make_config(tables, gpus=gpus, host=host), inventory, profiles


def check_invariants(config: Config, inventory: Inventory, profiles: Mapping[str, MemoryProfile], result: Plan) -> None:
    usable = {g.index: max(0, g.free_bytes - config.gpus.reserve) for g in inventory.gpus}
    host_room = rooms(config, inventory)[HOST]
    by_index = {g.index: g for g in result.gpus}
    for g in result.gpus:
        assert sum(s.bytes for s in g.resident) <= usable[g.index], f"GPU {g.index} overcommitted"
        assert g.free_after_bytes >= 0
    charged = {}
    for entry in result.models:
        spec = config.model_spec(entry.name)
        profile = profiles[entry.name]
        allowed = set(usable) if spec.gpus is None else set(spec.gpus) & set(usable)
        assert set(entry.gpus) <= allowed, f"{entry.name} placed outside its pins"
        whole = place(profile, profile.n_layers + 1, [1.0]).gpus[0].total_bytes
        if any(whole <= usable[g] for g in allowed):
            assert len(entry.gpus) <= 1, f"{entry.name} fits one GPU but was split"
        if entry.placement == "split":
            assert spec.allow_split
        if entry.placement == "partial":
            assert spec.allow_partial and entry.gpu_layers <= profile.n_layers
        if entry.placement == "cpu":
            assert spec.allow_cpu
        if entry.placement == "unplaced":
            assert entry.short_bytes > 0 or not allowed and not spec.allow_cpu
            continue
        assert entry.estimate is not None and entry.launch is not None
        split = entry.launch.tensor_split or ([1.0] if entry.gpus else [])
        again = place(profile, entry.gpu_layers, split)
        assert [d.total_bytes for d in again.gpus] == [d.total_bytes for d in entry.estimate.gpus]
        assert again.host.total_bytes == entry.host_bytes
        charged[entry.name] = host_charge(config, profile, entry.gpu_layers, split)
        if spec.mode == "on-demand" and entry.gpus:
            # each on-demand model fits next to the residents on every GPU it uses
            for index, device in zip(entry.gpus, entry.estimate.gpus):
                assert device.total_bytes <= by_index[index].free_after_bytes
    # host RAM is never overcommitted: the residents together, each on-demand model next to them
    residents = sum(b for name, b in charged.items() if config.model_spec(name).mode == "resident")
    assert residents <= host_room, "host RAM overcommitted"
    for name, b in charged.items():
        if config.model_spec(name).mode == "on-demand":
            assert residents + b <= host_room, f"on-demand {name} overcommits host RAM"
    for group in result.on_demand_groups:
        for g in result.gpus:
            loaded = sum(s.bytes for s in g.on_demand if s.model in group)
            assert loaded <= g.free_after_bytes, f"on-demand group {group} overfills GPU {g.index}"
        assert residents + sum(charged[n] for n in group) <= host_room, f"group {group} overcommits host RAM"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_planner_finds_the_best_plan_an_exact_oracle_finds(instance) -> None:  # type: ignore[no-untyped-def]
    config, inventory, profiles = instance
    result = plan(config, inventory, profiles)
    check_invariants(config, inventory, profiles, result)
    assert_agrees_with_the_oracle(config, inventory, profiles, result)
    assert not any("stopped after" in note for note in result.notes)


def assert_agrees_with_the_oracle(config: Config, inventory: Inventory, profiles: Mapping[str, MemoryProfile], result: Plan) -> None:
    """The plan scores what the best arrangement of the oracle scores. The oracle (like the search)
    gives a partial offload its fewest layers; once every model has its place the planner grows
    them, which frees host RAM, and a model left out for want of it then takes its place: the plan
    may score higher than the oracle, never lower, and only where a model may be partly offloaded."""
    best, got = best_score(config, inventory, profiles), plan_score(config, result)
    assert got >= best
    if not any(config.model_spec(name).allow_partial for name in profiles):
        assert got == best


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_models=8, max_gpus=4, max_layers=3))
def test_planner_is_exact_up_to_eight_models_on_four_gpus(instance) -> None:  # type: ignore[no-untyped-def]
    config, inventory, profiles = instance
    result = plan(config, inventory, profiles)
    check_invariants(config, inventory, profiles, result)
    assert_agrees_with_the_oracle(config, inventory, profiles, result)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.randoms(use_true_random=False))
def test_same_inputs_give_byte_identical_json_whatever_the_order(instance, rnd: random.Random) -> None:  # type: ignore[no-untyped-def]
    config, inventory, profiles = instance
    first = plan(config, inventory, profiles).model_dump_json()
    names = list(config.models)
    rnd.shuffle(names)
    shuffled = Config.model_validate(
        {**config.model_dump(), "models": {n: config.models[n].model_dump() for n in names}}
    )
    shuffled_profiles = {n: profiles[n] for n in reversed(list(profiles))}
    assert plan(shuffled, inventory, shuffled_profiles).model_dump_json() == first
    assert json.loads(first) == json.loads(plan(config, inventory, profiles).model_dump_json())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_models=24, max_gpus=8, max_layers=40, splits=False))
def test_larger_machines_keep_the_invariants_and_never_fall_below_a_smallest_first_greedy(instance) -> None:  # type: ignore[no-untyped-def]
    # without splits: the oracle's greedy would enumerate every layer cut over up to 8 GPUs
    config, inventory, profiles = instance
    result = plan(config, inventory, profiles)
    check_invariants(config, inventory, profiles, result)
    assert plan_score(config, result) >= greedy_score(config, inventory, profiles)


def test_sixty_four_models_oversubscribing_eight_gpus_never_fall_below_the_smallest_first_greedy() -> None:
    """The issue's case: 64 models that cannot all fit on 8 GPUs, where the search once returned
    fewer models whole than a smallest-first greedy (footholds of big models took the room)."""
    config, inventory, profiles = sixty_four_models(24, 3.0, splits=False)
    result = plan(config, inventory, profiles)
    check_invariants(config, inventory, profiles, result)
    assert plan_score(config, result) >= greedy_score(config, inventory, profiles)


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_the_small_adversarial_instances_are_solved_exactly(case: str) -> None:
    config, inventory, profiles = ADVERSARIAL[case]()
    result = plan(config, inventory, profiles)
    check_invariants(config, inventory, profiles, result)
    assert not any("stopped after" in note for note in result.notes)
    if case in ("packing-7-on-3", "symmetric-8-on-4"):  # the others take the oracle minutes
        assert_agrees_with_the_oracle(config, inventory, profiles, result)
    if case != "splits-8-on-4":  # the oracle's greedy would walk every cut of 60-80 layers
        assert plan_score(config, result) >= greedy_score(config, inventory, profiles)
