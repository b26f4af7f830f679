"""The estimator against what llama.cpp build 11434 allocated, recorded on the CPU and RPC devices.

`python -m benchmarks.accuracy --write benchmarks/results/estimator-accuracy.md` ran the real
llama-server (or the dry-run probe) on every case and recorded its buffers beside the table
(estimator-accuracy.json). These tests replay every recorded case against the estimator of this
commit, with no llama.cpp needed: weights (the mapped file span with mmap), KV cache, recurrent
state and output within 1 MiB; compute never under and over by at most max(15 %, 32 MiB).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.accuracy.__main__ import results_markdown, summary, table
from benchmarks.accuracy.compare import replay

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
RECORDED = json.loads((RESULTS / "estimator-accuracy.json").read_text())
CASES = {entry["label"]: entry for entry in RECORDED["cases"]}


@pytest.mark.parametrize("label", sorted(CASES))
def test_every_recorded_case_meets_the_targets(label: str) -> None:
    result = replay(CASES[label])
    misses = [f"{r.device} {r.component}: estimate {r.estimate} vs llama.cpp {r.measured}" for r in result.rows if not r.ok]
    assert not misses, "\n".join(misses)
    assert result.estimate_total >= result.measured_total


def test_the_issue_13_cases_were_measured() -> None:
    labels = set(CASES)
    # full offloads of MoE and MLA models split over two devices (pipeline parallelism)
    for shape in ("deepseek-v2-lite-8l", "qwen3-30b-a3b-8l", "mixtral-8x7b-5l"):
        assert any(label.startswith(shape) and "ngl99 ts" in label for label in labels), shape
    # a partial offload whose separate output head lies between token_embd and blk.0, mapped
    assert "llama-3.1-8b c8192 np1 fa-on ngl20 ts1 mmap" in labels
    assert "lfm2-1.2b c32768 np1 fa-auto" in labels  # "auto" on a hybrid at 32k


def test_a_partial_offload_maps_the_head_stored_before_blk0_on_the_host() -> None:
    entry = CASES["llama-3.1-8b c8192 np1 fa-on ngl20 ts1 mmap"]
    result = replay(entry)
    weights = next(r for r in result.rows if r.device == "CPU" and r.component == "weights")
    # llama.cpp's CPU_Mapped span: the token embeddings, the head behind them and 12 blocks
    assert abs(weights.estimate - weights.measured) <= 1024**2
    assert weights.measured > 2_300 * 1024**2


def test_the_committed_accuracy_table_is_what_the_code_reports() -> None:
    results = [replay(entry) for entry in RECORDED["cases"]]
    committed = (RESULTS / "estimator-accuracy.md").read_text()
    assert results_markdown(table(results), summary(results, [])) == committed, (
        "regenerate with: python -m benchmarks.accuracy --write benchmarks/results/estimator-accuracy.md"
    )
