"""GGUF files of real architectures at real shapes, made by code: header and tensor infos only.

`write_sparse_gguf` writes the metadata and tensor infos with the gguf package's writer and then
extends the file to its full size with `truncate`, so a 5 GB model costs a few MB of disk (the
vocabulary) and llama.cpp loads its weights as zeros. `SHAPES` lists the architectures the
accuracy harness measures, each at the dimensions of a published model (numbers from the models'
config.json files) and with a quantization mix like llama.cpp's Q4_K_M (`quant_mix`).

The tensor lists follow llama.cpp build 11434's `load_arch_tensors` for each architecture
(src/models/<arch>.cpp): names, shapes, and which tensors are optional.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from llama_smart_proxy.schemas.header import ModelHeader, TensorInfo

Q = gguf.GGMLQuantizationType
Tensor = tuple[str, tuple[int, ...], Q]  # name, shape in ggml order (ne0 first), type
Metadata = dict[str, int | float | bool | str | list[int] | list[bool]]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def quantized(ne: tuple[int, ...], wanted: Q) -> Q:
    """The type llama-quantize would store: `wanted` if the row fits its blocks, else a fallback."""
    if len(ne) == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if ne[0] % block == 0:
        return wanted
    if ne[0] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def tensor_bytes(ne: tuple[int, ...], kind: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(ne)) // block * size


def write_sparse_gguf(
    path: Path,
    arch: str,
    metadata: Metadata,
    tensors: list[Tensor],
    n_vocab: int,
    split_max_tensors: int = 0,
) -> list[Path]:
    """Write the model (as split parts when split_max_tensors > 0); return the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    # a neutral name: llama.cpp special-cases some model names (e.g. "phi3" wants <|endoftext|>)
    writer.add_name("synthetic shape")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    # A SentencePiece vocabulary: the special tokens, the 256 byte tokens, then fillers up to the
    # real vocabulary size (the output layer and logits buffer depend on it, not on its content).
    fillers = n_vocab - len(SPECIAL_TOKENS) - 256
    tokens = SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(fillers)]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * fillers
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, ne, kind in tensors:
        writer.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), tensor_bytes(ne, kind), raw_dtype=kind)
    files = [Path(p) for p in writer.print_plan()] if split_max_tensors else [path]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    sizes = []
    for fout, part in zip(writer.fout, writer.tensors):
        data = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, writer.data_alignment) for ti in part.values())
        sizes.append(gguf.GGUFWriter.ggml_pad(fout.tell(), writer.data_alignment) + data)
    writer.close()
    for file, size in zip(files, sizes):
        os.truncate(file, size)  # a hole: no disk, reads as zeros
    return files


# ---- architectures at real shapes ------------------------------------------------------------


def q4_k_m(n_layer: int) -> Callable[[int], bool]:
    """llama.cpp's Q4_K_M gives attn_v and ffn_down 6 bits in some layers (use_more_bits)."""
    return lambda i: i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str
    n_vocab: int
    metadata: Metadata
    tensors: list[Tensor] = field(repr=False)
    embedding: bool = False  # run llama-server with --embedding

    @property
    def file_bytes(self) -> int:
        return sum(tensor_bytes(ne, kind) for _, ne, kind in self.tensors)

    def header(self, path: str = "/models/synthetic.gguf") -> ModelHeader:
        """The header read_header would return for the written file (no file needed)."""
        tensors = []
        offset = 0  # from the start of the data section, as the gguf writer lays them out
        for name, ne, kind in self.tensors:
            size = tensor_bytes(ne, kind)
            tensors.append(TensorInfo(name=name, type=kind.name, shape=list(ne), n_bytes=size, offset=offset))
            offset += gguf.GGUFWriter.ggml_pad(size, 32)
        metadata = {"general.architecture": self.arch, **self.metadata}
        return ModelHeader(
            path=path,
            file_size=sum(gguf.GGUFWriter.ggml_pad(t.n_bytes, 32) for t in tensors),
            mtime_ns=0,
            architecture=self.arch,
            metadata=metadata,
            array_lengths={"tokenizer.ggml.tokens": self.n_vocab},
            tensors=tensors,
        )

    def write(self, directory: Path) -> Path:
        path = Path(directory) / f"{self.name}.gguf"
        if not path.exists():
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            write_sparse_gguf(temporary, self.arch, self.metadata, self.tensors, self.n_vocab)
            temporary.replace(path)
        return path


