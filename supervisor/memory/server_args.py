"""A llama-server command line read as llama-server reads it: `estimate -- <llama-server args>`.

Pure: argv and environment in, a `ServerCommand` out; no file is opened here.

Rules kept here:
- every flag that changes memory is in `FLAGS`, with its names, its environment variable and the
  default llama-server (build 11434) prints in `--help`; a test compares the table with the real
  binary's `--help`, so a renamed flag or a changed default is noticed;
- defaults are llama-server's own, not the proxy's config defaults: `-c 0` (the model's context),
  `-np` auto (4 slots sharing one unified KV cache, tools/server/server.cpp), `-fa auto`, every
  layer offloaded (`-ngl auto` before --fit), mmap (`-lm auto`);
- the command line wins over `LLAMA_ARG_*` variables, as in common/arg.cpp;
- other flags are skipped with their values (a value is a word that does not start with `-`, or a
  number); a flag that changes memory in a way the estimator does not model is named in `notes`;
- devices: `--device` names them (CUDAn, RPCn, none); without it, one device per `-ts` entry with
  the `--rpc` servers first (llama.cpp puts RPC devices at the front), else the RPC servers, else
  one CUDA GPU when layers are offloaded. RPC and CPU devices are not charged CUDA's overhead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from llama_smart_proxy.schemas.config import CacheType
from llama_smart_proxy.supervisor.errors import UserError
from llama_smart_proxy.supervisor.memory.flash_attention import DeviceKind

AUTO_PARALLEL = 4  # tools/server/server.cpp: "n_parallel is set to auto, using n_parallel = 4 and kv_unified = true"
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    env: str
    default: str | None  # as `llama-server --help` prints it; None: it prints none
    takes_value: bool = True
    negations: tuple[str, ...] = ()  # boolean pairs: the names that turn it off


FLAGS: tuple[Flag, ...] = (
    Flag(("-m", "--model"), "LLAMA_ARG_MODEL", None),
    Flag(("-mm", "--mmproj"), "LLAMA_ARG_MMPROJ", None),
    Flag(("-c", "--ctx-size"), "LLAMA_ARG_CTX_SIZE", "0"),
    Flag(("-np", "--parallel"), "LLAMA_ARG_N_PARALLEL", "-1"),
    Flag(("-kvu", "--kv-unified"), "LLAMA_ARG_KV_UNIFIED", "enabled if number of slots is auto",
         takes_value=False, negations=("-no-kvu", "--no-kv-unified")),  # fmt: skip
    Flag(("--kv-unified-per-slot",), "LLAMA_ARG_KV_UNIFIED_PER_SLOT", "unset"),
    Flag(("-ctk", "--cache-type-k"), "LLAMA_ARG_CACHE_TYPE_K", "f16"),
    Flag(("-ctv", "--cache-type-v"), "LLAMA_ARG_CACHE_TYPE_V", "f16"),
    Flag(("-fa", "--flash-attn"), "LLAMA_ARG_FLASH_ATTN", "'auto'"),
    Flag(("-b", "--batch-size"), "LLAMA_ARG_BATCH", "2048"),
    Flag(("-ub", "--ubatch-size"), "LLAMA_ARG_UBATCH", "512"),
    Flag(("-ngl", "--gpu-layers", "--n-gpu-layers"), "LLAMA_ARG_N_GPU_LAYERS", "auto"),
    Flag(("-ts", "--tensor-split"), "LLAMA_ARG_TENSOR_SPLIT", None),
    Flag(("-sm", "--split-mode"), "LLAMA_ARG_SPLIT_MODE", "layer"),
    Flag(("-mg", "--main-gpu"), "LLAMA_ARG_MAIN_GPU", "0"),
    Flag(("-dev", "--device"), "LLAMA_ARG_DEVICE", None),
    Flag(("--rpc",), "LLAMA_ARG_RPC", None),
    Flag(("-fit", "--fit"), "LLAMA_ARG_FIT", "'on'"),
    Flag(("-lm", "--load-mode"), "LLAMA_ARG_LOAD_MODE", "auto"),
    Flag(("--embedding", "--embeddings"), "LLAMA_ARG_EMBEDDINGS", "disabled", takes_value=False),
    Flag(("--spec-type",), "LLAMA_ARG_SPEC_TYPE", "none"),
    # read only to say that the estimate does not model them
    Flag(("--swa-full",), "LLAMA_ARG_SWA_FULL", "false", takes_value=False),
    Flag(("-kvo", "--kv-offload"), "LLAMA_ARG_KV_OFFLOAD", "enabled", takes_value=False,
         negations=("-nkvo", "--no-kv-offload")),  # fmt: skip
    Flag(("-ot", "--override-tensor"), "LLAMA_ARG_OVERRIDE_TENSOR", None),
    Flag(("-cmoe", "--cpu-moe"), "LLAMA_ARG_CPU_MOE", None, takes_value=False),
    Flag(("-ncmoe", "--n-cpu-moe"), "LLAMA_ARG_N_CPU_MOE", None),
)
_BY_NAME = {name: flag for flag in FLAGS for name in (*flag.names, *flag.negations)}
_UNMODELLED = {
    "--swa-full": "--swa-full (a full-size sliding-window cache) is not modelled: the window is charged",
    "-kvo": "--no-kv-offload (the KV cache on the host) is not modelled: the cache is charged to the devices",
    "-ot": "--override-tensor is not modelled: weights are charged where -ngl puts them",
    "-cmoe": "--cpu-moe is not modelled: expert weights are charged where -ngl puts them",
    "-ncmoe": "--n-cpu-moe is not modelled: expert weights are charged where -ngl puts them",
}


@dataclass(frozen=True)
class ServerCommand:
    """What one llama-server command line asks for, with llama-server's defaults filled in."""

    model: Path
    mmproj: Path | None
    ctx: int
    parallel: int
    kv_unified: bool
    cache_type_k: CacheType
    cache_type_v: CacheType
    flash_attn: str
    batch: int
    ubatch: int
    gpu_layers: int | None  # None: every layer (-ngl auto or all)
    tensor_split: tuple[float, ...]  # one proportion per device; empty: equal shares
    devices: tuple[DeviceKind, ...]  # offload devices in llama.cpp's order; empty: CPU only
    embedding: bool
    args: tuple[str, ...]  # the flags the memory profile reads again (-lm, --spec-type)
    notes: tuple[str, ...] = field(default=())


