"""The memory contract: what one model needs, per device and on the host.

Two levels:
- `MemoryProfile`: one model at given settings (context, slots, KV types, batch sizes), before
  it is placed. Per-layer weights and KV, the output layer, host buffers, compute buffers by
  device role. The planner tries placements against it without re-reading anything.
- `Estimate`: a profile placed (`supervisor.memory.placement.place`): bytes per device and on the
  host, by component, as llama.cpp itself would log them.
All sizes are bytes.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, computed_field, model_validator

from llama_smart_proxy.schemas.config import CacheType, Contract


class EstimateSettings(Contract):
    ctx: int = Field(ge=0, description="Requested context (-c); 0 means the model's own.")
    n_ctx: int = Field(ge=0, description="Context cells llama.cpp allocates (padded).")
    parallel: int = Field(ge=1, description="Slots (-np).")
    kv_unified: bool = Field(description="One KV stream shared by all slots.")
    cache_type_k: CacheType
    cache_type_v: CacheType
    flash_attn: bool = Field(description="Flash attention as resolved.")
    batch: int = Field(ge=1)
    ubatch: int = Field(ge=1)


class LayerMemory(Contract):
    weights_bytes: int = Field(ge=0, description="Tensors of this repeating layer (blk.N.*).")
    kv_bytes: int = Field(0, ge=0, description="KV cache of this layer, every stream.")
    recurrent_bytes: int = Field(0, ge=0, description="Recurrent state of this layer, every slot.")



class ComputeProfile(Contract):
    """Compute (scheduler) buffer per device, by the role the device plays in a placement."""

    gpu_full_bytes: int = Field(ge=0, description="A GPU that holds every layer and the output.")
    gpu_split_output_bytes: int = Field(
        ge=0, description="A GPU of a multi-GPU split that holds the output layer."
    )
    gpu_split_other_bytes: int = Field(
        ge=0, description="A GPU of a multi-GPU split without the output layer."
    )
    gpu_partial_bytes: int = Field(
        ge=0,
        description="Each GPU when some layers stay on the CPU (-ngl offloads the last layers, so "
        "never layer 0); on CUDA host weights are staged here for large batches (op offload).",
    )
    host_with_gpu_bytes: int = Field(
        ge=0, description="Host compute buffer when one GPU holds every layer and the output."
    )
    host_split_bytes: int = Field(
        0,
        ge=0,
        description="Host compute buffer when several GPUs hold every layer (pipeline parallelism "
        "keeps 4 copies of the graph inputs).",
    )
    host_cpu_only_bytes: int = Field(ge=0, description="Compute buffer of a CPU-only run.")


class MemoryProfile(Contract):
    model: str = Field(description="The GGUF file.")
    architecture: str
    known_architecture: bool = Field(
        description="False: an architecture the estimator does not know; figures are a "
        "conservative guess from the file size."
    )
    settings: EstimateSettings
    layers: list[LayerMemory] = Field(description="The repeating layers, in order.")
    input_weights_bytes: int = Field(
        ge=0, description="Input layer (token embeddings), always on the host."
    )
    output_weights_bytes: int = Field(
        ge=0, description="Output layer (output norm and head), on a GPU once -ngl >= 1."
    )
    tied_output_bytes: int = Field(
        0,
        ge=0,
        description="A model without output.weight reuses its token embeddings as the head: "
        "llama.cpp copies them to the output layer's device when that is a GPU (none on the host).",
    )
    output_buffer_bytes: int = Field(ge=0, description="Logits/embeddings buffer, on the host.")
    compute: ComputeProfile
    device_overhead_bytes: int = Field(
        ge=0,
        description="What a child uses per GPU beside llama.cpp's buffers: CUDA context, cuBLAS, "
        "and CUDA's memory pool (larger without flash attention).",
    )
    mmproj_bytes: int = Field(
        0, ge=0, description="Vision projector weights and compute, on the main GPU (or host)."
    )
    host_mapped_bytes: list[int] = Field(
        default_factory=list,
        description="With mmap: host weight bytes (the file span llama.cpp maps) when the first k "
        "layers stay on the host, k = 0..n_layers+1 (k = n_layers+1: the output layer too). Empty: "
        "no mmap, or no tensor offsets recorded; the host tensors' sizes count.",
    )
    warnings: list[str] = Field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layers)


class _WithTotal(Contract):
    """A contract whose JSON carries a computed `total_bytes`: read back, it is checked, not stored."""

    @model_validator(mode="before")
    @classmethod
    def _drop_total(cls, data: Any) -> Any:
        if isinstance(data, dict) and "total_bytes" in data:
            data = dict(data)
            total = data.pop("total_bytes")
            checked = cls.model_validate(data)
            if total != checked.total_bytes:  # type: ignore[attr-defined]
                raise ValueError(f"total_bytes {total} is not the sum of the parts ({checked.total_bytes})")  # type: ignore[attr-defined]
        return data


class DeviceMemory(_WithTotal):
    device: str = Field(description='"CPU" (the host) or "GPU<n>", n its position in the placement.')
    weights_bytes: int = 0
    kv_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    overhead_bytes: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_bytes
            + self.recurrent_bytes
            + self.compute_bytes
            + self.output_bytes
            + self.overhead_bytes
        )


class Estimate(_WithTotal):
    model: str
    architecture: str
    settings: EstimateSettings
    gpu_layers: int = Field(ge=0, description="Layers on GPUs, the output layer counted (-ngl).")
    n_layers: int = Field(ge=0, description="Repeating layers of the model.")
    tensor_split: list[float] = Field(description="Fractions per GPU; empty for one GPU or none.")
    gpus: list[DeviceMemory] = Field(description="One entry per GPU of the placement, in order.")
    host: DeviceMemory = Field(description="What stays in host RAM.")
    warnings: list[str] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        return self.host.total_bytes + sum(d.total_bytes for d in self.gpus)
