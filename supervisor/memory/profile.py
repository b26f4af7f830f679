"""The memory model of one model at given settings: `memory_profile(header, spec) -> MemoryProfile`.

Pure: no I/O, no clock. It mirrors how llama.cpp build 11434 sizes each buffer:
- context: cells and streams as supervisor/memory/geometry.py resolves them;
- KV per layer: `cells * streams * (row(type_k, n_embd_k_gqa) + row(type_v, v_width))`, where
  v_width is the layer's own with flash attention; without it V is stored transposed and padded
  to the widest layer (src/llama-kv-cache.cpp, [TAG_V_CACHE_VARIABLE]);
  sliding-window layers keep `pad(min(cells, n_swa * (parallel if unified else 1) + ubatch), 256)`
  cells (src/llama-kv-cache-iswa.cpp); MLA keeps K only, 576 wide (V-less cache, PR #19067);
- recurrent state per recurrent layer: `4 * (n_embd_r + n_embd_s) * max(1, parallel)` bytes,
  whatever the context (src/llama-memory-recurrent.cpp);
- weights: each tensor as stored, padded to the buffer's alignment; blocks by their layer, the
  token embeddings on the host, the output layer (with a copy of the embeddings when it has no
  output.weight and lands on a GPU) by itself (src/llama-model.cpp load_tensors); NextN/MTP
  blocks that llama.cpp skips (`unloaded_mtp_blocks`) count nowhere;
- output buffer: `4 * parallel * (n_vocab + n_embd if embeddings)` in host memory
  (src/llama-context.cpp output_reserve, with llama-server's n_outputs_max = parallel);
- compute buffers: supervisor/memory/compute.py.

- host weights with mmap (llama-server's default load mode): the file span from the first to the
  last tensor that stays on the host, per file (src/llama-model-loader.cpp get_mapping_range), so
  a tensor stored between two host tensors counts there even when it is loaded to a GPU; without
  mmap (`-lm none`), or for a header recorded without offsets, the host tensors' sizes.

`flash_attn = "auto"` is resolved for the kinds of device the model runs on, as llama.cpp does
(supervisor/memory/flash_attention.py), and charged as resolved.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from llama_smart_proxy.schemas.config import ModelSpec
from llama_smart_proxy.schemas.estimate import EstimateSettings, LayerMemory, MemoryProfile
from llama_smart_proxy.schemas.header import ModelHeader, TensorInfo
from llama_smart_proxy.schemas.units import MIB
from llama_smart_proxy.supervisor.memory import compute, flash_attention
from llama_smart_proxy.supervisor.memory.architectures import (
    MTP_NEVER_LOADED_ARCHITECTURES,
    MTP_ON_REQUEST_ARCHITECTURES,
    NO_TIED_HEAD_ARCHITECTURES,
    Hyperparameters,
    hyperparameters,
)
from llama_smart_proxy.supervisor.memory.geometry import Context, DeviceBackend, pad, resolve_context

CPU_ALIGNMENT = 32  # ggml/src/ggml-impl.h TENSOR_ALIGNMENT: the CPU (and RPC-over-CPU) buffer
CUDA_ALIGNMENT = 128  # ggml/src/ggml-cuda/ggml-cuda.cu: ggml_backend_cuda_buffer_type_get_alignment
CUDA_MATRIX_ROW_PADDING = 512  # ggml/src/ggml-cuda/common.cuh MATRIX_ROW_PADDING
# Per-GPU cost outside llama.cpp's buffers: CUDA context, cuBLAS, and CUDA's memory pool at its
# working size. Measured on an H200 (driver 580, CUDA 13; benchmarks/results/estimator-gpu.md):
# 597 MiB once a child is ready, at most 742 MiB after its slots filled their contexts with flash
# attention (21 shapes and settings); without flash attention the pool grows further
# (compute.cuda_pool_bytes). Smaller GPUs need less: 451-456 MiB measured per RTX 4090 (llama.cpp
# PR #15860); Ollama budgets 457 MiB, gguf-parser 250 MiB.
DEVICE_OVERHEAD_BYTES = 768 * MIB

# common/arg.cpp --load-mode: these modes do not map the file
_NO_MMAP_MODES = ("none", "dio")

# (values per block, bytes per block) of each GGML type, as gguf.GGML_QUANT_SIZES gives them (a
# test keeps the two equal): planning from a snapshot then needs neither gguf nor numpy, whose
# imports cost more than the planning itself.
QUANT_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q8_0": (32, 34), "Q8_1": (32, 40), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
    "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74),
    "IQ3_XXS": (256, 98), "IQ1_S": (256, 50), "IQ4_NL": (32, 18), "IQ3_S": (256, 110), "IQ2_S": (256, 82),
    "IQ4_XS": (256, 136), "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8), "F64": (1, 8),
    "IQ1_M": (256, 56), "BF16": (1, 2), "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17),
    "NVFP4": (64, 36), "Q1_0": (128, 18),
}  # fmt: skip


def quant_size(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type by name; gguf's table for one it lacks."""
    size = QUANT_SIZES.get(type_name)
    if size is None:
        import gguf

        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return size


