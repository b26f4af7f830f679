"""Planner speed goals (issue 4), with a baseline measured in the same run:

- planning 64 models on 8 GPUs takes under 100 ms (baseline: one model on one GPU);
- `plan` on the multi-GPU example, end to end as a command, takes under 1 s (baseline: starting
  the interpreter and importing the CLI, which every command pays).

Run: `make bench`, or `python -m pytest benchmarks/test_planner_bench.py --benchmark-only`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.timing import median_seconds
from llama_smart_proxy.supervisor.planner import plan
from tests.planning import GIB, MIB, make_config, make_inventory, make_profile

ROOT = Path(__file__).parent.parent
GOAL_64_ON_8_S = 0.100
GOAL_COMMAND_S = 1.0


def sixty_four_models(gpu_gib: int, scale: float):  # type: ignore[no-untyped-def]
    """64 models of 20-79 layers, mixed priorities, flags and modes, on 8 equal GPUs."""
    models = {
        f"m{i:02d}": {
            "priority": i % 3,
            "mode": "on-demand" if i % 8 == 7 else "resident",
            "allow_cpu": i % 5 != 0,
            "allow_partial": i % 4 != 0,
            "gpus": [i % 8, (i + 3) % 8] if i % 6 == 0 else None,
        }
        for i in range(64)
    }
    models = {name: {k: v for k, v in table.items() if v is not None} for name, table in models.items()}
    config = make_config(models, gpus={"reserve": "1GiB"})
    inventory = make_inventory([gpu_gib * GIB] * 8)
    profiles = {
        name: make_profile(n_layers=20 + (i * 7) % 60, layer=int((40 + (i * 37) % 160) * MIB * scale))
        for i, name in enumerate(models)
    }
    return config, inventory, profiles


SCENARIOS = {
    "all-fit-80GB": (80, 1.0),  # every model whole on a GPU: the first arrangement is proven best
    "tight-24GB": (24, 1.0),  # some split, partial, CPU and unplaced: the search spends its budget
    "very-tight-24GB": (24, 3.0),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_plan_64_models_on_8_gpus_under_100_ms(benchmark, scenario: str) -> None:  # type: ignore[no-untyped-def]
    config, inventory, profiles = sixty_four_models(*SCENARIOS[scenario])
    one = make_config({"m": {}})
    one_inventory, one_profiles = make_inventory([24 * GIB]), {"m": make_profile()}
    baseline = median_seconds(lambda: plan(one, one_inventory, one_profiles), rounds=20)

    result = benchmark(plan, config, inventory, profiles)

    median = benchmark.stats.stats.median
    placements: dict[str, int] = {}
    for m in result.models:
        placements[m.placement] = placements.get(m.placement, 0) + 1
    benchmark.extra_info.update(
        {
            "baseline_one_model_s": baseline,
            "ratio_to_baseline": median / baseline,
            "placements": placements,
            "proven_best": not any("stopped after" in n for n in result.notes),
        }
    )
    assert len(result.models) == 64
    assert median < GOAL_64_ON_8_S, f"{scenario}: median {median * 1000:.1f} ms, goal {GOAL_64_ON_8_S * 1000:.0f} ms"


def test_plan_command_on_the_multi_gpu_example_under_1_s(benchmark) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plan_command = [
        sys.executable, "-m", "llama_smart_proxy.supervisor", "plan", "--config", str(ROOT / "examples" / "multi-gpu.toml"),
        "--inventory", str(ROOT / "examples" / "inventory-2x24gb.json"),
    ]  # fmt: skip
    import_only = [sys.executable, "-c", "import supervisor.cli"]

    def run(command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr

    baseline = median_seconds(lambda: run(import_only), rounds=5)
    benchmark.pedantic(run, args=(plan_command,), rounds=7, iterations=1, warmup_rounds=1)

    median = benchmark.stats.stats.median
    benchmark.extra_info.update({"baseline_import_cli_s": baseline, "ratio_to_baseline": median / baseline})
    assert median < GOAL_COMMAND_S, f"plan command: median {median:.2f} s, goal {GOAL_COMMAND_S} s"
