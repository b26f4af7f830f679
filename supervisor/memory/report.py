"""`llama-smart-proxy estimate`: one GGUF file at given settings, as a table a person reads at a glance.

The I/O shell of the estimator for one file: read the header(s), build the memory profile, place
it, and render. Settings come from options with the config's defaults (`estimate FILE ...`), or
from a llama-server command line with llama-server's own (`estimate -- ...`,
supervisor/memory/server_args.py). Sizes are bytes inside and MiB/GiB only in the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_smart_proxy.schemas.config import BUILTIN_DEFAULTS, CacheType, FlashAttn, ModelSpec
from llama_smart_proxy.schemas.estimate import DeviceMemory, Estimate, MemoryProfile
from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.schemas.units import format_bytes
from llama_smart_proxy.supervisor.memory.flash_attention import DeviceKind
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.memory.profile import DEVICE_OVERHEAD_BYTES, memory_profile
from llama_smart_proxy.supervisor.memory.reader import read_header
from llama_smart_proxy.supervisor.memory.server_args import ServerCommand

COLUMNS = (
    ("weights", "weights_bytes"),
    ("KV cache", "kv_bytes"),
    ("recurrent", "recurrent_bytes"),
    ("compute", "compute_bytes"),
    ("output", "output_bytes"),
    ("CUDA own", "overhead_bytes"),
    ("total", "total_bytes"),
)


@dataclass(frozen=True)
class FileEstimate:
    header: ModelHeader
    profile: MemoryProfile
    estimate: Estimate
    kinds: tuple[DeviceKind, ...] = ()  # each offload device's kind; empty: all CUDA
    notes: tuple[str, ...] = ()


def estimate_file(
    path: Path,
    *,
    ctx: int | None = None,
    parallel: int | None = None,
    kv_unified: bool | None = None,
    cache_type_k: CacheType | None = None,
    cache_type_v: CacheType | None = None,
    flash_attn: FlashAttn | None = None,
    batch: int | None = None,
    ubatch: int | None = None,
    gpu_layers: int | None = None,
    tensor_split: Sequence[float] = (),
    mmproj: Path | None = None,
) -> FileEstimate:
    """Settings left None take the built-in defaults; gpu_layers None means every layer."""
    header = read_header(path)
    projector = read_header(mmproj) if mmproj is not None else None
    values = BUILTIN_DEFAULTS.model_dump()
    given = {
        "ctx": ctx, "parallel": parallel, "kv_unified": kv_unified, "cache_type_k": cache_type_k,
        "cache_type_v": cache_type_v, "flash_attn": flash_attn, "batch": batch, "ubatch": ubatch,
    }  # fmt: skip
    values.update({key: value for key, value in given.items() if value is not None})
    values.update(name=Path(path).stem, file=Path(path), mmproj=mmproj, aliases=[])
    spec = ModelSpec(**values)
    profile = memory_profile(header, spec, projector)
    split = list(tensor_split) or [1.0]
    layers = profile.n_layers + 1 if gpu_layers is None else gpu_layers
    estimate = place(profile, layers, split if layers > 0 else [])
    return FileEstimate(header, profile, estimate)


def estimate_command(command: ServerCommand) -> FileEstimate:
    """What a llama-server command line needs, per device of its kind and on the host."""
    header = read_header(command.model)
    projector = read_header(command.mmproj) if command.mmproj is not None else None
    values = BUILTIN_DEFAULTS.model_dump()
    values.update(
        name=command.model.stem, file=command.model, mmproj=command.mmproj, aliases=[], ctx=command.ctx,
        parallel=command.parallel, kv_unified=command.kv_unified, cache_type_k=command.cache_type_k,
        cache_type_v=command.cache_type_v, flash_attn=command.flash_attn, batch=command.batch,
        ubatch=command.ubatch, args=list(command.args),
    )  # fmt: skip
    spec = ModelSpec(**values)
    kinds = command.devices
    notes = list(command.notes)
    # llama.cpp decides flash attention once for every device: CUDA's answer holds for all of them
    cuda = memory_profile(header, spec, projector) if "cuda" in kinds else None
    other = None
    if any(kind != "cuda" for kind in kinds) or not kinds:
        if cuda is not None:
            spec = spec.model_copy(update={"flash_attn": "on" if cuda.settings.flash_attn else "off"})
        other = memory_profile(header, spec, projector, device_backend="cpu")
    profile = cuda or other
    assert profile is not None
    layers = profile.n_layers + 1 if command.gpu_layers is None else command.gpu_layers
    split = list(command.tensor_split) or [1.0] * len(kinds)
    if len(kinds) > 1 and not command.tensor_split:
        notes.append("no -ts: equal shares assumed (llama.cpp splits by each device's free memory)")
    estimate = place(profile, layers if kinds else 0, split if kinds else [])
    if cuda is not None and other is not None:
        # each device as its own kind allocates; the host as the CPU backend does
        by_other = place(other, layers, split)
        gpus = [mine if kind == "cuda" else theirs for kind, mine, theirs in zip(kinds, estimate.gpus, by_other.gpus)]
        estimate = estimate.model_copy(update={"gpus": gpus, "host": by_other.host})
    return FileEstimate(header, profile, estimate, kinds, tuple(notes))


def _cell(value: int) -> str:
    return format_bytes(value) if value else "-"


def render_estimate(result: FileEstimate) -> str:
    header, profile, estimate = result.header, result.profile, result.estimate
    s = estimate.settings
    parts = f"{header.parts} files" if header.parts > 1 else "1 file"
    lines = [
        f"{header.path}: {header.architecture}, {estimate.n_layers} layers, {format_bytes(header.file_size)} in {parts}",
        "settings: "
        + ", ".join(
            [
                f"context {s.ctx or 'from the model'} ({s.n_ctx} cells)",
                f"{s.parallel} slot{'s' if s.parallel != 1 else ''}",
                "unified KV cache" if s.kv_unified else "a KV stream per slot",
                f"K {s.cache_type_k} / V {s.cache_type_v}",
                f"flash attention {'on' if s.flash_attn else 'off'}",
                f"batch {s.batch} / ubatch {s.ubatch}",
            ]
        ),
        f"placement: {_placement(estimate, result.kinds)}",
        "",
    ]
    rows: list[tuple[str, DeviceMemory]] = [(_label(gpu.device, i, result.kinds), gpu) for i, gpu in enumerate(estimate.gpus)]
    rows.append(("host", estimate.host))
    table = [["", *[title for title, _ in COLUMNS]]]
    for name, device in rows:
        table.append([name, *[_cell(getattr(device, attr)) for _, attr in COLUMNS]])
    if len(rows) > 1:
        sums = [sum(getattr(device, attr) for _, device in rows) for _, attr in COLUMNS]
        table.append(["total", *[_cell(v) for v in sums]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        first = row[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))
        lines.append(f"  {first}  {rest}")
    lines.append("")
    if any(kind == "cuda" for kind in result.kinds or ("cuda",) * len(estimate.gpus)):
        lines.append(
            f"note: each CUDA GPU's overhead is CUDA's own use beside llama.cpp's buffers (context, cuBLAS, "
            f"memory pool; {format_bytes(DEVICE_OVERHEAD_BYTES)} measured on an H200, more without flash "
            "attention); the host column is RAM (with mmap the host weights are page cache)."
        )
    for note in result.notes:
        lines.append(f"note: {note}")
    for warning in profile.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines).rstrip() + "\n"


def _label(device: str, index: int, kinds: tuple[DeviceKind, ...]) -> str:
    """The table's name of an offload device: GPU<n> for CUDA, RPC<n> or CPU<n> for the others."""
    if index < len(kinds) and kinds[index] != "cuda":
        return f"{kinds[index].upper()}{index}"
    return device


def _placement(estimate: Estimate, kinds: tuple[DeviceKind, ...]) -> str:
    n = estimate.n_layers
    if not estimate.gpus:
        return "CPU only (-ngl 0)"
    gpus = len(estimate.gpus)
    where = f"{gpus} GPU{'s' if gpus > 1 else ''}" if all(k == "cuda" for k in kinds) else (
        f"{gpus} device{'s' if gpus > 1 else ''} ({', '.join(k.upper() for k in kinds)})"
    )
    if estimate.tensor_split:
        where += " split " + ":".join(f"{f:g}" for f in estimate.tensor_split)
    if estimate.gpu_layers >= n + 1:
        return f"-ngl {estimate.gpu_layers}: every layer and the output on {where}"
    blocks = max(estimate.gpu_layers - 1, 0)
    return f"-ngl {estimate.gpu_layers}: the output and the last {blocks} of {n} layers on {where}, the rest on the CPU"
