"""From a config file to a plan: the steps `plan`, `serve` and every reload share.

load the config → take the inventory (NVML, or a snapshot file) → read each model's header (its
file, or the snapshot's record) → estimate → plan. Each step raises a UserError that says what is
wrong; nothing here starts a process.

A config with [hosts] is a fleet: `prepare_fleet` reads every host's snapshot and solves the fleet
(planning/fleet.py); `prepare` then keeps this host's share (`Source.fleet_host`, else the host
named like this machine) and plans it against this machine as for one machine, so `serve` and every
reload run the same steps. A host listens on its `address` unless `proxy.listen` is set (in the
file, the environment or by `serve --listen`).
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import FleetPlan, Plan
from llama_smart_proxy.supervisor.config.load import LoadedConfig, load_config
from llama_smart_proxy.supervisor.errors import UserError
from llama_smart_proxy.supervisor.planning.fleet import Machine, share_config, solve_fleet
from llama_smart_proxy.supervisor.planning.headers import build_profiles, read_file_header
from llama_smart_proxy.supervisor.planning.inventory import load_inventory, take_inventory
from llama_smart_proxy.supervisor.planning.planner import plan


@dataclass(frozen=True)
class FleetShare:
    """This host's place in a fleet: its name and the whole fleet's assignment."""

    host: str
    fleet: FleetPlan


@dataclass(frozen=True)
class Prepared:
    loaded: LoadedConfig
    inventory: Inventory
    plan: Plan
    machine: str
    """Where the inventory came from, for people: "this machine (NVML now)" or the snapshot."""
    fleet: FleetShare | None = None
    """With [hosts]: this host's name and the fleet; `loaded.config` then holds its share only."""


@dataclass(frozen=True)
class PreparedFleet:
    loaded: LoadedConfig
    plan: FleetPlan


@dataclass(frozen=True)
class Source:
    """Where a config and an inventory come from, so a reload can take them again."""

    config_path: Path | None = None
    overrides: Mapping[str, Any] | None = None
    inventory_path: Path | None = None
    require_model_files: bool = True
    builtin: LoadedConfig | None = None
    """A config made in code (`serve --demo`), used instead of a file."""
    fleet_host: str | None = None
    """`serve --host NAME`: this host in the config's [hosts]; None: the host named like this machine."""
    host_inventories: Mapping[str, Path] | None = None
    """`plan --inventory NAME=FILE`: snapshots used instead of those hosts' `inventory`."""
    contents: Mapping[Path, bytes] | None = None
    """Config files' bytes already read (the save `--watch` settled on), parsed instead of
    reading those files again: an editor's next write may have begun since."""

    def load(self) -> LoadedConfig:
        if self.builtin is not None:
            return self.builtin
        assert self.config_path is not None
        return load_config(
            self.config_path, self.overrides, require_model_files=self.require_model_files, contents=self.contents
        )

    def inventory(self) -> tuple[Inventory, str]:
        if self.inventory_path is not None:
            inventory = load_inventory(self.inventory_path)
            return inventory, _snapshot_words(self.inventory_path, inventory)
        return take_inventory(), "this machine (NVML now)"


