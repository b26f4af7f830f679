"""What the estimator knows about each llama.cpp architecture, read from GGUF metadata alone.

Rules kept here:
- one table per behaviour (no KV cache, recurrent, hybrid, sliding-window period), each naming
  the llama.cpp build 11434 source it mirrors; everything about a layer's memory kind is decided
  in `hyperparameters()`, nowhere else;
- an architecture outside KNOWN_ARCHITECTURES is never refused: it is modelled as a plain
  transformer with every layer holding a full KV cache (and a recurrent state too when the file
  has ssm.* keys), which over-counts rather than under-counts, and the profile says so;
- a key read here that has the wrong type or an impossible value is a `ModelFileError` naming the
  file and the key, as llama.cpp refuses it (src/llama-model-loader.cpp: "key ... has wrong
  type", "wrong array length"), never a default taken in silence and never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from llama_smart_proxy.schemas.header import MetadataValue, ModelHeader
from llama_smart_proxy.supervisor.errors import ModelFileError

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS in src/llama-hparams.h: per-layer arrays hold no more
UINT32_MAX = 2**32 - 1  # llama.cpp keeps these hyperparameters in uint32_t
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.")

# src/llama-model.cpp `create_memory`: these get no memory module at all (res = nullptr).
NO_KV_ARCHITECTURES = frozenset(
    {
        "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
        "eurobert", "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada",
        "llada-moe", "rnd1", "clef",
    }
)  # fmt: skip

# src/models/<arch>.cpp `load_arch_tensors`: no output head, or one that is never a duplicate of
# token_embd (encoders; the embeddings stay on the host alone).
NO_TIED_HEAD_ARCHITECTURES = frozenset(
    {
        "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
        "eurobert", "modern-bert", "clef", "llada-moe", "wavtokenizer-dec",
    }
)  # fmt: skip

# src/models/<arch>.cpp `load_arch_tensors`: NextN/MTP blocks (the last nextn_predict_layers
# blocks) that llama.cpp does not load (TENSOR_SKIP): never, or unless MTP speculative decoding is
# asked for (--spec-type draft-mtp sets load_mtp). Other architectures load them: they count.
MTP_NEVER_LOADED_ARCHITECTURES = frozenset({"glm4", "bailingmoe2", "exaone-moe", "exaone4", "dots3note"})
MTP_ON_REQUEST_ARCHITECTURES = frozenset(
    {
        "deepseek2", "deepseek32", "deepseek4", "glm4moe", "glm-dsa", "glm5-next", "qwen35",
        "qwen35moe", "qwen3next", "qwen4exp", "bailingmoe3", "cohere2moe", "hy_v3", "mimo2",
        "nemotron_h", "step35",
    }
)  # fmt: skip

# src/llama-arch.cpp `llm_arch_is_recurrent`: every layer keeps a fixed state, no KV cache.
RECURRENT_ARCHITECTURES = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})

# src/models/<arch>.cpp `load_arch_hparams`: how hybrids mark their recurrent layers.
# "kv0": a layer is recurrent iff its head_count_kv is 0 (jamba, granite-hybrid, lfm2);
# "all": every layer has both an attention KV cache and a recurrent state (falcon-h1).
HYBRID_ARCHITECTURES = {"jamba": "kv0", "granitehybrid": "kv0", "lfm2": "kv0", "falcon-h1": "all"}

# src/models/<arch>.cpp: `load_swa_pattern(ml, period, dense_first)`; the GGUF key
# {arch}.attention.sliding_window_pattern (a period, or one bool per layer) overrides the period.
# An architecture with a window but not listed here is charged full-context KV on every layer.
SWA_PERIODS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "exaone4": (4, False),
    "exaone-moe": (4, False),
    "olmo2": (4, False),
    "openai-moe": (2, False),
    "smallthinker": (4, True),
    "plamo3": (8, False),
    "afmoe": (4, False),
    "mellum": (4, False),
}
# gemma2 reads its window with a default of 4096 when the key is absent (src/models/gemma2.cpp).
SWA_DEFAULT_WINDOW = {"gemma2": 4096}

# src/models/<arch>.cpp: ALiBi position biases (f_max_alibi_bias > 0): always for these; mpt and
# jais when {arch}.attention.max_alibi_bias says so; baichuan for its 13B shape (40 layers).
ALIBI_ARCHITECTURES = frozenset({"bloom", "jina-bert-v2", "refact"})

# Architectures whose tensors, caches and compute graph the estimator has been checked against
# (benchmarks/accuracy measures them); others get the conservative treatment above.
KNOWN_ARCHITECTURES = frozenset(
    {
        "llama", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma2", "gemma3", "deepseek2", "mamba",
        "lfm2", "bert", "nomic-bert",
    }
)  # fmt: skip


def is_known_architecture(architecture: str) -> bool:
    return architecture in KNOWN_ARCHITECTURES


@dataclass(frozen=True)
class Hyperparameters:
    """The numbers llama.cpp derives from the header (src/llama-model.cpp `load_hparams`)."""

    architecture: str
    known: bool
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: list[int]
    n_head_kv: list[int]
    head_k: int  # n_embd_head_k of full-attention layers
    head_v: int
    head_k_swa: int
    head_v_swa: int
    n_ff: list[int]
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_swa: int
    is_swa: list[bool]
    is_recurrent: list[bool]
    has_attention: list[bool]  # the layer has a KV cache
    is_mla: bool
    n_embd_r: int  # recurrent conv/shift state width per layer (f32)
    n_embd_s: int  # recurrent ssm/wkv state width per layer (f32)
    causal: bool
    embedding_model: bool  # no KV cache; llama-server runs it with --embedding
    n_layer_nextn: int
    is_moe: list[bool]  # the layer routes through experts (it has ffn_gate_inp)
    n_expert_shared: int
    ffn_gated: bool  # SwiGLU-style feed-forward (gate and up); BERT's is plain
    attn_softcap: bool  # gemma2's logit soft-capping (an extra KQ-sized pass without FA)
    ssm_d_inner: int
    key_length_mla: int  # per-head q/k width before absorption (MLA), else 0
    post_norms: bool  # gemma-style norms after attention and feed-forward (more live tensors)
    alibi: bool = False  # ALiBi position biases instead of RoPE

    def n_embd_k_gqa(self, il: int) -> int:
        return (self.head_k_swa if self.is_swa[il] else self.head_k) * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return (self.head_v_swa if self.is_swa[il] else self.head_v) * self.n_head_kv[il]


class HeaderFieldError(Exception):
    """A metadata value the estimator cannot use; `hyperparameters` names the file."""


def describe_value(value: object) -> str:
    """A metadata value's kind and, when short, the value itself, for an error message."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), "an array")
    shown = repr(value)
    return f"{kind} {shown}" if len(shown) <= 40 else kind


