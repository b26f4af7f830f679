"""benchmarks/gpu_e2e.py, the one-call GPU end-to-end check, run as its CPU smoke run: the same
steps (inventory, plan, serve, a request per model, each child's CUDA_VISIBLE_DEVICES, a clean
stop) with the real llama-server on the tiny model, so the script stays runnable for whoever is
lent a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu_e2e import main

pytestmark = [pytest.mark.llama_server, pytest.mark.slow]


def test_the_gpu_check_runs_end_to_end_as_a_cpu_smoke_run(llama_server: Path, tmp_path: Path) -> None:
    assert main(["--cpu-smoke", "--llama-server", str(llama_server), "--out", str(tmp_path)]) == 0
    steps = {s["step"]: s["outcome"] for s in json.loads((tmp_path / "gpu-e2e.json").read_text())["steps"]}
    assert steps["serve"] == steps["stop"] == "PASS"
    assert steps["CUDA_VISIBLE_DEVICES tiny"] == "PASS" and steps["nvml per process"] == "SKIP"