def parse_server_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerCommand:
    """Read a llama-server command line (the program name first is allowed); UserError names the flag."""
    words = list(argv)
    if words and not words[0].startswith("-") and Path(words[0]).name.startswith("llama-server"):
        words = words[1:]
    given: dict[str, str] = {}  # the first name of the flag -> its value ("1"/"0" for switches)
    from_env = []
    for flag in FLAGS:
        value = (env or {}).get(flag.env)
        if value is not None:
            given[flag.names[0]] = value
            from_env.append(flag.env)
    skipped: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, inline = word.partition("=")
        if not name.startswith("-"):
            raise UserError(f"estimate: unexpected word {word!r} in the llama-server command line (flags start with -)")
        flag = _BY_NAME.get(name)
        values: list[str] = [inline] if eq else []
        i += 1
        if flag is None or flag.takes_value:
            while i < len(words) and (flag is None or not values) and _is_value(words[i]):
                values.append(words[i])
                i += 1
        if flag is None:
            skipped.append(name)
            continue
        if flag.takes_value:
            if not values:
                raise UserError(f"estimate: {name} needs a value")
            given[flag.names[0]] = values[0]
        else:
            given[flag.names[0]] = "0" if name in flag.negations else "1"
    return _resolve(given, from_env, skipped)


def _is_value(word: str) -> bool:
    return not word.startswith("-") or bool(_NUMBER.match(word))


def _int(given: Mapping[str, str], name: str, default: int) -> int:
    text = given.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"estimate: {name} expects a whole number, got {text!r}") from None


def _switch(given: Mapping[str, str], name: str) -> bool | None:
    text = given.get(name)
    if text is None:
        return None
    return text.lower() not in ("0", "false", "off", "disabled", "no")


def _choice(given: Mapping[str, str], name: str, default: str, allowed: Sequence[str]) -> str:
    value = given.get(name, default)
    aliases = {"true": "on", "1": "on", "enabled": "on", "false": "off", "0": "off", "disabled": "off"}
    value = aliases.get(value.lower(), value.lower()) if "on" in allowed else value
    if value not in allowed:
        raise UserError(f"estimate: {name} expects one of {', '.join(allowed)}, got {given.get(name)!r}")
    return value