def prepare(
    source: Source, *, credit: Mapping[int, int] | None = None, loaded: LoadedConfig | None = None
) -> Prepared:
    """Load, inventory, estimate and plan; `credit` adds bytes back to GPUs' free memory (by
    index) for children of ours that a new plan may replace (see `credit_for`). With [hosts],
    this host's share only (the module docstring). `loaded`: the config, already loaded."""
    loaded = loaded or source.load()
    share = None
    if loaded.config.hosts:
        host = source.fleet_host or this_host(loaded.config)
        if host not in loaded.config.hosts:
            raise UserError(f"--host {host}: no such host in [hosts] ({', '.join(sorted(loaded.config.hosts))})")
        fleet = prepare_fleet(source, loaded=loaded).plan
        share = FleetShare(host, fleet)
        mine = [name for name, model in fleet.models.items() if host in model.hosts]
        config = share_config(loaded.config, mine)
        if "listen" not in config.proxy.model_fields_set:  # not set by the file, the environment or a flag
            # the host's address is where HAProxy and the other hosts' /v1/models send its clients
            config = config.model_copy(update={"proxy": config.proxy.model_copy(update={"listen": config.hosts[host].address})})
        loaded = replace(loaded, config=config)
    elif source.fleet_host is not None:
        raise UserError(f"--host {source.fleet_host}: {loaded.path} has no [hosts] table")
    inventory, machine = source.inventory()
    if credit:
        inventory = with_credit(inventory, credit)
    found = build_profiles(loaded.config, inventory.models, have_snapshot=source.inventory_path is not None)
    result = plan(loaded.config, inventory, found.profiles, found.headers, found.notes)
    return Prepared(loaded=loaded, inventory=inventory, plan=result, machine=machine, fleet=share)


def this_host(config: Config) -> str:
    """The host of [hosts] named like this machine (its short host name); a UserError otherwise."""
    name = socket.gethostname().split(".")[0]
    if name in config.hosts:
        return name
    raise UserError(
        f"this machine ({name}) is not one of the hosts in [hosts] ({', '.join(sorted(config.hosts))}); "
        "give serve --host NAME"
    )


def prepare_fleet(source: Source, *, loaded: LoadedConfig | None = None) -> PreparedFleet:
    """Read every host's snapshot and solve the fleet (planning/fleet.py)."""
    loaded = loaded or source.load()
    config = loaded.config
    given = dict(source.host_inventories or {})
    for name in given:
        if name not in config.hosts:
            raise UserError(f"--inventory {name}=...: no such host in [hosts] ({', '.join(sorted(config.hosts))})")
    read = functools.cache(read_file_header)  # one read of each header, however many hosts
    machines = {}
    for name, host in sorted(config.hosts.items()):
        path = given.get(name, host.inventory)
        if path is None:
            raise UserError(f"hosts.{name}.inventory: not set; give it there or with --inventory {name}=FILE")
        try:
            inventory = load_inventory(path)
        except UserError as exc:
            raise UserError(f"hosts.{name}.inventory: {exc}") from None
        found = build_profiles(config, inventory.models, have_snapshot=True, read=read)
        machines[name] = Machine(
            address=host.address,
            inventory=inventory,
            source=f"{_snapshot_words(Path(path), inventory)}: {inventory.message}",
            profiles=found.profiles,
            headers=found.headers,
            notes=found.notes,
        )
    return PreparedFleet(loaded=loaded, plan=solve_fleet(config, machines))


def _snapshot_words(path: Path, inventory: Inventory) -> str:
    words = f"snapshot {path}"
    if inventory.hostname or inventory.taken_at:
        words += f" of {inventory.hostname or '?'} taken {inventory.taken_at or '?'}"
    return words


def with_credit(inventory: Inventory, credit: Mapping[int, int]) -> Inventory:
    gpus = [
        gpu.model_copy(update={"free_bytes": min(gpu.total_bytes, gpu.free_bytes + credit.get(gpu.index, 0))})
        for gpu in inventory.gpus
    ]
    return inventory.model_copy(update={"gpus": gpus})


def credit_for(plan: Plan, running: Iterable[str]) -> dict[int, int]:
    """Planned bytes per GPU of the named models: what our own children hold now.

    A fresh inventory taken while they run sees their memory as used; giving it back lets the
    new plan keep them where they are (their own estimates are counted again by the new plan).
    Estimates are never below what llama.cpp allocates, so this may credit a little more than a
    child really holds: the per-GPU reserve covers that slack.
    """
    names = set(running)
    credit: dict[int, int] = {}
    for model in plan.models:
        if model.name in names and model.estimate is not None:
            for index, device in zip(model.gpus, model.estimate.gpus):
                credit[index] = credit.get(index, 0) + device.total_bytes
    return credit

