"""The inventory: every NVML state through a fake pynvml, the real one on this machine, snapshots."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from llama_smart_proxy.schemas.inventory import Host, Inventory
from llama_smart_proxy.supervisor.errors import InventoryError
from llama_smart_proxy.supervisor.planning.inventory import dump_inventory, load_inventory, read_host, take_inventory
from tests.fakes import fake_pynvml as fake
from tests.fakes.fake_pynvml import FakeNvml, gpu

HOST = Host(ram_total_bytes=64 * 1024**3, ram_available_bytes=60 * 1024**3, cpu_count=16)
STATES = {"ok", "library_missing", "driver_not_loaded", "no_device", "error"}


def inventory_of(nvml: object) -> Inventory:
    return take_inventory(nvml, host=HOST, now=datetime(2026, 1, 2, tzinfo=timezone.utc))


def test_two_gpus_are_listed_in_nvml_order_with_identity_memory_and_versions() -> None:
    nvml = FakeNvml(
        devices=[gpu(0, used=1024**3), gpu(1, name="NVIDIA RTX A6000", total=48 * 1024**3, capability=(8, 6))]
    )
    inv = inventory_of(nvml)
    assert inv.nvml_status == "ok"
    assert inv.driver_version == "550.54.15" and inv.cuda_version == "12.4"
    first, second = inv.gpus
    assert (first.index, first.uuid, first.pci_bus_id) == (0, "GPU-00000000-1111-2222-3333-444444444444", "00000000:01:00.0")
    assert first.free_bytes == 23 * 1024**3 and first.used_bytes == 1024**3 and first.total_bytes == 24 * 1024**3
    assert first.compute_capability == "8.9"
    assert (second.index, second.name, second.total_bytes, second.compute_capability) == (1, "NVIDIA RTX A6000", 48 * 1024**3, "8.6")
    assert "2 NVIDIA GPUs" in inv.message and not inv.warnings
    assert nvml.shutdowns == nvml.initialised == 1, "NVML must be shut down after reading"


def test_bus_id_and_cuda_version_read_as_recent_pynvml_gives_them() -> None:
    # as nvidia-ml-py 13 reported on a real H200: busId as str, CUDA 13000
    nvml = FakeNvml(devices=[gpu(0, bus_id="00000000:00:06.0")], bus_id_as_bytes=False, cuda_version=13000)
    inv = inventory_of(nvml)
    assert inv.gpus[0].pci_bus_id == "00000000:00:06.0" and inv.cuda_version == "13.0"


def test_missing_nvml_library_is_a_plain_state() -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0)], init_error=fake.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert inv.nvml_status == "library_missing"
    assert inv.gpus == [] and "libnvidia-ml" in inv.message


def test_missing_pynvml_module_is_a_plain_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    inv = take_inventory(host=HOST)
    assert inv.nvml_status == "library_missing" and "nvidia-ml-py" in inv.message


def test_driver_not_loaded_is_a_plain_state() -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0)], init_error=fake.NVML_ERROR_DRIVER_NOT_LOADED))
    assert inv.nvml_status == "driver_not_loaded" and inv.gpus == []
    assert "driver is not loaded" in inv.message


def test_other_init_failure_is_an_error_state_with_nvmls_words() -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0)], init_error=fake.NVML_ERROR_LIB_RM_VERSION_MISMATCH))
    assert inv.nvml_status == "error" and inv.gpus == []
    assert "version mismatch" in inv.message and "code 18" in inv.message


def test_no_device_is_a_plain_state() -> None:
    nvml = FakeNvml(devices=[])
    inv = inventory_of(nvml)
    assert inv.nvml_status == "no_device" and inv.gpus == []
    assert inv.driver_version == "550.54.15"
    assert nvml.shutdowns == 1


def test_one_erroring_device_is_left_out_with_a_warning_and_the_rest_kept() -> None:
    nvml = FakeNvml(devices=[gpu(0), gpu(1, error=fake.NVML_ERROR_GPU_IS_LOST), gpu(2)])
    inv = inventory_of(nvml)
    assert inv.nvml_status == "ok"
    assert [g.index for g in inv.gpus] == [0, 2], "indices stay NVML's, so pins by index still mean the same GPU"
    assert len(inv.warnings) == 1 and "GPU 1" in inv.warnings[0] and "GPU is lost" in inv.warnings[0]
    assert "(1 left out)" in inv.message


def test_every_device_erroring_is_an_error_state() -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0, error=fake.NVML_ERROR_UNKNOWN)]))
    assert inv.nvml_status == "error" and inv.gpus == [] and inv.warnings


def test_count_failure_is_an_error_state() -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0)], count_error=fake.NVML_ERROR_NO_PERMISSION))
    assert inv.nvml_status == "error" and "Insufficient Permissions" in inv.message


def test_unknown_compute_capability_keeps_the_gpu_with_a_warning() -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0, capability_error=fake.NVML_ERROR_UNKNOWN)]))
    assert inv.nvml_status == "ok" and inv.gpus[0].compute_capability is None
    assert "compute capability" in inv.warnings[0]


def test_the_real_pynvml_on_this_machine_gives_a_plain_state() -> None:
    import pynvml

    inv = take_inventory(pynvml)
    assert inv.nvml_status in STATES and inv.message
    if inv.nvml_status != "ok":
        assert inv.gpus == []
    assert inv.host.ram_total_bytes > 0 and inv.host.cpu_count >= 1


def test_host_ram_comes_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n")
    host = read_host(meminfo)
    assert (host.ram_total_bytes, host.ram_available_bytes) == (16384000 * 1024, 8192000 * 1024)


def test_snapshot_round_trips_and_is_stable_text(tmp_path: Path) -> None:
    inv = inventory_of(FakeNvml(devices=[gpu(0), gpu(1)]))
    path = tmp_path / "inv.json"
    path.write_text(dump_inventory(inv))
    assert load_inventory(path) == inv
    assert dump_inventory(load_inventory(path)) == path.read_text()


def test_broken_snapshot_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "inv.json"
    data = json.loads(dump_inventory(inventory_of(FakeNvml(devices=[gpu(0)]))))
    data["gpus"][0]["free_bytes"] = "lots"
    path.write_text(json.dumps(data))
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    message = str(caught.value)
    assert str(path) in message and "gpus.0.free_bytes" in message and "\n" not in message
    with pytest.raises(InventoryError, match="not found"):
        load_inventory(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InventoryError, match="not an inventory snapshot"):
        load_inventory(tmp_path / "bad.json")
