"""`llama-smart-proxy serve` as a real process: signals, systemd's notify socket, --watch, the
built-in demo on the real llama-server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.fakes.supervision import pid_alive
from tests.helpers import free_port, wait_for
from tests.service_harness import Harness


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


@contextmanager
def serve_process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_smart_proxy.supervisor", "serve", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    def ready() -> dict | None:
        assert process.poll() is None, f"serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            status = httpx.get(f"{base}/status", timeout=2).json()
        except httpx.HTTPError:
            return None
        models = status["models"]
        return status if models and all(m["state"] == "ready" for m in models if m["mode"] == "resident") else None

    return wait_for(ready, timeout, "serve to be ready")


@pytest.mark.llama_server
def test_demo_serves_the_tiny_model_on_the_real_llama_server_and_stops_on_ctrl_c(tmp_path: Path, llama_server: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": f"{llama_server.parent}:{os.environ['PATH']}"}
    with serve_process(["--demo", "--listen", f"127.0.0.1:{port}"], log, env) as process:
        status = wait_ready(base, process, log)
        child_pid = status["models"][0]["pid"]
        response = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
            timeout=30,
        )
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert not pid_alive(child_pid)
    text = log.read_text()
    assert "model tiny: ready in" in text and "stopped: every child is gone" in text


def test_sigterm_lets_the_in_flight_stream_finish_then_exits_zero(harness: Harness) -> None:
    config = harness.write_config({"m": {}})
    log = harness.directory / "serve.log"
    base = f"http://{harness.listen}"
    with serve_process(["--config", str(config)], log) as process:
        status = wait_ready(base, process, log)
        child_pid = status["models"][0]["pid"]
        body = {"model": "m", "stream": True, "fake": {"chunks": 20, "interval_ms": 50}}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as stream:
            chunks = stream.iter_raw()
            next(chunks)
            process.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert not pid_alive(child_pid)


class NotifyListener:
    """A NOTIFY_SOCKET as systemd provides it, recording (time, message) pairs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def kinds(self) -> list[str]:
        order = []
        for _, fields in self.messages:
            for kind in ("READY", "RELOADING", "STOPPING"):
                if kind in fields:
                    order.append(kind)
        return order

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_notify_socket_gets_ready_reloading_ready_watchdog_and_stopping_in_order(harness: Harness) -> None:
    config = harness.write_config({"m": {}})
    listener = NotifyListener(harness.directory / "notify.sock")
    log = harness.directory / "serve.log"
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
    try:
        with serve_process(["--config", str(config)], log, env) as process:
            wait_for(lambda: "READY" in listener.kinds(), 30, "READY=1")
            before_reload = time.monotonic_ns() // 1000
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: listener.kinds().count("READY") == 2, 30, "READY=1 after the reload")
            time.sleep(1.0)  # let a few watchdog pings arrive
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        listener.close()
    assert listener.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
    reloading = next(f for _, f in listener.messages if "RELOADING" in f)
    assert int(reloading["MONOTONIC_USEC"]) >= before_reload
    pings = [t for t, f in listener.messages if f.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 4, pings
    assert all(0.1 < gap < 0.4 for gap in gaps), gaps  # half of WATCHDOG_USEC, never the full period


def test_watch_reloads_once_per_editor_save_and_records_a_truncated_write_as_refused(harness: Harness) -> None:
    config = harness.write_config({"m": {}})
    log = harness.directory / "serve.log"
    base = f"http://{harness.listen}"
    with serve_process(["--config", str(config), "--watch"], log) as process:
        wait_ready(base, process, log)

        def reloads() -> dict:
            return httpx.get(f"{base}/status", timeout=5).json()["reloads"]

        # an editor's save: write a temporary file, rename it over the config
        saved = harness.write_config({"m": {}, "n": {}}, name=".config.toml.tmp")
        os.replace(saved, config)
        try:
            wait_for(lambda: reloads()["ok"] == 1, 15, "one reload after the save")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; reloads {reloads()}; serve log:\n{log.read_text()[-3000:]}") from None
        time.sleep(1.5)
        assert reloads() == {"ok": 1, "failed": 0}
        assert {m["name"] for m in httpx.get(f"{base}/status", timeout=5).json()["models"]} == {"m", "n"}

        text = config.read_text()
        cut = text.index('file = "n.gguf"') + len('file = "n.')
        config.write_text(text[:cut])  # cut mid-line, as a writer that died leaves it
        wait_for(lambda: reloads()["failed"] == 1, 15, "the truncated save recorded as a refused reload")
        time.sleep(1.5)
        status = httpx.get(f"{base}/status", timeout=5).json()
        assert status["reloads"] == {"ok": 1, "failed": 1} and "TOML" in status["last_reload"]["summary"]
        assert {m["name"] for m in status["models"]} == {"m", "n"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


# ---- serve refuses what plan refuses, before anything is bound or started

NO_GPU = Path(__file__).resolve().parent.parent / "examples" / "inventory-no-gpu.json"


@contextmanager
def held(listen: str) -> Iterator[None]:
    """Our own listening socket on `listen`: a serve that tried to bind would fail (exit 1)."""
    host, port = listen.rsplit(":", 1)
    with socket.socket() as sock:
        sock.bind((host, int(port)))
        sock.listen()
        yield


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_smart_proxy.supervisor", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize("unplaced", [["m"], ["n"], ["m", "n"]], ids=["resident", "on-demand", "both"])
def test_serve_refuses_a_plan_that_plan_refuses_with_its_words_before_binding(harness: Harness, unplaced: list[str]) -> None:
    models = {"m": {}, "n": {"mode": "on-demand"}, "ok": {}}
    for name in unplaced:
        models[name]["allow_cpu"] = False  # no GPU in the snapshot: nowhere to go
    config = harness.write_config(models)
    listener = NotifyListener(harness.directory / "notify.sock")
    try:
        with held(harness.listen):
            served = run_cli("serve", "--config", str(config), "--inventory", str(NO_GPU), env={"NOTIFY_SOCKET": str(listener.path)})
        time.sleep(0.3)  # a READY=1 sent before exit would have arrived by now
    finally:
        listener.close()
    planned = run_cli("plan", "--config", str(config), "--inventory", str(NO_GPU))
    assert (served.returncode, planned.returncode) == (3, 3), served.stderr
    verdict = next(line for line in planned.stdout.splitlines() if line.startswith("Result: ")).removeprefix("Result: ")
    assert f"llama-smart-proxy: {verdict}; nothing was started" in served.stderr
    for line in planned.stdout.splitlines():
        if line.strip().startswith("why:") and "cannot be placed" in line:
            assert line.strip().removeprefix("why: ") in served.stderr
    assert listener.kinds() == []
    assert "Traceback" not in served.stderr and "listening on" not in served.stderr
    assert not harness.events("start")


@pytest.mark.parametrize("content", [b"my notes\n", b""], ids=["text", "empty"])
def test_serve_refuses_a_model_file_plan_refuses_with_the_same_line(harness: Harness, content: bytes) -> None:
    config = harness.write_config({"m": {}})
    harness.model_file("m").write_bytes(content)
    with held(harness.listen):
        served = run_cli("serve", "--config", str(config))
    planned = run_cli("plan", "--config", str(config))
    validated = run_cli("validate", "--config", str(config))
    line = config.read_text().splitlines().index('file = "m.gguf"') + 1
    problem = f"{config}:{line}: models.m.file: {harness.model_file('m')}: not a GGUF file"
    for result in (served, planned, validated):
        assert result.returncode == 2 and problem in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_serve_on_an_address_in_use_is_one_line_and_exit_1(harness: Harness) -> None:
    config = harness.write_config({"m": {}})
    with held(harness.listen):
        served = run_cli("serve", "--config", str(config))
    assert served.returncode == 1
    assert f"llama-smart-proxy: proxy.listen {harness.listen}: cannot listen: Address already in use" in served.stderr
    assert "Traceback" not in served.stderr and "ExceptionGroup" not in served.stderr


def test_serve_warns_that_inherited_llama_arg_variables_do_not_reach_children(harness: Harness) -> None:
    config = harness.write_config({"m": {}})
    log = harness.directory / "serve.log"
    env = {"LLAMA_ARG_N_GPU_LAYERS": "0", "LLAMA_SMART_PROXY_LOG_LEVEL": "info"}
    with serve_process(["--config", str(config)], log, env) as process:
        status = wait_ready(f"http://{harness.listen}", process, log)
        child_env = Path(f"/proc/{status['models'][0]['pid']}/environ").read_bytes().split(b"\0")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert "children do not inherit LLAMA_ARG_N_GPU_LAYERS" in log.read_text()
    assert any(v.startswith(b"FAKE_LLAMA_EVENTS=") for v in child_env)  # the config's env arrives
    assert not [v for v in child_env if v.startswith((b"LLAMA_ARG_", b"LLAMA_SMART_PROXY_"))]
