"""keep_cache at the edges, over real sockets and the FAKE llama-server: a save that hangs or a
busy slot never holds a stop past its bounds, a crash saves nothing and a cache is offered to one
start only, and a service stop saves what the next service run restores."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for
from tests.service_harness import Harness, Running


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


def cache_section(harness: Harness, **extra: str) -> str:
    lines = [f'dir = "{harness.directory / "cache"}"', 'disk_reserve = "0"', *(f"{k} = {v}" for k, v in extra.items())]
    return "\n".join(lines)


def post(running: Running, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{running.base}/v1/chat/completions", json={"model": model, "messages": [], **extra}, timeout=30)


def unload(running: Running, model: str) -> float:
    started = time.monotonic()
    running.portal.call(running.service.runtime.unload, model)
    return time.monotonic() - started


def test_a_save_that_does_not_answer_holds_the_stop_no_longer_than_save_timeout(harness: Harness) -> None:
    config = harness.write_config(
        {"a": {"keep_cache": True, "env": {"FAKE_LLAMA_SLOT_SAVE_MS": "60000"}}},
        prompt_cache=cache_section(harness, save_timeout='"1s"'),
    )
    with harness.serving(config) as running:
        assert post(running, "a").status_code == 200
        took = unload(running, "a")
        assert 1.0 <= took < 3.5, took  # the save's second, then SIGTERM (the fake exits at once)
        cache = running.model("a")["prompt_cache"]
        assert cache["slots_saved"] == 0 and "save_timeout" in cache["last_event"]
        assert running.model("a")["state"] == "stopped"


def test_a_busy_slot_is_not_saved_and_not_waited_for_beyond_the_drain(harness: Harness) -> None:
    config = harness.write_config(
        {"a": {"keep_cache": True}}, proxy='drain_timeout = "1s"', prompt_cache=cache_section(harness)
    )
    config.write_text(config.read_text().replace('drain_timeout = "10s"\n', ""))  # the harness's own
    with harness.serving(config) as running:
        assert post(running, "a").status_code == 200  # the slot holds tokens
        slow: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: slow.append(post(running, "a", fake={"delay_ms": 8000})), daemon=True)
        thread.start()
        wait_for(lambda: len(harness.events("request")) == 2, what="the slow request to reach the child")
        took = unload(running, "a")
        assert took < 3.5, took  # drain_timeout (1 s), the slot busy: no save to wait for
        cache = running.model("a")["prompt_cache"]
        assert cache["slots_saved"] == 0 and "1 busy slots not saved" in cache["last_event"]
        assert not harness.events("slot_save")
        thread.join(30)  # (answered 502, or 200 by a restarted child when the proxy asked again)
        assert slow


def test_a_crash_saves_nothing_and_a_saved_cache_is_offered_to_one_start_only(harness: Harness) -> None:
    config = harness.write_config({"a": {"keep_cache": True}}, prompt_cache=cache_section(harness))
    with harness.serving(config) as running:
        assert post(running, "a").status_code == 200
        unload(running, "a")  # a planned stop: saved
        assert [e["tokens"] for e in harness.events("slot_save")] == [100]
        assert post(running, "a").status_code == 200  # started again: restored, then served
        assert [e["tokens"] for e in harness.events("slot_restore")] == [100]
        pid = running.model("a")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: running.model("a")["pid"] not in (None, pid), what="the restart")
        running.wait_state("a", "ready")
        # the crash saved nothing, and the cache restored before it is not restored again
        assert len(harness.events("slot_save")) == 1 and len(harness.events("slot_restore")) == 1
        cache = running.model("a")["prompt_cache"]
        assert (cache["slots_saved"], cache["slots_restored"], cache["bytes_on_disk"]) == (1, 1, 0)


def test_a_service_stop_saves_and_the_next_run_restores_before_the_first_request(harness: Harness) -> None:
    config = harness.write_config({"a": {"keep_cache": True}}, prompt_cache=cache_section(harness))
    with harness.serving(config) as running:
        assert post(running, "a").status_code == 200
        assert post(running, "a").status_code == 200
    assert [e["tokens"] for e in harness.events("slot_save")] == [200]
    with harness.serving(config) as running:
        assert [e["tokens"] for e in harness.events("slot_restore")] == [200]  # before ready
        cache = running.model("a")["prompt_cache"]
        assert cache["slots_restored"] == 1 and cache["tokens_restored"] == 200
        restore_s = cache["last_restore_s"]
        assert restore_s is not None and running.model("a")["load_seconds"] >= restore_s
