"""Compute (scheduler) buffers: a model of ggml-alloc's peak over llama.cpp's worst-case graph.

llama.cpp sizes each backend's compute buffer by allocating the prompt-processing graph for one
micro-batch (n_ubatch tokens, n_seq sequences, llama-server's n_seq outputs) and keeping the
peak (src/llama-context.cpp sched_reserve). There is no closed form; this module charges
  inputs (the attention masks, alive for the whole graph)
  + the largest of the phases of one layer (attention, feed-forward, recurrent scan)
    and of the output head,
in f32 values per micro-batch token, with coefficients measured on llama.cpp build 11434's CPU
backend (benchmarks/accuracy: estimate vs. llama.cpp's own figure for every architecture, never
under, at most 15 % over). Version-dependent: the logits term follows PR #23861 (the server
reserves n_seq outputs, not n_ubatch).

GPU buffers are not measured here (no GPU in the measuring machine): a CUDA device runs the same
graph with its own kernels and, across several GPUs, pipeline parallelism keeps
GGML_SCHED_MAX_COPIES = 4 copies of the graph inputs (ggml/src/ggml-backend.cpp). The CUDA figures
are the CPU graph times CUDA_COMPUTE_MARGIN plus those copies; calibrate both on a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.estimate import ComputeProfile
from schemas.header import ModelHeader

if TYPE_CHECKING:
    from schemas.config import FlashAttn, ModelSpec
    from supervisor.memory.architectures import Hyperparameters
    from supervisor.memory.profile import Context, DeviceBackend

MIB = 1024**2
F32 = 4
F16 = 2
# Small graph inputs (positions, token ids, output ids, slot indices) and allocator slack;
# measured at 0.0176 MiB on the CPU for a 512-token micro-batch.
GRAPH_CONSTANT_BYTES = 64 * 1024
# CUDA kernels differ from the CPU's (flash attention tiles, cuBLAS conversions): an unmeasured
# margin over the CPU figure until a GPU run calibrates it.
CUDA_COMPUTE_MARGIN = 1.15
SCHED_MAX_COPIES = 4  # ggml/src/ggml-backend.cpp GGML_SCHED_MAX_COPIES (pipeline parallelism)
UNKNOWN_ARCH_FACTOR = 1.5  # unknown graph shapes: half again on top of the dense-transformer model


def _attention_cells(ctx: Context) -> int:
    """KV cells one sequence's attention spans in the reserve graph (per stream when split)."""
    return ctx.cells


def _mask_bytes(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """The KQ masks: f16 with flash attention, f32 without; one more for sliding-window layers."""
    if not any(hp.has_attention):
        return 0
    width = F16 if flash_attn else F32
    size = width * ctx.n_ubatch * _attention_cells(ctx)
    if any(hp.is_swa):
        size += width * ctx.n_ubatch * ctx.swa_cells
    return size


def _layer_phases(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """Peak live bytes inside one layer, over every layer of the model."""
    x = ctx.n_ubatch
    peak = 0
    for il in range(hp.n_layer):
        n_ff = hp.n_ff[il]
        if hp.n_expert:
            n_ff = max(n_ff, hp.n_ff_exp * hp.n_expert_used)
        ffn = F32 * x * (3 * n_ff + 5 * hp.n_embd)
        attention = 0
        if hp.has_attention[il]:
            kv_width = hp.n_embd_k_gqa(il) + hp.n_embd_v_gqa(il)
            attention = F32 * x * (6 * hp.n_embd + kv_width)
            if not flash_attn:
                cells = ctx.swa_cells if hp.is_swa[il] else _attention_cells(ctx)
                attention += F32 * x * cells * hp.n_head[il]
        peak = max(peak, ffn, attention)
    return peak


def _output_phase(hp: Hyperparameters, ctx: Context, embeddings: bool) -> int:
    outputs = ctx.n_batch if embeddings else ctx.n_seq
    outputs = min(outputs, ctx.n_ubatch)
    return F32 * outputs * hp.n_vocab + F32 * ctx.n_ubatch * hp.n_embd


def cpu_graph_bytes(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """The compute buffer of a run with every layer on one device."""
    inputs = _mask_bytes(hp, ctx, flash_attn)
    peak = max(_layer_phases(hp, ctx, flash_attn), _output_phase(hp, ctx, hp.embedding_model))
    total = inputs + peak + GRAPH_CONSTANT_BYTES
    if not hp.known:
        total = int(total * UNKNOWN_ARCH_FACTOR)
    return total


def compute_profile(
    hp: Hyperparameters,
    ctx: Context,
    spec: ModelSpec,
    *,
    flash_attn: FlashAttn,
    largest_layer_tensor: int,
    device_backend: DeviceBackend,
) -> ComputeProfile:
    if flash_attn == "auto":
        graph = max(cpu_graph_bytes(hp, ctx, True), cpu_graph_bytes(hp, ctx, False))
        inputs = max(_mask_bytes(hp, ctx, True), _mask_bytes(hp, ctx, False))
    else:
        graph = cpu_graph_bytes(hp, ctx, flash_attn == "on")
        inputs = _mask_bytes(hp, ctx, flash_attn == "on")
    # the host keeps the input embeddings' rows when the layers are on a device
    host_inputs = F32 * ctx.n_ubatch * hp.n_embd + GRAPH_CONSTANT_BYTES
    if device_backend == "cpu":
        return ComputeProfile(
            gpu_full_bytes=graph,
            gpu_split_output_bytes=graph,
            gpu_split_other_bytes=graph,
            gpu_partial_bytes=graph,
            host_with_gpu_bytes=host_inputs,
            host_cpu_only_bytes=graph,
        )
    device = int(graph * CUDA_COMPUTE_MARGIN)
    copies = (SCHED_MAX_COPIES - 1) * inputs
    return ComputeProfile(
        gpu_full_bytes=device,
        gpu_split_output_bytes=device + copies,
        gpu_split_other_bytes=device + copies,
        # op offload (batch >= 32) stages host-resident weights in the device's compute buffer
        gpu_partial_bytes=device + largest_layer_tensor,
        host_with_gpu_bytes=host_inputs,
        host_cpu_only_bytes=graph,
    )


def mmproj_compute_bytes(mmproj: ModelHeader, *, flash_attn: bool) -> int:
    """A vision projector's compute buffer (libmtmd): the attention over one image's patches.

    Unmeasured here: a conservative closed form (KQ over every patch, f32 without flash
    attention), at least 128 MiB.
    """
    md = mmproj.metadata
    image = int(md.get("clip.vision.image_size", 1024) or 1024)  # type: ignore[arg-type]
    patch = int(md.get("clip.vision.patch_size", 14) or 14)  # type: ignore[arg-type]
    width = int(md.get("clip.vision.embedding_length", 1280) or 1280)  # type: ignore[arg-type]
    heads = int(md.get("clip.vision.attention.head_count", 16) or 16)  # type: ignore[arg-type]
    positions = (image // max(patch, 1)) ** 2
    attention = F16 * positions * positions if flash_attn else F32 * positions * positions * heads
    activations = F32 * positions * width * 8
    return max(128 * MIB, attention + activations)
