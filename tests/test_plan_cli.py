"""`plan` and `inventory` as a user runs them: exit codes, snapshots without the GGUF files, JSON
that validates against schemas/plan.schema.json, recorded headers and stale ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.supervisor.cli import main
from llama_smart_proxy.supervisor.planning.inventory import dump_inventory, load_inventory
from tests.fakes.fake_pynvml import FakeNvml, gpu
from tests.json_schema import validate

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
PLAN_SCHEMA = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The example configs and snapshots in a directory where no GGUF file exists."""
    for name in ["multi-gpu.toml", "datacenter.toml", "minimal.toml", "api-keys.txt", *[p.name for p in EXAMPLES.glob("inventory-*.json")]]:
        shutil.copy(EXAMPLES / name, tmp_path / name)
    assert not list(tmp_path.rglob("*.gguf"))
    return tmp_path


def model_of(plan_json: str, name: str) -> dict:  # type: ignore[type-arg]
    # read as data: an Estimate's computed total_bytes does not validate back into the model
    return next(m for m in json.loads(plan_json)["models"] if m["name"] == name)


def run_plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_example_snapshot_loads_through_the_schema() -> None:
    snapshots = sorted(EXAMPLES.glob("inventory-*.json"))
    assert [p.name for p in snapshots] == [
        "inventory-1x24gb.json", "inventory-2x24gb.json", "inventory-4x80gb.json", "inventory-no-gpu.json",
    ]  # fmt: skip
    for path in snapshots:
        inventory = load_inventory(path)
        assert inventory.models, f"{path.name} records no model headers"


@pytest.mark.parametrize(
    ("config", "snapshot", "code"),
    [
        ("multi-gpu.toml", "2x24gb", 0),
        ("multi-gpu.toml", "4x80gb", 0),
        ("multi-gpu.toml", "1x24gb", 3),
        ("multi-gpu.toml", "no-gpu", 3),
        ("datacenter.toml", "4x80gb", 0),
        ("minimal.toml", "no-gpu", 0),
    ],
)
def test_examples_plan_from_snapshots_without_the_gguf_files(
    workdir: Path, capsys: pytest.CaptureFixture[str], config: str, snapshot: str, code: int
) -> None:
    got, out, _ = run_plan(capsys, "--config", str(workdir / config), "--inventory", str(workdir / f"inventory-{snapshot}.json"))
    assert got == code, out
    assert "Result: " in out and f"(exit {code})" in out
    assert "snapshot" in out and "matched by file name" in out


