"""What the estimator needs from a GGUF file's header: metadata and tensor infos, never weights.

A `ModelHeader` is read from the file (supervisor/memory/reader.py) or taken from an inventory
snapshot recorded on the production machine, where the file is; it is keyed by the file's path,
size and modification time so that a stale record is noticed.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from llama_smart_proxy.schemas.config import Contract

MetadataValue = int | float | bool | str | list[int] | list[float] | list[bool]


# A contract like the others (frozen, unknown keys are errors), but a dataclass: a snapshot of 64
# models holds 21,000 of them, which validate in a third of the time a model class takes (38 ms
# against 96: benchmarks/results/planner-bench.md).
@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class TensorInfo:
    name: str = Field(description="Tensor name, e.g. blk.0.attn_q.weight.")
    type: str = Field(description="GGML type name as stored, e.g. Q4_K, F16.")
    shape: list[int] = Field(description="Dimensions as GGUF stores them (ne0 first).")
    n_bytes: int = Field(ge=0, description="Bytes the tensor occupies in the file.")
    offset: int | None = Field(
        None,
        ge=0,
        description="Byte offset of the tensor's data in its file (with mmap llama.cpp maps the "
        "span from the first to the last tensor kept on the host). None in snapshots taken before "
        "offsets were recorded.",
    )
    part: int = Field(0, ge=0, description="Which file of a split model holds it (0: the first).")


class ModelHeader(Contract):
    path: str = Field(description="The GGUF file (the first part of a split model), absolute.")
    file_size: int = Field(ge=0, description="Bytes of the file, all split parts together.")
    mtime_ns: int = Field(description="Modification time of the first part, ns since the epoch.")
    parts: int = Field(1, ge=1, description="Number of split parts.")
    architecture: str = Field(description="general.architecture.")
    metadata: dict[str, MetadataValue] = Field(
        default_factory=dict,
        description="Metadata key-values; arrays of strings are kept as their length only "
        "(see array_lengths), numeric arrays whole.",
    )
    array_lengths: dict[str, int] = Field(
        default_factory=dict, description="Length of every array-valued metadata key."
    )
    tensors: list[TensorInfo] = Field(default_factory=list, description="Every tensor's info.")
