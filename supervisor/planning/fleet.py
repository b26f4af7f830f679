"""The fleet: which host runs each model of one config, and each host's share planned; pure, no I/O.

Rules kept here (issue 18):
- every model, and each of its replicas, runs whole on exactly one host (never split across hosts),
  replicas on distinct hosts, each among the hosts the model allows (`Config.fleet_hosts`);
- each host's share is planned by the single-machine planner (planning/planner.py) against that
  host's inventory, so every rule, reason and exit code of one machine holds per host;
- a replica no host can take is unplaced, with the reason each host it was tried on gave.

How: replicas are placed in the planner's order (priority, residents first, name), replica by
replica. Each goes to the allowed host that gains most by the planner's own score (models placed,
whole on GPUs, partly on GPUs, per priority level; fewest GPUs split over), then that leaves the
most room (GPU memory left, then host RAM), then the first by name; a host where it would take the
place of a model placed before it is not tried further. Small instances (EXACT_MODELS models, at
most EXACT_ASSIGNMENTS assignments) are then searched exhaustively over host assignments, scoring
the same way over every host; the greedy assignment stands unless that finds a better one.
Each (host, set of models) is planned once (`_Plans`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import FleetHostPlan, FleetModel, FleetPlan, FleetUnplaced, Plan
from llama_smart_proxy.supervisor.planning.headers import HeaderInfo
from llama_smart_proxy.supervisor.planning.planner import plan

EXACT_MODELS = 6  # up to this many models the assignment is searched to the end ...
EXACT_ASSIGNMENTS = 8**5  # ... when there are at most this many ways to assign them: five models, each
# on any set of up to three hosts (each host's share planned once: 2**5 plans a host)

Score = tuple[int, ...]


@dataclass(frozen=True)
class Machine:
    """One host as the fleet sees it: its address, its snapshot, and the shell's findings there."""

    address: str
    inventory: Inventory
    source: str
    """Where the inventory came from, for people ("snapshot inventories/alpha.json of ...")."""
    profiles: Mapping[str, MemoryProfile]
    headers: Mapping[str, HeaderInfo]
    notes: Sequence[str] = ()


def share_config(config: Config, names: Iterable[str]) -> Config:
    """`config` with only the named models: what one host runs.

    Built with model_copy, which does not validate again: proxy.default_model may name a model
    another host runs (its requests are then answered with where it runs)."""
    keep = set(names)
    return config.model_copy(update={"models": {n: m for n, m in config.models.items() if n in keep}})


def plan_order(config: Config) -> list[str]:
    """The single-machine planner's order of preference: priority, residents first, name."""
    specs = config.model_specs()
    return [s.name for s in sorted(specs, key=lambda s: (-s.priority, s.mode != "resident", s.name))]


def plan_score(result: Plan, levels: Sequence[int]) -> Score:
    """A plan's score in the planner's order (planning/search.py), over the fleet's priority levels,
    so that the scores of several hosts add up."""
    width = len(levels)
    v = [0] * (3 * width + 1)
    for m in result.models:
        if m.placement == "unplaced":
            continue
        level = levels.index(m.priority)
        v[level] += 1
        if m.placement in ("gpu", "split"):
            v[width + level] += 1
        elif m.placement == "partial":
            v[2 * width + level] += 1
        if m.placement == "split":
            v[-1] -= len(m.gpus)
    return tuple(v)


def add(a: Score, b: Score) -> Score:
    return tuple(x + y for x, y in zip(a, b))


def room_left(result: Plan) -> tuple[int, int]:
    """(GPU memory, host RAM) the plan leaves to more models."""
    gpu = sum(g.free_after_bytes for g in result.gpus)
    host = result.host.usable_bytes - result.host.resident_bytes if result.host else 0
    return gpu, host


class _Plans:
    """Each host's plan for a set of models, made once."""

    def __init__(self, config: Config, machines: Mapping[str, Machine]) -> None:
        self.config = config
        self.machines = machines
        self.levels = sorted({s.priority for s in config.model_specs()}, reverse=True)
        self._plans: dict[tuple[str, frozenset[str]], Plan] = {}

    def plan(self, host: str, names: Iterable[str]) -> Plan:
        key = (host, frozenset(names))
        found = self._plans.get(key)
        if found is None:
            machine = self.machines[host]
            mentioned = [f"models.{n}." for n in self.config.models]
            notes = [
                note for note in machine.notes
                if any(f"models.{n}." in note for n in key[1]) or not any(m in note for m in mentioned)
            ]  # fmt: skip
            found = plan(
                share_config(self.config, key[1]),
                machine.inventory,
                {n: p for n, p in machine.profiles.items() if n in key[1]},
                {n: h for n, h in machine.headers.items() if n in key[1]},
                notes,
            )
            self._plans[key] = found
        return found

    def score(self, host: str, names: Iterable[str]) -> Score:
        return plan_score(self.plan(host, names), self.levels)


