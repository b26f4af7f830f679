"""Time to first token of a repeated long prompt after an eviction, with and without keep_cache, in
one run (issue 17). One command:

    python -m benchmarks.prompt_cache [--quick] [--out benchmarks/results/prompt-cache.md]

Setup: `serve` with the real llama-server on the CPU and three on-demand models of one generated
GGUF (random weights, llama architecture, large enough that a long prompt takes seconds on the
CPU): `kept` (keep_cache = true), `plain` (keep_cache = false) and `other`. An inventory snapshot
with one GPU that holds one of them at a time makes every start evict the model before it (the
children still run on the CPU: the snapshot only drives the plan and the memory ledger).

Each round: `other` evicts the previous model, then the long prompt goes to `kept` (which `other`'s
next start evicts, saving its slot) or to `plain`; the arms alternate which goes first, so drift
hits both alike. Time to first token is measured by the client over the proxy, streaming, from the
request to the first content chunk: it includes the model's start (load, and for `kept` the
restore), which an evicted model always pays. `other` is what evicts both arms, so neither arm's
figure carries the other's save. The save's own cost, paid at the stop, is reported beside it.
The first round is a warm-up (`kept` has nothing saved yet): reported apart, not in the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.accuracy.oracle import free_port
from llama_smart_proxy.schemas.inventory import Gpu, Host, Inventory
from llama_smart_proxy.supervisor.planning.inventory import dump_inventory
from llama_smart_proxy.supervisor.children.llama_binary import find_llama_server
from llama_smart_proxy.supervisor.planning.prepare import Source, prepare
from llama_smart_proxy.supervisor.service.tinymodel import TinyShape, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SHAPE = TinyShape(n_embd=384, n_layer=6, n_head=6, n_head_kv=2, n_ff=1024, n_ctx_train=8192)
"""About 12 M float32 parameters: a 5000-token prompt takes seconds on two CPU cores."""
CTX = 8192
PROMPT_WORDS = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. "


def inventory(total_bytes: int) -> str:
    gpu = Gpu(
        index=0, uuid="GPU-00000000-0000-0000-0000-000000000000", pci_bus_id="00000000:01:00.0",
        name="one model at a time", total_bytes=total_bytes, used_bytes=0, free_bytes=total_bytes,
    )  # fmt: skip
    host = Host(ram_total_bytes=64 * 1024**3, ram_available_bytes=64 * 1024**3, cpu_count=os.cpu_count() or 1)
    return dump_inventory(Inventory(nvml_status="ok", message="benchmark snapshot", gpus=[gpu], host=host))


def write_config(directory: Path, model: Path, listen: str) -> Path:
    lines = [
        "[proxy]", f'listen = "{listen}"', 'queue_timeout = "5m"', 'first_byte_timeout = "10m"',
        "[llama_server]", 'stop_grace = "5s"',
        "[gpus]", 'reserve = "0MiB"',
        "[prompt_cache]", f'dir = "{directory / "cache"}"', 'disk_reserve = "0"',
    ]  # fmt: skip
    for name, keep in (("kept", True), ("plain", False), ("other", False)):
        lines += [f"[models.{name}]", f'file = "{model}"', f"ctx = {CTX}", 'mode = "on-demand"']
        lines += ["keep_cache = true"] if keep else []
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def first_token(base: str, model: str, prompt: str) -> tuple[float, int]:
    """(seconds from the request to the first streamed token, prompt tokens processed)."""
    body = {"model": model, "prompt": prompt, "n_predict": 2, "temperature": 0, "seed": 1, "stream": True}
    started = time.perf_counter()
    ttft = None
    prompt_n = -1
    with httpx.stream("POST", f"{base}/completion", json=body, timeout=600) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if ttft is None:  # the first token's event (its text may be an incomplete UTF-8 byte: "")
                ttft = time.perf_counter() - started
            if "timings" in event:
                prompt_n = event["timings"]["prompt_n"]
    assert ttft is not None, "no token streamed"
    return ttft, prompt_n


def status(base: str, model: str) -> dict[str, Any]:
    return next(m for m in httpx.get(f"{base}/status", timeout=30).json()["models"] if m["name"] == model)


def run(rounds: int, prompt_chars: int, keep: bool = False) -> dict[str, Any]:
    find_llama_server()  # fails early, with the install hint, when there is none
    directory = Path(tempfile.mkdtemp(prefix="prompt-cache-bench-"))
    try:
        model = write_tiny_model(directory / "bench.gguf", SHAPE)
        listen = f"127.0.0.1:{free_port()}"
        config = write_config(directory, model, listen)
        probe = directory / "probe.json"
        probe.write_text(inventory(80 * 1024**3))
        need = prepare(Source(config, inventory_path=probe)).plan.model("kept").estimate.gpus[0].total_bytes
        snapshot = directory / "inventory.json"
        snapshot.write_text(inventory(need * 3 // 2))
        prompt = (PROMPT_WORDS * (prompt_chars // len(PROMPT_WORDS) + 1))[:prompt_chars]
        log = (directory / "serve.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "llama_smart_proxy.supervisor", "serve", "--config", str(config), "--inventory", str(snapshot)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        base = f"http://{listen}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code in (200, 503):
                        break
                except httpx.TransportError:
                    pass
                assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
            samples: dict[str, list[dict[str, float]]] = {"kept": [], "plain": []}
            first_kept: dict[str, float] = {}
            for r in range(rounds + 1):
                for arm in ("kept", "plain") if r % 2 == 0 else ("plain", "kept"):
                    first_token(base, "other", "Hello")  # evicts whatever holds the GPU (saving kept's slot)
                    ttft, prompt_n = first_token(base, arm, prompt)
                    child = status(base, arm)
                    sample = {"ttft_s": ttft, "prompt_n": prompt_n, "load_s": child["load_seconds"]}
                    cache = child.get("prompt_cache")
                    if cache:
                        sample["restore_s"] = cache["last_restore_s"] or 0.0
                    if r == 0:  # a warm-up round; kept has nothing saved yet
                        if arm == "kept":
                            first_kept = sample
                    else:
                        samples[arm].append(sample)
            first_token(base, "other", "Hello")  # a last eviction, for its save's figures
            kept = status(base, "kept")["prompt_cache"]
        finally:
            serve.terminate()
            serve.wait(timeout=120)
            log.close()
        return {"samples": samples, "first_kept": first_kept, "kept_cache": kept, "need_bytes": need}
    finally:
        if keep:
            print(f"kept {directory} (serve.log, config, model)", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(result: dict[str, Any], rounds: int, prompt_chars: int, load: tuple[str, str]) -> str:
    kept, plain = result["samples"]["kept"], result["samples"]["plain"]
    ttft_kept = median([s["ttft_s"] for s in kept])
    ttft_plain = median([s["ttft_s"] for s in plain])
    cache = result["kept_cache"]
    lines = [
        "# Prompt cache benchmark: time to first token after an eviction",
        "",
        "Produced by `python -m benchmarks.prompt_cache` (real llama-server on the CPU, through the proxy; "
        "three on-demand models of one generated GGUF that evict each other; arms interleaved).",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}.",
        f"Load average (1, 5, 15 min) before: {load[0]}, after: {load[1]}.",
        f"Model: {SHAPE} (llama, float32, random weights), ctx {CTX}; prompt {prompt_chars} characters, "
        f"{max(int(s['prompt_n']) for s in plain)} tokens (the byte vocabulary spends three on a space); "
        f"{rounds} measured rounds per arm.",
        "",
        "| arm | TTFT median s | TTFT per round s | prompt_n | load s (median, restore included) | restore s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in (("keep_cache = true", kept), ("keep_cache = false", plain)):
        per_round = ", ".join(f"{s['ttft_s']:.3f}" for s in rows)
        prompt_ns = sorted({int(s["prompt_n"]) for s in rows})
        restore = median([s["restore_s"] for s in rows if "restore_s" in s])
        lines.append(
            f"| {name} | {median([s['ttft_s'] for s in rows]):.3f} | {per_round} | {', '.join(map(str, prompt_ns))} | "
            f"{median([s['load_s'] for s in rows]):.3f} | {'-' if restore != restore else f'{restore:.4f}'} |"
        )
    first = result["first_kept"]
    lines += [
        "",
        f"**Ratio, TTFT without / with keep_cache: {ttft_plain / ttft_kept:.1f}x** "
        f"({ttft_plain:.3f} s / {ttft_kept:.3f} s). The least favourable pair, the fastest round without "
        f"against the slowest with: {min(s['ttft_s'] for s in plain) / max(s['ttft_s'] for s in kept):.1f}x.",
        "",
        f"The kept model's first round, with nothing saved yet: TTFT {first['ttft_s']:.3f} s, prompt_n "
        f"{int(first['prompt_n'])}, as the plain arm.",
        f"What keeping costs, paid at each stop: the last save took {cache['last_save_s']:.4f} s and wrote "
        f"{cache['bytes_on_disk']} bytes; over the run {cache['slots_saved']} slots saved, "
        f"{cache['slots_restored']} restored, {cache['tokens_restored']} tokens restored.",
        "",
        "Raw samples:",
        "",
        "```json",
        json.dumps(result["samples"], indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of a 1500-character prompt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-chars", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt-cache.md")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (serve.log, config, model)")
    args = parser.parse_args()
    rounds, chars = (2, 1500) if args.quick else (args.rounds, args.prompt_chars)
    before = loadavg()
    result = run(rounds, chars, keep=args.keep)
    text = report(result, rounds, chars, (before, loadavg()))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
