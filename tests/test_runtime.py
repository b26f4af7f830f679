"""The runtime behind the proxy, over real sockets and FAKE llama-server children: on-demand
starts, queueing while loading, eviction by memory, TTL, failed models, admin actions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for
from tests.service_harness import Harness


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


def concurrently(*calls):
    """Run the calls in threads at once; return their results in order."""
    results: list = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_resident_models_answer_through_the_proxy_by_name_and_alias(harness: Harness) -> None:
    config = harness.write_config({"a": {"aliases": ["first"]}, "b": {}})
    with harness.serving(config) as running:
        assert running.chat("a").json()["echo"]["model"] == "a"
        assert running.chat("first").status_code == 200
        assert running.chat("b").status_code == 200
        assert running.chat("nope").status_code == 404
        assert {m["name"]: m["state"] for m in running.status()["models"]} == {"a": "ready", "b": "ready"}


def test_requests_wait_while_an_on_demand_model_loads_and_it_starts_once(harness: Harness) -> None:
    config = harness.write_config({"lazy": {"mode": "on-demand", "env": {"FAKE_LLAMA_LOAD_S": "1"}}})
    with harness.serving(config) as running:
        assert running.model("lazy")["state"] == "stopped"
        responses = concurrently(*[lambda: running.chat("lazy")] * 4)
        assert [r.status_code for r in responses] == [200] * 4
        assert len(harness.events("start")) == 1


def test_full_queue_answers_503_with_retry_after(harness: Harness) -> None:
    config = harness.write_config(
        {"lazy": {"mode": "on-demand", "env": {"FAKE_LLAMA_LOAD_S": "2"}}}, proxy="queue_limit = 1"
    )
    with harness.serving(config) as running:
        responses = concurrently(lambda: running.chat("lazy"), lambda: running.chat("lazy"), lambda: running.chat("lazy"))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 503, 503]
        refused = next(r for r in responses if r.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1
        assert "queue_full" in refused.text


def test_queue_timeout_answers_503_not_a_hang(harness: Harness) -> None:
    config = harness.write_config(
        {"slow": {"mode": "on-demand", "env": {"FAKE_LLAMA_LOAD_S": "30"}}}, proxy='queue_timeout = "500ms"'
    )
    with harness.serving(config) as running:
        response = running.chat("slow")
        assert response.status_code == 503 and "load_timeout" in response.text


def test_failed_model_answers_503_with_its_reason_and_reset_clears_it(harness: Harness) -> None:
    config = harness.write_config(
        {"broken": {"mode": "on-demand", "env": {"FAKE_LLAMA_EXIT_CODE": "3"}}},
        llama_server="crash_loop_deaths = 2",
    )
    with harness.serving(config) as running:
        first = running.chat("broken")
        assert first.status_code == 503
        running.wait_state("broken", "failed")
        again = running.chat("broken")
        assert again.status_code == 503 and "failed" in again.text and "exit" in again.text.lower()
        reset = httpx.post(f"{running.base}/admin/models/broken/reset", timeout=10)
        assert reset.status_code == 200
        assert running.model("broken")["state"] == "stopped"


def gpu_config(harness: Harness, **models_extra) -> tuple[Path, Path, int]:
    """Two on-demand models that each fit the one GPU alone but not together."""
    models = {name: {"mode": "on-demand", **models_extra.get(name, {})} for name in ("a", "b")}
    config = harness.write_config(models)
    probe = harness.write_inventory([80 * 1024**3], name="probe.json")
    from llama_smart_proxy.supervisor.planning.prepare import Source, prepare

    estimate = prepare(Source(config, inventory_path=probe)).plan.model("a").estimate
    assert estimate is not None and estimate.gpus
    need = estimate.gpus[0].total_bytes
    inventory = harness.write_inventory([need * 3 // 2])
    return config, inventory, need


def test_idle_on_demand_model_is_evicted_by_memory_to_start_another(harness: Harness) -> None:
    config, inventory, _ = gpu_config(harness)
    with harness.serving(config, inventory) as running:
        assert running.chat("a").status_code == 200
        assert running.chat("b").status_code == 200
        assert running.model("a")["state"] == "stopped"
        assert running.model("b")["state"] == "ready"
        assert running.chat("a").status_code == 200
        assert running.model("b")["state"] == "stopped"


def test_busy_model_is_never_evicted_its_rival_waits(harness: Harness) -> None:
    config, inventory, _ = gpu_config(harness)
    with harness.serving(config, inventory) as running:
        with httpx.stream(
            "POST", f"{running.base}/v1/chat/completions",
            json={"model": "a", "stream": True, "fake": {"chunks": 10, "interval_ms": 100}}, timeout=30,
        ) as stream:  # fmt: skip
            chunks = stream.iter_raw()
            next(chunks)  # a is now busy
            waiting: list[httpx.Response] = []
            rival = threading.Thread(target=lambda: waiting.append(running.chat("b")))
            rival.start()
            wait_for(lambda: running.model("b")["queued"] == 1, what="b queued")
            assert running.model("a")["state"] == "ready"  # not evicted while streaming
            rest = b"".join(chunks)
            assert b"[DONE]" in rest
        rival.join(timeout=30)
        assert waiting and waiting[0].status_code == 200
        assert running.model("a")["state"] == "stopped"


def test_idle_ttl_unloads_an_on_demand_model(harness: Harness) -> None:
    config = harness.write_config({"brief": {"mode": "on-demand", "idle_ttl": "1s"}})
    with harness.serving(config) as running:
        assert running.chat("brief").status_code == 200
        pid = running.model("brief")["pid"]
        assert pid is not None
        running.wait_state("brief", "stopped", timeout=10)
        assert running.model("brief")["pid"] is None


def test_an_admin_load_is_not_idle_past_its_ttl_at_once(harness: Harness) -> None:
    # the model's entry is older than its idle_ttl and it was never used: its idle time starts
    # when it is loaded, not when the service started
    config = harness.write_config({"warm": {"mode": "on-demand", "idle_ttl": "2s"}})
    with harness.serving(config) as running:
        time.sleep(2.2)
        assert httpx.post(f"{running.base}/admin/models/warm/load", timeout=10).status_code == 200
        time.sleep(1.0)
        assert running.model("warm")["state"] == "ready"
        running.wait_state("warm", "stopped", timeout=10)  # and it is unloaded once idle for 2 s


def test_admin_load_and_unload_a_model(harness: Harness) -> None:
    config = harness.write_config({"m": {"mode": "on-demand"}})
    with harness.serving(config) as running:
        assert httpx.post(f"{running.base}/admin/models/m/load", timeout=10).status_code == 200
        assert running.model("m")["state"] == "ready"
        assert httpx.post(f"{running.base}/admin/models/m/unload", timeout=10).status_code == 200
        assert running.model("m")["state"] == "stopped"
        assert httpx.post(f"{running.base}/admin/models/zzz/load", timeout=10).status_code == 404


def test_max_concurrency_holds_extra_requests_until_one_finishes(harness: Harness) -> None:
    config = harness.write_config({"one": {"max_concurrency": 1}})
    with harness.serving(config) as running:
        body = {"model": "one", "messages": [], "stream": True, "fake": {"chunks": 5, "interval_ms": 60}}
        responses = concurrently(
            lambda: httpx.post(f"{running.base}/v1/chat/completions", json=body, timeout=30),
            lambda: httpx.post(f"{running.base}/v1/chat/completions", json=body, timeout=30),
        )
        assert [r.status_code for r in responses] == [200, 200]
        # the child notes "done" after its last write: the client may have read it first
        done = wait_for(lambda: len(d := harness.events("done")) == 2 and d, what="both requests done")
        requests = harness.events("request")
        assert len(requests) == 2
        # the child saw the second request only after the first had finished
        assert requests[1]["t"] >= done[0]["t"]