# src/llama-arch.cpp LLM_TENSOR_INFOS: LLM_TENSOR_LAYER_INPUT tensors stay on the host.
_INPUT_TENSORS = ("token_embd.", "position_embd.", "token_types.", "per_layer_token_embd.")
# Repeating-layer tensors created with layer index 0 although their names carry none.
_LAYER_ZERO_TENSORS = ("token_embd_norm.", "rope_freqs.", "rope_factors_long.", "rope_factors_short.")


def row_bytes(cache_type: str, width: int) -> int:
    """ggml_row_size: bytes of `width` values of the given cache type."""
    block, size = quant_size(cache_type.upper())
    return -(-width // block) * size


def is_quantized_cache(cache_type: str) -> bool:
    return cache_type not in ("f32", "f16", "bf16")


def kv_bytes_per_layer(hp: Hyperparameters, ctx: Context, spec: ModelSpec, flash_attn: bool) -> list[int]:
    """Bytes of the KV cache of each layer, every stream included."""
    v_width_max = max((hp.n_embd_v_gqa(il) for il in range(hp.n_layer)), default=0)
    sizes = []
    for il in range(hp.n_layer):
        if not hp.has_attention[il]:
            sizes.append(0)
            continue
        cells = ctx.swa_cells if hp.is_swa[il] else ctx.cells
        k = row_bytes(spec.cache_type_k, hp.n_embd_k_gqa(il))
        # MLA: the compressed latent lives in K alone (src/llama-kv-cache.cpp: has_v = !is_mla)
        if hp.is_mla:
            v = 0
        else:
            v = row_bytes(spec.cache_type_v, hp.n_embd_v_gqa(il) if flash_attn else v_width_max)
        sizes.append(pad(k * cells * ctx.streams, CPU_ALIGNMENT) + pad(v * cells * ctx.streams, CPU_ALIGNMENT))
    return sizes


def recurrent_bytes_per_layer(hp: Hyperparameters, ctx: Context) -> list[int]:
    rows = max(1, ctx.n_seq)  # llama-server runs without rollback snapshots (n_rs_seq = 0)
    state = pad(4 * hp.n_embd_r * rows, CPU_ALIGNMENT) + pad(4 * hp.n_embd_s * rows, CPU_ALIGNMENT)
    return [state if recurrent else 0 for recurrent in hp.is_recurrent]


def tensor_bytes(tensor: TensorInfo, backend: DeviceBackend) -> int:
    """Bytes a weight takes in a device buffer (ggml_backend_buft_get_alloc_size, padded)."""
    return _padded(tensor.type, tensor.shape[0] if tensor.shape else 0, tensor.n_bytes, backend)


@functools.lru_cache(maxsize=4096)
def _padded(type_name: str, ne0: int, n_bytes: int, backend: DeviceBackend) -> int:
    if backend == "cpu":
        return pad(n_bytes, CPU_ALIGNMENT)
    size = n_bytes
    block, type_size = quant_size(type_name)
    if block > 1 and ne0 % CUDA_MATRIX_ROW_PADDING:
        # ggml-cuda.cu: quantized rows are padded so the kernels may read past the last one
        size += -(-(CUDA_MATRIX_ROW_PADDING - ne0 % CUDA_MATRIX_ROW_PADDING) // block) * type_size
    return pad(size, CUDA_ALIGNMENT)


def uses_mmap(spec: ModelSpec) -> bool:
    """Whether llama-server maps the file (its default, `-lm auto`), from the child's own args."""
    mode = spec.env.get("LLAMA_ARG_LOAD_MODE", "auto")
    args = list(spec.args)
    for i, arg in enumerate(args):
        if arg in ("-lm", "--load-mode") and i + 1 < len(args):
            mode = args[i + 1]
        elif arg.startswith("--load-mode="):
            mode = arg.partition("=")[2]
        elif arg == "--no-mmap":
            mode = "none"
    return mode not in _NO_MMAP_MODES


def mapped_spans(header: ModelHeader, n_layer: int, unloaded_blocks: int = 0) -> list[int]:
    """Bytes llama.cpp maps on the host with mmap when the first k layer units stay there, for
    k = 0..n_layer+1 (unit n_layer is the output layer): per file, from the first to the last
    byte of the host's tensors (the input layer always among them). Empty when the header has
    no offsets (a snapshot recorded before they were)."""
    nowhere = 1 << 62
    lo: dict[int, list[int]] = {}  # per file part, per unit (the input layer at n_layer + 1)
    hi: dict[int, list[int]] = {}
    for tensor in header.tensors:
        start = tensor.offset
        if start is None:
            return []
        unit = _unit(tensor.name, n_layer, unloaded_blocks)
        if unit is None:
            continue
        first = lo.get(tensor.part)
        if first is None:
            first = lo[tensor.part] = [nowhere] * (n_layer + 2)
            hi[tensor.part] = [-1] * (n_layer + 2)
        last = hi[tensor.part]
        end = start + tensor.n_bytes
        if start < first[unit]:
            first[unit] = start
        if end > last[unit]:
            last[unit] = end
    spans = [0] * (n_layer + 2)
    for part, first in lo.items():
        last = hi[part]
        low, high = first[n_layer + 1], last[n_layer + 1]  # the input layer
        for k in range(n_layer + 2):
            if k == n_layer + 1:  # everything on the host: the output layer too
                low, high = min(low, first[n_layer]), max(high, last[n_layer])
            if high >= 0:
                spans[k] += high - low
            if k < n_layer:
                low, high = min(low, first[k]), max(high, last[k])
    return spans


@functools.lru_cache(maxsize=1 << 16)  # tensor names repeat from model to model
def _block(name: str) -> int | None:
    """il of a `blk.il.*` tensor, else None."""
    if not name.startswith("blk."):
        return None
    end = name.find(".", 4)
    number = name[4:end] if end > 0 else ""
    return int(number) if number.isdigit() else None


def _unit(name: str, n_layer: int, unloaded_blocks: int) -> int | None:
    """The layer unit a tensor belongs to: il for blk.il, n_layer for the output layer, n_layer+1
    for the input layer; None for a block llama.cpp does not load."""
    il = _block(name)
    if il is not None:
        if n_layer - unloaded_blocks <= il < n_layer:
            return None
        return il if il < n_layer else n_layer
    if name.startswith(_INPUT_TENSORS):
        return n_layer + 1
    if name.startswith(_LAYER_ZERO_TENSORS) and n_layer:
        return 0
    return n_layer


@dataclass(frozen=True)
class Weights:
    layers: list[int]
    input_bytes: int
    output_bytes: int
    tied_output_bytes: int  # a copy of token_embd that exists only when the output is on a GPU
    largest_layer_tensor: int
    unassigned_bytes: int  # tensors the estimator could not place (unknown architectures)


def split_weights(
    header: ModelHeader, n_layer: int, backend: DeviceBackend, *, ties_head: bool = True, unloaded_blocks: int = 0
) -> Weights:
    """Weights by where llama.cpp puts them; the last `unloaded_blocks` blocks (NextN/MTP blocks
    llama.cpp skips) count nowhere, though they keep their place in the layer count."""
    layers = [0] * n_layer
    input_bytes = output_bytes = largest = unassigned = 0
    embeddings = 0
    has_output = False
    for tensor in header.tensors:
        size = tensor_bytes(tensor, backend)
        il = _block(tensor.name)
        if il is not None:
            if n_layer - unloaded_blocks <= il < n_layer:
                continue
            if il < n_layer:
                layers[il] += size
                largest = max(largest, size)
            else:
                unassigned += size
        elif tensor.name.startswith(_INPUT_TENSORS):
            input_bytes += size
            if tensor.name == "token_embd.weight":
                embeddings = size
        elif tensor.name.startswith(_LAYER_ZERO_TENSORS) and n_layer:
            layers[0] += size
        else:
            output_bytes += size
            has_output = has_output or tensor.name == "output.weight"
    # src/models/*.cpp: `if (output == NULL) output = token_embd (TENSOR_DUPLICATED)`
    tied = embeddings if ties_head and not has_output else 0
    return Weights(layers, input_bytes, output_bytes + unassigned, tied, largest, unassigned)


def unloaded_mtp_blocks(hp: Hyperparameters, spec: ModelSpec) -> int:
    """NextN/MTP blocks llama-server will not load: their weights take no memory."""
    if not hp.n_layer_nextn or not hp.known:
        return 0
    if hp.architecture in MTP_NEVER_LOADED_ARCHITECTURES:
        return hp.n_layer_nextn
    mtp = any("draft-mtp" in arg for arg in spec.args) or "draft-mtp" in spec.env.get("LLAMA_ARG_SPEC_TYPE", "")
    return hp.n_layer_nextn if hp.architecture in MTP_ON_REQUEST_ARCHITECTURES and not mtp else 0


def memory_profile(
    header: ModelHeader,
    spec: ModelSpec,
    mmproj: ModelHeader | None = None,
    *,
    device_backend: DeviceBackend = "cuda",
) -> MemoryProfile:
    """What the model needs at spec's settings, before placement. Pure.

    device_backend "cuda" (the default) pads weights as CUDA buffers do and charges the CUDA
    context per GPU; "cpu" describes llama.cpp's CPU or RPC-over-CPU devices, which the accuracy
    harness measures against.
    """
    hp = hyperparameters(header)
    ctx = resolve_context(hp, spec)
    warnings: list[str] = []
    kinds: frozenset[flash_attention.DeviceKind] = frozenset({device_backend, "cpu"})
    flash_attn, why = flash_attention.resolve(hp, spec.flash_attn, spec.cache_type_k, spec.cache_type_v, kinds)
    if why:
        warnings.append(why)
    if spec.flash_attn == "off" and is_quantized_cache(spec.cache_type_v) and not hp.is_mla:
        warnings.append(
            f"cache_type_v {spec.cache_type_v} needs flash attention: llama.cpp refuses to start "
            "with flash_attn off and a quantized V cache"
        )
    # "auto" that resolves to off still has its cache laid out for flash attention (created before
    # the check); the planner launches "off", which transposes V: charge the larger of the two
    kv = kv_bytes_per_layer(hp, ctx, spec, flash_attn=flash_attn)
    if spec.flash_attn == "auto" and not flash_attn:
        kv = [max(a, b) for a, b in zip(kv, kv_bytes_per_layer(hp, ctx, spec, flash_attn=True))]
    recurrent = recurrent_bytes_per_layer(hp, ctx)
    unloaded = unloaded_mtp_blocks(hp, spec)
    if unloaded:
        warnings.append(
            f"the last {unloaded} block(s) are NextN/MTP layers, which llama-server does not load"
            + ("" if hp.architecture in MTP_NEVER_LOADED_ARCHITECTURES else " unless --spec-type draft-mtp is given")
            + ": not counted"
        )
    weights = split_weights(
        header,
        hp.n_layer,
        device_backend,
        ties_head=hp.architecture not in NO_TIED_HEAD_ARCHITECTURES,
        unloaded_blocks=unloaded,
    )
    embeddings = hp.embedding_model
    output_buffer = 4 * ctx.n_seq * (hp.n_vocab + (hp.n_embd if embeddings else 0))

    if not hp.known:
        warnings.append(
            f"architecture {hp.architecture!r} is not one the estimator knows: weights are exact, "
            "the KV cache assumes every layer keeps the full context, and the compute buffer is "
            "a generous guess"
        )
        missing = header.file_size - sum(t.n_bytes for t in header.tensors)
        if missing > 0:
            weights = Weights(
                weights.layers,
                weights.input_bytes,
                weights.output_bytes + missing,  # never less than the file holds
                weights.tied_output_bytes,
                weights.largest_layer_tensor,
                weights.unassigned_bytes,
            )

    compute_profile = compute.compute_profile(
        hp,
        ctx,
        flash_attn=flash_attn,
        largest_layer_tensor=weights.largest_layer_tensor,
        device_backend=device_backend,
    )
    device_overhead = 0
    if device_backend == "cuda":
        pool = compute.cuda_pool_bytes(hp, ctx, flash_attn=flash_attn)
        device_overhead = DEVICE_OVERHEAD_BYTES + pool
    mmproj_bytes = 0
    if mmproj is not None:
        mmproj_bytes = sum(tensor_bytes(t, device_backend) for t in mmproj.tensors) + compute.mmproj_compute_bytes(
            mmproj, flash_attn=flash_attn
        )

    settings = EstimateSettings(
        ctx=spec.ctx,
        n_ctx=ctx.n_ctx,
        parallel=ctx.n_seq,
        kv_unified=spec.kv_unified,
        cache_type_k=spec.cache_type_k,
        cache_type_v=spec.cache_type_v,
        flash_attn=flash_attn,
        batch=ctx.n_batch,
        ubatch=ctx.n_ubatch,
    )
    layers = [
        # computed here, so already valid: construct without validating each layer again
        LayerMemory.model_construct(weights_bytes=w, kv_bytes=k, recurrent_bytes=r)
        for w, k, r in zip(weights.layers, kv, recurrent)
    ]
    return MemoryProfile(
        model=header.path,
        architecture=hp.architecture,
        known_architecture=hp.known,
        settings=settings,
        layers=layers,
        input_weights_bytes=weights.input_bytes,
        output_weights_bytes=weights.output_bytes,
        tied_output_bytes=weights.tied_output_bytes,
        output_buffer_bytes=output_buffer,
        compute=compute_profile,
        device_overhead_bytes=device_overhead,
        mmproj_bytes=mmproj_bytes,
        host_mapped_bytes=mapped_spans(header, hp.n_layer, unloaded) if uses_mmap(spec) else [],
        warnings=warnings,
    )