def test_exit_0_when_everything_is_placed_and_the_table_adds_up(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_plan(capsys, "-c", str(workdir / "multi-gpu.toml"), "-i", str(workdir / "inventory-2x24gb.json"))
    assert code == 0
    # per GPU: free - reserve = usable; usable - each resident share = free after, as printed
    gpu_blocks = [b.split("\n\n")[0] for b in out.split("\nGPU ")[1:]]
    assert len(gpu_blocks) == 2
    for block in gpu_blocks:
        rows = dict(
            (line.strip().rsplit(None, 1)[0], int(line.strip().rsplit(None, 1)[1].replace(",", "")))
            for line in block.splitlines()[1:]
            if line.startswith("    ") and not line.strip().startswith("(")
        )
        shares = sum(v for k, v in rows.items() if k not in ("total", "free", "reserve", "usable", "free after"))
        assert rows["free"] + rows["reserve"] == rows["usable"]
        assert rows["usable"] + shares == rows["free after"]
    assert "qwen2_5-7b  resident   10    GPU 0" in out
    assert "llama-70b   on-demand  -5    GPU 0+1, 63/81 layers" in out


def test_exit_4_with_strict_when_a_model_falls_back_to_partial_offload(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_plan(capsys, "-c", str(workdir / "multi-gpu.toml"), "-i", str(workdir / "inventory-2x24gb.json"), "--strict")
    assert code == 4
    assert "--strict: fell back from the GPU: llama-70b (partial) (exit 4)" in out


def test_exit_3_names_the_model_that_cannot_be_placed_and_how_much_it_lacks(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_plan(capsys, "-c", str(workdir / "multi-gpu.toml"), "-i", str(workdir / "inventory-1x24gb.json"), "--json")
    assert code == 3
    coder = model_of(out, "coder")
    assert coder["placement"] == "unplaced" and coder["short_bytes"] > 0 and "gpus = [1]" in coder["reason"]
    assert "cannot be placed: coder (5.4 GiB short)" in err


def test_json_validates_against_the_committed_schema_and_is_byte_identical_across_runs(workdir: Path) -> None:
    command = [
        sys.executable, "-m", "llama_smart_proxy.supervisor", "plan", "--config", str(workdir / "datacenter.toml"),
        "--inventory", str(workdir / "inventory-4x80gb.json"), "--json",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    data = json.loads(first.stdout)
    assert validate(data, PLAN_SCHEMA) == []
    assert {m["placement"] for m in data["models"]} == {"gpu", "split", "cpu"}


def test_the_schema_check_catches_a_wrong_plan() -> None:
    bad = {"gpus": [], "models": [{"name": "x", "placement": "moon"}], "notes": [], "on_demand_groups": [], "extra": 1}
    problems = validate(bad, PLAN_SCHEMA)
    assert any("extra" in p for p in problems) and any("moon" in p or "placement" in p for p in problems)


def test_a_present_file_is_used_and_a_stale_record_of_it_reported(workdir: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "models").mkdir()
    shutil.copy(tiny_model, workdir / "models" / "tiny.gguf")  # newer than the snapshot's record
    code, out, _ = run_plan(capsys, "-c", str(workdir / "minimal.toml"), "-i", str(workdir / "inventory-no-gpu.json"), "--json")
    assert code == 0
    tiny = model_of(out, "tiny")
    assert tiny["header_source"] == "file" and tiny["placement"] == "cpu"
    stale = [n for n in json.loads(out)["notes"] if "does not match the file here" in n]
    assert len(stale) == 1 and "/srv/llama/models/tiny.gguf" in stale[0] and "planned from the file" in stale[0]


def test_a_missing_file_without_a_record_cannot_be_planned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[models.ghost]\nfile = "ghost.gguf"\n')
    snapshot = tmp_path / "inv.json"
    snapshot.write_text((EXAMPLES / "inventory-no-gpu.json").read_text())
    code, out, _ = run_plan(capsys, "-c", str(config), "-i", str(snapshot))
    assert code == 3
    assert "the snapshot records no header for it" in out and "ghost" in out


def test_a_broken_snapshot_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[models.a]\nfile = "a.gguf"\n')
    (tmp_path / "inv.json").write_text('{"gpus": "none"}')
    code, out, err = run_plan(capsys, "-c", str(config), "-i", str(tmp_path / "inv.json"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "inv.json: not an inventory snapshot" in err


def test_inventory_json_with_config_records_every_models_header(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices=[gpu(0), gpu(1)]))
    shutil.copy(tiny_model, tmp_path / "tiny.gguf")
    config = tmp_path / "c.toml"
    config.write_text('[models.a]\nfile = "tiny.gguf"\n[models.b]\nfile = "missing.gguf"\n')
    assert main(["inventory", "--json", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    inventory = Inventory.model_validate_json(out)
    assert [g.index for g in inventory.gpus] == [0, 1] and inventory.nvml_status == "ok"
    stat = (tmp_path / "tiny.gguf").stat()
    header = inventory.models[str(tmp_path / "tiny.gguf")]
    assert (header.file_size, header.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert header.tensors and header.architecture == "llama"
    assert any("models.b.file: header not recorded" in w for w in inventory.warnings)
    assert out == dump_inventory(inventory)


def test_a_snapshot_plans_the_same_in_another_directory_once_the_files_are_gone(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production: take the snapshot where the files are. CI: plan elsewhere, without them."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices=[gpu(0)]))
    production, ci = tmp_path / "prod", tmp_path / "ci"
    for d in (production, ci):
        d.mkdir()
        (d / "c.toml").write_text('[models.a]\nfile = "models/tiny.gguf"\nallow_cpu = false\n')
    (production / "models").mkdir()
    shutil.copy(tiny_model, production / "models" / "tiny.gguf")
    assert main(["inventory", "--json", "--config", str(production / "c.toml")]) == 0
    (ci / "snapshot.json").write_text(capsys.readouterr().out)
    assert main(["plan", "-c", str(production / "c.toml"), "-i", str(ci / "snapshot.json"), "--json"]) == 0
    there = model_of(capsys.readouterr().out, "a")
    assert main(["plan", "-c", str(ci / "c.toml"), "-i", str(ci / "snapshot.json"), "--json"]) == 0
    here = model_of(capsys.readouterr().out, "a")
    assert there["header_source"] == "file" and here["header_source"] == "snapshot"
    assert here["placement"] == there["placement"] == "gpu"
    assert here["estimate"]["gpus"] == there["estimate"]["gpus"] and here["estimate"]["host"] == there["estimate"]["host"]


def test_the_ci_snippet_runs_commands_the_cli_accepts() -> None:
    from llama_smart_proxy.supervisor.cli import build_parser

    text = (EXAMPLES / "ci-plan-check.yml").read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("llama-smart-proxy ")]
    assert any(" plan " in c and "--inventory" in c for c in commands)
    for command in commands:
        words = command.split(">")[0].split("||")[0].split()[1:]
        args = build_parser().parse_args(words)
        assert args.handler.__name__ in ("cmd_plan", "cmd_inventory")


def test_plan_without_a_snapshot_reads_this_machine_through_nvml(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices=[gpu(0), gpu(1, used=20 * 1024**3)]))
    shutil.copy(tiny_model, tmp_path / "tiny.gguf")
    config = tmp_path / "c.toml"
    config.write_text('[gpus]\npolicy = "spread"\n[models.a]\nfile = "tiny.gguf"\n')
    code, out, _ = run_plan(capsys, "-c", str(config), "--json")
    assert code == 0
    a = model_of(out, "a")
    assert (a["placement"], a["gpus"], a["header_source"]) == ("gpu", [0], "file")
    assert a["launch"]["devices"] == ["GPU-00000000-1111-2222-3333-444444444444"]
