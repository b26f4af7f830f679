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

from schemas.header import ModelHeader, TensorInfo

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
    writer.add_name(f"synthetic {arch}")
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
        tensors = [
            TensorInfo(name=name, type=kind.name, shape=list(ne), n_bytes=tensor_bytes(ne, kind))
            for name, ne, kind in self.tensors
        ]
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
