"""Properties of the planner over random machines and model sets (hypothesis).

The brute force below shares no code with the planner: it enumerates every placement the rules
allow, measuring each with `place`, and asks only whether everything can be placed.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.planner import plan
from tests.planning import MIB, make_config, make_inventory, make_profile

SIZES_MIB = st.integers(min_value=1, max_value=40).map(lambda k: k * 256)


@st.composite
def instances(draw: st.DrawFn, max_models: int = 6, max_gpus: int = 3) -> tuple[Config, Inventory, dict[str, MemoryProfile]]:
    n_gpus = draw(st.integers(0, max_gpus))
    totals = [draw(st.sampled_from([8, 12, 16, 24])) * 1024 * MIB for _ in range(n_gpus)]
    free = [t - draw(st.integers(0, 8)) * 512 * MIB for t in totals]
    inventory = make_inventory(totals, free=[max(0, f) for f in free])
    n_models = draw(st.integers(1, max_models))
    tables = {}
    profiles = {}
    for i in range(n_models):
        name = f"m{i}"
        table: dict[str, object] = {
            "allow_split": draw(st.booleans()),
            "allow_partial": draw(st.booleans()),
            "allow_cpu": draw(st.booleans()),
            "priority": draw(st.integers(0, 2)),
            "mode": draw(st.sampled_from(["resident", "resident", "resident", "on-demand"])),
        }
        if n_gpus and draw(st.integers(0, 3)) == 0:
            table["gpus"] = sorted(draw(st.sets(st.integers(0, n_gpus - 1), max_size=n_gpus)))
        tables[name] = table
        n_layers = draw(st.integers(1, 5))
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
        )
    reserve = draw(st.sampled_from([0, 512 * MIB]))
    policy = draw(st.sampled_from(["pack", "spread"]))
    config = make_config(tables, gpus={"reserve": reserve, "policy": policy})
    return config, inventory, profiles


# --- the brute force ---------------------------------------------------------------------------


def _options(config: Config, inventory: Inventory, name: str, profile: MemoryProfile) -> list[dict[int, int]]:
    """Every placement the rules allow for one model, as bytes per GPU index ({} is the CPU)."""
    spec = config.model_spec(name)
    usable = {g.index: max(0, g.free_bytes - config.gpus.reserve) for g in inventory.gpus}
    allowed = sorted(usable) if spec.gpus is None else sorted(i for i in usable if i in spec.gpus)
    n = profile.n_layers
    whole = place(profile, n + 1, [1.0]).gpus[0].total_bytes
    fits_single = any(whole <= usable[g] for g in allowed)
    out: list[dict[int, int]] = [{g: whole} for g in allowed if whole <= usable[g]]
    if spec.allow_split and not fits_single:
        for k in range(2, len(allowed) + 1):
            for subset in itertools.combinations(allowed, k):
                for cuts in itertools.combinations(range(1, n + 1), k - 1):
                    bounds = (0, *cuts, n + 1)
                    counts = [float(bounds[i + 1] - bounds[i]) for i in range(k)]
                    estimate = place(profile, n + 1, counts)
                    out.append({g: d.total_bytes for g, d in zip(subset, estimate.gpus)})
    if spec.allow_partial and n >= 1:
        foothold = place(profile, 1, [1.0]).gpus[0].total_bytes  # the least a partial can use
        out += [{g: foothold} for g in allowed]
    if spec.allow_cpu:
        out.append({})
    return out


def everything_fits(config: Config, inventory: Inventory, profiles: Mapping[str, MemoryProfile]) -> bool:
    usable = {g.index: max(0, g.free_bytes - config.gpus.reserve) for g in inventory.gpus}
    names = sorted(profiles)
    options = {name: _options(config, inventory, name, profiles[name]) for name in names}
    residents = [n for n in names if config.model_spec(n).mode == "resident"]
    on_demand = [n for n in names if config.model_spec(n).mode == "on-demand"]
    failed: set[tuple[int, tuple[int, ...]]] = set()

    def fits(room: dict[int, int], option: dict[int, int]) -> bool:
        return all(room[g] >= b for g, b in option.items())

    def search(i: int, room: dict[int, int]) -> bool:
        if i == len(residents):
            return all(any(fits(room, o) for o in options[n]) for n in on_demand)
        key = (i, tuple(sorted(room.items())))
        if key in failed:
            return False
        for option in options[residents[i]]:
            if fits(room, option):
                after = dict(room)
                for g, b in option.items():
                    after[g] -= b
                if search(i + 1, after):
                    return True
        failed.add(key)
        return False

    return search(0, usable)


# --- the properties ------------------------------------------------------------------------------


def check_invariants(config: Config, inventory: Inventory, profiles: Mapping[str, MemoryProfile], result: Plan) -> None:
    usable = {g.index: max(0, g.free_bytes - config.gpus.reserve) for g in inventory.gpus}
    by_index = {g.index: g for g in result.gpus}
    for g in result.gpus:
        assert sum(s.bytes for s in g.resident) <= usable[g.index], f"GPU {g.index} overcommitted"
        assert g.free_after_bytes >= 0
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
        if entry.placement != "unplaced":
            assert entry.estimate is not None and entry.launch is not None
            split = entry.launch.tensor_split or ([1.0] if entry.gpus else [])
            again = place(profile, entry.gpu_layers, split)
            assert [d.total_bytes for d in again.gpus] == [d.total_bytes for d in entry.estimate.gpus]
        if spec.mode == "on-demand" and entry.gpus:
            # each on-demand model fits next to the residents on every GPU it uses
            assert entry.estimate is not None
            for index, device in zip(entry.gpus, entry.estimate.gpus):
                assert device.total_bytes <= by_index[index].free_after_bytes
    for group in result.on_demand_groups:
        for g in result.gpus:
            loaded = sum(s.bytes for s in g.on_demand if s.model in group)
            assert loaded <= g.free_after_bytes, f"on-demand group {group} overfills GPU {g.index}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_planner_places_everything_whenever_a_brute_force_can(instance) -> None:  # type: ignore[no-untyped-def]
    config, inventory, profiles = instance
    result = plan(config, inventory, profiles)
    check_invariants(config, inventory, profiles, result)
    if everything_fits(config, inventory, profiles):
        unplaced = [m.name for m in result.models if m.placement == "unplaced"]
        assert not unplaced, f"brute force places everything, the planner left {unplaced} out"


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
@given(instances(max_models=24, max_gpus=8))
def test_invariants_hold_on_larger_machines(instance) -> None:  # type: ignore[no-untyped-def]
    config, inventory, profiles = instance
    check_invariants(config, inventory, profiles, plan(config, inventory, profiles))
