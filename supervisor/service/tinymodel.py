"""Tiny GGUF models made by code: the built-in demo's models and the tests' fixtures.

- A llama-architecture chat model: random weights and a byte-level vocabulary (every byte is a
  token), so the real llama-server loads it and answers a chat completion in milliseconds on the
  CPU. Its answers are noise, and never end before max_tokens.
- A BERT embedding model (mean pooling, a WordPiece vocabulary of single characters), which
  llama-server serves with `--embeddings`: its vectors are noise of the right shape.

They exist to exercise everything around a model without downloading one.
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class TinyShape:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048


# ChatML, which llama-server also uses when a model has no template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL = [("<unk>", gguf.TokenType.UNKNOWN), ("<s>", gguf.TokenType.CONTROL), ("</s>", gguf.TokenType.CONTROL)]


@dataclass(frozen=True)
class TinyBertShape:
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_ff: int = 64
    n_ctx_train: int = 512


def _random_weights(rng: np.random.Generator) -> Callable[..., np.ndarray]:
    """Small random float32 weights of the given shape (numpy order: rows first)."""
    return lambda *dims: (rng.standard_normal(dims) * 0.02).astype(np.float32)


def write_tiny_model(path: Path | str, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write the tiny chat model to `path` (atomically) and return the path."""
    return _write_atomically(Path(path), lambda temporary: _write(temporary, shape, seed))


def write_tiny_embedding_model(path: Path | str, shape: TinyBertShape = TinyBertShape(), seed: int = 0) -> Path:
    """Write the tiny BERT embedding model to `path` (atomically) and return the path."""
    return _write_atomically(Path(path), lambda temporary: _write_bert(temporary, shape, seed))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # the writer logs every file it writes at INFO; that is noise in `serve --demo`'s output
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.WARNING)
    try:
        write(temporary)
    finally:
        gguf_log.setLevel(level)
    temporary.replace(path)
    return path


def _write(temporary: Path, shape: TinyShape, seed: int) -> None:
    tokens = [t for t, _ in _SPECIAL] + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(k) for _, k in _SPECIAL] + [int(gguf.TokenType.BYTE)] * 256
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    rng = np.random.default_rng(seed)
    weights = _random_weights(rng)

    writer = gguf.GGUFWriter(str(temporary), "llama")
    writer.add_name("llama-smart-proxy tiny test model")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", weights(n_vocab, shape.n_embd))
    writer.add_tensor("output_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
    # Large byte logits and zero ones for <unk>, <s>, </s>: sampling never picks </s>, so a reply
    # always runs to max_tokens and tests can count on its length.
    output = (rng.standard_normal((n_vocab, shape.n_embd)) * 1.0).astype(np.float32)
    output[: len(_SPECIAL)] = 0.0
    writer.add_tensor("output.weight", output)
    kv_width = head_dim * shape.n_head_kv
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(kv_width, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(kv_width, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(shape.n_embd, shape.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# WordPiece, as llama.cpp reads it: a word's first piece carries the phantom space "▁", the
# pieces after it do not. Special tokens at BERT's usual ids would need a 30k vocabulary; these are
# set explicitly instead. (token, its role, its type)
_BERT_SPECIAL = [
    ("[PAD]", "pad", gguf.TokenType.CONTROL),
    ("[UNK]", "unk", gguf.TokenType.UNKNOWN),
    ("[CLS]", "bos", gguf.TokenType.CONTROL),  # llama.cpp starts a BERT input with its BOS: [CLS]
    ("[SEP]", "sep", gguf.TokenType.CONTROL),
    ("[MASK]", "mask", gguf.TokenType.CONTROL),
]
_BERT_CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def _write_bert(temporary: Path, shape: TinyBertShape, seed: int) -> None:
    pieces = [f"▁{c}" for c in _BERT_CHARACTERS] + list(_BERT_CHARACTERS)
    tokens = [t for t, _, _ in _BERT_SPECIAL] + pieces
    types = [int(k) for _, _, k in _BERT_SPECIAL] + [int(gguf.TokenType.NORMAL)] * len(pieces)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    weights = _random_weights(rng)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(temporary), "bert")
    writer.add_name("llama-smart-proxy tiny embedding model")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_token_type_count(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = {role: i for i, (_, role, _) in enumerate(_BERT_SPECIAL)}
    writer.add_pad_token_id(ids["pad"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_bos_token_id(ids["bos"])
    writer.add_sep_token_id(ids["sep"])
    writer.add_mask_token_id(ids["mask"])

    writer.add_tensor("token_embd.weight", weights(n_vocab, shape.n_embd))
    writer.add_tensor("token_types.weight", weights(2, shape.n_embd))
    writer.add_tensor("position_embd.weight", weights(shape.n_ctx_train, shape.n_embd))
    writer.add_tensor("token_embd_norm.weight", ones(shape.n_embd))
    writer.add_tensor("token_embd_norm.bias", zeros(shape.n_embd))
    for i in range(shape.n_layer):
        for part in ("q", "k", "v"):
            writer.add_tensor(f"blk.{i}.attn_{part}.weight", weights(shape.n_embd, shape.n_embd))
            writer.add_tensor(f"blk.{i}.attn_{part}.bias", zeros(shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.bias", zeros(shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output_norm.bias", zeros(shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.bias", zeros(shape.n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(shape.n_embd, shape.n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.bias", zeros(shape.n_embd))
        writer.add_tensor(f"blk.{i}.layer_output_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"blk.{i}.layer_output_norm.bias", zeros(shape.n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-smart-proxy"


def default_model_path() -> Path:
    """Where the built-in default keeps its tiny model: the user's cache directory."""
    # the name carries a version: a model written by an older release is not reused
    return _cache_dir() / "tiny-llama-v2.gguf"


def default_embedding_model_path() -> Path:
    """Where the built-in demo keeps its tiny embedding model."""
    return _cache_dir() / "tiny-bert-v1.gguf"


def ensure_default_model() -> Path:
    return _ensure(default_model_path(), write_tiny_model)


def ensure_default_embedding_model() -> Path:
    return _ensure(default_embedding_model_path(), write_tiny_embedding_model)


def _ensure(path: Path, write: Callable[[Path], Path]) -> Path:
    if not path.is_file():
        write(path)
    return path
