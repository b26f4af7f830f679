"""`flash_attn = "auto"`: resolved per kind of device as llama.cpp build 11434 resolves it, and
charged as resolved (supervisor/memory/flash_attention.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.accuracy.shapes import SHAPES, llama_like
from llama_smart_proxy.schemas.config import BUILTIN_DEFAULTS, ModelSpec
from llama_smart_proxy.supervisor.memory.architectures import hyperparameters
from llama_smart_proxy.supervisor.memory.flash_attention import cuda_supports, resolve
from llama_smart_proxy.supervisor.memory.profile import memory_profile

# head size 160: no CUDA flash-attention kernel in this build (ggml-cuda/fattn.cu)
ODD_HEADS = llama_like(
    "odd-heads", "llama", n_vocab=32000, n_embd=2560, n_layer=8, n_head=16, n_head_kv=4, n_ff=6912,
    n_ctx_train=8192, head_dim=160,
)  # fmt: skip


def spec(**overrides: Any) -> ModelSpec:
    values = BUILTIN_DEFAULTS.model_dump()
    values.update(name="m", file=Path("/models/m.gguf"), mmproj=None, aliases=[], flash_attn="auto")
    values.update(overrides)
    return ModelSpec(**values)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_auto_is_charged_as_on_wherever_the_cpu_and_rpc_devices_run(shape: str) -> None:
    header = SHAPES[shape].header()
    auto = memory_profile(header, spec(ctx=32768), device_backend="cpu")
    on = memory_profile(header, spec(ctx=32768, flash_attn="on"), device_backend="cpu")
    assert auto.settings.flash_attn is True
    assert auto.compute == on.compute
    assert [layer.kv_bytes for layer in auto.layers] == [layer.kv_bytes for layer in on.layers]


def test_auto_no_longer_charges_a_hybrid_the_scores_of_flash_attention_off() -> None:
    # the case: lfm2 at 32k, where the larger of on and off was 20x the buffer
    header = SHAPES["lfm2-1.2b"].header()
    auto = memory_profile(header, spec(ctx=32768), device_backend="cpu").compute.host_cpu_only_bytes
    off = memory_profile(header, spec(ctx=32768, flash_attn="off"), device_backend="cpu").compute.host_cpu_only_bytes
    assert auto * 10 < off


@pytest.mark.parametrize("shape", ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-9b", "gemma-3-4b", "phi-3-mini-4k",
                                   "deepseek-v2-lite", "qwen3-30b-a3b", "bge-base-en-v1.5"])  # fmt: skip
def test_cuda_runs_flash_attention_for_the_usual_head_sizes_and_mla(shape: str) -> None:
    hp = hyperparameters(SHAPES[shape].header())
    assert cuda_supports(hp, "f16", "f16")
    assert cuda_supports(hp, "q8_0", "q8_0")


def test_cuda_has_no_kernel_for_head_size_160_or_an_iq4_nl_cache() -> None:
    assert not cuda_supports(hyperparameters(ODD_HEADS.header()), "f16", "f16")
    assert not cuda_supports(hyperparameters(SHAPES["llama-3.1-8b"].header()), "iq4_nl", "f16")


def test_auto_resolves_off_for_cuda_and_on_for_the_cpu_when_cuda_lacks_the_kernel() -> None:
    header = ODD_HEADS.header()
    cuda = memory_profile(header, spec(ctx=8192))
    cpu = memory_profile(header, spec(ctx=8192), device_backend="cpu")
    off = memory_profile(header, spec(ctx=8192, flash_attn="off"))
    assert cuda.settings.flash_attn is False and cpu.settings.flash_attn is True
    assert cuda.compute == off.compute
    assert cuda.device_overhead_bytes == off.device_overhead_bytes  # the f16 scores in CUDA's pool
    assert any("resolves to off" in w for w in cuda.warnings)


def test_a_quantized_v_cache_turns_auto_on_and_grok_turns_it_off() -> None:
    hp = hyperparameters(ODD_HEADS.header())
    assert resolve(hp, "auto", "q8_0", "q8_0", frozenset({"cuda", "cpu"}))[0] is True
    grok = hyperparameters(ODD_HEADS.header().model_copy(update={"architecture": "grok"}))
    assert resolve(grok, "auto", "f16", "f16", frozenset({"cpu"}))[0] is False
    assert resolve(grok, "on", "f16", "f16", frozenset({"cpu"}))[0] is True  # as asked


def test_auto_resolved_off_keeps_the_larger_kv_layout() -> None:
    # the cache is created before the check, laid out for flash attention; a launch with -fa off
    # transposes V: whichever it is, the estimate is not under
    header = ODD_HEADS.header()
    auto = memory_profile(header, spec(ctx=8192))
    on = memory_profile(header, spec(ctx=8192, flash_attn="on"))
    off = memory_profile(header, spec(ctx=8192, flash_attn="off"))
    for a, b, c in zip(auto.layers, on.layers, off.layers):
        assert a.kv_bytes == max(b.kv_bytes, c.kv_bytes)
