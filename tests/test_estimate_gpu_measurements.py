"""The estimator against what a real GPU showed (recorded on an H200, compared here without one).

`python -m benchmarks.accuracy.gpu measure` recorded llama.cpp's CUDA buffers and NVML's used
memory for 21 shapes and settings; these tests hold every later estimator to them, and keep the
committed results table in step with the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.accuracy.gpu import report, results_markdown

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
MEASURED = json.loads((RESULTS / "estimator-gpu-h200.json").read_text())


def test_the_estimate_never_falls_under_the_memory_a_real_gpu_used() -> None:
    _, compared = report(MEASURED)
    assert len(compared) == len(MEASURED["runs"]) == 21
    under = [f"{c.label}: {c.total_ratio:.3f}" for c in compared if c.total_ratio < 1]
    assert not under, under


def test_the_compute_estimate_never_falls_under_cudas_own_buffer() -> None:
    _, compared = report(MEASURED)
    assert all(c.compute_ratio >= 1 for c in compared), [(c.label, c.compute_ratio) for c in compared]


def test_the_committed_gpu_results_table_is_what_the_code_reports() -> None:
    table, compared = report(MEASURED)
    committed = (RESULTS / "estimator-gpu.md").read_text()
    assert results_markdown(MEASURED, table, compared) == committed, (
        "regenerate with: python -m benchmarks.accuracy.gpu report "
        "benchmarks/results/estimator-gpu-h200.json --write benchmarks/results/estimator-gpu.md"
    )
