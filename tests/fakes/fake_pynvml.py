"""A fake of the pynvml module (nvidia-ml-py) for fault injection: NVML states no real machine
gives on demand (library missing, driver not loaded, no device, one device erroring).

It offers the functions and constants supervisor/planning/inventory.py uses, with pynvml's calling
conventions: errors are `NVMLError` with an NVML code in `.value`, strings come back as str, and
the PCI bus id as bytes (the raw ctypes field, older pynvml) or str (nvidia-ml-py 13 on a real
H200 returned str). Build one per test:

    nvml = FakeNvml(devices=[FakeDevice()], init_error=None)
    take_inventory(nvml)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

# The codes of pynvml (nvml.h)
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

GIB = 1024**3


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class FakeDevice:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    bus_id: str = "00000000:01:00.0"
    total: int = 24 * GIB
    used: int = 512 * 1024**2
    capability: tuple[int, int] = (8, 9)
    error: int | None = None  # every call on this device fails with this NVML code
    capability_error: int | None = None
    processes: dict[int, int | None] | None = None
    """pid -> bytes NVML reports for compute processes (None bytes: "not available", as some
    drivers say); None: the driver does not report processes (NVML_ERROR_NOT_SUPPORTED)."""


@dataclass
class FakeNvml:
    devices: list[FakeDevice] = field(default_factory=list)
    init_error: int | None = None
    count_error: int | None = None
    driver_version: str = "550.54.15"
    cuda_version: int = 12040
    bus_id_as_bytes: bool = True
    initialised: int = 0
    shutdowns: int = 0
    memory_info_delay_s: float = 0.0
    """How long each memory read takes: a driver that is slow to answer (it blocks the caller)."""
    slow_reads_on: list[int] = field(default_factory=list)
    """The thread of each slow memory read, so a test can tell that none blocked the event loop."""

    NVMLError = NVMLError
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        if self.count_error is not None:
            raise NVMLError(self.count_error)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._check_init()
        device = self.devices[index]
        if device.error is not None:
            raise NVMLError(device.error)
        return device

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        return self._device(handle).name

    def nvmlDeviceGetPciInfo(self, handle: FakeDevice) -> SimpleNamespace:
        bus_id = self._device(handle).bus_id
        return SimpleNamespace(busId=bus_id.encode() if self.bus_id_as_bytes else bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        d = self._device(handle)
        if self.memory_info_delay_s:
            self.slow_reads_on.append(threading.get_ident())
            time.sleep(self.memory_info_delay_s)
        return SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeDevice) -> tuple[int, int]:
        d = self._device(handle)
        if d.capability_error is not None:
            raise NVMLError(d.capability_error)
        return d.capability

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        d = self._device(handle)
        if d.processes is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in d.processes.items()]

    def _check_init(self) -> None:
        if self.initialised <= self.shutdowns:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: FakeDevice) -> FakeDevice:
        self._check_init()
        if handle.error is not None:
            raise NVMLError(handle.error)
        return handle


def gpu(index: int, **changes: object) -> FakeDevice:
    """Device `index` with a distinct UUID and bus id."""
    values: dict[str, object] = {
        "uuid": f"GPU-{index:08x}-1111-2222-3333-444444444444",
        "bus_id": f"00000000:{index + 1:02X}:00.0",
    }
    values.update(changes)
    return FakeDevice(**values)  # type: ignore[arg-type]
