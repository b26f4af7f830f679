"""A fleet ([hosts]): config errors, the assignment of models to hosts (properties, and exact on small
instances against a brute-force oracle over host assignments), `plan` over several snapshots, and
`prepare` keeping one host's share."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_smart_proxy.schemas.config import Config, ProxySettings
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.plan import FleetPlan
from llama_smart_proxy.supervisor.cli import main
from llama_smart_proxy.supervisor.config.load import load_config
from llama_smart_proxy.supervisor.errors import ConfigError, UserError
from llama_smart_proxy.supervisor.fleet.routes import routes_of_plan
from llama_smart_proxy.supervisor.planning import fleet as fleet_module
from llama_smart_proxy.supervisor.planning.fleet import Machine, plan_order, plan_score, share_config, solve_fleet
from llama_smart_proxy.supervisor.planning.headers import HeaderInfo
from llama_smart_proxy.supervisor.planning.planner import plan
from llama_smart_proxy.supervisor.planning.prepare import Source, prepare, prepare_fleet, this_host
from tests.json_schema import validate
from tests.planning import GIB, MIB, make_config, make_inventory, make_profile
from tests.test_planner_properties import check_invariants

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
FLEET_SCHEMA = json.loads((ROOT / "schemas" / "fleet-plan.schema.json").read_text())


# --- the config ---------------------------------------------------------------------------------

HOSTS = """
[hosts.alpha]
address = "10.0.0.1:8080"
inventory = "alpha.json"

