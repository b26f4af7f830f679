"""`llama-smart-proxy estimate`: one GGUF file at given settings, as a table a person reads at a glance.

The I/O shell of the estimator for one file: read the header(s), build the memory profile, place
it, and render. Sizes are bytes inside and MiB/GiB only in the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_smart_proxy.schemas.config import BUILTIN_DEFAULTS, CacheType, FlashAttn, ModelSpec
from llama_smart_proxy.schemas.estimate import DeviceMemory, Estimate, MemoryProfile
from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.schemas.units import format_bytes
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.memory.profile import DEVICE_OVERHEAD_BYTES, memory_profile
from llama_smart_proxy.supervisor.memory.reader import read_header

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
        f"placement: {_placement(estimate)}",
        "",
    ]
    rows: list[tuple[str, DeviceMemory]] = [(gpu.device, gpu) for gpu in estimate.gpus]
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
    if estimate.gpus:
        lines.append(
            f"note: each GPU's overhead is CUDA's own use beside llama.cpp's buffers (context, cuBLAS, "
            f"memory pool; {format_bytes(DEVICE_OVERHEAD_BYTES)} measured on an H200, more without flash "
            "attention); the host column is RAM (with mmap the host weights are page cache)."
        )
    for warning in profile.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines).rstrip() + "\n"


def _placement(estimate: Estimate) -> str:
    n = estimate.n_layers
    if not estimate.gpus:
        return "CPU only (-ngl 0)"
    gpus = len(estimate.gpus)
    where = f"{gpus} GPU{'s' if gpus > 1 else ''}"
    if estimate.tensor_split:
        where += " split " + ":".join(f"{f:g}" for f in estimate.tensor_split)
    if estimate.gpu_layers >= n + 1:
        return f"-ngl {estimate.gpu_layers}: every layer and the output on {where}"
    blocks = max(estimate.gpu_layers - 1, 0)
    return f"-ngl {estimate.gpu_layers}: the output and the last {blocks} of {n} layers on {where}, the rest on the CPU"
