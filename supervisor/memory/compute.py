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

The device roles (one device, a pipeline-parallel split, a partial offload, and the host in each)
are measured with ggml-rpc-server devices standing in for GPUs (`_roles`). A CUDA device
allocates the same graph: on an H200 (benchmarks/accuracy/gpu.py, results in
benchmarks/results/estimator-gpu.md) its compute buffer came to 0.95-0.97 of these figures for
every transformer shape (0.84 for mamba, 0.73 for a BERT encoder), so CUDA takes them as they are,
except on partial offload (`_cuda_partial`). CUDA's temporaries live outside these buffers, in its
memory pool: `cuda_pool_bytes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama_smart_proxy.schemas.estimate import ComputeProfile
from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.schemas.units import MIB
from llama_smart_proxy.supervisor.memory.architectures import header_int

if TYPE_CHECKING:
    from llama_smart_proxy.supervisor.memory.architectures import Hyperparameters
    from llama_smart_proxy.supervisor.memory.geometry import Context, DeviceBackend

F32 = 4
F16 = 2
# Small graph inputs (positions, token ids, output ids, slot indices) and allocator slack:
# measured at 0.0176 MiB on the CPU for a 512-token micro-batch; charged generously.
GRAPH_CONSTANT_BYTES = 256 * 1024
SCHED_MAX_COPIES = 4  # ggml/src/ggml-backend.cpp GGML_SCHED_MAX_COPIES (pipeline parallelism)
PARTIAL_SHIFT_ROWS = -2  # a device holding some layers: two rows of n_embd fewer (measured)
# The fitted coefficients reproduce llama.cpp's figure to within a few percent; this keeps the
# estimate above it where the fit is loose (multi-stream graphs, odd head layouts).
SAFETY_FACTOR = 1.03
UNKNOWN_ARCH_FACTOR = 1.5  # unknown graph shapes: half again on top of the dense-transformer model


def _attention_cells(hp: Hyperparameters, ctx: Context) -> int:
    """KV cells one stream's attention spans in the reserve graph; the micro-batch itself for
    models without a cache (their attention is over the batch)."""
    if not any(hp.has_attention):
        return ctx.n_ubatch
    return ctx.cells


def _mask_bytes(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """The KQ masks, graph inputs alive throughout: f16 with flash attention, f32 without; a
    second one for sliding-window layers."""
    if not any(hp.n_head):
        return 0
    width = F16 if flash_attn else F32
    size = width * ctx.n_ubatch * _attention_cells(hp, ctx)
    if any(hp.is_swa):
        size += width * ctx.n_ubatch * ctx.swa_cells
    return size


def _ffn_values(hp: Hyperparameters, il: int, flash_attn: bool, shift: int) -> int:
    """Live f32 values per token while a layer's feed-forward runs.

    shift: see _layer_values (a device holding some layers only). The per-expert down outputs of a
    wide-routing MoE (many experts used, no shared expert) stay one row higher there instead.
    """
    if hp.is_moe[il]:
        used, ffe = hp.n_expert_used, hp.n_ff_exp or hp.n_ff[il]
        # gate, up and their product for each selected expert
        values = 3 * ffe * used + 5 * hp.n_embd + shift
        if not hp.n_expert_shared:
            # the selected experts' down outputs and their weighted copy (qwen3moe: 8 of 128)
            down = 2 * (hp.n_embd + ffe) * used + (hp.n_embd if shift else 0)
            values = max(values, down)
        return values
    if not hp.ffn_gated:
        return 2 * hp.n_ff[il] + hp.n_embd + shift
    values = 3 * hp.n_ff[il] + 5 * hp.n_embd
    if not flash_attn and hp.has_attention[il] and not hp.is_mla:
        # without flash attention the attention's permuted output is still alive here; this
        # phase is the peak at small contexts (measured: ctx <= ~1024 with FA off)
        n_q = hp.n_head[il] * (hp.head_k_swa if hp.is_swa[il] else hp.head_k)
        kv = hp.n_embd_k_gqa(il) + hp.n_embd_v_gqa(il)
        values = max(values, 3 * hp.n_ff[il] + 3 * hp.n_embd + 3 * n_q + kv + (hp.n_embd if hp.post_norms else 0))
    return values + shift


def _attention_values(hp: Hyperparameters, ctx: Context, il: int, flash_attn: bool) -> int:
    """Live f32 values per token while a layer's attention runs (KQ included without FA)."""
    n_head = hp.n_head[il]
    if not n_head or not (hp.has_attention[il] or hp.embedding_model):
        return 0
    head_k = hp.head_k_swa if hp.is_swa[il] else hp.head_k
    if hp.is_mla:
        # absorbed MLA: queries in the latent space (n_head x 576) next to their 192-wide form
        values = 2 * n_head * head_k + 2 * n_head * hp.key_length_mla + 3 * hp.n_embd
    elif hp.embedding_model:
        # no cache: K and V are fresh projections of the batch
        values = 2 * hp.n_embd + 3 * n_head * head_k + 2 * hp.n_head_kv[il] * head_k
    else:
        values = 3 * hp.n_embd + 3 * n_head * head_k + hp.n_embd_k_gqa(il) + hp.n_embd_v_gqa(il)
    if hp.post_norms:
        values += hp.n_embd
    if not flash_attn:
        cells = ctx.swa_cells if hp.is_swa[il] else _attention_cells(hp, ctx)
        values += cells * n_head  # KQ, f32, [cells, tokens, heads]
        if hp.attn_softcap:
            values += 2 * n_head * head_k
    return values


def _recurrent_values(hp: Hyperparameters, il: int) -> int:
    if not hp.is_recurrent[il]:
        return 0
    if hp.ssm_d_inner:
        return 15 * hp.ssm_d_inner // 2  # mamba: in-projection, conv, scan output and gate
    return 17 * hp.n_embd  # short convolution (lfm2): in-projection, its slices, conv window


def _layer_values(hp: Hyperparameters, ctx: Context, il: int, flash_attn: bool, shift: int = 0) -> int:
    """Peak live f32 values per token inside layer il.

    shift adjusts the phases for a device that holds some of the layers only (measured: two
    rows of n_embd fewer than in the whole graph).
    """
    return max(
        _ffn_values(hp, il, flash_attn, shift),
        _attention_values(hp, ctx, il, flash_attn) + shift,
        _recurrent_values(hp, il) + shift,
    )


def _layer_peak(hp: Hyperparameters, ctx: Context, flash_attn: bool, shift: int = 0) -> int:
    """Peak live bytes inside one layer, over every layer of the model."""
    peak = max((_layer_values(hp, ctx, il, flash_attn, shift) for il in range(hp.n_layer)), default=0)
    return F32 * ctx.n_ubatch * peak


def _recurrent_state_bytes(hp: Hyperparameters, ctx: Context) -> int:
    """A recurrent layer's states pass through the graph whole (copied in, updated, written back)."""
    if not any(hp.is_recurrent):
        return 0
    return F32 * (hp.n_embd_r + hp.n_embd_s) * ctx.n_seq


def _output_phase(hp: Hyperparameters, ctx: Context) -> int:
    if hp.embedding_model:
        return F32 * ctx.n_seq * hp.n_embd  # pooled embeddings; no vocabulary head
    return F32 * ctx.n_seq * hp.n_vocab + F32 * ctx.n_ubatch * hp.n_embd


def _graph(hp: Hyperparameters, ctx: Context, flash_attn: bool, shift: int = 0) -> int:
    """Masks, recurrent states and the peak phase: the whole graph on one backend, unpadded."""
    peak = max(_layer_peak(hp, ctx, flash_attn, shift), _output_phase(hp, ctx))
    return _mask_bytes(hp, ctx, flash_attn) + _recurrent_state_bytes(hp, ctx) + peak


def _charged(value: int, hp: Hyperparameters) -> int:
    total = int(value * SAFETY_FACTOR) + GRAPH_CONSTANT_BYTES
    if not hp.known:
        total = int(total * UNKNOWN_ARCH_FACTOR)
    return total


def cpu_graph_bytes(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """The compute buffer of a run with every layer on one device."""
    return _charged(_graph(hp, ctx, flash_attn), hp)


def _partial(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """A device in a partial offload: `-ngl k <= n_layer` offloads the output layer and the last
    k-1 blocks, never block 0, so leading dense blocks (deepseek2) do not count. Measured on RPC
    devices, which lack CUDA's op offload: a device holding only the output layer needs just
    its logits there, and the one holding the output of a wide-routing MoE four rows less; both
    are charged the common figure here (the planner prices a partial offload per device alike).
    """
    shift = PARTIAL_SHIFT_ROWS * hp.n_embd
    layers = range(1, hp.n_layer) if hp.n_layer > 1 else range(hp.n_layer)
    values = max((_layer_values(hp, ctx, il, flash_attn, shift) for il in layers), default=0)
    peak = max(F32 * ctx.n_ubatch * values, _output_phase(hp, ctx))
    return _mask_bytes(hp, ctx, flash_attn) + _recurrent_state_bytes(hp, ctx) + peak


def _split_moe_rows(hp: Hyperparameters) -> int:
    """Rows of n_embd a pipeline-parallel device needs beyond the dense rule for wide-routing MoE.

    Measured with llama-server on two RPC devices (benchmarks/accuracy, the "-8l" shapes: real
    blocks, fewer of them): on both devices Qwen3-30B-A3B (8 of 128 experts) needed one row more
    than the dense rule, DeepSeek-V2-Lite (6 of 64, two shared, MLA) 2.2 rows more, at micro-batches
    of 512 and 1024 with flash attention; Mixtral-8x7B (2 of 8) none. Where ggml-alloc puts them is
    not modelled (see the partial-offload note in the results); this charges 2 rows, and 1 more
    with MLA.
    """
    if not any(hp.is_moe) or hp.n_expert_used <= 2:
        return 0
    return 3 if hp.is_mla else 2


def _roles(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> dict[str, int]:
    """Compute buffer of each device role, as llama.cpp's CPU and RPC backends size them.

    Measured with ggml-rpc-server devices (benchmarks/accuracy):
    - one device holding everything: the whole graph less one row of n_embd; the host keeps the
      masks and the input embeddings (and, without flash attention, one K+V row-set per cache);
    - several devices holding everything run pipeline-parallel: the scheduler keeps
      GGML_SCHED_MAX_COPIES = 4 copies of every graph input, so each device adds 3 more masks and
      the activations it receives (11 rows of n_embd before the output device, 2 on it), and the
      host holds 4 masks and 10 rows. (A no_alloc dry run, as llama-fit-params does, reports 4
      more rows on the output device than llama-server then allocates; this follows the server.)
    - a device holding some layers: the graph less two n_embd rows over the layers it may hold;
      the host runs the rest of the model, so it needs the whole graph.
    """
    x = ctx.n_ubatch
    graph = _graph(hp, ctx, flash_attn)
    masks = _mask_bytes(hp, ctx, flash_attn)
    row = F32 * x * hp.n_embd
    kv_rows = 0
    if not flash_attn and any(hp.has_attention):
        caches = 2 if any(hp.is_swa) else 1
        width = max(hp.n_embd_k_gqa(il) + hp.n_embd_v_gqa(il) for il in range(hp.n_layer))
        kv_rows = F32 * x * width * caches
    extra = (SCHED_MAX_COPIES - 1) * masks + (SCHED_MAX_COPIES - 1) * kv_rows + _split_moe_rows(hp) * row
    return {
        "full": graph - row,
        "host_full": masks + 4 * row + kv_rows,
        "split_other": graph + extra + 11 * row,
        "split_output": graph + extra + 2 * row,
        "host_split": SCHED_MAX_COPIES * (masks + kv_rows) + 10 * row,
        "partial": _partial(hp, ctx, flash_attn),
        "cpu_only": graph,
    }


def compute_profile(
    hp: Hyperparameters,
    ctx: Context,
    *,
    flash_attn: bool,
    largest_layer_tensor: int,
    device_backend: DeviceBackend,
) -> ComputeProfile:
    """Every role's buffer with flash attention as resolved (supervisor/memory/flash_attention.py)."""
    roles = _roles(hp, ctx, flash_attn)
    charged = {key: _charged(value, hp) for key, value in roles.items()}
    if device_backend == "cpu":
        return ComputeProfile(
            gpu_full_bytes=charged["full"],
            gpu_split_output_bytes=charged["split_output"],
            gpu_split_other_bytes=charged["split_other"],
            gpu_partial_bytes=charged["partial"],
            host_with_gpu_bytes=charged["host_full"],
            host_split_bytes=charged["host_split"],
            host_cpu_only_bytes=charged["cpu_only"],
        )

    return ComputeProfile(
        gpu_full_bytes=charged["full"],
        gpu_split_output_bytes=charged["split_output"],
        gpu_split_other_bytes=charged["split_other"],
        gpu_partial_bytes=_cuda_partial(charged, largest_layer_tensor),
        host_with_gpu_bytes=charged["host_full"],
        host_split_bytes=charged["host_split"],
        host_cpu_only_bytes=charged["cpu_only"],
    )


def _cuda_partial(charged: dict[str, int], largest_layer_tensor: int) -> int:
    """A CUDA device in a partial offload also runs the host layers' large-batch products (op
    offload: batches of 32 and more go to the GPU with their weights copied over), so it needs the
    whole graph's activations and the largest layer tensor staged beside them, not the smaller
    figure of an RPC device holding some layers. Measured on an H200: 0.87-0.97 of this for dense
    and MoE shapes at micro-batches of 512 and 2048.
    """
    return max(charged["full"], charged["partial"]) + largest_layer_tensor


def cuda_pool_bytes(hp: Hyperparameters, ctx: Context, flash_attn: bool) -> int:
    """Temporaries CUDA takes from its memory pool beyond the fixed per-device overhead.

    Without flash attention cuBLAS multiplies the attention weights by V in f16, so the pool holds
    an f16 copy of the widest layer's scores, `cells x n_ubatch x n_head` (measured on an H200:
    the pool's growth was this plus 80-104 MiB, which DEVICE_OVERHEAD_BYTES covers). With flash
    attention the pool stays within that overhead.
    """
    if flash_attn or not any(hp.n_head):
        return 0
    widest = max(
        (
            hp.n_head[il] * (ctx.swa_cells if hp.is_swa[il] else _attention_cells(hp, ctx))
            for il in range(hp.n_layer)
            if hp.has_attention[il] or hp.embedding_model
        ),
        default=0,
    )
    return F16 * ctx.n_ubatch * widest


def mmproj_compute_bytes(mmproj: ModelHeader, *, flash_attn: bool) -> int:
    """A vision projector's compute buffer (libmtmd): the attention over one image's patches.

    Unmeasured here: a conservative closed form (KQ over every patch, f32 without flash
    attention), at least 128 MiB.
    """
    image = header_int(mmproj, "clip.vision.image_size", 1024) or 1024
    patch = header_int(mmproj, "clip.vision.patch_size", 14) or 14
    width = header_int(mmproj, "clip.vision.embedding_length", 1280) or 1280
    heads = header_int(mmproj, "clip.vision.attention.head_count", 16) or 16
    positions = (image // max(patch, 1)) ** 2
    attention = F16 * positions * positions if flash_attn else F32 * positions * positions * heads
    activations = F32 * positions * width * 8
    return max(128 * MIB, attention + activations)
