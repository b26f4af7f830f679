"""memory_profile for every family the estimator knows, and for one it does not.

Shapes come from benchmarks/accuracy/shapes.py (real models' dimensions); the expected figures
are llama.cpp's rules worked by hand. The accuracy harness checks the same against llama.cpp.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from benchmarks.accuracy.shapes import SHAPES, Shape, llama_like
from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.memory.profile import memory_profile, pad
from llama_smart_proxy.supervisor.planning.headers import build_profiles
from tests.test_memory_profile import spec

MIB = 1024**2


def kv_total(shape: Shape, **settings: object) -> int:
    return sum(layer.kv_bytes for layer in memory_profile(shape.header(), spec(**settings)).layers)


def test_gemma3_sliding_layers_keep_window_plus_ubatch_cells() -> None:
    # 34 layers, every sixth full; 4 KV heads of 256, f16: 4096 bytes per cell per layer
    full_layers, swa_layers = 5, 29
    swa_cells = pad(1024 * 1 + 512, 256)
    assert kv_total(SHAPES["gemma-3-4b"], ctx=16384) == 4096 * (full_layers * 16384 + swa_layers * swa_cells)


def test_unified_sliding_window_spans_every_slot() -> None:
    # unified: one stream of pad(n_swa * slots + ubatch) cells; per slot: slots x pad(n_swa + ubatch)
    unified = kv_total(SHAPES["gemma-3-4b"], ctx=16384, parallel=4, kv_unified=True)
    per_slot = kv_total(SHAPES["gemma-3-4b"], ctx=16384, parallel=4, kv_unified=False)
    assert unified == 4096 * (5 * 16384 + 29 * pad(1024 * 4 + 512, 256))
    assert per_slot == 4096 * (5 * 4 * 4096 + 29 * 4 * pad(1024 + 512, 256))


def test_sliding_window_never_exceeds_the_context() -> None:
    assert kv_total(SHAPES["gemma-2-9b"], ctx=2048) == 42 * 2048 * 8 * 256 * 4


def test_gemma2_window_defaults_to_4096_when_the_key_is_missing() -> None:
    shape = SHAPES["gemma-2-9b"]
    metadata = {k: v for k, v in shape.metadata.items() if k != "gemma2.attention.sliding_window"}
    without = dataclasses.replace(shape, metadata=metadata)
    assert kv_total(without, ctx=32768) == kv_total(shape, ctx=32768)


def test_phi3_window_is_ignored_as_llama_cpp_does() -> None:
    assert kv_total(SHAPES["phi-3-mini-4k"], ctx=4096) == 32 * 4096 * 32 * 96 * 4


def test_moe_expert_tensors_count_in_full() -> None:
    header = SHAPES["mixtral-8x7b"].header()
    profile = memory_profile(header, spec(), device_backend="cpu")
    experts = sum(t.n_bytes for t in header.tensors if t.name.startswith("blk.7.ffn_") and "_exps" in t.name)
    assert profile.layers[7].weights_bytes > experts > 8 * 3 * 4096 * 14336 * 144 // 256 // 2
    assert profile.layers[7].weights_bytes == sum(t.n_bytes for t in header.tensors if t.name.startswith("blk.7."))


def test_mla_caches_the_576_wide_latent_and_no_v() -> None:
    # DeepSeek-V2-Lite: 27 layers, K only, kv_lora_rank 512 + rope 64, f16
    assert kv_total(SHAPES["deepseek-v2-lite"], ctx=8192) == 27 * 8192 * 576 * 2


def test_mla_quantized_k_uses_its_block_size() -> None:
    assert kv_total(SHAPES["deepseek-v2-lite"], ctx=8192, cache_type_k="q8_0") == 27 * 8192 * 576 // 32 * 34


def test_mamba_state_is_fixed_per_slot_whatever_the_context() -> None:
    shape = SHAPES["mamba-2.8b"]
    per_layer_per_slot = 4 * ((4 - 1) * 5120 + 16 * 5120)  # conv (d_conv-1)*d_inner + ssm d_state*d_inner
    for ctx in (4096, 65536):
        profile = memory_profile(shape.header(), spec(ctx=ctx, parallel=3))
        assert sum(layer.kv_bytes for layer in profile.layers) == 0
        assert sum(layer.recurrent_bytes for layer in profile.layers) == 64 * 3 * per_layer_per_slot


def test_lfm2_attention_layers_cache_and_short_convolutions_keep_a_state() -> None:
    profile = memory_profile(SHAPES["lfm2-1.2b"].header(), spec(ctx=8192, parallel=2))
    kv_heads = SHAPES["lfm2-1.2b"].metadata["lfm2.attention.head_count_kv"]
    assert isinstance(kv_heads, list)
    for layer, heads in zip(profile.layers, kv_heads):
        if heads:
            assert (layer.kv_bytes, layer.recurrent_bytes) == (8192 * 8 * 64 * 4, 0)
        else:  # (L_cache - 1) * n_embd f32 per slot
            assert (layer.kv_bytes, layer.recurrent_bytes) == (0, 2 * (3 - 1) * 2048 * 4)


def test_embedding_models_have_no_cache_and_return_embeddings() -> None:
    profile = memory_profile(SHAPES["bge-base-en-v1.5"].header(), spec(ctx=512, parallel=2))
    assert all(layer.kv_bytes == 0 and layer.recurrent_bytes == 0 for layer in profile.layers)
    assert profile.output_buffer_bytes == 4 * 2 * (30522 + 768)
    assert profile.input_weights_bytes > 0  # token, position and type embeddings stay on the host


def renamed(shape: Shape, arch: str) -> ModelHeader:
    """The same tensors under an architecture name the estimator has never seen."""
    header = shape.header()
    metadata = {k.replace(f"{shape.arch}.", f"{arch}.", 1): v for k, v in header.metadata.items()}
    metadata["general.architecture"] = arch
    return header.model_copy(update={"architecture": arch, "metadata": metadata})


@pytest.mark.parametrize("name", ["gemma-3-4b", "qwen3-8b", "mixtral-8x7b"])
def test_unknown_architecture_warns_and_never_estimates_below_the_known_one(name: str) -> None:
    known = memory_profile(SHAPES[name].header(), spec(ctx=16384))
    unknown = memory_profile(renamed(SHAPES[name], "future-arch"), spec(ctx=16384))
    assert not unknown.known_architecture
    assert any("not one the estimator knows" in w for w in unknown.warnings)
    for layers in (1, 20, 99):
        a, b = place(known, layers, [1.0]), place(unknown, layers, [1.0])
        assert b.total_bytes >= a.total_bytes
        assert b.gpus[0].compute_bytes > a.gpus[0].compute_bytes


def test_unknown_hybrid_with_ssm_keys_gets_both_a_cache_and_a_state() -> None:
    header = renamed(SHAPES["mamba-2.8b"], "future-ssm")
    profile = memory_profile(header, spec(ctx=4096))
    assert all(layer.recurrent_bytes > 0 for layer in profile.layers)


def test_unknown_architecture_charges_the_whole_file_at_least() -> None:
    shape = llama_like("x", "llama", n_vocab=1000, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=512)
    header = renamed(shape, "mystery")
    header = header.model_copy(update={"file_size": header.file_size + 10 * MIB})  # bytes not in any tensor
    profile = memory_profile(header, spec(ctx=512))
    weights = profile.input_weights_bytes + profile.output_weights_bytes + sum(l.weights_bytes for l in profile.layers)
    assert weights >= header.file_size


def test_empty_header_of_an_unknown_architecture_does_not_crash() -> None:
    header = ModelHeader(path="/m.gguf", file_size=1000, mtime_ns=0, architecture="nothing", metadata={"general.architecture": "nothing"})
    profile = memory_profile(header, spec())
    assert place(profile, 99, [1.0]).total_bytes >= 1000


def test_vision_projector_weights_and_compute_go_to_the_first_gpu() -> None:
    from llama_smart_proxy.schemas.header import TensorInfo

    projector = ModelHeader(
        path="/m/mmproj.gguf", file_size=600 * MIB, mtime_ns=0, architecture="clip",
        metadata={"general.architecture": "clip", "clip.vision.image_size": 896, "clip.vision.patch_size": 14,
                  "clip.vision.embedding_length": 1152, "clip.vision.attention.head_count": 16},
        tensors=[TensorInfo(name="v.blk.0.attn_q.weight", type="F16", shape=[1152, 1152], n_bytes=1152 * 1152 * 2)],
    )  # fmt: skip
    header = SHAPES["gemma-3-4b"].header()
    plain = memory_profile(header, spec())
    with_projector = memory_profile(header, spec(), projector)
    assert with_projector.mmproj_bytes > 1152 * 1152 * 2
    split = place(with_projector, 99, [1.0, 1.0])
    assert split.gpus[0].weights_bytes - place(plain, 99, [1.0, 1.0]).gpus[0].weights_bytes == with_projector.mmproj_bytes
    off = memory_profile(header, spec(flash_attn="off"), projector)
    assert off.mmproj_bytes > with_projector.mmproj_bytes  # f32 attention over every patch without FA


def test_a_nextn_block_takes_no_memory_unless_mtp_speculation_is_asked_for() -> None:
    # llama.cpp skips a NextN/MTP block's tensors (TENSOR_SKIP) unless load_mtp; the accuracy
    # harness checks the same against llama.cpp (deepseek-v2-lite-mtp cases)
    header = SHAPES["deepseek-v2-lite-mtp"].header()
    block = sum(t.n_bytes for t in header.tensors if t.name.startswith("blk.27."))
    plain = memory_profile(header, spec())
    asked = memory_profile(header, spec(args=["--spec-type", "ngram-mod,draft-mtp"]))
    assert plain.n_layers == asked.n_layers == 28  # it keeps its place in -ngl's count
    assert plain.layers[27].weights_bytes == 0 and any("NextN/MTP" in w for w in plain.warnings)
    assert asked.layers[27].weights_bytes >= block > 100 * MIB
    assert sum(layer.kv_bytes for layer in asked.layers[27:]) == 0  # no cache for it either way


def test_arguments_given_to_every_child_reach_the_estimate(tmp_path: Path) -> None:
    shape = SHAPES["deepseek-v2-lite-mtp"]

    def block_27(args: list[str]) -> int:
        config = Config.model_validate(
            {"llama_server": {"args": args}, "models": {"ds": {"file": str(tmp_path / "ds.gguf")}}}
        )
        recorded = {str(tmp_path / "ds.gguf"): shape.header(str(tmp_path / "ds.gguf"))}  # as a snapshot has it
        found = build_profiles(config, recorded, have_snapshot=True)
        return found.profiles["ds"].layers[27].weights_bytes

    assert block_27([]) == 0
    assert block_27(["--spec-type", "draft-mtp"]) > 0
