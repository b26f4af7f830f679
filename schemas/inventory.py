"""The machine as the planner sees it: GPUs through NVML, host RAM and CPUs.

An inventory is taken live (supervisor/planning/inventory.py) or loaded from a JSON snapshot taken on
another machine, so a CI job without a GPU can plan against production. A snapshot may also carry
the GGUF headers of the config's models (`models`), since the files themselves stay behind.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llama_smart_proxy.schemas.config import Contract
from llama_smart_proxy.schemas.header import ModelHeader

NvmlStatus = Literal["ok", "library_missing", "driver_not_loaded", "no_device", "error"]


class Gpu(Contract):
    index: int = Field(ge=0, description="NVML index (PCI bus order).")
    uuid: str = Field(description="GPU UUID, e.g. GPU-8f1c...; children are pinned by it.")
    pci_bus_id: str = Field(description="PCI bus id, e.g. 00000000:01:00.0.")
    name: str = Field(description="Product name.")
    total_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0)
    free_bytes: int = Field(ge=0)
    compute_capability: str | None = Field(None, description='"major.minor", e.g. "8.9".')


class Host(Contract):
    ram_total_bytes: int = Field(ge=0)
    ram_available_bytes: int = Field(ge=0)
    cpu_count: int = Field(ge=1)


class Inventory(Contract):
    nvml_status: NvmlStatus = Field(description="What NVML said, as a plain state.")
    message: str = Field(description="One line for a person: what was found, or why no GPU.")
    driver_version: str | None = None
    cuda_version: str | None = Field(None, description='CUDA version the driver supports, "12.4".')
    gpus: list[Gpu] = Field(default_factory=list, description="Usable GPUs, in NVML order.")
    host: Host
    warnings: list[str] = Field(
        default_factory=list, description="Devices excluded and why, and other findings."
    )
    hostname: str = ""
    taken_at: str = Field("", description="When the inventory was taken, ISO 8601.")
    models: dict[str, ModelHeader] = Field(
        default_factory=dict,
        description="Recorded GGUF headers, by absolute file path, for planning without the files.",
    )
