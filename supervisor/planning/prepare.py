"""From a config file to a plan: the steps `plan`, `serve` and every reload share.

load the config → take the inventory (NVML, or a snapshot file) → read each model's header (its
file, or the snapshot's record) → estimate → plan. Each step raises a UserError that says what is
wrong; nothing here starts a process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.supervisor.config.load import LoadedConfig, load_config
from llama_smart_proxy.supervisor.planning.headers import build_profiles
from llama_smart_proxy.supervisor.planning.inventory import load_inventory, take_inventory
from llama_smart_proxy.supervisor.planning.planner import plan


@dataclass(frozen=True)
class Prepared:
    loaded: LoadedConfig
    inventory: Inventory
    plan: Plan
    machine: str
    """Where the inventory came from, for people: "this machine (NVML now)" or the snapshot."""


@dataclass(frozen=True)
class Source:
    """Where a config and an inventory come from, so a reload can take them again."""

    config_path: Path | None = None
    overrides: Mapping[str, Any] | None = None
    inventory_path: Path | None = None
    require_model_files: bool = True
    builtin: LoadedConfig | None = None
    """A config made in code (`serve --demo`), used instead of a file."""

    def load(self) -> LoadedConfig:
        if self.builtin is not None:
            return self.builtin
        assert self.config_path is not None
        return load_config(self.config_path, self.overrides, require_model_files=self.require_model_files)

    def inventory(self) -> tuple[Inventory, str]:
        if self.inventory_path is not None:
            inventory = load_inventory(self.inventory_path)
            machine = f"snapshot {self.inventory_path}"
            if inventory.hostname or inventory.taken_at:
                machine += f" of {inventory.hostname or '?'} taken {inventory.taken_at or '?'}"
            return inventory, machine
        return take_inventory(), "this machine (NVML now)"


def prepare(source: Source, *, credit: Mapping[int, int] | None = None) -> Prepared:
    """Load, inventory, estimate and plan; `credit` adds bytes back to GPUs' free memory (by
    index) for children of ours that a new plan may replace (see `credit_for`)."""
    loaded = source.load()
    inventory, machine = source.inventory()
    if credit:
        inventory = with_credit(inventory, credit)
    found = build_profiles(loaded.config, inventory.models, have_snapshot=source.inventory_path is not None)
    result = plan(loaded.config, inventory, found.profiles, found.headers, found.notes)
    return Prepared(loaded=loaded, inventory=inventory, plan=result, machine=machine)


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

