"""The runtime's fault handling with the REAL llama-server on the tiny model: a child killed under
load, a child stopped (SIGSTOP) while ready, and a SIGTERM drain with keep-alive connections open."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.supervision import pid_alive
from tests.helpers import wait_for
from tests.service_harness import Harness

pytestmark = pytest.mark.llama_server

QUICK_HEALTH = 'health_interval = "200ms"\nhealth_timeout = "500ms"\nhealth_failures = 2\nstall_timeout = "3s"'


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path, llama_server: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model, binary=llama_server)


def chat(base: str, client: httpx.Client, stream: bool) -> httpx.Response:
    body = {"model": "t", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "stream": stream}
    return client.post(f"{base}/v1/chat/completions", json=body)


def test_killing_a_child_under_load_fails_only_the_requests_in_flight_at_the_kill(harness: Harness) -> None:
    config = harness.write_config({"t": {"ctx": 512}})
    with harness.serving(config) as running:
        pid = running.model("t")["pid"]
        stop = threading.Event()
        results: list[tuple[float, float, str | None]] = []  # (sent, ended, failure)

        def client_loop(stream: bool) -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        response = chat(running.base, client, stream)
                        failure = None if response.status_code == 200 else f"{response.status_code} {response.text[:200]}"
                        if failure is None and stream and "[DONE]" not in response.text:
                            failure = "stream cut short"
                    except httpx.HTTPError as exc:
                        failure = f"{type(exc).__name__}: {exc}"
                    results.append((sent, time.monotonic(), failure))

        clients = [threading.Thread(target=client_loop, args=(i % 2 == 1,), daemon=True) for i in range(4)]
        for c in clients:
            c.start()
        wait_for(lambda: len(results) >= 20, timeout=60, what="requests flowing")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: running.model("t")["pid"] not in (None, pid), timeout=60, what="the restart")
        restarted = len(results)
        wait_for(lambda: len(results) >= restarted + 20, timeout=60, what="requests after the restart")
        stop.set()
        for c in clients:
            c.join(timeout=60)
        failed = [(sent, ended, why) for sent, ended, why in results if why is not None]
        not_in_flight = [f for f in failed if not (f[0] <= killed_at <= f[1])]
        assert not not_in_flight, not_in_flight
        assert len(failed) <= 4  # at most one per client: the one it had in flight
        assert all("its server stopped" in why or "cut short" in why or "Error" in why for _, _, why in failed), failed
        assert running.model("t")["restarts"] == 1


def test_a_stopped_child_is_restarted_within_the_health_window_and_serves_again(harness: Harness) -> None:
    config = harness.write_config({"t": {"ctx": 512}}, llama_server=QUICK_HEALTH)
    with harness.serving(config) as running:
        pid = running.model("t")["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            wait_for(lambda: running.model("t")["pid"] not in (None, pid), timeout=30, what="a new child")
            noticed_s = time.monotonic() - stopped_at
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        # 2 probes of up to 200 ms + 500 ms each, then SIGKILL: well under 3 s
        assert noticed_s < 3, noticed_s
        running.wait_state("t", "ready", timeout=60)
        with httpx.Client(timeout=60) as client:
            assert chat(running.base, client, stream=False).status_code == 200
        assert running.model("t")["restarts"] == 1 and not pid_alive(pid)


def test_sigterm_with_keepalive_connections_open_exits_within_the_drain_and_the_stop_grace(harness: Harness) -> None:
    drain_s, grace_s = 3.0, 2.0  # the harness's stop_grace is 2 s
    config = harness.write_config({"t": {"ctx": 512}})
    config.write_text(config.read_text().replace('drain_timeout = "10s"', f'drain_timeout = "{drain_s:g}s"'))
    log_path = harness.directory / "serve.log"
    base = f"http://{harness.listen}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_smart_proxy.supervisor", "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(lambda: _ready(base, process, log_path), timeout=60, what="serve to be ready")
            host, port = harness.listen.split(":")
            idle = [socket.create_connection((host, int(port))) for _ in range(3)]
            for sock in idle:  # each has served a request and stays open (keep-alive)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            with httpx.Client(timeout=60) as client:
                assert chat(base, client, stream=False).status_code == 200  # and keeps its connection
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                for sock in idle:
                    sock.settimeout(drain_s)
                    assert sock.recv(65536) == b""  # closed at once by the drain
                code = process.wait(timeout=drain_s + grace_s + 10)
                elapsed = time.monotonic() - signalled
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert code == 0, log_path.read_text()[-3000:]
    assert elapsed <= drain_s + grace_s, elapsed


def _ready(base: str, process: subprocess.Popen, log: Path) -> bool:
    assert process.poll() is None, f"serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
    try:
        status = httpx.get(f"{base}/status", timeout=2).json()
    except httpx.HTTPError:
        return False
    return all(m["state"] == "ready" for m in status["models"])
