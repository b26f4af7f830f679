"""memory_profile: KV cache, weights, output buffer and placement of dense GQA models.

The expected numbers are worked by hand from llama.cpp's rules (see supervisor/memory/profile.py);
the accuracy harness (benchmarks/accuracy) checks the same rules against llama.cpp itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.accuracy.shapes import SHAPES, llama_like
from llama_smart_proxy.schemas.config import BUILTIN_DEFAULTS, ModelSpec
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.memory.profile import memory_profile, row_bytes

MIB = 1024**2

LLAMA_8B = llama_like(
    "llama-8b", "llama", n_vocab=128256, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336,
    n_ctx_train=131072, rope_freqs=True,
)  # fmt: skip
LLAMA_1B_TIED = llama_like(
    "llama-1b", "llama", n_vocab=128256, n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192,
    n_ctx_train=131072, tied=True,
)  # fmt: skip


def spec(**overrides: Any) -> ModelSpec:
    values = BUILTIN_DEFAULTS.model_dump()
    values.update(name="m", file=Path("/models/m.gguf"), mmproj=None, aliases=[])
    values.update(overrides)
    return ModelSpec(**values)


def test_gqa_kv_cache_is_128_kib_per_token_for_llama3_8b() -> None:
    profile = memory_profile(LLAMA_8B.header(), spec(ctx=8192))
    assert sum(layer.kv_bytes for layer in profile.layers) == 8192 * 32 * 8 * 128 * (2 + 2)


def test_context_is_padded_to_256_cells() -> None:
    profile = memory_profile(LLAMA_8B.header(), spec(ctx=1000))
    assert profile.settings.n_ctx == 1024
    assert profile.layers[0].kv_bytes == 1024 * 8 * 128 * 4


def test_context_zero_means_the_models_own() -> None:
    assert memory_profile(LLAMA_8B.header(), spec(ctx=0)).settings.n_ctx == 131072


def test_per_slot_streams_round_each_slot_up_to_256() -> None:
    # 5000 / 3 = 1666 -> 1792 cells in each of 3 streams
    profile = memory_profile(LLAMA_8B.header(), spec(ctx=5000, parallel=3, kv_unified=False))
    assert profile.settings.n_ctx == 3 * 1792
    assert profile.layers[0].kv_bytes == 3 * 1792 * 8 * 128 * 4


def test_unified_cache_does_not_grow_with_slots() -> None:
    one = memory_profile(LLAMA_8B.header(), spec(ctx=4096, parallel=1))
    four = memory_profile(LLAMA_8B.header(), spec(ctx=4096, parallel=4))
    assert one.layers[5].kv_bytes == four.layers[5].kv_bytes


@pytest.mark.parametrize(
    ("cache_type", "bytes_per_block_of_32"),
    [("f16", 64), ("q8_0", 34), ("q4_0", 18), ("q4_1", 20), ("q5_0", 22), ("q5_1", 24), ("iq4_nl", 18)],
)
def test_quantized_cache_rows_use_ggml_block_sizes(cache_type: str, bytes_per_block_of_32: int) -> None:
    profile = memory_profile(LLAMA_8B.header(), spec(ctx=4096, cache_type_k=cache_type, cache_type_v=cache_type))
    assert profile.layers[0].kv_bytes == 2 * 4096 * (1024 // 32) * bytes_per_block_of_32
    assert row_bytes(cache_type, 1024) == 1024 // 32 * bytes_per_block_of_32


def test_quantized_v_without_flash_attention_warns() -> None:
    profile = memory_profile(LLAMA_8B.header(), spec(cache_type_v="q8_0", flash_attn="off"))
    assert any("needs flash attention" in w for w in profile.warnings)


def test_weights_are_the_tensors_as_stored_split_by_layer() -> None:
    header = LLAMA_8B.header()
    profile = memory_profile(header, spec(), device_backend="cpu")
    by_layer_3 = sum(t.n_bytes for t in header.tensors if t.name.startswith("blk.3."))
    assert profile.layers[3].weights_bytes == by_layer_3  # every size here is a multiple of 32
    embd = next(t.n_bytes for t in header.tensors if t.name == "token_embd.weight")
    assert profile.input_weights_bytes == embd
    total = profile.input_weights_bytes + profile.output_weights_bytes + sum(l.weights_bytes for l in profile.layers)
    assert total == sum(t.n_bytes for t in header.tensors)


def test_cuda_pads_quantized_rows_and_aligns_to_128() -> None:
    # ffn_down rows of 14336 are a multiple of 512: no row padding, only alignment
    cpu = memory_profile(LLAMA_8B.header(), spec(), device_backend="cpu")
    cuda = memory_profile(LLAMA_8B.header(), spec(), device_backend="cuda")
    assert 0 <= cuda.layers[1].weights_bytes - cpu.layers[1].weights_bytes < 9 * 128


def test_output_buffer_is_logits_for_every_slot() -> None:
    profile = memory_profile(LLAMA_8B.header(), spec(parallel=4))
    assert profile.output_buffer_bytes == 4 * 4 * 128256


def test_tied_embeddings_are_copied_only_to_a_gpu_output() -> None:
    header = LLAMA_1B_TIED.header()
    profile = memory_profile(header, spec())
    embd = next(t.n_bytes for t in header.tensors if t.name == "token_embd.weight")
    assert profile.tied_output_bytes >= embd
    on_gpu = place(profile, 1, [1.0])
    assert on_gpu.gpus[0].weights_bytes == profile.output_weights_bytes + profile.tied_output_bytes
    cpu_only = place(profile, 0, [])
    total = profile.input_weights_bytes + profile.output_weights_bytes + sum(l.weights_bytes for l in profile.layers)
    assert cpu_only.host.weights_bytes == total


def test_an_encoder_has_no_head_so_nothing_of_its_embeddings_goes_to_the_gpu() -> None:
    # measured on an H200: bge-base's CUDA0 model buffer holds the blocks alone (and the estimate
    # was 44.7 MiB over when it copied token_embd there as a tied head)
    header = SHAPES["bge-base-en-v1.5"].header()
    profile = memory_profile(header, spec(ctx=512))
    assert profile.tied_output_bytes == 0
    on_gpu = place(profile, 99, [1.0])
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    assert on_gpu.host.weights_bytes >= embd.n_bytes
    assert on_gpu.gpus[0].weights_bytes == sum(l.weights_bytes for l in profile.layers) + profile.output_weights_bytes


def test_full_offload_puts_every_layer_on_the_gpu_and_charges_its_overhead() -> None:
    profile = memory_profile(LLAMA_8B.header(), spec())
    estimate = place(profile, 33, [1.0])
    gpu = estimate.gpus[0]
    assert gpu.kv_bytes == sum(layer.kv_bytes for layer in profile.layers)
    assert gpu.overhead_bytes == profile.device_overhead_bytes > 400 * MIB
    assert estimate.host.weights_bytes == profile.input_weights_bytes
    assert estimate.host.output_bytes == profile.output_buffer_bytes


def test_flash_attention_off_grows_the_compute_buffer_with_context() -> None:
    short = memory_profile(LLAMA_8B.header(), spec(ctx=4096, flash_attn="off"), device_backend="cpu")
    long = memory_profile(LLAMA_8B.header(), spec(ctx=16384, flash_attn="off"), device_backend="cpu")
    on = memory_profile(LLAMA_8B.header(), spec(ctx=16384, flash_attn="on"), device_backend="cpu")
    # f32 KQ of 32 heads per cell and token: 12288 more cells x 512 tokens x 33 x 4 bytes
    growth = long.compute.host_cpu_only_bytes - short.compute.host_cpu_only_bytes
    kq = 12288 * 512 * 33 * 4
    assert kq <= growth <= kq * 1.05
    assert on.compute.host_cpu_only_bytes < long.compute.host_cpu_only_bytes


def test_without_flash_attention_a_gpu_is_charged_the_f16_scores_in_cudas_pool() -> None:
    # cuBLAS multiplies the attention weights by V in f16: cells x micro-batch x heads x 2 bytes,
    # measured on an H200 as the pool's growth (benchmarks/results/estimator-gpu.md)
    on = memory_profile(LLAMA_8B.header(), spec(ctx=8192, ubatch=2048, flash_attn="on"))
    off = memory_profile(LLAMA_8B.header(), spec(ctx=8192, ubatch=2048, flash_attn="off"))
    auto = memory_profile(LLAMA_8B.header(), spec(ctx=8192, ubatch=2048, flash_attn="auto"))
    assert off.device_overhead_bytes - on.device_overhead_bytes == 8192 * 2048 * 32 * 2
    assert auto.device_overhead_bytes == on.device_overhead_bytes  # head size 128: CUDA runs it
    cpu = memory_profile(LLAMA_8B.header(), spec(flash_attn="off"), device_backend="cpu")
    assert cpu.device_overhead_bytes == 0


def test_a_partial_offload_on_cuda_needs_the_whole_graph_and_a_staged_weight() -> None:
    # CUDA runs the host layers' large batches itself (op offload); an RPC device does not
    header = LLAMA_8B.header()
    cuda = memory_profile(header, spec(ctx=8192)).compute
    cpu = memory_profile(header, spec(ctx=8192), device_backend="cpu").compute
    largest = max(t.n_bytes for t in header.tensors if t.name.startswith("blk."))
    assert cuda.gpu_partial_bytes >= cpu.gpu_full_bytes + largest
    assert cuda.gpu_partial_bytes > cpu.gpu_partial_bytes + largest


def test_the_type_table_planning_uses_agrees_with_ggufs_own() -> None:
    # profile.py keeps its own copy so that planning from a snapshot imports neither gguf nor numpy;
    # an older gguf (down to the floor pyproject.toml allows) knows fewer types, never other sizes
    import gguf

    from llama_smart_proxy.supervisor.memory.profile import QUANT_SIZES

    theirs = {q.name: gguf.GGML_QUANT_SIZES[q] for q in gguf.GGMLQuantizationType if q in gguf.GGML_QUANT_SIZES}
    assert {name: QUANT_SIZES.get(name) for name in theirs} == theirs


def test_planning_from_a_snapshot_imports_neither_gguf_nor_numpy() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from llama_smart_proxy.supervisor.planning import headers, planner, prepare\n"
        "from llama_smart_proxy.supervisor.memory import profile, placement\n"
        "print(sorted(m for m in ('gguf', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