def _t(tensors: list[Tensor], name: str, ne: tuple[int, ...], kind: Q) -> None:
    tensors.append((name, ne, quantized(ne, kind)))


def _io(t: list[Tensor], n_embd: int, n_vocab: int, tied: bool = False, embd: Q = Q.Q4_K) -> None:
    _t(t, "token_embd.weight", (n_embd, n_vocab), embd)
    _t(t, "output_norm.weight", (n_embd,), Q.F32)
    if not tied:
        _t(t, "output.weight", (n_embd, n_vocab), Q.Q6_K)


def llama_like(
    name: str,
    arch: str,
    *,
    n_vocab: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_ctx_train: int,
    head_dim: int | None = None,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    tied: bool = False,
    n_expert: int = 0,
    n_expert_used: int = 0,
    n_ff_exp: int = 0,
    rope_freqs: bool = False,
    extra: Metadata | None = None,
) -> Shape:
    """llama, mistral (arch llama), mixtral (llama with experts), qwen2, qwen3, qwen3moe."""
    head_dim = head_dim or n_embd // n_head
    more_bits = q4_k_m(n_layer)
    t: list[Tensor] = []
    _io(t, n_embd, n_vocab, tied=tied)
    if rope_freqs:
        _t(t, "rope_freqs.weight", (head_dim // 2,), Q.F32)
    for i in range(n_layer):
        b = f"blk.{i}"
        _t(t, f"{b}.attn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_q.weight", (n_embd, n_head * head_dim), Q.Q4_K)
        _t(t, f"{b}.attn_k.weight", (n_embd, n_head_kv * head_dim), Q.Q4_K)
        _t(t, f"{b}.attn_v.weight", (n_embd, n_head_kv * head_dim), Q.Q6_K if more_bits(i) else Q.Q4_K)
        if qkv_bias:
            _t(t, f"{b}.attn_q.bias", (n_head * head_dim,), Q.F32)
            _t(t, f"{b}.attn_k.bias", (n_head_kv * head_dim,), Q.F32)
            _t(t, f"{b}.attn_v.bias", (n_head_kv * head_dim,), Q.F32)
        if qk_norm:
            _t(t, f"{b}.attn_q_norm.weight", (head_dim,), Q.F32)
            _t(t, f"{b}.attn_k_norm.weight", (head_dim,), Q.F32)
        _t(t, f"{b}.attn_output.weight", (n_head * head_dim, n_embd), Q.Q4_K)
        _t(t, f"{b}.ffn_norm.weight", (n_embd,), Q.F32)
        if n_expert:
            ff = n_ff_exp or n_ff
            _t(t, f"{b}.ffn_gate_inp.weight", (n_embd, n_expert), Q.F32)
            _t(t, f"{b}.ffn_gate_exps.weight", (n_embd, ff, n_expert), Q.Q4_K)
            _t(t, f"{b}.ffn_up_exps.weight", (n_embd, ff, n_expert), Q.Q4_K)
            _t(t, f"{b}.ffn_down_exps.weight", (ff, n_embd, n_expert), Q.Q6_K if more_bits(i) else Q.Q4_K)
        else:
            _t(t, f"{b}.ffn_gate.weight", (n_embd, n_ff), Q.Q4_K)
            _t(t, f"{b}.ffn_up.weight", (n_embd, n_ff), Q.Q4_K)
            _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.Q6_K if more_bits(i) else Q.Q4_K)
    md: Metadata = {
        f"{arch}.context_length": n_ctx_train,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.vocab_size": n_vocab,
    }
    if head_dim != n_embd // n_head:
        md[f"{arch}.attention.key_length"] = head_dim
        md[f"{arch}.attention.value_length"] = head_dim
    if arch == "llama":
        md[f"{arch}.rope.dimension_count"] = head_dim
    if n_expert:
        md[f"{arch}.expert_count"] = n_expert
        md[f"{arch}.expert_used_count"] = n_expert_used
        if n_ff_exp:
            md[f"{arch}.expert_feed_forward_length"] = n_ff_exp
    md.update(extra or {})
    return Shape(name, arch, n_vocab, md, t)


def phi3(name: str, *, n_vocab: int, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int, n_ctx_train: int, n_swa: int) -> Shape:
    head_dim = n_embd // n_head
    more_bits = q4_k_m(n_layer)
    t: list[Tensor] = []
    _io(t, n_embd, n_vocab)
    for i in range(n_layer):
        b = f"blk.{i}"
        _t(t, f"{b}.attn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_qkv.weight", (n_embd, n_embd + 2 * n_head_kv * head_dim), Q.Q6_K if more_bits(i) else Q.Q5_K)
        _t(t, f"{b}.attn_output.weight", (n_embd, n_embd), Q.Q4_K)
        _t(t, f"{b}.ffn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.Q6_K if more_bits(i) else Q.Q4_K)
        _t(t, f"{b}.ffn_up.weight", (n_embd, 2 * n_ff), Q.Q4_K)
    md: Metadata = {
        "phi3.context_length": n_ctx_train,
        "phi3.rope.scaling.original_context_length": n_ctx_train,
        "phi3.embedding_length": n_embd,
        "phi3.block_count": n_layer,
        "phi3.feed_forward_length": n_ff,
        "phi3.attention.head_count": n_head,
        "phi3.attention.head_count_kv": n_head_kv,
        "phi3.attention.layer_norm_rms_epsilon": 1e-5,
        "phi3.rope.dimension_count": head_dim,
        "phi3.attention.sliding_window": n_swa,
    }
    return Shape(name, "phi3", n_vocab, md, t)


def gemma(
    name: str, arch: str, *, n_vocab: int, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, head_dim: int,
    n_ff: int, n_ctx_train: int, n_swa: int,
) -> Shape:
    """gemma2 (tied head, post norms) and gemma3 (adds q/k norms)."""
    more_bits = q4_k_m(n_layer)
    t: list[Tensor] = []
    _io(t, n_embd, n_vocab, tied=True, embd=Q.Q6_K)
    for i in range(n_layer):
        b = f"blk.{i}"
        _t(t, f"{b}.attn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_q.weight", (n_embd, n_head * head_dim), Q.Q4_K)
        _t(t, f"{b}.attn_k.weight", (n_embd, n_head_kv * head_dim), Q.Q4_K)
        _t(t, f"{b}.attn_v.weight", (n_embd, n_head_kv * head_dim), Q.Q6_K if more_bits(i) else Q.Q4_K)
        _t(t, f"{b}.attn_output.weight", (n_head * head_dim, n_embd), Q.Q4_K)
        _t(t, f"{b}.post_attention_norm.weight", (n_embd,), Q.F32)
        if arch == "gemma3":
            _t(t, f"{b}.attn_q_norm.weight", (head_dim,), Q.F32)
            _t(t, f"{b}.attn_k_norm.weight", (head_dim,), Q.F32)
        _t(t, f"{b}.ffn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.ffn_gate.weight", (n_embd, n_ff), Q.Q4_K)
        _t(t, f"{b}.ffn_up.weight", (n_embd, n_ff), Q.Q4_K)
        _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.Q6_K if more_bits(i) else Q.Q4_K)
        _t(t, f"{b}.post_ffw_norm.weight", (n_embd,), Q.F32)
    md: Metadata = {
        f"{arch}.context_length": n_ctx_train,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.attention.sliding_window": n_swa,
    }
    if arch == "gemma2":
        md["gemma2.attn_logit_softcapping"] = 50.0
        md["gemma2.final_logit_softcapping"] = 30.0
    return Shape(name, arch, n_vocab, md, t)


def deepseek2_lite(name: str, nextn: int = 0, n_layer: int = 27) -> Shape:
    """DeepSeek-V2-Lite: MLA (kv_lora_rank 512, rope 64, no q LoRA), 64 experts of which 6 used, 2 shared.

    nextn: NextN/MTP blocks after the trunk, as DeepSeek-V3 has one (a MoE block and its nextn.*
    projections and norms; the embeddings and head shared with the trunk). n_layer: fewer blocks
    of the same shape, for runs that allocate for real (each block is alike after the first).
    """
    n_vocab, n_embd, n_head = 102400, 2048, 16
    kv_lora, rope, nope, v_head = 512, 64, 128, 128
    n_ff, n_ff_exp, n_expert, n_shared = 10944, 1408, 64, 2
    more_bits = q4_k_m(n_layer)
    t: list[Tensor] = []
    _io(t, n_embd, n_vocab)
    for i in range(n_layer + nextn):
        b = f"blk.{i}"
        if i >= n_layer:
            _t(t, f"{b}.nextn.eh_proj.weight", (2 * n_embd, n_embd), Q.Q8_0)
            _t(t, f"{b}.nextn.enorm.weight", (n_embd,), Q.F32)
            _t(t, f"{b}.nextn.hnorm.weight", (n_embd,), Q.F32)
            _t(t, f"{b}.nextn.shared_head_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_kv_a_norm.weight", (kv_lora,), Q.F32)
        _t(t, f"{b}.attn_q.weight", (n_embd, n_head * (nope + rope)), Q.Q4_K)
        _t(t, f"{b}.attn_kv_a_mqa.weight", (n_embd, kv_lora + rope), Q.Q4_K)
        _t(t, f"{b}.attn_k_b.weight", (nope, kv_lora, n_head), Q.Q8_0)
        _t(t, f"{b}.attn_v_b.weight", (kv_lora, v_head, n_head), Q.Q4_K)
        _t(t, f"{b}.attn_output.weight", (n_head * v_head, n_embd), Q.Q4_K)
        _t(t, f"{b}.ffn_norm.weight", (n_embd,), Q.F32)
        if i == 0:
            _t(t, f"{b}.ffn_gate.weight", (n_embd, n_ff), Q.Q4_K)
            _t(t, f"{b}.ffn_up.weight", (n_embd, n_ff), Q.Q4_K)
            _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.Q6_K)
        else:
            _t(t, f"{b}.ffn_gate_inp.weight", (n_embd, n_expert), Q.F32)
            _t(t, f"{b}.ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert), Q.Q4_K)
            _t(t, f"{b}.ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert), Q.Q4_K)
            _t(t, f"{b}.ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), Q.Q6_K if more_bits(i) else Q.Q4_K)
            _t(t, f"{b}.ffn_gate_shexp.weight", (n_embd, n_ff_exp * n_shared), Q.Q4_K)
            _t(t, f"{b}.ffn_up_shexp.weight", (n_embd, n_ff_exp * n_shared), Q.Q4_K)
            _t(t, f"{b}.ffn_down_shexp.weight", (n_ff_exp * n_shared, n_embd), Q.Q6_K)
    md: Metadata = {
        "deepseek2.context_length": 163840,
        "deepseek2.embedding_length": n_embd,
        "deepseek2.block_count": n_layer + nextn,
        "deepseek2.feed_forward_length": n_ff,
        "deepseek2.attention.head_count": n_head,
        "deepseek2.attention.head_count_kv": 1,
        # the MLA layout convert_hf_to_gguf.py writes: the cache holds the latent (576 = 512 + 64)
        "deepseek2.attention.key_length": kv_lora + rope,
        "deepseek2.attention.value_length": kv_lora,
        "deepseek2.attention.key_length_mla": nope + rope,
        "deepseek2.attention.value_length_mla": v_head,
        "deepseek2.attention.kv_lora_rank": kv_lora,
        "deepseek2.rope.dimension_count": rope,
        "deepseek2.attention.layer_norm_rms_epsilon": 1e-6,
        "deepseek2.leading_dense_block_count": 1,
        "deepseek2.expert_count": n_expert,
        "deepseek2.expert_used_count": 6,
        "deepseek2.expert_shared_count": n_shared,
        "deepseek2.expert_feed_forward_length": n_ff_exp,
        "deepseek2.expert_weights_scale": 1.0,
        "deepseek2.vocab_size": n_vocab,
    }
    if nextn:
        md["deepseek2.nextn_predict_layers"] = nextn
    if n_layer not in (26, 27):
        # llama.cpp knows the Lite layout by its block count (src/models/deepseek2.cpp is_lite); a
        # rank of 0 says the same for other counts: queries through attn_q, no q LoRA
        md["deepseek2.attention.q_lora_rank"] = 0
    return Shape(name, "deepseek2", n_vocab, md, t)


def mamba(name: str, *, n_vocab: int, n_embd: int, n_layer: int, d_state: int, d_conv: int, dt_rank: int, kind: Q = Q.Q8_0) -> Shape:
    d_inner = 2 * n_embd
    t: list[Tensor] = []
    _io(t, n_embd, n_vocab, tied=True, embd=kind)
    for i in range(n_layer):
        b = f"blk.{i}"
        _t(t, f"{b}.attn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.ssm_in.weight", (n_embd, 2 * d_inner), kind)
        _t(t, f"{b}.ssm_conv1d.weight", (d_conv, d_inner), Q.F32)
        _t(t, f"{b}.ssm_conv1d.bias", (d_inner,), Q.F32)
        _t(t, f"{b}.ssm_x.weight", (d_inner, dt_rank + 2 * d_state), kind)
        _t(t, f"{b}.ssm_dt.weight", (dt_rank, d_inner), kind)
        _t(t, f"{b}.ssm_dt.bias", (d_inner,), Q.F32)
        t.append((f"{b}.ssm_a", (d_state, d_inner), Q.F32))
        _t(t, f"{b}.ssm_d", (d_inner,), Q.F32)
        _t(t, f"{b}.ssm_out.weight", (d_inner, n_embd), kind)
    md: Metadata = {
        "mamba.context_length": 1048576,
        "mamba.embedding_length": n_embd,
        "mamba.block_count": n_layer,
        "mamba.feed_forward_length": 0,
        "mamba.attention.head_count": 0,
        "mamba.ssm.conv_kernel": d_conv,
        "mamba.ssm.inner_size": d_inner,
        "mamba.ssm.state_size": d_state,
        "mamba.ssm.time_step_rank": dt_rank,
        "mamba.attention.layer_norm_rms_epsilon": 1e-5,
    }
    return Shape(name, "mamba", n_vocab, md, t)


def bert(name: str, arch: str, *, n_vocab: int, n_embd: int, n_layer: int, n_head: int, n_ff: int, n_ctx_train: int, pooling: int) -> Shape:
    """bert (separate q/k/v, position embeddings) and nomic-bert (fused qkv, SwiGLU, rotary)."""
    t: list[Tensor] = []
    _t(t, "token_embd.weight", (n_embd, n_vocab), Q.F16)
    _t(t, "token_types.weight", (n_embd, 2), Q.F32)
    if arch == "bert":
        _t(t, "position_embd.weight", (n_embd, n_ctx_train), Q.F16)
    _t(t, "token_embd_norm.weight", (n_embd,), Q.F32)
    _t(t, "token_embd_norm.bias", (n_embd,), Q.F32)
    for i in range(n_layer):
        b = f"blk.{i}"
        if arch == "bert":
            for part in ("q", "k", "v"):
                _t(t, f"{b}.attn_{part}.weight", (n_embd, n_embd), Q.F16)
                _t(t, f"{b}.attn_{part}.bias", (n_embd,), Q.F32)
        else:
            _t(t, f"{b}.attn_qkv.weight", (n_embd, 3 * n_embd), Q.F16)
        _t(t, f"{b}.attn_output.weight", (n_embd, n_embd), Q.F16)
        _t(t, f"{b}.attn_output.bias", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_output_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_output_norm.bias", (n_embd,), Q.F32)
        _t(t, f"{b}.ffn_up.weight", (n_embd, n_ff), Q.F16)
        if arch == "bert":
            _t(t, f"{b}.ffn_up.bias", (n_ff,), Q.F32)
        else:
            _t(t, f"{b}.ffn_gate.weight", (n_embd, n_ff), Q.F16)
        _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.F16)
        if arch == "bert":
            _t(t, f"{b}.ffn_down.bias", (n_embd,), Q.F32)
        _t(t, f"{b}.layer_output_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.layer_output_norm.bias", (n_embd,), Q.F32)
    md: Metadata = {
        f"{arch}.context_length": n_ctx_train,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.layer_norm_epsilon": 1e-12,
        f"{arch}.attention.causal": False,
        f"{arch}.pooling_type": pooling,
        "tokenizer.ggml.token_type_count": 2,
    }
    if arch == "nomic-bert":
        md["nomic-bert.rope.freq_base"] = 1000.0
    return Shape(name, arch, n_vocab, md, t, embedding=True)


def lfm2(name: str, *, n_vocab: int, n_embd: int, n_ff: int, n_head: int, kv_heads: list[int], l_cache: int, n_ctx_train: int) -> Shape:
    """LFM2: short-convolution layers (head_count_kv 0) between attention layers."""
    head_dim = n_embd // n_head
    n_layer = len(kv_heads)
    t: list[Tensor] = []
    _t(t, "token_embd.weight", (n_embd, n_vocab), Q.Q6_K)
    _t(t, "token_embd_norm.weight", (n_embd,), Q.F32)  # LFM2's output norm, under this name
    for i, kv in enumerate(kv_heads):
        b = f"blk.{i}"
        _t(t, f"{b}.ffn_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.ffn_gate.weight", (n_embd, n_ff), Q.Q4_K)
        _t(t, f"{b}.ffn_up.weight", (n_embd, n_ff), Q.Q4_K)
        _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.Q6_K)
        _t(t, f"{b}.attn_norm.weight", (n_embd,), Q.F32)
        if kv:
            _t(t, f"{b}.attn_q_norm.weight", (head_dim,), Q.F32)
            _t(t, f"{b}.attn_k_norm.weight", (head_dim,), Q.F32)
            _t(t, f"{b}.attn_q.weight", (n_embd, n_embd), Q.Q4_K)
            _t(t, f"{b}.attn_k.weight", (n_embd, kv * head_dim), Q.Q4_K)
            _t(t, f"{b}.attn_v.weight", (n_embd, kv * head_dim), Q.Q6_K)
            _t(t, f"{b}.attn_output.weight", (n_embd, n_embd), Q.Q4_K)
        else:
            _t(t, f"{b}.shortconv.conv.weight", (l_cache, n_embd), Q.F32)
            _t(t, f"{b}.shortconv.in_proj.weight", (n_embd, 3 * n_embd), Q.Q4_K)
            _t(t, f"{b}.shortconv.out_proj.weight", (n_embd, n_embd), Q.Q4_K)
    md: Metadata = {
        "lfm2.context_length": n_ctx_train,
        "lfm2.embedding_length": n_embd,
        "lfm2.block_count": n_layer,
        "lfm2.feed_forward_length": n_ff,
        "lfm2.attention.head_count": n_head,
        "lfm2.attention.head_count_kv": kv_heads,
        "lfm2.attention.layer_norm_rms_epsilon": 1e-5,
        "lfm2.shortconv.l_cache": l_cache,
        "lfm2.vocab_size": n_vocab,
    }
    return Shape(name, "lfm2", n_vocab, md, t)


# Real models' dimensions (their config.json), at llama.cpp's Q4_K_M mix unless noted.
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        llama_like("llama-3.1-8b", "llama", n_vocab=128256, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8,
                   n_ff=14336, n_ctx_train=131072, rope_freqs=True),
        llama_like("llama-3.2-1b", "llama", n_vocab=128256, n_embd=2048, n_layer=16, n_head=32, n_head_kv=8,
                   n_ff=8192, n_ctx_train=131072, tied=True, rope_freqs=True),
        # an untied head stored before blk.0: with mmap the host maps it too on a partial offload
        llama_like("tinyllama-1.1b", "llama", n_vocab=32000, n_embd=2048, n_layer=22, n_head=32, n_head_kv=4,
                   n_ff=5632, n_ctx_train=2048),
        llama_like("mistral-7b-v0.3", "llama", n_vocab=32768, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8,
                   n_ff=14336, n_ctx_train=32768),
        llama_like("qwen2.5-7b", "qwen2", n_vocab=152064, n_embd=3584, n_layer=28, n_head=28, n_head_kv=4,
                   n_ff=18944, n_ctx_train=32768, qkv_bias=True),
        llama_like("qwen2.5-0.5b", "qwen2", n_vocab=151936, n_embd=896, n_layer=24, n_head=14, n_head_kv=2,
                   n_ff=4864, n_ctx_train=32768, qkv_bias=True, tied=True),
        llama_like("qwen3-8b", "qwen3", n_vocab=151936, n_embd=4096, n_layer=36, n_head=32, n_head_kv=8,
                   n_ff=12288, n_ctx_train=40960, head_dim=128, qk_norm=True),
        phi3("phi-3-mini-4k", n_vocab=32064, n_embd=3072, n_layer=32, n_head=32, n_head_kv=32, n_ff=8192,
             n_ctx_train=4096, n_swa=2047),
        gemma("gemma-2-9b", "gemma2", n_vocab=256000, n_embd=3584, n_layer=42, n_head=16, n_head_kv=8, head_dim=256,
              n_ff=14336, n_ctx_train=8192, n_swa=4096),
        gemma("gemma-3-4b", "gemma3", n_vocab=262144, n_embd=2560, n_layer=34, n_head=8, n_head_kv=4, head_dim=256,
              n_ff=10240, n_ctx_train=131072, n_swa=1024),
        llama_like("mixtral-8x7b", "llama", n_vocab=32000, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8,
                   n_ff=14336, n_ctx_train=32768, n_expert=8, n_expert_used=2),
        llama_like("qwen3-30b-a3b", "qwen3moe", n_vocab=151936, n_embd=2048, n_layer=48, n_head=32, n_head_kv=4,
                   n_ff=6144, n_ctx_train=40960, head_dim=128, qk_norm=True, n_expert=128, n_expert_used=8,
                   n_ff_exp=768),
        deepseek2_lite("deepseek-v2-lite"),
        deepseek2_lite("deepseek-v2-lite-mtp", nextn=1),
        # the same blocks, fewer of them: full offloads over RPC devices allocate for real, so these
        # keep the per-layer shapes (which size the compute buffers) at a few GB
        llama_like("mixtral-8x7b-5l", "llama", n_vocab=32000, n_embd=4096, n_layer=5, n_head=32, n_head_kv=8,
                   n_ff=14336, n_ctx_train=32768, n_expert=8, n_expert_used=2),
        llama_like("qwen3-30b-a3b-8l", "qwen3moe", n_vocab=151936, n_embd=2048, n_layer=8, n_head=32, n_head_kv=4,
                   n_ff=6144, n_ctx_train=40960, head_dim=128, qk_norm=True, n_expert=128, n_expert_used=8,
                   n_ff_exp=768),
        deepseek2_lite("deepseek-v2-lite-8l", n_layer=8),
        mamba("mamba-2.8b", n_vocab=50280, n_embd=2560, n_layer=64, d_state=16, d_conv=4, dt_rank=160),
        lfm2("lfm2-1.2b", n_vocab=65536, n_embd=2048, n_ff=8192, n_head=32,
             kv_heads=[0, 0, 8, 0, 0, 8, 0, 0, 8, 0, 8, 0, 8, 0, 8, 0], l_cache=3, n_ctx_train=128000),
        bert("bge-base-en-v1.5", "bert", n_vocab=30522, n_embd=768, n_layer=12, n_head=12, n_ff=3072,
             n_ctx_train=512, pooling=2),
        bert("nomic-embed-text-v1.5", "nomic-bert", n_vocab=30522, n_embd=768, n_layer=12, n_head=12, n_ff=3072,
             n_ctx_train=2048, pooling=1),
    ]
}  # fmt: skip
