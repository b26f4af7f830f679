"""Reloads: only what changed changes, under load; a bad new config leaves the old one serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from llama_smart_proxy.supervisor.proxy.backends import ActionRefused
from llama_smart_proxy.supervisor.service import reload_transaction
from tests.service_harness import Harness


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


def pids(running) -> dict[str, int | None]:
    return {m["name"]: m["pid"] for m in running.status()["models"]}


def test_reload_restarts_only_the_changed_model_and_routes_in_one_step(harness: Harness) -> None:
    config = harness.write_config({"keep": {"aliases": ["k"]}, "change": {"ctx": 512}, "drop": {}})
    with harness.serving(config) as running:
        before = pids(running)
        harness.write_config(
            {"keep": {"aliases": ["k", "k2"]}, "change": {"ctx": 1024}, "new": {}}
        )
        summary = running.reload()
        assert "restart change" in summary and "start new" in summary and "stop drop" in summary
        after = pids(running)
        assert after["keep"] == before["keep"]
        assert after["change"] not in (None, before["change"])
        assert after["new"] is not None and "drop" not in after
        assert running.chat("k2").status_code == 200
        assert running.chat("drop").status_code == 404
        status = running.status()
        assert status["last_reload"]["ok"] is True


def test_unchanged_config_reload_touches_nothing(harness: Harness) -> None:
    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        before = pids(running)
        assert "no change" in running.reload()
        assert pids(running) == before


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        ("syntax", "TOML syntax error"),
        ("schema", "models.a.ctx"),
        ("vanished", "file not found"),
        ("no_fit", "does not place"),
    ],
)
def test_bad_reload_is_refused_and_the_old_config_keeps_serving(harness: Harness, mistake: str, expected: str) -> None:
    inventory = harness.write_inventory([80 * 1024**3])
    config = harness.write_config({"a": {}, "b": {}})
    with harness.serving(config, inventory) as running:
        before = pids(running)
        if mistake == "syntax":
            config.write_text(config.read_text() + "\n[models.c\n")
        elif mistake == "schema":
            harness.write_config({"a": {"ctx": "huge"}, "b": {}})
        elif mistake == "vanished":
            harness.model_file("b").unlink()
        elif mistake == "no_fit":
            harness.write_config(
                {"a": {"ctx": 4096}, "b": {"allow_cpu": False, "allow_partial": False}}
            )
            harness.write_inventory([64 * 1024**2])  # the GPU "shrank": b no longer fits it
        with pytest.raises(ActionRefused, match=expected):
            running.reload()
        assert pids(running) == before
        assert running.chat("a").status_code == 200 and running.chat("b").status_code == 200
        status = running.status()
        assert status["last_reload"]["ok"] is False and expected in status["last_reload"]["summary"]
        assert any("last reload failed" in note for note in status["notes"])
        metrics = httpx.get(f"{running.base}/metrics", timeout=10).text
        assert 'llama_smart_proxy_reloads_total{result="failed"} 1' in metrics


def test_admin_reload_route_reports_a_refusal(harness: Harness) -> None:
    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        config.write_text("this is not toml = = \n")
        response = httpx.post(f"{running.base}/admin/reload", timeout=30)
        assert response.status_code == 409
        assert "TOML syntax error" in response.json()["error"]["message"]


def test_a_watched_save_is_reloaded_from_the_bytes_the_watcher_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The editor writes the same save again in place, and has truncated the file when the reload
    # reads it. Reading the file again, the old reload was refused as a broken config; the watcher,
    # having dealt with those bytes once, then never handed on the whole save that followed.
    config = harness.write_config({"a": {"ctx": 512}})
    with harness.serving(config, watch=True) as running:
        real_prepare = reload_transaction.prepare

        def prepare_while_the_editor_writes_again(source, **kwargs):  # type: ignore[no-untyped-def]
            saved = config.read_bytes()
            config.write_bytes(b"")
            try:
                return real_prepare(source, **kwargs)
            finally:
                config.write_bytes(saved)

        monkeypatch.setattr(reload_transaction, "prepare", prepare_while_the_editor_writes_again)
        harness.write_config({"a": {"ctx": 1024}})
        deadline = time.monotonic() + 10
        while running.status()["last_reload"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the rewrite settles in 0.5 s: a second reload would have begun by now
        status = running.status()
        assert status["last_reload"] is not None and status["last_reload"]["ok"], status["last_reload"]
        assert status["reloads"] == {"ok": 1, "failed": 0}
        assert running.service.runtime.prepared.loaded.config.models["a"].ctx == 1024


def test_hundred_reloads_under_load_lose_no_request(harness: Harness) -> None:
    base_models = {"steady": {"aliases": ["s"]}, "other": {}, "flip": {"ctx": 512}, "gone": {}}
    changed_models = {"steady": {"aliases": ["s"]}, "other": {}, "flip": {"ctx": 1024}, "extra": {}}
    config = harness.write_config(base_models)
    with harness.serving(config) as running:
        text_a = harness.write_config(base_models, name="a.toml").read_text()
        text_b = harness.write_config(changed_models, name="b.toml").read_text()
        steady_pids = {k: v for k, v in pids(running).items() if k in ("steady", "other")}
        stop = threading.Event()
        failures: list[str] = []
        counts = {"ok": 0, "streams": 0, "removed_404": 0}

        def load(model: str, stream: bool) -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    body = {"model": model, "messages": [], "stream": stream}
                    if stream:
                        body["fake"] = {"chunks": 5, "interval_ms": 10}
                    try:
                        response = client.post(f"{running.base}/v1/chat/completions", json=body)
                    except httpx.HTTPError as exc:
                        failures.append(f"{model}: {exc!r}")
                        continue
                    if response.status_code == 200:
                        if stream and not response.text.rstrip().endswith("data: [DONE]"):
                            failures.append(f"{model}: stream cut short: {response.text[-80:]!r}")
                        counts["streams" if stream else "ok"] += 1
                    elif response.status_code == 404 and model in ("gone", "extra"):
                        counts["removed_404"] += 1  # intended: the model is not in the config now
                        time.sleep(0.01)
                    else:
                        failures.append(f"{model}: {response.status_code} {response.text[:200]}")

        workers = [
            threading.Thread(target=load, args=args, daemon=True)
            for args in (("s", False), ("other", True), ("flip", False), ("flip", True), ("gone", False), ("extra", False))
        ]
        for w in workers:
            w.start()
        try:
            started = time.monotonic()
            for i in range(100):
                config.write_text(text_b if i % 2 == 0 else text_a)
                running.reload()
                assert {k: v for k, v in pids(running).items() if k in steady_pids} == steady_pids
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=30)
        assert not failures, failures[:5]
        assert counts["ok"] > 100 and counts["streams"] > 50, counts
        assert running.status()["reloads"] == {"ok": 100, "failed": 0}
        # streams to the model that restarts on every reload finished on its old children
        flip_pids = {e["pid"] for e in harness.events("start") if any(a.endswith("flip.gguf") for a in e["argv"])}
        final_pid = pids(running)["flip"]
        assert len(flip_pids) > 50
        finished_on_old = [e for e in harness.events("done") if e["pid"] in flip_pids - {final_pid}]
        assert finished_on_old, "no request finished on a replaced child"
        assert not harness.events("aborted") and not harness.events("die")
        print(f"100 reloads in {elapsed:.1f}s with {counts}")
