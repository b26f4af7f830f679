"""The plan: where every model runs and why, as pure data.

`plan` prints it and `serve` launches it; the same config, inventory and headers give
byte-identical JSON (no timestamps, sorted keys in lists by name or index).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llama_smart_proxy.schemas.config import Contract, Mode
from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.schemas.launch import LaunchSpec

Placement = Literal["gpu", "split", "partial", "cpu", "unplaced"]


class ModelShare(Contract):
    model: str
    bytes: int = Field(ge=0)


class GpuPlan(Contract):
    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int = Field(description="Free when the inventory was taken.")
    reserve_bytes: int = Field(description="Headroom kept free ([gpus] reserve).")
    usable_bytes: int = Field(description="free - reserve: what the plan may fill.")
    resident: list[ModelShare] = Field(description="Resident models' estimated bytes here.")
    on_demand: list[ModelShare] = Field(
        default_factory=list,
        description="On-demand models planned here and their bytes once loaded (not counted in "
        "free_after_bytes: each fits next to the residents; see Plan.on_demand_groups).",
    )
    free_after_bytes: int = Field(description="usable minus the resident models.")


class ModelPlan(Contract):
    name: str
    aliases: list[str] = Field(default_factory=list)
    mode: Mode
    priority: int
    placement: Placement
    gpus: list[int] = Field(default_factory=list, description="NVML indices used, in split order.")
    gpu_layers: int = Field(0, description="Layers on GPUs, output layer counted.")
    n_layers: int = Field(0, description="Repeating layers of the model.")
    host_bytes: int = Field(0, description="Host RAM the model needs.")
    estimate: Estimate | None = Field(None, description="The placed estimate, by component.")
    header_source: Literal["file", "snapshot", "missing"] = Field(
        "file", description="Where the GGUF header came from."
    )
    header_note: str = Field("", description="Which file or snapshot record the header came from.")
    short_bytes: int = Field(
        0,
        description="For an unplaced model: the fewest bytes more on one device that would have "
        "given it a place, every other resident keeping at least its placement's tier.",
    )
    short_of: str = Field(
        "", description='Where those bytes are lacking: "GPU <index>" or "host RAM"; empty if placed.'
    )
    fallback: bool = Field(
        False,
        description="Runs partly or wholly on the CPU although its config allows GPUs "
        "(`plan --strict` fails on it).",
    )
    reason: str = Field(description="Why this placement, in words.")
    launch: LaunchSpec | None = Field(None, description="How its child starts; None if unplaced.")


class HostPlan(Contract):
    ram_total_bytes: int = Field(ge=0)
    ram_available_bytes: int = Field(ge=0, description="Available when the inventory was taken.")
    cpu_count: int = Field(ge=1)
    reserve_bytes: int = Field(0, ge=0, description="Headroom kept free ([host] reserve).")
    usable_bytes: int = Field(0, ge=0, description="available - reserve: what the plan may fill.")
    resident_bytes: int = Field(ge=0, description="Host RAM the resident models need together.")
    with_on_demand_bytes: int = Field(
        ge=0, description="The same with every on-demand model loaded as well."
    )
    mapped_bytes: int = Field(
        0, ge=0, description="Of resident_bytes, model weights mapped from their files (page cache)."
    )
    overcommit_bytes: int = Field(
        0,
        ge=0,
        description="With [host] mmap_overcommit: how far the residents go past usable_bytes "
        "(mapped weights the kernel may evict and read again).",
    )


class Plan(Contract):
    policy: Literal["pack", "spread"] = Field("pack", description="[gpus] policy the plan used.")
    gpus: list[GpuPlan] = Field(default_factory=list)
    host: HostPlan | None = Field(None, description="Host RAM against what the models need there.")
    models: list[ModelPlan] = Field(default_factory=list, description="By name.")
    notes: list[str] = Field(default_factory=list, description="Plain statements about the plan.")
    on_demand_groups: list[list[str]] = Field(
        default_factory=list,
        description="Sets of on-demand models that fit at the same time next to the residents.",
    )

    def model(self, name: str) -> ModelPlan:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise KeyError(name)


# --- a fleet: several hosts, each running its share of one config ------------------------------


class FleetHostPlan(Contract):
    address: str = Field(description="Where the host's service listens, host:port ([hosts.NAME] address).")
    inventory: str = Field(description="The snapshot its share was planned against, for people.")
    plan: Plan = Field(description="Its share, planned by the single-machine planner.")


class FleetModel(Contract):
    aliases: list[str] = Field(default_factory=list)
    replicas: int = Field(ge=1, description="How many hosts should run it.")
    hosts: list[str] = Field(description="The hosts that run it, by name; fewer than replicas when unplaced.")


class FleetUnplaced(Contract):
    model: str
    replica: int = Field(ge=1, description="Which replica (1-based) found no host.")
    reason: str = Field(description="Why, naming each host it was tried on.")


class FleetPlan(Contract):
    """Which host runs each model, and each host's plan; `plan --json` for a config with [hosts]."""

    hosts: dict[str, FleetHostPlan] = Field(description="Every host of [hosts], by name.")
    models: dict[str, FleetModel] = Field(description="Every model, by name.")
    unplaced: list[FleetUnplaced] = Field(
        default_factory=list, description="Replicas no host can take; empty when every replica has a host."
    )
    notes: list[str] = Field(default_factory=list, description="Plain statements about the assignment.")