def _resolve(given: Mapping[str, str], from_env: list[str], skipped: list[str]) -> ServerCommand:
    notes: list[str] = []
    if "-m" not in given:
        raise UserError("estimate: the llama-server command line names no model (-m FILE)")
    cache_types = get_args(CacheType)
    ctk = _choice(given, "-ctk", "f16", cache_types)
    ctv = _choice(given, "-ctv", "f16", cache_types)
    flash_attn = _choice(given, "-fa", "auto", ("on", "off", "auto"))
    parallel = _int(given, "-np", -1)
    if parallel == 0:
        raise UserError("estimate: -np 0 is not a number of slots (llama-server refuses it)")
    unified = _switch(given, "-kvu")
    if parallel < 0:
        parallel, unified = AUTO_PARALLEL, True  # tools/server/server.cpp, whatever -kvu said
    ctx = _int(given, "-c", 0)
    per_slot = _int(given, "--kv-unified-per-slot", 0)
    if per_slot > 0 and "-c" not in given:
        ctx = parallel * per_slot
    batch, ubatch = _int(given, "-b", 2048), _int(given, "-ub", 512)
    embedding = bool(_switch(given, "--embedding"))
    if embedding and batch > ubatch:
        batch = ubatch  # the server sets n_batch = n_ubatch for embeddings
    ngl_text = given.get("-ngl", "auto")
    gpu_layers = None if ngl_text in ("auto", "all", "-1", "-2") else _int(given, "-ngl", 0)
    split = _fractions(given.get("-ts"))
    devices = _devices(given, split, gpu_layers, notes)
    mode = _choice(given, "-sm", "layer", ("none", "layer", "row", "tensor"))
    if mode == "none" and len(devices) > 1:
        main = _int(given, "-mg", 0)
        if not 0 <= main < len(devices):
            raise UserError(f"estimate: -mg {main} is not one of the {len(devices)} devices")
        devices, split = (devices[main],), ()
    elif mode in ("row", "tensor"):
        notes.append(f"-sm {mode} is not modelled: estimated as -sm layer")
    if split and len(split) != len(devices):
        raise UserError(f"estimate: -ts gives {len(split)} proportions for {len(devices)} devices")
    if _choice(given, "-fit", "on", ("on", "off")) == "on" and devices:
        notes.append(
            "--fit is on (llama-server's default): it lowers -ngl, and -c when -c is 0, if the devices "
            "lack the memory; this estimate is for the command as written (add --fit off to pin it)"
        )
    for key, text in _UNMODELLED.items():
        if key in given and (key != "-kvo" or given[key] == "0"):
            notes.append(text)
    if from_env:
        notes.append(f"read from the environment: {', '.join(from_env)}")
    if skipped:
        notes.append(f"flags that do not change memory here, skipped: {' '.join(dict.fromkeys(skipped))}")
    args: list[str] = []
    if "-lm" in given:
        args += ["-lm", given["-lm"]]
    if "--spec-type" in given:
        args += ["--spec-type", given["--spec-type"]]
    return ServerCommand(
        model=Path(given["-m"]),
        mmproj=Path(given["-mm"]) if given.get("-mm") else None,
        ctx=ctx,
        parallel=parallel,
        kv_unified=bool(unified),
        cache_type_k=ctk,  # type: ignore[arg-type]
        cache_type_v=ctv,  # type: ignore[arg-type]
        flash_attn=flash_attn,
        batch=batch,
        ubatch=ubatch,
        gpu_layers=gpu_layers,
        tensor_split=split,
        devices=devices,
        embedding=embedding,
        args=tuple(args),
        notes=tuple(notes),
    )


def _fractions(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        values = tuple(float(part) for part in re.split(r"[,/]+", text) if part)
    except ValueError:
        raise UserError(f"estimate: -ts expects proportions such as 3,1, got {text!r}") from None
    if any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise UserError(f"estimate: -ts expects non-negative proportions, at least one positive, got {text!r}")
    return values


def device_kind(name: str) -> DeviceKind | None:
    """A --device name as llama.cpp lists it: CUDA0, RPC0[host:port], CPU; None for another GPU."""
    upper = name.upper()
    if upper.startswith("CUDA"):
        return "cuda"
    if upper.startswith("RPC"):
        return "rpc"
    if upper.startswith("CPU"):
        return "cpu"
    return None


def _devices(
    given: Mapping[str, str], split: tuple[float, ...], gpu_layers: int | None, notes: list[str]
) -> tuple[DeviceKind, ...]:
    if gpu_layers == 0:
        return ()
    rpc = [server for server in given.get("--rpc", "").split(",") if server]
    named = given.get("-dev")
    if named is not None:
        if named.strip().lower() == "none":
            return ()
        kinds: list[DeviceKind] = []
        for name in (part.strip() for part in named.split(",") if part.strip()):
            kind = device_kind(name)
            if kind is None:
                notes.append(f"device {name} is estimated as a CUDA GPU")
                kind = "cuda"
            kinds.append(kind)
        return tuple(kinds)
    if split:
        if len(split) < len(rpc):
            raise UserError(f"estimate: -ts gives {len(split)} proportions for {len(rpc)} RPC servers")
        local = len(split) - len(rpc)
        if local:
            after = " after the RPC servers" if rpc else ""
            notes.append(f"-ts names {local} device(s){after}: taken to be CUDA GPUs (name them with --device)")
        return ("rpc",) * len(rpc) + ("cuda",) * local
    if rpc:
        return ("rpc",) * len(rpc)
    notes.append("one CUDA GPU assumed (give -ts or --device for more, -ngl 0 or --device none for none)")
    return ("cuda",)
