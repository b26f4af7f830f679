"""The machine through NVML (pynvml, from nvidia-ml-py), host RAM and CPUs; snapshots to and from JSON.

Rules kept here:
- every NVML failure is a plain state (`schemas.inventory.NvmlStatus`), never an exception: the
  library or module missing, the driver not loaded, no device, a device that errors (left out,
  with a warning naming it);
- GPUs are listed in NVML order, which is PCI bus order; children are pinned by UUID, because
  CUDA's default order (fastest first) differs;
- the NVML module is a parameter, so tests hand in a fake (tests/fakes/fake_pynvml.py);
- a snapshot is the Inventory JSON; a broken one is one line naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.schemas.inventory import Gpu, Host, Inventory
from llama_smart_proxy.schemas.units import format_bytes
from llama_smart_proxy.supervisor.errors import InventoryError

MEMINFO = Path("/proc/meminfo")


def take_inventory(
    nvml: ModuleType | Any | None = None,
    *,
    host: Host | None = None,
    models: Mapping[str, ModelHeader] | None = None,
    now: datetime | None = None,
) -> Inventory:
    """What this machine has now. `nvml` defaults to the real pynvml module."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            nvml = None
    gpu_part = _read_gpus(nvml)
    return Inventory(
        **gpu_part,
        host=host or read_host(),
        hostname=socket.gethostname(),
        taken_at=(now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        models=dict(sorted((models or {}).items())),
    )


def _read_gpus(nvml: Any) -> dict[str, Any]:
    if nvml is None:
        return {
            "nvml_status": "library_missing",
            "message": "the pynvml module (nvidia-ml-py) is not installed: no GPU can be seen",
        }
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            return {
                "nvml_status": "library_missing",
                "message": "the NVML library (libnvidia-ml.so.1) is not installed: no NVIDIA driver on this machine",
            }
        if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
            return {
                "nvml_status": "driver_not_loaded",
                "message": "the NVIDIA driver is not loaded (NVML: Driver Not Loaded); no GPU can be used",
            }
        return {"nvml_status": "error", "message": f"NVML could not start: {_describe(exc)}"}
    try:
        return _read_devices(nvml)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass  # nothing is left to release, and the answer is already read


def _read_devices(nvml: Any) -> dict[str, Any]:
    warnings: list[str] = []
    driver = _optional(nvml, warnings, "driver version", nvml.nvmlSystemGetDriverVersion)
    cuda_raw = _optional(nvml, warnings, "CUDA version", nvml.nvmlSystemGetCudaDriverVersion)
    # NVML gives CUDA as major*1000 + minor*10: 12040 -> "12.4"
    cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}" if isinstance(cuda_raw, int) else None
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        return {
            "nvml_status": "error",
            "message": f"NVML could not count the GPUs: {_describe(exc)}",
            "driver_version": driver,
            "cuda_version": cuda,
            "warnings": warnings,
        }
    gpus = []
    for index in range(count):
        try:
            gpus.append(_read_device(nvml, index, warnings))
        except nvml.NVMLError as exc:
            warnings.append(f"GPU {index} left out: NVML error {_describe(exc)}")
    base = {"driver_version": driver, "cuda_version": cuda, "gpus": gpus, "warnings": warnings}
    if count == 0:
        return {**base, "nvml_status": "no_device", "message": "NVML found no NVIDIA GPU"}
    if not gpus:
        return {**base, "nvml_status": "error", "message": f"all {count} GPUs failed to report through NVML"}
    names = ", ".join(f"{g.index}: {g.name} {format_bytes(g.total_bytes)}" for g in gpus)
    left_out = f" ({count - len(gpus)} left out)" if len(gpus) < count else ""
    return {**base, "nvml_status": "ok", "message": f"{len(gpus)} NVIDIA GPU{'s' if len(gpus) != 1 else ''}{left_out}: {names}"}


def _read_device(nvml: Any, index: int, warnings: list[str]) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    capability = _optional(
        nvml, warnings, f"GPU {index} compute capability", nvml.nvmlDeviceGetCudaComputeCapability, handle
    )
    return Gpu(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        used_bytes=int(memory.used),
        free_bytes=int(memory.free),
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
    )


def _optional(nvml: Any, warnings: list[str], what: str, call: Any, *args: Any) -> Any:
    """A detail the plan can do without: on error, None and a warning."""
    try:
        return call(*args)
    except nvml.NVMLError as exc:
        warnings.append(f"{what} unknown: NVML error {_describe(exc)}")
        return None


def _describe(exc: Exception) -> str:
    code = getattr(exc, "value", None)
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may be the thing failing
        text = ""
    return f"{text} (code {code})" if code is not None else text or type(exc).__name__


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_host(meminfo: Path = MEMINFO) -> Host:
    """Host RAM from /proc/meminfo (sysconf where there is none) and the CPUs this process may use."""
    total = available = None
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                value = int(rest.split()[0]) * 1024  # kB
                if key == "MemTotal":
                    total = value
                else:
                    available = value
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return Host(ram_total_bytes=total, ram_available_bytes=available, cpu_count=max(1, cpus))


def load_inventory(path: Path | str) -> Inventory:
    """A snapshot written by `inventory --json`; InventoryError if it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(f"{path}: inventory snapshot not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: cannot read the inventory snapshot: {exc}") from None
    try:
        return Inventory.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InventoryError(f"{path}: not an inventory snapshot: {where}: {first['msg']}{more}") from None


def dump_inventory(inventory: Inventory) -> str:
    """The snapshot text: sorted keys, so two snapshots diff cleanly."""
    return json.dumps(inventory.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def describe_inventory(inventory: Inventory) -> str:
    """The inventory for a person."""
    lines = [f"NVML: {inventory.nvml_status}: {inventory.message}"]
    if inventory.driver_version or inventory.cuda_version:
        lines.append(f"driver {inventory.driver_version or '?'}, CUDA {inventory.cuda_version or '?'}")
    for g in inventory.gpus:
        lines.append(
            f"GPU {g.index}  {g.name}  {g.uuid}  PCI {g.pci_bus_id}  compute {g.compute_capability or '?'}\n"
            f"       total {format_bytes(g.total_bytes)}, used {format_bytes(g.used_bytes)}, "
            f"free {format_bytes(g.free_bytes)}"
        )
    h = inventory.host
    lines.append(
        f"host {inventory.hostname or '?'}: {h.cpu_count} CPUs, RAM {format_bytes(h.ram_total_bytes)} "
        f"total, {format_bytes(h.ram_available_bytes)} available"
    )
    for path, header in inventory.models.items():
        lines.append(f"recorded header: {path} ({header.architecture}, {format_bytes(header.file_size)})")
    lines += [f"warning: {w}" for w in inventory.warnings]
    return "\n".join(lines)
