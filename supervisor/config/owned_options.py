"""The llama-server options the launch sets from the plan or from the config's own keys, which a
config's `args` and `env` may therefore not set; each with the key to use instead.

Rules kept here:
- every spelling in common/arg.cpp of llama.cpp build 11434 counts, negations included, and
  `--flag=value` and llama.cpp's `--ctx_size` spelling too;
- each option's LLAMA_ARG_* variable counts as well, and its LLAMA_ARG_NO_* form;
- every flag the launch emits (supervisor/children/launch.py FLAGS_USED) is one of these: a test
  keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OwnedOption:
    """A llama-server option the launch sets from the plan or the config's own keys."""

    flags: tuple[str, ...]
    """Every spelling in common/arg.cpp of build 11434, negations included."""
    env: str | None
    """Its LLAMA_ARG_* variable (llama.cpp also reads the LLAMA_ARG_NO_* form of a switch); None
    for an option llama.cpp reads from no variable."""
    instead: str
    """The config key(s) that say it."""


OWNED_OPTIONS: tuple[OwnedOption, ...] = (
    OwnedOption(("-m", "--model"), "LLAMA_ARG_MODEL", "file"),
    OwnedOption(("-mm", "--mmproj"), "LLAMA_ARG_MMPROJ", "mmproj"),
    OwnedOption(("--host",), "LLAMA_ARG_HOST", "proxy.listen (children listen on 127.0.0.1 only)"),
    OwnedOption(("--port",), "LLAMA_ARG_PORT", "llama_server.port_range"),
    OwnedOption(("-c", "--ctx-size"), "LLAMA_ARG_CTX_SIZE", "ctx"),
    OwnedOption(("-np", "--parallel"), "LLAMA_ARG_N_PARALLEL", "parallel"),
    OwnedOption(("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"), "LLAMA_ARG_KV_UNIFIED", "kv_unified"),
    OwnedOption(("-fa", "--flash-attn"), "LLAMA_ARG_FLASH_ATTN", "flash_attn"),
    OwnedOption(("-ctk", "--cache-type-k"), "LLAMA_ARG_CACHE_TYPE_K", "cache_type_k"),
    OwnedOption(("-ctv", "--cache-type-v"), "LLAMA_ARG_CACHE_TYPE_V", "cache_type_v"),
    OwnedOption(("-b", "--batch-size"), "LLAMA_ARG_BATCH", "batch"),
    OwnedOption(("-ub", "--ubatch-size"), "LLAMA_ARG_UBATCH", "ubatch"),
    OwnedOption(("-ngl", "--gpu-layers", "--n-gpu-layers"), "LLAMA_ARG_N_GPU_LAYERS",
                "gpus, allow_partial and allow_cpu (the plan decides the layers on GPUs)"),
    OwnedOption(("-ts", "--tensor-split"), "LLAMA_ARG_TENSOR_SPLIT", "gpus and allow_split (the plan decides the split)"),
    OwnedOption(("-sm", "--split-mode"), "LLAMA_ARG_SPLIT_MODE", "allow_split"),
    OwnedOption(("-mg", "--main-gpu"), "LLAMA_ARG_MAIN_GPU", "gpus"),
    OwnedOption(("-dev", "--device"), "LLAMA_ARG_DEVICE", "gpus"),
    OwnedOption(("-fit", "--fit"), "LLAMA_ARG_FIT", "gpus, allow_split and allow_partial (the plan replaces --fit, always off)"),
    OwnedOption(("-a", "--alias"), "LLAMA_ARG_ALIAS", "aliases (the proxy answers to them; the child to the model's name)"),
    OwnedOption(("--slot-save-path",), None,  # no LLAMA_ARG_* variable in build 11434
                "keep_cache and prompt_cache.dir (the proxy saves and restores the slots, and keeps the budget)"),
)  # fmt: skip

_OWNED_FLAGS = {flag: option for option in OWNED_OPTIONS for flag in option.flags}
_OWNED_ENV = {
    name: option
    for option in OWNED_OPTIONS
    if option.env is not None
    for name in (option.env, option.env.replace("LLAMA_ARG_", "LLAMA_ARG_NO_"))
}


def owned_option(arg: str) -> OwnedOption | None:
    """The option `arg` sets when it is one the launch owns (`--flag=value` and llama.cpp's
    `--ctx_size` spelling included), else None."""
    flag = arg.split("=", 1)[0]
    if flag.startswith("--"):
        flag = flag.replace("_", "-")  # common/arg.cpp reads --ctx_size as --ctx-size
    return _OWNED_FLAGS.get(flag)


def owned_variable(name: str) -> OwnedOption | None:
    """The option a LLAMA_ARG_* variable sets when it is one the launch owns, else None."""
    return _OWNED_ENV.get(name)
