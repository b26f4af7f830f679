"""`plan --config NEW --against RUNNING`: what a reload would change, shown without applying it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_smart_proxy.supervisor.cli import main
from tests.service_harness import Harness


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


def test_against_a_saved_plan_lists_restarts_starts_and_stops(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    old = harness.write_config({"keep": {}, "change": {"ctx": 512}, "drop": {}}, name="old.toml")
    assert main(["plan", "--config", str(old), "--json"]) == 0
    running = harness.directory / "running-plan.json"
    running.write_text(capsys.readouterr().out)
    new = harness.write_config({"keep": {}, "change": {"ctx": 1024}, "new": {}}, name="new.toml")

    assert main(["plan", "--config", str(new), "--against", str(running)]) == 0
    out = capsys.readouterr().out
    assert "restart change" in out and "start new" in out and "stop drop" in out
    assert "keep" not in out


def test_against_a_status_answer_and_a_refused_reload(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    old = harness.write_config({"a": {}}, name="old.toml")
    assert main(["plan", "--config", str(old), "--json"]) == 0
    status = harness.directory / "status.json"
    status.write_text(json.dumps({"status": "ok", "plan": json.loads(capsys.readouterr().out)}))
    inventory = harness.write_inventory([64 * 1024**2])  # too small for a once it must use a GPU
    new = harness.write_config({"a": {"allow_cpu": False, "allow_partial": False}}, name="new.toml")

    code = main(["plan", "--config", str(new), "--inventory", str(inventory), "--against", str(status)])
    assert code == 3
    assert "a reload would be refused" in capsys.readouterr().out


def test_against_a_file_that_is_not_a_plan_is_one_clear_line(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    config = harness.write_config({"a": {}})
    bogus = harness.directory / "bogus.json"
    bogus.write_text('{"hello": 1}')
    assert main(["plan", "--config", str(config), "--against", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert f"{bogus}: not a plan or a /status answer" in err and "Traceback" not in err
