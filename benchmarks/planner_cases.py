"""Planner inputs for the benchmarks and the property tests: 64 models on 8 GPUs, small instances
built to be hard (bin packing that a greedy gets wrong, splits of many-layer models, a host that
cannot hold every CPU fallback, priorities with on-demand models to keep room for), and the files
of a CI dry run (64 models planned from a snapshot that records their headers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.accuracy.shapes import SHAPES
from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.inventory import Gpu, Host, Inventory
from llama_smart_proxy.supervisor.planning.inventory import dump_inventory
from tests.planning import GIB, MIB, make_config, make_inventory, make_profile

Instance = tuple[Config, Inventory, dict[str, MemoryProfile]]


def sixty_four_models(gpu_gib: int, scale: float, *, ram: int = 1024 * GIB, splits: bool = True) -> Instance:
    """64 models of 20-79 layers, mixed priorities, flags and modes, on 8 equal GPUs."""
    models = {
        f"m{i:02d}": {
            "priority": i % 3,
            "mode": "on-demand" if i % 8 == 7 else "resident",
            "allow_cpu": i % 5 != 0,
            "allow_partial": i % 4 != 0,
            "allow_split": splits,
            "gpus": [i % 8, (i + 3) % 8] if i % 6 == 0 else None,
        }
        for i in range(64)
    }
    models = {name: {k: v for k, v in table.items() if v is not None} for name, table in models.items()}
    config = make_config(models, gpus={"reserve": "1GiB"})
    inventory = make_inventory([gpu_gib * GIB] * 8, ram=ram)
    profiles = {
        name: make_profile(n_layers=20 + (i * 7) % 60, layer=int((40 + (i * 37) % 160) * MIB * scale))
        for i, name in enumerate(models)
    }
    return config, inventory, profiles


def _gib_model(gib: float, n_layers: int = 40) -> MemoryProfile:
    """A model that needs about `gib` GiB whole on one GPU (default profile costs: 900 MiB fixed)."""
    layer = max(1, int((gib * 1024 - 900) / n_layers - 8)) * MIB
    return make_profile(n_layers=n_layers, layer=layer)


def packing_seven_on_three() -> Instance:
    """Seven strict models on three GPUs: in plan order each takes the fullest GPU that fits and
    three run whole; pairing them differently runs six (the issue's 7-on-3 case)."""
    sizes = {"a": 11.0, "b": 11.0, "c": 11.0, "d": 8.9, "e": 8.9, "f": 8.9, "g": 7.0}
    strict = {"allow_split": False, "allow_partial": False, "allow_cpu": False}
    config = make_config({name: strict for name in sizes}, gpus={"reserve": 0})
    return config, make_inventory([20 * GIB] * 3), {name: _gib_model(gib) for name, gib in sizes.items()}


def splits_eight_on_four() -> Instance:
    """Eight models on four GPUs, four of them bigger than any GPU (split or partial, 60-80
    layers, every layer cut a choice), four that fit one GPU each but not all at once."""
    tables: dict[str, dict[str, object]] = {}
    profiles = {}
    for i, gib in enumerate([26.0, 22.0, 30.0, 19.0]):
        tables[f"big{i}"] = {"priority": 1, "allow_cpu": False}
        profiles[f"big{i}"] = _gib_model(gib, n_layers=60 + 5 * i)
    for i, gib in enumerate([9.0, 7.5, 11.0, 6.0]):
        tables[f"small{i}"] = {"allow_cpu": i % 2 == 0}
        profiles[f"small{i}"] = _gib_model(gib)
    config = make_config(tables, gpus={"reserve": "512MiB"})
    return config, make_inventory([16 * GIB, 16 * GIB, 24 * GIB, 24 * GIB], ram=96 * GIB), profiles


def host_bound_eight_on_two() -> Instance:
    """Eight models on two small GPUs and 40 GiB of host RAM: most cannot run whole, and the host
    cannot take every one that falls back to partial offload or the CPU."""
    tables = {f"m{i}": {"priority": i % 2, "allow_partial": i % 3 != 0, "allow_cpu": True} for i in range(8)}
    profiles = {f"m{i}": _gib_model(6.0 + i, n_layers=32 + 4 * i) for i in range(8)}
    config = make_config(tables, gpus={"reserve": 0}, host={"reserve": "2GiB"})
    return config, make_inventory([12 * GIB, 12 * GIB], ram=40 * GIB), profiles


def priorities_eight_on_four() -> Instance:
    """Six residents and two on-demand models of higher priority on four equal GPUs, pins on
    half of them: the residents must leave the on-demand models their room."""
    tables: dict[str, dict[str, object]] = {
        "vision": {"mode": "on-demand", "priority": 5, "allow_partial": False, "allow_cpu": False},
        "coder": {"mode": "on-demand", "priority": 3, "allow_cpu": False},
    }
    profiles = {"vision": _gib_model(14.0), "coder": _gib_model(10.0)}
    for i in range(6):
        tables[f"r{i}"] = {"priority": i % 3, **({"gpus": [i % 4, (i + 1) % 4]} if i % 2 else {})}
        profiles[f"r{i}"] = _gib_model(5.0 + 1.5 * i)
    config = make_config(tables, gpus={"reserve": "1GiB", "policy": "spread"})
    return config, make_inventory([24 * GIB] * 4), profiles


def symmetric_eight_on_four() -> Instance:
    """Eight strict models that cannot all fit on four identical GPUs: every permutation of the
    GPUs is the same plan, which the search folds together."""
    sizes = [9.5, 9.5, 8.5, 8.5, 7.5, 7.5, 6.0, 13.0]
    strict = {"allow_split": False, "allow_partial": False, "allow_cpu": False}
    tables = {f"s{i}": strict for i in range(len(sizes))}
    config = make_config(tables, gpus={"reserve": 0})
    return config, make_inventory([20 * GIB] * 4), {f"s{i}": _gib_model(g) for i, g in enumerate(sizes)}


ADVERSARIAL: dict[str, Callable[[], Instance]] = {
    "packing-7-on-3": packing_seven_on_three,
    "splits-8-on-4": splits_eight_on_four,
    "host-bound-8-on-2": host_bound_eight_on_two,
    "priorities-8-on-4": priorities_eight_on_four,
    "symmetric-8-on-4": symmetric_eight_on_four,
}

CI_SHAPES = [
    "llama-3.1-8b", "qwen2.5-7b", "mistral-7b-v0.3", "qwen3-8b", "gemma-2-9b", "gemma-3-4b", "phi-3-mini-4k",
    "qwen2.5-0.5b", "llama-3.2-1b", "lfm2-1.2b", "mamba-2.8b", "qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b",
    "bge-base-en-v1.5", "nomic-embed-text-v1.5",
]  # fmt: skip


def write_ci_dry_run(directory: Path) -> tuple[Path, Path]:
    """A config of 64 models (16 real shapes, each four times under its own path) and a snapshot
    of an 8 x 80 GB machine that records every header: what a CI job plans against."""
    directory.mkdir(parents=True, exist_ok=True)
    headers = {}
    lines = ['[gpus]', 'reserve = "1GiB"', '']
    for i in range(64):
        shape = SHAPES[CI_SHAPES[i % len(CI_SHAPES)]]
        path = f"/srv/models/m{i:02d}-{shape.name}.gguf"
        headers[path] = shape.header(path)
        lines += [f"[models.m{i:02d}]", f'file = "{path}"', f"ctx = {[4096, 8192, 16384][i % 3]}", f"priority = {i % 3}"]
        lines += ['mode = "on-demand"'] if i % 8 == 7 else []
        lines.append("")
    gpus = [
        Gpu(index=g, uuid=f"GPU-{g:08d}-0000-0000-0000-000000000000", pci_bus_id=f"00000000:{g + 1:02X}:00.0",
            name="NVIDIA A100-SXM4-80GB", total_bytes=80 * GIB, used_bytes=0, free_bytes=80 * GIB)
        for g in range(8)
    ]  # fmt: skip
    inventory = Inventory(
        nvml_status="ok", message="8 NVIDIA GPUs", gpus=gpus,
        host=Host(ram_total_bytes=1024 * GIB, ram_available_bytes=1000 * GIB, cpu_count=64),
        hostname="ci", taken_at="2026-01-15T09:30:00+00:00", models=headers,
    )  # fmt: skip
    config, snapshot = directory / "config.toml", directory / "inventory.json"
    config.write_text("\n".join(lines))
    snapshot.write_text(dump_inventory(inventory))
    return config, snapshot
