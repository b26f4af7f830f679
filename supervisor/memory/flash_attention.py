"""`flash_attn = "auto"` resolved as llama.cpp build 11434 resolves it, per kind of device.

Rules kept here (src/llama-context.cpp `llama_init_from_model` and `resolve_fused_ops`):
- Grok never uses flash attention; a quantized V cache forces it on (both before anything else);
- otherwise llama.cpp reserves a one-token graph and checks, for every attention layer, that the
  flash-attention node runs on the device that holds the layer; one mismatch turns it off for the
  whole model (one switch, not one per device);
- the CPU backend supports every flash-attention node (ggml-cpu.cpp `supports_op`: default true),
  and so does an RPC device as the client sees it (ggml-rpc.cpp `supports_op` returns true);
- a CUDA device supports it for the head sizes and cache types of
  ggml/src/ggml-cuda/fattn.cu `ggml_cuda_get_best_fattn_kernel`: K and V widths equal and one of
  40, 64, 72, 80, 96, 112, 128, 256; or K/V 192/128, 320/256, 512/512, 576/512 (MLA) when the
  grouped-query optimisation applies (at least 2 query heads per KV head, no ALiBi, a cache whose
  cells are a multiple of 256) with 192 needing a multiple of 8 query heads per KV head and 320 a
  multiple of 32; K and V types f32, f16, bf16, q4_0, q4_1, q5_0, q5_1 or q8_0 (not iq4_nl).

The KV cache is created before the check, with "auto" counted as on (V not transposed); the
planner launches the resolved value explicitly, so its children never see "auto".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from llama_smart_proxy.schemas.config import CacheType, FlashAttn
    from llama_smart_proxy.supervisor.memory.architectures import Hyperparameters

DeviceKind = Literal["cuda", "rpc", "cpu"]

# ggml-cuda/fattn.cu: head sizes with a kernel whatever the grouping (V as wide as K)
CUDA_PLAIN_HEAD_SIZES = frozenset({40, 64, 72, 80, 96, 112, 128, 256})
# (K width, V width) -> the multiple of query heads per KV head the kernel needs (1: any >= 2)
CUDA_GROUPED_HEAD_SIZES = {(192, 128): 8, (320, 256): 32, (512, 512): 1, (576, 512): 1}
CUDA_CACHE_TYPES = frozenset({"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"})
FATTN_KQ_STRIDE = 256  # ggml-cuda/fattn-common.cuh; llama.cpp pads every cache to 256 cells


def cuda_supports(hp: Hyperparameters, cache_type_k: CacheType, cache_type_v: CacheType) -> bool:
    """Whether a CUDA device runs the flash-attention node of every attention layer of the model."""
    has_cache = any(hp.has_attention)
    if has_cache and (cache_type_k not in CUDA_CACHE_TYPES or cache_type_v not in CUDA_CACHE_TYPES):
        return False
    for il in range(hp.n_layer):
        if not hp.n_head[il] or not (hp.has_attention[il] or hp.embedding_model):
            continue
        if hp.is_mla:
            # absorbed MLA attends over the latent: K is kv_lora_rank + rope wide, V the latent
            head_k, head_v, kv_heads = hp.head_k, hp.head_v, 1
        else:
            swa = hp.is_swa[il]
            head_k = hp.head_k_swa if swa else hp.head_k
            head_v = hp.head_v_swa if swa else hp.head_v
            kv_heads = hp.n_head_kv[il] or hp.n_head[il]
        if head_k in CUDA_PLAIN_HEAD_SIZES and head_v == head_k:
            continue
        multiple = CUDA_GROUPED_HEAD_SIZES.get((head_k, head_v))
        if multiple is None:
            return False
        group = hp.n_head[il] // kv_heads if kv_heads else 0
        # without a cache the keys are the one-token check's batch, never a multiple of 256
        grouped = group >= 2 and not hp.alibi and has_cache
        if not grouped or group % multiple:
            return False
    return True


def resolve(
    hp: Hyperparameters,
    setting: FlashAttn,
    cache_type_k: CacheType,
    cache_type_v: CacheType,
    devices: frozenset[DeviceKind],
) -> tuple[bool, str]:
    """(flash attention on?, why) for a model whose layers sit on devices of these kinds (the CPU
    is always among them: the host runs whatever is not offloaded)."""
    if setting == "on":
        return True, ""
    if setting == "off":
        return False, ""
    if hp.architecture == "grok":
        return False, "flash_attn auto: llama.cpp never uses flash attention for grok"
    if cache_type_v not in ("f32", "f16", "bf16"):
        return True, ""  # llama.cpp turns it on for a quantized V cache
    if "cuda" in devices and not cuda_supports(hp, cache_type_k, cache_type_v):
        return False, (
            "flash_attn auto resolves to off: CUDA has no flash-attention kernel for this model's "
            f"head sizes or cache types ({cache_type_k}/{cache_type_v}), so llama.cpp turns it off"
        )
    return True, ""
