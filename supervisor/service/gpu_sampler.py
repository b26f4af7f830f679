"""One reader of live memory: NVML (per GPU, and per process where the driver reports processes)
and host RAM (available, and each child's resident set), sampled in worker threads at a fixed
interval.

Rules kept here:
- NVML calls block (a driver call each, and NVML can hang on a lost GPU), and so do /proc reads:
  they never run on the event loop; /health, /status, /metrics and /events show the last sample
  and how old it is;
- one sampler per service, a task of the runtime's task group; a failing read is logged once and
  leaves the last good sample in place;
- a driver that does not report processes (some containers, some vGPU setups) is a plain state:
  no per-process figures, never an error;
- NVML is read only where the plan has GPUs; host RAM always.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from llama_smart_proxy.supervisor.planning.inventory import MEMINFO, read_host, take_inventory

log = logging.getLogger("llama-smart-proxy.gpus")

SAMPLE_INTERVAL_S = 2.0


@dataclass(frozen=True)
class GpuSample:
    taken_at: float
    """time.monotonic() when it was read."""
    used_by_gpu: Mapping[int, int]
    free_by_gpu: Mapping[int, int]
    used_by_process: Mapping[int, Mapping[int, int]] = field(default_factory=dict)
    """GPU index -> pid -> bytes, for the GPUs whose driver reported its processes."""
    taken_at_unix: float = field(default_factory=time.time)

    def age_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.taken_at


@dataclass(frozen=True)
class HostSample:
    taken_at_unix: float
    available_bytes: int
    rss_by_pid: Mapping[int, int]
    """Resident set size of each pid asked about that was still there."""


def read_nvml(nvml: Any | None = None) -> GpuSample:
    inventory = take_inventory(nvml)
    return GpuSample(
        taken_at=time.monotonic(),
        used_by_gpu={g.index: g.used_bytes for g in inventory.gpus},
        free_by_gpu={g.index: g.free_bytes for g in inventory.gpus},
        used_by_process=read_gpu_processes(nvml),
    )


def read_gpu_processes(nvml: Any | None = None) -> dict[int, dict[int, int]]:
    """GPU index -> pid -> bytes from NVML's compute processes; a GPU whose driver does not
    report them (or reports no figure for them) is left out."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return {}
    try:
        nvml.nvmlInit()
    except Exception:  # no library, no driver: take_inventory says so in words
        return {}
    found: dict[int, dict[int, int]] = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except (nvml.NVMLError, AttributeError):
                continue
            used = {int(p.pid): int(p.usedGpuMemory) for p in processes if p.usedGpuMemory is not None}
            found[index] = used
    except nvml.NVMLError:
        pass
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    return found


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_host_sample(pids: Iterable[int], meminfo: Path = MEMINFO, proc: Path = Path("/proc")) -> HostSample:
    """MemAvailable, and the resident set of each pid (from /proc/<pid>/statm, in pages)."""
    rss: dict[int, int] = {}
    for pid in pids:
        try:
            fields = (proc / str(pid) / "statm").read_text().split()
            rss[pid] = int(fields[1]) * PAGE_SIZE
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not Linux
    return HostSample(time.time(), read_host(meminfo).ram_available_bytes, rss)


class GpuSampler:
    def __init__(
        self,
        read: Callable[[], GpuSample] = read_nvml,
        interval_s: float = SAMPLE_INTERVAL_S,
        *,
        read_host: Callable[[Iterable[int]], HostSample] = read_host_sample,
    ) -> None:
        self._read = read
        self._read_host = read_host
        self.interval_s = interval_s
        self.latest: GpuSample | None = None
        self.latest_host: HostSample | None = None
        self._failing = False
        self._host_failing = False

    async def run(
        self, *, has_gpus: Callable[[], bool] = lambda: True, pids: Callable[[], list[int]] = list
    ) -> None:
        """Sample until cancelled: NVML while `has_gpus()`, host RAM and the `pids()` always."""
        while True:
            if has_gpus():
                try:
                    self.latest = await anyio.to_thread.run_sync(self._read, abandon_on_cancel=True)
                    self._failing = False
                except Exception as exc:  # a driver error must not end the service
                    if not self._failing:
                        log.warning("reading GPU memory through NVML failed: %s", exc)
                    self._failing = True
            wanted = pids()  # read on the event loop, where the runtime's state is consistent
            try:
                self.latest_host = await anyio.to_thread.run_sync(self._read_host, wanted, abandon_on_cancel=True)
                self._host_failing = False
            except Exception as exc:
                if not self._host_failing:
                    log.warning("reading host memory failed: %s", exc)
                self._host_failing = True
            await anyio.sleep(self.interval_s)
