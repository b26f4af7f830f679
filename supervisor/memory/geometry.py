"""What a launch's settings make of a model before any byte is counted: the context geometry
(cells, streams, batches) and the kind of backend its offload devices allocate with; pure.

Both the memory profile (supervisor/memory/profile.py) and the compute buffers
(supervisor/memory/compute.py) are functions of these, so they live here, below both.

Rules kept here (llama.cpp build 11434):
- `n_ctx = pad(ctx or n_ctx_train, 256)`; one stream of n_ctx cells when the cache is unified,
  else `pad(n_ctx / parallel, 256)` cells in each of `parallel` streams (src/llama-context.cpp,
  llama_context ctor; the 256 padding is PR #17046);
- sliding-window layers keep `pad(min(cells, n_swa * (parallel if unified else 1) + ubatch), 256)`
  cells (src/llama-kv-cache-iswa.cpp);
- a causal model's batch is at most its context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from llama_smart_proxy.schemas.config import ModelSpec
    from llama_smart_proxy.supervisor.memory.architectures import Hyperparameters

CONTEXT_PADDING = 256  # src/llama-context.cpp: n_ctx = GGML_PAD(n_ctx, 256)
SWA_PADDING = 256  # src/llama-kv-cache-iswa.cpp: "the SWA cache is always padded to 256"
DEFAULT_CONTEXT = 4096  # when neither the config nor the model gives one

DeviceBackend = Literal["cuda", "cpu"]
"""How a model's offload devices allocate: "cuda", or "cpu" for llama.cpp's CPU backend and RPC
devices serving it (32-byte alignment, no CUDA context, flash attention for every head size)."""


def pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Context:
    """The resolved context geometry (src/llama-context.cpp and src/llama-kv-cache-iswa.cpp)."""

    n_ctx: int
    cells: int  # per stream
    streams: int
    swa_cells: int  # per stream, for sliding-window layers
    n_batch: int
    n_ubatch: int
    n_seq: int


def resolve_context(hp: Hyperparameters, spec: ModelSpec) -> Context:
    n_seq = max(1, spec.parallel)
    requested = spec.ctx or hp.n_ctx_train or DEFAULT_CONTEXT
    n_ctx = pad(requested, CONTEXT_PADDING)
    if spec.kv_unified:
        cells, streams = n_ctx, 1
    else:
        cells, streams = pad(n_ctx // n_seq, CONTEXT_PADDING), n_seq
        n_ctx = cells * n_seq
    n_batch = min(n_ctx, spec.batch) if hp.causal else spec.batch
    n_ubatch = min(n_batch, spec.ubatch)
    swa_cells = 0
    if hp.n_swa:
        window = hp.n_swa * (n_seq if spec.kv_unified else 1) + n_ubatch
        swa_cells = pad(min(cells, window), SWA_PADDING)
    return Context(n_ctx, cells, streams, swa_cells, n_batch, n_ubatch, n_seq)