def _count(key: str, value: object) -> int:
    """A non-negative integer that fits llama.cpp's uint32_t."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise HeaderFieldError(f"{key} is {describe_value(value)}, expected an integer")
    if not 0 <= value <= UINT32_MAX:
        raise HeaderFieldError(f"{key} is {value}, expected an integer from 0 to {UINT32_MAX}")
    return value


def _int(md: Mapping[str, MetadataValue], key: str, default: int = 0) -> int:
    value = md.get(key)
    if value is None:
        return default
    if isinstance(value, list):
        values = [_count(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return max(values) if values else default
    return _count(key, value)


def _per_layer(md: Mapping[str, MetadataValue], key: str, n_layer: int, default: list[int]) -> list[int]:
    """A scalar or per-layer array key, as llama.cpp's get_key_or_arr reads it."""
    value = md.get(key)
    if value is None:
        return list(default)
    if isinstance(value, list):
        if len(value) != n_layer:
            raise HeaderFieldError(f"{key} has {len(value)} values, expected one per layer ({n_layer})")
        return [_count(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return [_count(key, value)] * n_layer


class _Fields(Mapping[str, MetadataValue]):
    """A header's metadata as the estimator reads it. An array of strings is kept as its length
    only (reader.py), so reading one where a number or a flag belongs is the wrong type too."""

    def __init__(self, header: ModelHeader) -> None:
        self._metadata = header.metadata
        self._lengths = header.array_lengths

    def __getitem__(self, key: str) -> MetadataValue:
        if key not in self._metadata and key in self._lengths:
            raise HeaderFieldError(f"{key} is an array of strings, expected a number")
        return self._metadata[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._metadata)

    def __len__(self) -> int:
        return len(self._metadata)


def header_int(header: ModelHeader, key: str, default: int = 0) -> int:
    """One integer key of a header; a ModelFileError naming the file and the key if it is not one."""
    try:
        return _int(_Fields(header), key, default)
    except HeaderFieldError as exc:
        raise ModelFileError(header.path, str(exc)) from None


def _flag(md: Mapping[str, MetadataValue], key: str, default: bool) -> bool:
    value = md.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HeaderFieldError(f"{key} is {describe_value(value)}, expected a boolean")
    return value


def _number(md: Mapping[str, MetadataValue], key: str) -> float:
    value = md.get(key, 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise HeaderFieldError(f"{key} is {describe_value(value)}, expected a number")
    return value


def _swa_layers(arch: str, md: Mapping[str, MetadataValue], n_layer: int) -> tuple[int, list[bool]]:
    """(window, is_swa per layer) as src/llama-hparams.cpp set_swa_pattern computes it."""
    window = _int(md, f"{arch}.attention.sliding_window", SWA_DEFAULT_WINDOW.get(arch, 0))
    if arch == "lfm2":
        return window, [False] * n_layer  # marked per layer from head counts, below
    if window <= 0 or arch not in SWA_PERIODS:
        # phi3 ignores its window (PR #13676); unlisted architectures: full cache, over-counting
        return 0, [False] * n_layer
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = md.get(key)
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise HeaderFieldError(f"{key} has {len(pattern)} values, expected one per layer ({n_layer})")
        return window, [v if isinstance(v, bool) else bool(_count(f"{key}[{i}]", v)) for i, v in enumerate(pattern)]
    period, dense_first = SWA_PERIODS[arch]
    if pattern is not None:
        period = _count(key, pattern)
    if dense_first:
        return window, [period == 0 or il % period != 0 for il in range(n_layer)]
    return window, [period == 0 or il % period < period - 1 for il in range(n_layer)]


def hyperparameters(header: ModelHeader) -> Hyperparameters:
    """The header's hyperparameters; a ModelFileError naming the file and the key when one is
    of the wrong type or impossible."""
    try:
        return _read_hyperparameters(header)
    except HeaderFieldError as exc:
        raise ModelFileError(header.path, str(exc)) from None


def _read_hyperparameters(header: ModelHeader) -> Hyperparameters:
    arch = header.architecture
    md = _Fields(header)
    known = is_known_architecture(arch)
    n_layer_all = _int(md, f"{arch}.block_count")
    if n_layer_all > MAX_LAYERS:
        raise HeaderFieldError(f"{arch}.block_count is {n_layer_all}, more than llama.cpp's {MAX_LAYERS} layers")
    if n_layer_all <= 0:
        blocks = (_BLOCK_NAME.match(t.name) for t in header.tensors)
        n_layer_all = 1 + max((int(m.group(1)) for m in blocks if m), default=-1)
        if n_layer_all > MAX_LAYERS:
            raise HeaderFieldError(f"tensor blk.{n_layer_all - 1}.* is past llama.cpp's {MAX_LAYERS} layers")
    n_embd = _int(md, f"{arch}.embedding_length")
    vocab_size = _int(md, f"{arch}.vocab_size")  # read even when unused: llama.cpp checks its type
    n_vocab = header.array_lengths.get("tokenizer.ggml.tokens") or vocab_size
    if not n_vocab:
        output = next((t for t in header.tensors if t.name in ("output.weight", "token_embd.weight")), None)
        n_vocab = output.shape[1] if output is not None and len(output.shape) > 1 else 0
    n_head = _per_layer(md, f"{arch}.attention.head_count", n_layer_all, [0] * n_layer_all)
    n_head_kv = _per_layer(md, f"{arch}.attention.head_count_kv", n_layer_all, n_head)
    first_head = n_head[0] if n_head else 0
    head_k = _int(md, f"{arch}.attention.key_length", n_embd // first_head if first_head else 0)
    head_v = _int(md, f"{arch}.attention.value_length", n_embd // first_head if first_head else 0)
    if first_head == 0:
        head_k = head_v = 0
    head_k_swa = _int(md, f"{arch}.attention.key_length_swa", head_k)
    head_v_swa = _int(md, f"{arch}.attention.value_length_swa", head_v)
    n_ff = _per_layer(md, f"{arch}.feed_forward_length", n_layer_all, [0] * n_layer_all)
    n_expert = _int(md, f"{arch}.expert_count")
    n_expert_used = _int(md, f"{arch}.expert_used_count")
    n_ff_exp = _int(md, f"{arch}.expert_feed_forward_length")
    n_swa, is_swa = _swa_layers(arch, md, n_layer_all)
    nextn = _int(md, f"{arch}.nextn_predict_layers")

    # recurrent state widths (src/llama-hparams.cpp n_embd_r / n_embd_s)
    d_conv = _int(md, f"{arch}.ssm.conv_kernel")
    d_inner = _int(md, f"{arch}.ssm.inner_size")
    d_state = _int(md, f"{arch}.ssm.state_size")
    n_group = _int(md, f"{arch}.ssm.group_count")
    wkv_head = _int(md, f"{arch}.wkv.head_size")
    l_cache = _int(md, f"{arch}.shortconv.l_cache")
    if wkv_head:
        n_embd_r = _int(md, f"{arch}.token_shift_count", 2) * n_embd
        n_embd_s = n_embd * wkv_head
    elif l_cache:
        n_embd_r, n_embd_s = n_embd * (l_cache - 1), 0
    else:
        n_embd_r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
        n_embd_s = d_state * d_inner
    has_ssm_keys = any(key.startswith(f"{arch}.ssm.") for key in md)

    if arch in RECURRENT_ARCHITECTURES:
        is_recurrent = [True] * n_layer_all
        has_attention = [False] * n_layer_all
    elif arch in HYBRID_ARCHITECTURES:
        rule = HYBRID_ARCHITECTURES[arch]
        is_recurrent = [True] * n_layer_all if rule == "all" else [kv == 0 for kv in n_head_kv]
        has_attention = [True] * n_layer_all if rule == "all" else [kv != 0 for kv in n_head_kv]
        if arch == "lfm2" and n_swa > 0:
            is_swa = [not r for r in is_recurrent]
    elif arch in NO_KV_ARCHITECTURES:
        is_recurrent = [False] * n_layer_all
        has_attention = [False] * n_layer_all
    elif not known and has_ssm_keys:
        # an unknown hybrid: charge both a KV cache and a recurrent state on every layer
        is_recurrent = [True] * n_layer_all
        has_attention = [True] * n_layer_all
    else:
        is_recurrent = [False] * n_layer_all
        has_attention = [kv > 0 for kv in n_head_kv]
    if nextn and known:
        # the main context's cache skips the NextN (MTP) blocks (src/llama-model.cpp create_memory)
        for il in range(n_layer_all - nextn, n_layer_all):
            has_attention[il] = False

    names = {t.name for t in header.tensors}
    is_moe = [f"blk.{il}.ffn_gate_inp.weight" in names for il in range(n_layer_all)]
    expert_up = next((t for t in header.tensors if t.name.endswith(".ffn_up_exps.weight")), None)
    if expert_up is not None and len(expert_up.shape) >= 2:
        n_ff_exp = expert_up.shape[1]  # the tensors say it, whatever key the architecture uses
    causal = _flag(md, f"{arch}.attention.causal", arch not in NO_KV_ARCHITECTURES)
    pooling = _int(md, f"{arch}.pooling_type")
    return Hyperparameters(
        architecture=arch,
        known=known,
        n_layer=n_layer_all,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=_int(md, f"{arch}.context_length"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_k=head_k,
        head_v=head_v,
        head_k_swa=head_k_swa,
        head_v_swa=head_v_swa,
        n_ff=n_ff,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        n_swa=n_swa,
        is_swa=is_swa,
        is_recurrent=is_recurrent,
        has_attention=has_attention,
        is_mla=f"{arch}.attention.key_length_mla" in md and f"{arch}.attention.value_length_mla" in md,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        causal=causal,
        embedding_model=arch in NO_KV_ARCHITECTURES or (pooling not in (0, -1) and not causal),
        n_layer_nextn=nextn,
        is_moe=is_moe,
        n_expert_shared=_int(md, f"{arch}.expert_shared_count"),
        ffn_gated=arch != "bert",
        attn_softcap=arch == "gemma2" or bool(_number(md, f"{arch}.attn_logit_softcapping")),
        ssm_d_inner=d_inner,
        key_length_mla=_int(md, f"{arch}.attention.key_length_mla"),
        post_norms="blk.0.post_ffw_norm.weight" in names,
        alibi=arch in ALIBI_ARCHITECTURES
        or (arch == "baichuan" and n_layer_all == 40)
        or _number(md, f"{arch}.attention.max_alibi_bias") > 0,
    )
