"""One plan entry → the llama-server command line and environment; pure, no I/O.

Rules kept here:
- every flag we emit is in `FLAGS_USED`, which `llama_binary.check_llama_server` looks for in the
  binary's `--help`, so a flag renamed by llama.cpp fails at start, not in a user's service;
- flags were checked against common/arg.cpp of llama.cpp build 11434: `--fit` is on by default and
  would re-decide -ngl and the split, so the plan's choice is pinned with `--fit off`;
- the child listens on loopback only; the proxy is the only way in;
- devices are pinned by UUID through CUDA_VISIBLE_DEVICES (in PCI bus order), so indices inside
  the child (-mg, -ts order) are indices into `LaunchSpec.devices`; a CPU model sees no GPU at all;
- the plan's device pinning wins over any `env` a user gave, since the memory plan depends on it;
- the child answers to its config name (`--alias`), so responses never carry the file's path as
  `"model"`; aliases are not passed (they live outside the LaunchSpec, so changing them keeps the
  child), the proxy renames the field to the name a client used;
- what the plan decides is the plan's alone: every flag in `FLAGS_USED` is one of the options a
  config's `args` and `env` may not set (supervisor/config/owned_options.py, a test keeps the two in
  step);
- a child's environment is the supervisor's without the service's own settings and secrets
  (LLAMA_SMART_PROXY_*), systemd's per-service variables, and inherited LLAMA_ARG_* variables,
  which would change what llama-server loads behind the estimate's back; the config's `env` is
  laid over the rest, and the estimate sees it (`child_environment`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llama_smart_proxy.schemas.config import LlamaServerSettings
from llama_smart_proxy.schemas.launch import LaunchSpec, served_model_name

CHILD_HOST = "127.0.0.1"

FLAGS_USED: tuple[str, ...] = (
    "-m", "--host", "--port", "-c", "-np", "--kv-unified", "--no-kv-unified", "-ctk", "-ctv",
    "-fa", "-b", "-ub", "-ngl", "-sm", "-ts", "-mg", "--fit", "--mmproj", "--alias", "--slot-save-path",
)  # fmt: skip
"""Every flag `build_command` may emit; the binary check requires each of them."""


DROPPED_PREFIXES = ("LLAMA_SMART_PROXY_", "LLAMA_ARG_")
"""Inherited variables a child never sees: the service's own settings and secrets, and options
llama-server would read behind the estimate's back."""
DROPPED_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})
"""systemd's per-service variables: they describe this service, not its children."""


def is_dropped(name: str) -> bool:
    """Whether an inherited variable is kept from children."""
    return name.startswith(DROPPED_PREFIXES) or name in DROPPED_VARIABLES


def child_environment(inherited: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """A child's whole environment: `inherited` (the supervisor's) without what `is_dropped`
    names, with the command's `env` laid over it."""
    return {**{k: v for k, v in inherited.items() if not is_dropped(k)}, **env}


def ignored_llama_variables(inherited: Iterable[str]) -> list[str]:
    """Inherited LLAMA_ARG_* names, which children do not get: worth a warning at start."""
    return sorted(name for name in inherited if name.startswith("LLAMA_ARG_"))


@dataclass(frozen=True)
class Command:
    """What to execute: argv[0] is the binary; `env` is laid over the supervisor's environment,
    less what `is_dropped` names (`child_environment`)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def build_command(
    spec: LaunchSpec, *, binary: Path, port: int, settings: LlamaServerSettings
) -> Command:
    """The argv and environment that start `spec` on `port`.

    `spec.args` already holds [llama_server] args then the model's own; they come last so a user
    can add flags, but the ones above are the plan's.
    """
    if spec.tensor_split and len(spec.tensor_split) != len(spec.devices):
        raise ValueError(
            f"{spec.model}: tensor_split has {len(spec.tensor_split)} fractions for "
            f"{len(spec.devices)} devices"
        )
    if spec.devices and spec.main_gpu >= len(spec.devices):
        raise ValueError(f"{spec.model}: main_gpu {spec.main_gpu} is not one of its {len(spec.devices)} devices")
    on_gpu = bool(spec.devices)
    argv = [
        str(binary),
        "-m", spec.file,
        "--alias", served_model_name(spec.model),
        "--host", CHILD_HOST,
        "--port", str(port),
        "-c", str(spec.ctx),
        "-np", str(spec.parallel),
        "--kv-unified" if spec.kv_unified else "--no-kv-unified",
        "-ctk", spec.cache_type_k,
        "-ctv", spec.cache_type_v,
        "-fa", spec.flash_attn,
        "-b", str(spec.batch),
        "-ub", str(spec.ubatch),
        "-ngl", str(spec.gpu_layers if on_gpu else 0),
    ]  # fmt: skip
    if len(spec.devices) > 1:
        argv += ["-sm", spec.split_mode]
        if spec.tensor_split:
            # repr is the shortest text that reads back as the same float, so llama.cpp's float32
            # split points match the planner's (supervisor/memory/placement.py)
            argv += ["-ts", ",".join(repr(float(f)) for f in spec.tensor_split)]
        argv += ["-mg", str(spec.main_gpu)]
    argv += ["--fit", "off"]
    if spec.mmproj is not None:
        argv += ["--mmproj", spec.mmproj]
    if spec.slot_save_path is not None:
        argv += ["--slot-save-path", spec.slot_save_path]
    argv += spec.args

    env = {**settings.env, **spec.env}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    # An empty list hides every GPU: a CPU model must not create a CUDA context (hundreds of MiB)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.devices)
    return Command(argv=argv, env=env)
