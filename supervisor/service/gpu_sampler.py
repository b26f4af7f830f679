"""One reader of live GPU memory: NVML is sampled in a worker thread at a fixed interval.

Rules kept here:
- NVML calls block (a driver call each, and NVML can hang on a lost GPU): they never run on the
  event loop; /health, /status and /metrics show the last sample and how old it is;
- one sampler per service, a task of the runtime's task group; a failing read is logged once and
  leaves the last good sample in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.to_thread

from llama_smart_proxy.supervisor.planning.inventory import take_inventory

log = logging.getLogger("llama-smart-proxy.gpus")

SAMPLE_INTERVAL_S = 2.0


@dataclass(frozen=True)
class GpuSample:
    taken_at: float
    """time.monotonic() when it was read."""
    used_by_gpu: Mapping[int, int]
    free_by_gpu: Mapping[int, int]

    def age_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.taken_at


def read_nvml() -> GpuSample:
    inventory = take_inventory()
    return GpuSample(
        taken_at=time.monotonic(),
        used_by_gpu={g.index: g.used_bytes for g in inventory.gpus},
        free_by_gpu={g.index: g.free_bytes for g in inventory.gpus},
    )


class GpuSampler:
    def __init__(self, read: Callable[[], GpuSample] = read_nvml, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._read = read
        self.interval_s = interval_s
        self.latest: GpuSample | None = None
        self._failing = False

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            try:
                self.latest = await anyio.to_thread.run_sync(self._read, abandon_on_cancel=True)
                self._failing = False
            except Exception as exc:  # a driver error must not end the service
                if not self._failing:
                    log.warning("reading GPU memory through NVML failed: %s", exc)
                self._failing = True
            await anyio.sleep(self.interval_s)
