"""Hand-made inputs for planner tests and benchmarks: memory profiles, inventories, configs.

Pure data, no GGUF files: the planner's contract is MemoryProfile, so its tests build those
directly with sizes a person can follow (MiB numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import ComputeProfile, EstimateSettings, LayerMemory, MemoryProfile
from llama_smart_proxy.schemas.inventory import Gpu, Host, Inventory

MIB = 1024**2
GIB = 1024**3


def make_profile(
    file: str = "/models/m.gguf",
    *,
    n_layers: int = 32,
    layer: int = 100 * MIB,
    kv: int = 8 * MIB,
    output: int = 300 * MIB,
    input: int = 250 * MIB,
    compute: int = 300 * MIB,
    partial_compute: int | None = None,
    split_other: int | None = None,
    overhead: int = 300 * MIB,
    mmproj: int = 0,
    tied: int = 0,
    layers: Sequence[int] | None = None,
    mapped: bool = False,
) -> MemoryProfile:
    """A dense model: n_layers equal layers (or the given per-layer weights), KV per layer.

    mapped: loaded with mmap, its output layer stored between the embeddings and blk.0, so the
    host maps the head too as soon as one block stays there (llama.cpp's get_mapping_range).
    """
    weights = list(layers) if layers is not None else [layer] * n_layers
    spans: list[int] = []
    if mapped:
        spans = [input] + [input + output + sum(weights[:k]) for k in range(1, len(weights) + 1)]
        spans.append(spans[-1])  # everything on the host: the head was already in the span
    return MemoryProfile(
        model=file,
        architecture="llama",
        known_architecture=True,
        settings=EstimateSettings(
            ctx=4096,
            n_ctx=4096,
            parallel=1,
            kv_unified=True,
            cache_type_k="f16",
            cache_type_v="f16",
            flash_attn=True,
            batch=2048,
            ubatch=512,
        ),
        layers=[LayerMemory(weights_bytes=w, kv_bytes=kv) for w in weights],
        input_weights_bytes=input,
        output_weights_bytes=output,
        tied_output_bytes=tied,
        output_buffer_bytes=1 * MIB,
        compute=ComputeProfile(
            gpu_full_bytes=compute,
            gpu_split_output_bytes=compute,
            gpu_split_other_bytes=compute // 2 if split_other is None else split_other,
            gpu_partial_bytes=compute * 2 if partial_compute is None else partial_compute,
            host_with_gpu_bytes=16 * MIB,
            host_cpu_only_bytes=compute,
        ),
        device_overhead_bytes=overhead,
        mmproj_bytes=mmproj,
        host_mapped_bytes=spans,
    )


def make_inventory(
    gpus: Sequence[int],
    *,
    free: Sequence[int] | None = None,
    ram: int = 64 * GIB,
    message: str | None = None,
) -> Inventory:
    """GPUs of the given total sizes (bytes), all free unless `free` says otherwise."""
    free = list(free) if free is not None else list(gpus)
    return Inventory(
        nvml_status="ok" if gpus else "no_device",
        message=message or (f"{len(gpus)} NVIDIA GPUs" if gpus else "NVML found no NVIDIA device"),
        driver_version="550.54.15" if gpus else None,
        cuda_version="12.4" if gpus else None,
        gpus=[
            Gpu(
                index=i,
                uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000",
                pci_bus_id=f"00000000:{i + 1:02X}:00.0",
                name="NVIDIA Test GPU",
                total_bytes=total,
                used_bytes=total - f,
                free_bytes=f,
                compute_capability="8.9",
            )
            for i, (total, f) in enumerate(zip(gpus, free))
        ],
        host=Host(ram_total_bytes=ram, ram_available_bytes=ram, cpu_count=16),
    )


def make_config(models: dict[str, dict[str, Any]], **sections: Any) -> Config:
    """A Config from plain tables; every model gets a file named after it."""
    tables = {name: {"file": f"/models/{name}.gguf", **table} for name, table in models.items()}
    return Config.model_validate({"models": tables, **sections})
