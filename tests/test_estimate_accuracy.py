"""The accuracy harness in its small form: the estimate against the real llama-server.

Small models at real shapes (written sparse), on the CPU and over two RPC devices standing in for
GPUs; every component within the issue's targets (benchmarks/accuracy/compare.py). The full run
is `python -m benchmarks.accuracy`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.accuracy.cases import QUICK_CASES, Case
from benchmarks.accuracy.compare import run_case

pytestmark = [pytest.mark.llama_server, pytest.mark.slow]


@pytest.mark.parametrize("case", QUICK_CASES, ids=lambda case: case.label)
def test_estimate_meets_targets_against_llama_server(case: Case, llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    models = tmp_path_factory.getbasetemp() / "accuracy-models"
    result = run_case(case, models, probe=None)
    misses = [f"{r.device} {r.component}: estimate {r.estimate} vs llama.cpp {r.measured}" for r in result.rows if not r.ok]
    assert not misses, "\n".join(misses)
    assert result.estimate_total >= result.measured_total
    assert any(r.component == "compute" for r in result.rows)  # something was measured
    if case.tensor_split:
        assert {r.device for r in result.rows} >= {"CPU", "RPC0", "RPC1"}