[hosts.beta]
address = "10.0.0.2:8080"
inventory = "beta.json"
"""


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, require_model_files=False)
    return str(caught.value).splitlines()


@pytest.mark.parametrize(
    ("tables", "where", "what"),
    [
        (HOSTS + '[models.q]\nfile = "q.gguf"\nhosts = ["alpha", "gamma"]\n', ":11: models.q.hosts.1", "unknown host 'gamma' (hosts: alpha, beta)"),
        (HOSTS + '[models.q]\nfile = "q.gguf"\nreplicas = 3\n', ":11: models.q.replicas", "3 replicas but only 2 hosts it may run on"),
        (HOSTS + '[models.q]\nfile = "q.gguf"\nhosts = ["beta"]\nreplicas = 2\n', ":12: models.q.replicas", "2 replicas but only 1 host"),
        (HOSTS + '[models.q]\nfile = "q.gguf"\nreplicas = 0\n', ":11: models.q.replicas", "greater than or equal to 1"),
        (HOSTS + '[models.q]\nfile = "q.gguf"\nhosts = []\n', ":11: models.q.hosts", "names no host"),
        (HOSTS.replace("10.0.0.2:8080", "10.0.0.2") + '[models.q]\nfile = "q.gguf"\n', ":7: hosts.beta.address", "expected host:port"),
        ('[models.q]\nfile = "q.gguf"\nhosts = ["alpha"]\n', ":3: models.q.hosts", "needs a [hosts] table"),
        ('[models.q]\nfile = "q.gguf"\nreplicas = 2\n', ":3: models.q.replicas", "needs a [hosts] table"),
        (HOSTS.replace('address = "10.0.0.1:8080"', 'adress = "10.0.0.1:8080"') + '[models.q]\nfile = "q.gguf"\n', ":3: hosts.alpha.adress", "did you mean 'address'"),
    ],
)  # fmt: skip
def test_a_fleet_mistake_is_one_line_naming_file_line_and_key(tmp_path: Path, tables: str, where: str, what: str) -> None:
    lines = problems_of(tmp_path, tables)
    assert any(where in line and what in line for line in lines), lines


def test_a_fleet_config_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="models.q.hosts.0: unknown host 'x'"):
        make_config({"q": {"hosts": ["x"]}}, hosts={"a": {"address": "h:1"}})


def test_host_inventories_are_relative_to_the_config_and_model_files_need_not_all_be_here(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(HOSTS + '[models.q]\nfile = "/nowhere/q.gguf"\n')
    config = load_config(path).config  # the file is checked on the hosts that run it
    assert config.hosts["alpha"].inventory == tmp_path / "alpha.json"
    assert config.fleet_hosts("q") == ["alpha", "beta"] and config.replicas("q") == 1


# --- the assignment, pure -------------------------------------------------------------------------


def machines_for(config: Config, inventories: Mapping[str, object], profiles: Mapping[str, MemoryProfile]) -> dict[str, Machine]:
    return {
        host: Machine(
            address=config.hosts[host].address,
            inventory=inventory,  # type: ignore[arg-type]
            source=f"test {host}",
            profiles=profiles,
            headers={n: HeaderInfo() for n in profiles},
        )
        for host, inventory in inventories.items()
    }


def fleet_total(config: Config, fleet: FleetPlan) -> tuple[int, ...]:
    levels = sorted({s.priority for s in config.model_specs()}, reverse=True)
    total = tuple([0] * (3 * len(levels) + 1))
    for entry in fleet.hosts.values():
        total = tuple(a + b for a, b in zip(total, plan_score(entry.plan, levels)))
    return total


def oracle_best(config: Config, machines: Mapping[str, Machine]) -> tuple[int, ...]:
    """Every assignment of each model to a set of its allowed hosts (at most its replicas), each host
    planned by the single-machine planner: the best summed score."""
    levels = sorted({s.priority for s in config.model_specs()}, reverse=True)
    names = sorted(config.models)
    choices = [
        [set(c) for k in range(config.replicas(n) + 1) for c in itertools.combinations(config.fleet_hosts(n), k)]
        for n in names
    ]
    memo: dict[tuple[str, frozenset[str]], tuple[int, ...]] = {}
    best: tuple[int, ...] | None = None
    for pick in itertools.product(*choices):
        total = tuple([0] * (3 * len(levels) + 1))
        for host, machine in machines.items():
            share = frozenset(n for n, hosts in zip(names, pick) if host in hosts)
            if (host, share) not in memo:
                result = plan(share_config(config, share), machine.inventory, {n: machine.profiles[n] for n in share})
                memo[(host, share)] = plan_score(result, levels)
            total = tuple(a + b for a, b in zip(total, memo[(host, share)]))
        best = total if best is None or total > best else best
    assert best is not None
    return best


@st.composite
def fleets(draw: st.DrawFn, max_models: int = 5, max_hosts: int = 3) -> tuple[Config, dict[str, Machine]]:
    hosts = [f"h{i}" for i in range(draw(st.integers(2, max_hosts)))]
    inventories = {}
    for host in hosts:
        gpus = [draw(st.sampled_from([8, 12, 24])) * GIB for _ in range(draw(st.integers(0, 2)))]
        inventories[host] = make_inventory(gpus, ram=draw(st.sampled_from([4, 8, 16])) * GIB)
    tables: dict[str, dict[str, object]] = {}
    profiles = {}
    for i in range(draw(st.integers(1, max_models))):
        name = f"m{i}"
        allowed = sorted(draw(st.sets(st.sampled_from(hosts), min_size=1))) if draw(st.booleans()) else None
        table: dict[str, object] = {
            "priority": draw(st.integers(0, 1)),
            "allow_cpu": draw(st.booleans()),
            "allow_partial": draw(st.booleans()),
            "mode": draw(st.sampled_from(["resident", "resident", "on-demand"])),
            "replicas": draw(st.integers(1, len(allowed or hosts))),
        }
        if allowed is not None:
            table["hosts"] = allowed
        tables[name] = table
        profiles[name] = make_profile(
            f"/models/{name}.gguf",
            layers=[draw(st.integers(1, 24)) * 256 * MIB for _ in range(draw(st.integers(1, 4)))],
            kv=draw(st.sampled_from([0, 256])) * MIB,
            compute=256 * MIB,
        )
    config = make_config(tables, hosts={h: {"address": f"10.0.0.{i + 1}:8080"} for i, h in enumerate(hosts)})
    return config, machines_for(config, inventories, profiles)


def check_fleet(config: Config, machines: Mapping[str, Machine], fleet: FleetPlan) -> None:
    assert sorted(fleet.hosts) == sorted(machines) and sorted(fleet.models) == sorted(config.models)
    for host, entry in fleet.hosts.items():
        share = share_config(config, [m.name for m in entry.plan.models])
        # never overcommitted: each host's plan keeps the single-machine planner's rules
        check_invariants(share, machines[host].inventory, machines[host].profiles, entry.plan)
        assert entry.address == config.hosts[host].address
    for name, model in fleet.models.items():
        # replicas on distinct hosts, among those the model allows, each a whole copy on one host
        assert len(set(model.hosts)) == len(model.hosts) <= config.replicas(name)
        assert set(model.hosts) <= set(config.fleet_hosts(name))
        for host, entry in fleet.hosts.items():
            names = [m.name for m in entry.plan.models]
            assert (name in names) == (host in model.hosts)
            if name in names:
                assert entry.plan.model(name).placement != "unplaced"
        left = [u.replica for u in fleet.unplaced if u.model == name]
        assert left == list(range(len(model.hosts) + 1, config.replicas(name) + 1))
        for u in fleet.unplaced:
            assert u.reason.startswith("no host can take")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_the_fleet_keeps_every_hosts_rules_and_places_as_many_as_the_best_assignment(
    instance: tuple[Config, dict[str, Machine]],
) -> None:
    config, machines = instance
    fleet = solve_fleet(config, machines)
    check_fleet(config, machines, fleet)
    # exact on small instances: never below the best assignment by the planner's own order
    assert fleet_total(config, fleet) == oracle_best(config, machines)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(max_models=9, max_hosts=3))
def test_the_greedy_alone_keeps_every_hosts_rules_on_larger_fleets(instance: tuple[Config, dict[str, Machine]]) -> None:
    config, machines = instance
    fleet = solve_fleet(config, machines)  # more than EXACT_MODELS models: the greedy alone
    check_fleet(config, machines, fleet)


def two_boxes(**big: object) -> tuple[Config, dict[str, Machine]]:
    """A 24 GiB box and an 8 GiB one; a 6 GiB model `a` and a 20 GiB model `b`, GPU only."""
    tables = {name: {"allow_cpu": False, "allow_partial": False, "allow_split": False} for name in ("a", "b")}
    config = make_config(tables, hosts={"big": {"address": "10.0.0.1:8080"}, "small": {"address": "10.0.0.2:8080"}})
    profiles = {
        "a": make_profile("/models/a.gguf", n_layers=4, layer=1200 * MIB),
        "b": make_profile("/models/b.gguf", n_layers=4, layer=4600 * MIB),
    }
    inventories = {"big": make_inventory([24 * GIB]), "small": make_inventory([8 * GIB])}
    return config, machines_for(config, inventories, profiles)


def test_the_exact_search_places_what_the_greedy_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    config, machines = two_boxes()
    fleet = solve_fleet(config, machines)
    assert fleet.models["a"].hosts == ["small"] and fleet.models["b"].hosts == ["big"] and not fleet.unplaced
    assert any("best assignment" in note for note in fleet.notes)

    monkeypatch.setattr(fleet_module, "EXACT_MODELS", 0)  # the greedy alone: a takes the most room
    greedy = solve_fleet(config, machines)
    assert greedy.models["a"].hosts == ["big"] and greedy.models["b"].hosts == []
    (left,) = greedy.unplaced
    assert left.model == "b" and left.reason.startswith("no host can take b: big: ") and "; small: " in left.reason


def test_plan_order_is_the_planners() -> None:
    config = make_config({"z": {"priority": 2}, "a": {"mode": "on-demand", "priority": 2}, "b": {}})
    assert plan_order(config) == ["z", "a", "b"]


# --- plan and prepare through files ---------------------------------------------------------------


def write_fleet(directory: Path, models: str, beta: str = "inventory-1x24gb.json") -> Path:
    """Two hosts with the example snapshots (they record the example models' headers)."""
    shutil.copy(EXAMPLES / "inventory-2x24gb.json", directory / "alpha.json")
    shutil.copy(EXAMPLES / beta, directory / "beta.json")
    path = directory / "fleet.toml"
    path.write_text(HOSTS + models)
    return path


MODELS = """
[models.qwen]
file = "/srv/llama/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf"
replicas = 2
aliases = ["chat"]

[models.coder]
file = "/srv/llama/models/Qwen2.5-Coder-7B-Instruct-Q4_K_M.gguf"
"""
BIG = """
[models.llama-70b]
file = "/srv/llama/models/Llama-3.3-70B-Instruct-Q4_K_M-00001-of-00002.gguf"
allow_partial = false
allow_cpu = false
hosts = ["beta"]
"""


def test_plan_json_for_a_fleet_validates_and_names_each_model_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_fleet(tmp_path, MODELS)
    assert main(["plan", "-c", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert validate(data, FLEET_SCHEMA) == []
    fleet = FleetPlan.model_validate(data)
    assert fleet.models["qwen"].hosts == ["alpha", "beta"] and len(fleet.models["coder"].hosts) == 1
    routes = routes_of_plan(fleet, ProxySettings(), "0.0.0.0:8080")
    (chat,) = [m for m in routes.models if "chat" in m.names]
    assert [routes.host(h).address for h in chat.hosts] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert {m.name for m in fleet.hosts["alpha"].plan.models} | {m.name for m in fleet.hosts["beta"].plan.models} == {"qwen", "coder"}


def test_plan_shows_each_host_then_the_fleet_and_exits_with_the_worst(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_fleet(tmp_path, MODELS + BIG)
    assert main(["plan", "-c", str(config)]) == 3
    out = capsys.readouterr().out
    assert "=== Host alpha  10.0.0.1:8080" in out and "=== Host beta  10.0.0.2:8080" in out
    assert f"Machine: snapshot {tmp_path / 'alpha.json'} of gpu-box" in out
    assert "=== Fleet: where each model runs" in out
    assert "no host can take llama-70b: beta: " in out
    assert out.rstrip().splitlines()[-1].startswith("Result: no host can take llama-70b") and out.rstrip().endswith("(exit 3)")

    # beta's snapshot replaced by a bigger machine: it fits, every host exits 0
    code = main(["plan", "-c", str(config), "--inventory", f"beta={EXAMPLES / 'inventory-4x80gb.json'}"])
    assert code == 0, capsys.readouterr().out
    capsys.readouterr()

    # --strict: the worst host's fallback is the fleet's
    write_fleet(tmp_path, MODELS + '[defaults]\nallow_partial = true\n', beta="inventory-no-gpu.json")
    assert main(["plan", "-c", str(config), "--strict"]) == 4
    assert "beta: --strict: fell back from the GPU" in capsys.readouterr().out


def test_plan_inventory_names_a_host_of_the_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_fleet(tmp_path, MODELS)
    assert main(["plan", "-c", str(config), "--inventory", "gamma=x.json"]) == 2
    assert "no such host in [hosts] (alpha, beta)" in capsys.readouterr().err
    assert main(["plan", "-c", str(config), "--inventory", "x.json"]) == 2
    assert "give NAME=FILE" in capsys.readouterr().err
    (tmp_path / "beta.json").unlink()
    assert main(["plan", "-c", str(config)]) == 2
    assert "hosts.beta.inventory: " in capsys.readouterr().err


def test_prepare_keeps_the_named_hosts_share_and_the_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_fleet(tmp_path, MODELS)
    snapshot = EXAMPLES / "inventory-1x24gb.json"
    fleet = prepare(Source(config, inventory_path=snapshot, fleet_host="beta", require_model_files=False))
    assert fleet.fleet is not None and fleet.fleet.host == "beta"
    mine = sorted(n for n, m in fleet.fleet.fleet.models.items() if "beta" in m.hosts)
    assert sorted(fleet.loaded.config.models) == mine == sorted(m.name for m in fleet.plan.models)

    monkeypatch.setattr("socket.gethostname", lambda: "alpha.example.org")
    assert this_host(fleet.loaded.config) == "alpha"
    monkeypatch.setattr("socket.gethostname", lambda: "gamma")
    with pytest.raises(UserError, match=r"this machine \(gamma\) is not one of the hosts in \[hosts\] \(alpha, beta\); give serve --host NAME"):
        prepare(Source(config, inventory_path=snapshot, require_model_files=False))
    with pytest.raises(UserError, match="--host delta: no such host"):
        prepare(Source(config, inventory_path=snapshot, fleet_host="delta", require_model_files=False))


def test_serve_host_on_a_config_without_hosts_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.toml"
    path.write_text('[models.q]\nfile = "/nowhere/q.gguf"\n')
    with pytest.raises(UserError, match=r"--host alpha: .*one.toml has no \[hosts\] table"):
        prepare(Source(path, inventory_path=EXAMPLES / "inventory-no-gpu.json", fleet_host="alpha", require_model_files=False))


def test_the_routes_of_a_fleet_give_the_hosts_of_every_name_and_alias(tmp_path: Path) -> None:
    # what `llama-smart-proxy haproxy` routes by (a config without [hosts]: test_haproxy_config.py)
    fleet = prepare_fleet(Source(write_fleet(tmp_path, MODELS), require_model_files=False)).plan
    routes = routes_of_plan(fleet, ProxySettings(), "0.0.0.0:8080")
    hosts = {name: list(m.hosts) for m in routes.models for name in m.names}
    assert hosts["qwen"] == hosts["chat"] == ["alpha", "beta"] and len(hosts["coder"]) == 1


def test_plan_inventory_without_hosts_keeps_its_meaning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(EXAMPLES / "minimal.toml", tmp_path / "minimal.toml")
    snapshot = str(EXAMPLES / "inventory-no-gpu.json")
    code = main(["plan", "-c", str(tmp_path / "minimal.toml"), "-i", snapshot, "--json"])
    assert code in (0, 3) and "models" in json.loads(capsys.readouterr().out)
    assert main(["plan", "-c", str(tmp_path / "minimal.toml"), "-i", snapshot, "-i", snapshot]) == 2
    assert "--inventory FILE once" in capsys.readouterr().err