def solve_fleet(config: Config, machines: Mapping[str, Machine]) -> FleetPlan:
    """Assign every model's replicas to hosts and plan each host's share (the module docstring)."""
    plans = _Plans(config, machines)
    shares, tried = _greedy(config, plans)
    notes: list[str] = []
    exact = _exhaustive(config, plans)
    if exact is not None and _total(plans, exact) > _total(plans, shares):
        notes.append(
            "Placing the models in order, each on the host with the most room, gave a worse fleet by "
            "the planner's order (placed, whole on GPUs, partly on GPUs, fewest GPUs split) than the "
            "best assignment, searched over all of them; the best one is used."
        )
        shares, tried = exact, {}
    # a model its host's planner leaves unplaced takes no place there: it joins the unplaced
    for host in sorted(shares):
        result = plans.plan(host, shares[host])
        for name in sorted(shares[host]):
            if result.model(name).placement == "unplaced":
                shares[host] = shares[host] - {name}
    hosts_of = {name: sorted(h for h in shares if name in shares[h]) for name in config.models}
    unplaced = []
    for name in plan_order(config):
        for replica in range(len(hosts_of[name]) + 1, config.replicas(name) + 1):
            reasons = tried.get((name, replica)) or _reasons(config, plans, shares, name)
            which = f"{name} replica {replica}" if config.replicas(name) > 1 else name
            unplaced.append(FleetUnplaced(model=name, replica=replica, reason=f"no host can take {which}: {reasons}"))
    return FleetPlan(
        hosts={
            host: FleetHostPlan(
                address=machines[host].address, inventory=machines[host].source, plan=plans.plan(host, shares[host])
            )
            for host in sorted(machines)
        },
        models={
            name: FleetModel(aliases=list(config.models[name].aliases), replicas=config.replicas(name), hosts=hosts_of[name])
            for name in sorted(config.models)
        },
        unplaced=unplaced,
        notes=notes,
    )


def _greedy(config: Config, plans: _Plans) -> tuple[dict[str, frozenset[str]], dict[tuple[str, int], str]]:
    """Replicas in plan order, each on its best host; also why each replica left out was refused."""
    shares = {host: frozenset[str]() for host in plans.machines}
    tried: dict[tuple[str, int], str] = {}
    for name in plan_order(config):
        for replica in range(1, config.replicas(name) + 1):
            best: tuple[tuple[Score, tuple[int, int]], str] | None = None
            refusals = []
            for host in config.fleet_hosts(name):
                if name in shares[host]:
                    continue
                why = _refusal(plans, host, shares[host], name)
                if why is not None:
                    refusals.append(f"{host}: {why}")
                    continue
                after = plans.plan(host, shares[host] | {name})
                gain = tuple(a - b for a, b in zip(plan_score(after, plans.levels), plans.score(host, shares[host])))
                key = (gain, room_left(after))
                if best is None or key > best[0]:
                    best = (key, host)
            if best is None:
                tried[(name, replica)] = "; ".join(refusals) or "every host it may run on runs a replica"
                break  # the next replica would find the same hosts taken
            shares[best[1]] = shares[best[1]] | {name}
    return shares, tried


def _refusal(plans: _Plans, host: str, share: frozenset[str], name: str) -> str | None:
    """Why `name` may not join `share` on `host`, or None when it may."""
    after = plans.plan(host, share | {name})
    if after.model(name).placement == "unplaced":
        return after.model(name).reason
    before = plans.plan(host, share)
    lost = [m.name for m in before.models if m.placement != "unplaced" and after.model(m.name).placement == "unplaced"]
    if lost:
        return f"it would take the place of {', '.join(lost)}"
    return None


def _reasons(config: Config, plans: _Plans, shares: Mapping[str, frozenset[str]], name: str) -> str:
    """Each allowed host's answer for one more replica of `name`, next to its share."""
    parts = []
    for host in config.fleet_hosts(name):
        if name in shares[host]:
            parts.append(f"{host}: runs a replica already")
        else:
            parts.append(f"{host}: {_refusal(plans, host, shares[host], name) or 'it fits, but not next to the best assignment'}")
    return "; ".join(parts)


def _total(plans: _Plans, shares: Mapping[str, frozenset[str]]) -> Score:
    total: Score = tuple([0] * (3 * len(plans.levels) + 1))
    for host, names in sorted(shares.items()):
        total = add(total, plans.score(host, names))
    return total


def _exhaustive(config: Config, plans: _Plans) -> dict[str, frozenset[str]] | None:
    """The best assignment over all of them by the summed score, first found among equals; None
    when the instance is too large to search."""
    names = plan_order(config)
    if len(names) > EXACT_MODELS:
        return None
    options = []
    for name in names:
        allowed = config.fleet_hosts(name)
        replicas = config.replicas(name)
        # the most replicas first, hosts in name order
        options.append([c for k in range(replicas, -1, -1) for c in itertools.combinations(allowed, k)])
    if math.prod(len(o) for o in options) > EXACT_ASSIGNMENTS:
        return None
    hosts = sorted(plans.machines)
    best: tuple[Score, tuple[tuple[str, ...], ...]] | None = None
    for choice in itertools.product(*options):
        total = _total(plans, {h: frozenset(n for n, on in zip(names, choice) if h in on) for h in hosts})
        if best is None or total > best[0]:
            best = (total, choice)
    if best is None:
        return None
    return {h: frozenset(n for n, on in zip(names, best[1]) if h in on) for h in hosts}
