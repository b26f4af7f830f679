"""The proxy load benchmark: `serve` itself, as users run it, against the bare relay and nginx, all
in front of the same fast fake backend on loopback, in one run. One command:

    python -m benchmarks.proxy_load [--quick] [--out benchmarks/results/proxy-load.md]

The wiring, in a temporary directory: a tiny GGUF model written by code, a config whose
llama-server binary is a wrapper around benchmarks/fast_backend.py, and `serve` started from that
config (planned for a machine without GPUs, examples/inventory-no-gpu.json). The model's child, the
fast backend, is the backend of every arm:
- `direct`: the child's own port (the yardstick every "added" figure subtracts);
- `serve`: this proxy, as shipped;
- `bare`: benchmarks/bare_relay.py, a minimal anyio + h11 relay (what a bare relay costs);
- `nginx`: keep-alive, unbuffered (when installed).

What it measures (method: shared/research/perf_reliability.md §2; arms interleaved within every
round and repeat, so drift hits all alike; CPU0 runs the proxies under test, CPU1 the backend and
the load generator; the 1-minute load average is recorded before every run):
- added latency p50/p99 of sequential small chat requests (median over rounds of arm - direct);
- closed-loop requests/s at 8 and 64 connections, and each proxy's CPU time per request (from
  /proc: serve's own process, not its child; nginx's master and worker; the relay's process);
- 64 concurrent streams at 50 chunks/s: added time to first byte p99 (steady starts, and all 64
  at once), added inter-chunk gap p99, and the proxy's CPU time per stream;
- client disconnect -> backend sees its upstream connection closed, every trial.
It writes benchmarks/results/proxy-load.md (and .json beside it, with every raw run) and prints it.
The machine should be quiet: the run waits (--wait-quiet) for a low load average first.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.accuracy.oracle import free_port

ROOT = Path(__file__).resolve().parent.parent
PROXY_CPU, LOAD_CPU = 0, 1
PAYLOAD = json.dumps(
    {
        "model": "bench",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": "Write one short sentence about proxies, please. " * 3,
            },
        ],
        "max_tokens": 32,
        "temperature": 0.2,
    }
).encode()


def request_bytes(body: bytes = PAYLOAD) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nUser-Agent: proxy-load/1\r\n"
        b"Accept: application/json\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


REQUEST = request_bytes()


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_proxy(port: int, backend_port: int) -> None:
    """A ProxyServer with a fixed backend and stub Backends. Not an arm of this benchmark any more
    (it measures `serve` itself); benchmarks/relay_sockets.py runs it to compare socket layers."""
    import logging

    import anyio
    from llama_smart_proxy.schemas.config import ProxySettings
    from llama_smart_proxy.supervisor.proxy.backends import (
        ModelState,
        ModelStatus,
        ServiceStatus,
        Upstream,
    )
    from llama_smart_proxy.supervisor.proxy.server import ProxyServer

    logging.basicConfig(level=logging.WARNING)
    upstream = Upstream("127.0.0.1", backend_port, pool_size=128)

    class BenchBackends:
        def resolve(self, name: str) -> str | None:
            return "bench" if name == "bench" else None

        def admits_now(self, model: str) -> bool:
            return True

        @asynccontextmanager
        async def lease(self, model: str):  # type: ignore[no-untyped-def]
            yield upstream

        async def status(self) -> ServiceStatus:
            ready = ModelStatus("bench", ModelState.READY, port=backend_port)
            return ServiceStatus(models=(ready,))

        async def load(self, model: str) -> None: ...
        async def unload(self, model: str) -> None: ...
        async def reset_failed(self, model: str) -> None: ...
        async def reload(self) -> str:
            return ""

    settings = ProxySettings(listen=f"127.0.0.1:{port}")
    server = ProxyServer(settings, BenchBackends())  # type: ignore[arg-type]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            print("ready", flush=True)

    anyio.run(main)


# ---- processes -------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)


def _spawn(
    name: str, argv: list[str], port: int, cpu: int, ready: str | None = "ready"
) -> Service:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        # pin() only calls sched_setaffinity, which takes no lock another thread could hold
        preexec_fn=lambda: pin(cpu),  # noqa: PLW1509
    )
    service = Service(name, port, process)
    seen_ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if ready and line.strip() == ready:
                seen_ready.set()
            service.lines.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    try:
        if ready:
            if not seen_ready.wait(20):
                raise RuntimeError(f"{name} did not start")
        else:
            wait_listening(port)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return service


def stop_all(services: list[Service]) -> None:
    """SIGTERM to every service, then SIGKILL to any still running 5 s later; each one reaped."""
    for service in services:
        service.process.terminate()
    for service in services:
        try:
            service.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    if found := shutil.which("nginx"):
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def start_nginx(port: int, backend: int, tmp: Path) -> Service | None:
    binary = nginx_binary()
    if binary is None:
        return None
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, user=user, backend=backend, port=port))
    argv = [binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")]
    return _spawn("nginx", argv, port, PROXY_CPU, ready=None)


# `serve` from a config, as users run it. Its one model's llama-server is the fast backend.
SERVE_CONFIG = """\
[llama_server]
binary = {binary}
env = {{ FAST_BACKEND_CPU = "{cpu}", FAST_BACKEND_EVENTS = {events} }}

[proxy]
log_level = "warning"

[models.bench]
file = {model}
# 64 slots: the streams phase runs 64 concurrent streams, and a user expecting 64 at once gives
# llama-server 64 slots (with fewer, serve would queue the rest, which is not what is measured)
parallel = 64
ctx = 8192
"""


def toml_string(value: object) -> str:
    return json.dumps(str(value))  # a TOML basic string, for paths and the like


def start_serve(tmp: Path, port: int, events: Path) -> Service:
    """`serve -c <config>` on CPU0, its output to tmp/serve.log; returned once it was started
    (see `wait_serve_ready`)."""
    from llama_smart_proxy.supervisor.service.tinymodel import write_tiny_model

    model = tmp / "tiny.gguf"
    write_tiny_model(model)
    wrapper = tmp / "fast-llama-server"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m benchmarks.fast_backend "$@"\n'
    )
    wrapper.chmod(0o755)
    config = tmp / "bench.toml"
    config.write_text(
        SERVE_CONFIG.format(
            binary=toml_string(wrapper),
            cpu=LOAD_CPU,
            events=toml_string(events),
            model=toml_string(model),
        )
    )
    # the inventory makes serve plan for a machine without GPUs (no NVML needed)
    inventory = ROOT / "examples" / "inventory-no-gpu.json"
    argv = [sys.executable, "-m", "llama_smart_proxy.supervisor", "serve"]
    argv += [
        "-c",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--inventory",
        str(inventory),
    ]
    with (tmp / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            preexec_fn=lambda: pin(PROXY_CPU),  # noqa: PLW1509 (see _spawn)
        )
    return Service("serve", port, process)


def get_json(port: int, path: str, timeout: float = 2.0) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return json.loads(response.read())
    finally:
        connection.close()


def wait_serve_ready(serve: Service, log: Path, timeout: float = 60) -> tuple[int, int]:
    """Wait until serve's model is ready; (its child's port, the child's pid)."""
    deadline = time.monotonic() + timeout
    status: Any = None
    while time.monotonic() < deadline:
        if serve.process.poll() is not None:
            break
        with suppress(OSError, ValueError):
            status = get_json(serve.port, "/status")
            model = status["models"][0]
            if model["state"] == "ready":
                return int(model["port"]), int(model["pid"])
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    state = "exited" if serve.process.poll() is not None else "not ready"
    raise RuntimeError(
        f"serve {state} (last /status: {json.dumps(status)[:500]}); log tail:\n{tail}"
    )


def kill_strays(tmp: Path) -> list[int]:
    """SIGKILL every process whose command line names `tmp` (serve's child, should serve have
    died without stopping it); the pids killed."""
    killed = []
    marker = str(tmp).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads, not their children), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (nginx's workers)."""
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(p) for p in listed]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan parents
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with suppress(OSError):
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) == pid:
                        found.append(int(entry.name))
        return found


# ---- clients ---------------------------------------------------------------------------------


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"content-length:")
    end = lower.find(b"\r\n", at)
    return int(lower[at + 15 : end if end > 0 else None])


def sequential_ms(port: int, count: int) -> list[float]:
    """Latency of `count` keep-alive requests, one at a time, in ms."""
    latencies = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clock = time.perf_counter
        for _ in range(count):
            started = clock()
            sock.sendall(REQUEST)
            buffer = b""
            while True:
                buffer += sock.recv(65536)
                end = buffer.find(b"\r\n\r\n")
                if end >= 0 and len(buffer) >= end + 4 + _content_length(buffer[:end]):
                    break
            latencies.append((clock() - started) * 1000)
            assert buffer.startswith(b"HTTP/1.1 200"), buffer[:100]
    return latencies


@dataclass
class ClosedRun:
    rps: float
    """Requests/s inside the counted window (after the warm-up)."""
    completed: int
    """Every request completed in the run, warm-up and wind-down included."""
    elapsed_s: float
    """From the first connect to the last client's close."""


async def closed_loop(
    port: int, connections: int, seconds: float, warmup: float = 0.5
) -> ClosedRun:
    """`connections` keep-alive clients, each sending its next request when its last is answered."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    window = (started + warmup, started + warmup + seconds)
    counted = completed = 0
    finished = asyncio.Event()
    open_clients = connections

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.write(REQUEST)  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            nonlocal counted, completed, open_clients
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                total = end + 4 + _content_length(self.buffer[:end])
                if len(self.buffer) < total:
                    return
                if not self.buffer.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(self.buffer[:200])
                self.buffer = self.buffer[total:]
                completed += 1
                now = loop.time()
                if window[0] <= now <= window[1]:
                    counted += 1
                if now > window[1]:
                    self.transport.close()
                    open_clients -= 1
                    if open_clients == 0:
                        finished.set()
                    return
                self.transport.write(REQUEST)  # type: ignore[attr-defined]

    for _ in range(connections):
        await loop.create_connection(Client, "127.0.0.1", port)
    await asyncio.wait_for(finished.wait(), warmup + seconds + 30)
    return ClosedRun(counted / seconds, completed, loop.time() - started)


async def closed_loop_rps(
    port: int, connections: int, seconds: float, warmup: float = 0.5
) -> float:
    """Requests/s of a closed loop (benchmarks/relay_sockets.py uses it)."""
    return (await closed_loop(port, connections, seconds, warmup)).rps


@dataclass
class StreamTimes:
    ttfb_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    errors: int = 0


async def run_streams(
    port: int, streams: int, chunks: int, interval_ms: float, spacing_s: float
) -> StreamTimes:
    """`streams` SSE requests, started `spacing_s` apart (0: all at once); per stream the time from
    sending the request to the first event, and the gaps between events as the client sees them."""
    loop = asyncio.get_running_loop()
    times = StreamTimes()
    body = json.dumps(
        {"model": "bench", "stream": True, "chunks": chunks, "interval_ms": interval_ms}
    ).encode()
    request = request_bytes(body)

    class Stream(asyncio.Protocol):
        def __init__(self) -> None:
            self.done = loop.create_future()
            self.arrivals: list[float] = []
            self.tail = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            now = time.perf_counter()
            window = self.tail + data
            events = window.count(b"data: ") - self.tail.count(b"data: ")
            self.arrivals.extend([now] * events)
            self.tail = window[-8:]
            if window.endswith(b"0\r\n\r\n") and not self.done.done():
                self.done.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.done.done():
                self.done.set_result(None)

    protocols = []
    for _ in range(streams):
        _, protocol = await loop.create_connection(Stream, "127.0.0.1", port)
        protocols.append(protocol)
    sent_at: list[float] = []
    first_at = loop.time()
    for i, protocol in enumerate(protocols):
        delay = first_at + i * spacing_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at.append(time.perf_counter())
        protocol.transport.write(request)
    await asyncio.wait_for(asyncio.gather(*(p.done for p in protocols)), 60)
    for protocol, sent in zip(protocols, sent_at):
        protocol.transport.close()
        if len(protocol.arrivals) != chunks + 1:
            times.errors += 1
            continue
        times.ttfb_ms.append((protocol.arrivals[0] - sent) * 1000)
        times.gaps_ms.extend(
            (b - a) * 1000
            for a, b in zip(protocol.arrivals[:-1], protocol.arrivals[1:-1])
        )
    return times


def disconnect_ms(port: int, events: Path, trial_id: str, interval_ms: float) -> float:
    """Open a stream, read its first event, close; how long until the backend saw its upstream
    connection close (CLOCK_MONOTONIC on both sides). The backend appends `disconnect <id> <time>`
    lines to `events` (FAST_BACKEND_EVENTS)."""
    body = {
        "model": "bench",
        "stream": True,
        "chunks": 100000,
        "interval_ms": interval_ms,
        "id": trial_id,
    }
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_bytes(json.dumps(body).encode()))
        buffer = b""
        while buffer.count(b"data: ") < 2:
            buffer += sock.recv(65536)
        closed_at = time.monotonic()
    deadline = time.monotonic() + 5
    prefix = f"disconnect {trial_id} "
    while time.monotonic() < deadline:
        with suppress(FileNotFoundError):
            for line in events.read_text().splitlines():
                if line.startswith(prefix):
                    return (float(line.split()[2]) - closed_at) * 1000
        time.sleep(0.002)
    return float("inf")


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int = 9
    sequential: int = 300
    warmup: int = 50
    closed_s: float = 3.0
    streams: int = 64
    chunks: int = 50
    interval_ms: float = 20.0
    disconnect_trials: int = 20
    stream_repeats: int = 5
    settle_s: float = 0.5  # between a stream run's warm-up and the measured run, for every arm
    closed_repeats: int = 3


QUICK = Plan(rounds=3, sequential=150, warmup=30, closed_s=1.0, chunks=25, disconnect_trials=5,
             stream_repeats=1, closed_repeats=1)  # fmt: skip
CONNECTIONS = (8, 64)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import anyio  # noqa: F401
    import h11

    nginx = nginx_binary() or "nginx"
    try:
        nginx_run = subprocess.run(
            [nginx, "-v"], capture_output=True, text=True, check=False
        )
        nginx_version = nginx_run.stderr.strip()
    except OSError:
        nginx_version = "not installed"
    from importlib.metadata import version

    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "h11": h11.__version__,
        "anyio": version("anyio"),
        "nginx": nginx_version,
        "llama-smart-proxy": version("llama-smart-proxy"),
    }


QUIET_LOAD = 1.0  # 1-minute load average under which the machine counts as quiet (§2.2)


def wait_until_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) for the 1-minute load average to drop below QUIET_LOAD; return it."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            load = float(Path("/proc/loadavg").read_text().split()[0])
        except OSError:
            return float("nan")
        if load < QUIET_LOAD or time.monotonic() > deadline:
            return load
        message = (
            f"waiting for a quiet machine: load average {load:.2f} >= {QUIET_LOAD}"
        )
        print(message, file=sys.stderr, flush=True)
        time.sleep(15)


def run(plan: Plan, quiet_wait_s: float = 0.0) -> dict[str, Any]:
    pin(LOAD_CPU)
    load = wait_until_quiet(quiet_wait_s)
    results: dict[str, Any] = {
        "machine": machine(),
        "load_before": loadavg(),
        "plan": plan.__dict__,
        "quiet": load < QUIET_LOAD,
    }
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="proxy-load-") as tmp_name:
        tmp = Path(tmp_name)
        serve_port, bare_port, nginx_port = free_port(), free_port(), free_port()
        events = tmp / "backend-events.log"
        services: list[Service] = []
        try:
            serve = start_serve(tmp, serve_port, events)
            services.append(serve)
            child_port, child_pid = wait_serve_ready(serve, tmp / "serve.log")
            relay = [py, "-m", "benchmarks.bare_relay", str(bare_port), str(child_port)]
            bare = _spawn("bare", relay, bare_port, PROXY_CPU)
            services.append(bare)
            nginx = start_nginx(nginx_port, child_port, tmp)
            if nginx:
                services.append(nginx)
            arms = {"direct": child_port, "serve": serve_port, "bare": bare_port}
            # what each arm's CPU time is read from: the proxy process(es), never the backend
            pids: dict[str, Callable[[], list[int]]] = {
                "direct": list,
                "serve": lambda: [serve.process.pid],  # serve alone, not its child
                "bare": lambda: [bare.process.pid],
            }
            if nginx:
                arms["nginx"] = nginx_port
                master = nginx.process.pid
                pids["nginx"] = lambda: [master, *children_of(master)]
            results["arms"] = list(arms)
            results["backend_pid"] = child_pid
            results.update(measure(plan, arms, pids, child_pid, events))
        finally:
            try:
                stop_all(services)  # SIGTERM: serve stops its child itself
            finally:
                strays = kill_strays(tmp)
                if strays:
                    print(f"killed leftover processes {strays}", file=sys.stderr)
    results["load_after"] = loadavg()
    return results


def measure(
    plan: Plan,
    arms: dict[str, int],
    pids: dict[str, Callable[[], list[int]]],
    backend_pid: int,
    events: Path,
) -> dict[str, Any]:
    loads: list[dict[str, Any]] = []

    def note(phase: str, arm: str, repeat: int) -> None:
        """The load average before a measurement run."""
        loads.append({"phase": phase, "arm": arm, "repeat": repeat, "load": loadavg()})

    def cpu_of(arm: str) -> tuple[list[int], float] | None:
        """The arm's proxy processes and their CPU seconds so far (None: direct, no proxy)."""
        processes = pids[arm]()
        return (processes, cpu_seconds(processes)) if processes else None

    def cpu_since(start: tuple[list[int], float] | None) -> float | None:
        return None if start is None else cpu_seconds(start[0]) - start[1]

    out: dict[str, Any] = {"loads": loads}
    # 1. sequential latency, arms interleaved per round
    for port in arms.values():
        sequential_ms(port, plan.warmup)
    per_round: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    for r in range(plan.rounds):
        for arm, port in arms.items():
            note("sequential", arm, r)
            per_round[arm].append(sequential_ms(port, plan.sequential))
    seq: dict[str, Any] = {}
    for arm in arms:
        flat = [x for r in per_round[arm] for x in r]
        seq[arm] = {"p50": pct(flat, 50), "p90": pct(flat, 90), "p99": pct(flat, 99)}
        seq[arm]["round_p50"] = [pct(r, 50) for r in per_round[arm]]
        seq[arm]["round_p99"] = [pct(r, 99) for r in per_round[arm]]
        if arm != "direct":
            pairs = list(zip(per_round[arm], per_round["direct"]))
            added50 = [pct(a, 50) - pct(d, 50) for a, d in pairs]
            added99 = [pct(a, 99) - pct(d, 99) for a, d in pairs]
            seq[arm]["added_p50"] = statistics.median(added50)
            seq[arm]["added_p50_runs"] = added50
            seq[arm]["added_p99"] = statistics.median(added99)
            seq[arm]["added_p99_runs"] = added99
    out["sequential"] = seq

    # 2. closed loop, arms interleaved, repeated. Requests/s: the best run (noise only slows).
    # CPU per request: the proxy's CPU time over the whole run (connects, warm-up, wind-down)
    # over every request completed in it, the median over repeats.
    closed: dict[int, dict[str, Any]] = {}
    for connections in CONNECTIONS:
        raw: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        for repeat in range(plan.closed_repeats):
            for arm, port in arms.items():
                note(f"closed-{connections}", arm, repeat)
                start = cpu_of(arm)
                backend_start = cpu_seconds([backend_pid])
                result = asyncio.run(closed_loop(port, connections, plan.closed_s))
                spent = cpu_since(start)
                raw[arm].append(
                    {
                        "rps": result.rps,
                        "completed": result.completed,
                        "elapsed_s": result.elapsed_s,
                        "cpu_s": spent,
                        "cpu_us_per_request": None
                        if spent is None
                        else spent / result.completed * 1e6,
                        "backend_cpu_s": cpu_seconds([backend_pid]) - backend_start,
                    }
                )
        closed[connections] = {}
        for arm, runs in raw.items():
            cpu_runs = [r["cpu_us_per_request"] for r in runs]
            closed[connections][arm] = {
                "rps": max(r["rps"] for r in runs),
                "rps_runs": [r["rps"] for r in runs],
                "cpu_us": None if cpu_runs[0] is None else statistics.median(cpu_runs),
                "cpu_us_runs": cpu_runs,
                "runs": runs,
            }
    out["closed"] = closed

    # 3. streams: steady starts and a burst of all at once
    # Each arm runs `stream_repeats` times, interleaved; a figure is the median over the runs of
    # that run's percentile, so one run hit by a neighbour's burst of work does not decide it.
    spacing = plan.chunks * plan.interval_ms / 1000 / plan.streams
    runs: dict[str, dict[str, list[StreamTimes]]] = {
        "steady": {a: [] for a in arms},
        "burst": {a: [] for a in arms},
    }
    stream_cpu: dict[str, dict[str, list[float | None]]] = {
        mode: {a: [] for a in arms} for mode in runs
    }
    for mode, gap in (("steady", spacing), ("burst", 0.0)):
        for repeat in range(plan.stream_repeats):
            for arm, port in arms.items():
                # warm: the proxies hold keep-alive connections to the backend, as in steady service;
                # then settle, so that the measured starts do not share the CPU with the warm-up's
                # end (its connections closing, serve's pool reopening the ones the child closed)
                asyncio.run(run_streams(port, plan.streams, 3, plan.interval_ms, 0))
                time.sleep(plan.settle_s)
                note(f"streams-{mode}", arm, repeat)
                start = cpu_of(arm)
                times = asyncio.run(
                    run_streams(port, plan.streams, plan.chunks, plan.interval_ms, gap)
                )
                spent = cpu_since(start)
                runs[mode][arm].append(times)
                per_stream = None if spent is None else spent / plan.streams * 1000
                stream_cpu[mode][arm].append(per_stream)
    out["streams"] = {
        mode: {
            arm: {
                "ttfb_p50": statistics.median(pct(t.ttfb_ms, 50) for t in times),
                "ttfb_p99": statistics.median(pct(t.ttfb_ms, 99) for t in times),
                "ttfb_p99_runs": [pct(t.ttfb_ms, 99) for t in times],
                "gap_p50": statistics.median(pct(t.gaps_ms, 50) for t in times),
                "gap_p99": statistics.median(pct(t.gaps_ms, 99) for t in times),
                "gap_p99_runs": [pct(t.gaps_ms, 99) for t in times],
                "errors": sum(t.errors for t in times),
                "streams": sum(len(t.ttfb_ms) for t in times),
                "cpu_ms_per_stream": None
                if stream_cpu[mode][arm][0] is None
                else statistics.median(stream_cpu[mode][arm]),  # type: ignore[type-var]
                "cpu_ms_per_stream_runs": stream_cpu[mode][arm],
            }
            for arm, times in by_arm.items()
        }
        for mode, by_arm in runs.items()
    }

    # 4. disconnect -> upstream closed, at 50 chunks/s and at 2 chunks/s, arms interleaved
    disconnects: dict[str, list[float]] = {arm: [] for arm in arms}
    for i in range(plan.disconnect_trials):
        interval = plan.interval_ms if i % 2 == 0 else 500.0
        for arm, port in arms.items():
            note("disconnect", arm, i)
            disconnects[arm].append(disconnect_ms(port, events, f"{arm}-{i}", interval))
    out["disconnect_ms"] = disconnects
    return out


# ---- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def runs_text(values: list[float | None], digits: int) -> str:
    return ", ".join(fmt(v, digits) for v in values)


def report(r: dict[str, Any], profile: str | None = None) -> str:
    """The markdown report; `profile`: a link to the profile notes, when they exist."""
    m = r["machine"]
    seq, closed, streams, disc = (
        r["sequential"],
        r["closed"],
        r["streams"],
        r["disconnect_ms"],
    )
    arms = r["arms"]
    plan = r["plan"]
    one_minute = [
        float(x["load"].split()[0]) for x in r["loads"] if x["load"] != "unknown"
    ]
    quiet = (
        "" if r["quiet"] else f" (**not quiet**: at or above {QUIET_LOAD} at the start)"
    )
    lines = [
        "# Proxy load benchmark",
        "",
        (
            "Produced by `python -m benchmarks.proxy_load` on loopback. `serve` runs as users run "
            "it, from a config, with one model (64 slots) whose llama-server is the fast fake "
            "backend `benchmarks/fast_backend.py`; that child is the backend of every arm: "
            "`direct` (its own port), `serve`, `bare` (`benchmarks/bare_relay.py`, a minimal "
            "anyio + h11 relay) and `nginx` (keep-alive, unbuffered). The proxies under test are "
            "pinned to CPU0, the backend and the load generator to CPU1; arms are interleaved in "
            "every round and repeat. CPU time is read from /proc: serve's own process (not its "
            "child), nginx's master and worker, the relay's process."
        ),
        "",
        (
            f"Machine: {m['cpus']} CPUs, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}, "
            f"h11 {m['h11']}, anyio {m['anyio']}, {m['nginx']}, "
            f"llama-smart-proxy {m.get('llama-smart-proxy', '?')}."
        ),
        (
            f"Load average (1, 5, 15 min) before: {r['load_before']}{quiet}, after: "
            f"{r['load_after']}. 1-minute load average before each of the {len(one_minute)} "
            f"measurement runs: min {min(one_minute, default=float('nan')):.2f}, "
            f"max {max(one_minute, default=float('nan')):.2f} (every reading is in the JSON)."
        ),
        f"Plan: {plan}.",
        "",
        "## Targets",
        "",
    ]
    serve_seq = seq["serve"]
    lines.append(
        "- Added p50 ≤ 0.6 ms and p99 ≤ 3 ms at c=1 (serve): "
        f"p50 {verdict(serve_seq['added_p50'] <= 0.6)} ({serve_seq['added_p50']:.3f} ms); "
        f"p99 {verdict(serve_seq['added_p99'] <= 3.0)} ({serve_seq['added_p99']:.3f} ms)."
    )
    c8 = closed[8]
    cpu_ratio = ratio(c8["serve"]["cpu_us"], c8.get("bare", {}).get("cpu_us"))
    rps_ratio = ratio(c8["serve"]["rps"], c8.get("bare", {}).get("rps"))
    lines.append(
        "- CPU per request ≤ 0.8 × the bare relay's (at c=8); requests/s ≥ 1.2 × the bare "
        "relay's at c=8: "
        f"CPU {verdict(cpu_ratio is not None and cpu_ratio <= 0.8)} "
        f"(serve {fmt(c8['serve']['cpu_us'])} µs, bare {fmt(c8.get('bare', {}).get('cpu_us'))} "
        f"µs: {fmt(cpu_ratio, 2)} ×); "
        f"requests/s {verdict(rps_ratio is not None and rps_ratio >= 1.2)} "
        f"(serve {fmt(c8['serve']['rps'])}/s, bare {fmt(c8.get('bare', {}).get('rps'))}/s: "
        f"{fmt(rps_ratio, 2)} ×)."
    )

    def added(mode: str, arm: str, key: str) -> float:
        return streams[mode][arm][key] - streams[mode]["direct"][key]

    def runs_within(mode: str, key: str, limit: float) -> str:
        pairs = zip(
            streams[mode]["serve"][key + "_runs"],
            streams[mode]["direct"][key + "_runs"],
        )
        within = [p - d <= limit for p, d in pairs]
        return f"{sum(within)} of {len(within)} runs within"

    ttfb_steady = added("steady", "serve", "ttfb_p99")
    ttfb_burst = added("burst", "serve", "ttfb_p99")
    gap = max(added(mode, "serve", "gap_p99") for mode in streams)
    lines.append(
        "- Added TTFB p99 ≤ 2 ms with steady starts, ≤ 25 ms when 64 streams start at once; "
        "added inter-chunk gap p99 ≤ 1 ms (worse of the two start modes): "
        f"steady {verdict(ttfb_steady <= 2)} ({ttfb_steady:.2f} ms; "
        f"{runs_within('steady', 'ttfb_p99', 2)}); "
        f"burst {verdict(ttfb_burst <= 25)} ({ttfb_burst:.2f} ms; "
        f"{runs_within('burst', 'ttfb_p99', 25)}); "
        f"gap {verdict(gap <= 1)} ({gap:.2f} ms)."
    )
    worst_cancel = max(disc["serve"])
    lines.append(
        "- Cancel stays ≤ 100 ms in every trial: "
        f"{verdict(worst_cancel <= 100)} (worst {worst_cancel:.2f} ms of "
        f"{len(disc['serve'])} trials)."
    )

    lines += [
        "",
        "## Added latency, sequential small chat requests (c=1, keep-alive)",
        "",
        (
            f"{plan['rounds']} rounds of {plan['sequential']} requests per arm; added = arm - "
            "direct within a round, the median over rounds (each round's figure in brackets)."
        ),
        "",
        "| arm | p50 ms | p90 ms | p99 ms | added p50 ms (rounds) | added p99 ms (rounds) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        s = seq[arm]
        extra = (
            f"{s['added_p50']:.3f} ({runs_text(s['added_p50_runs'], 3)}) | "
            f"{s['added_p99']:.3f} ({runs_text(s['added_p99_runs'], 3)})"
            if arm != "direct"
            else "- | -"
        )
        lines.append(
            f"| {arm} | {s['p50']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | {extra} |"
        )
    for other in ("nginx", "bare"):
        if other in seq:
            o = seq[other]
            lines += [
                "",
                (
                    f"serve adds {serve_seq['added_p50']:.3f} ms at p50 and "
                    f"{serve_seq['added_p99']:.3f} ms at p99; {other} adds "
                    f"{o['added_p50']:.3f} ms and {o['added_p99']:.3f} ms: serve/{other} "
                    f"{fmt(ratio(serve_seq['added_p50'], o['added_p50']), 1)} × at p50, "
                    f"{fmt(ratio(serve_seq['added_p99'], o['added_p99']), 1)} × at p99."
                ),
            ]

    lines += [
        "",
        "## Closed loop: requests/s and the proxy's CPU time per request",
        "",
        (
            f"{plan['closed_repeats']} interleaved runs of {plan['closed_s']} s (after 0.5 s of "
            "warm-up) per arm and connection count. Requests/s: the best run (noise only slows); "
            "CPU per request: the proxy's user + system time over the whole run (connects, "
            "warm-up and wind-down included) over every request completed in it, the median over "
            "runs (/proc counts in clock ticks, 10 ms)."
        ),
        "",
        "| connections | arm | requests/s, best (runs) | CPU µs/request, median (runs) |",
        "|---|---|---|---|",
    ]
    for c, by_arm in closed.items():
        for arm in arms:
            a = by_arm[arm]
            lines.append(
                f"| {c} | {arm} | {fmt(a['rps'])} ({runs_text(a['rps_runs'], 0)}) | "
                f"{fmt(a['cpu_us'])} ({runs_text(a['cpu_us_runs'], 0)}) |"
            )
    lines += [
        "",
        (
            "| connections | serve/bare requests/s | serve/bare CPU | serve/nginx requests/s "
            "| serve/nginx CPU | serve/direct requests/s |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for c, by_arm in closed.items():
        s, b, n = by_arm["serve"], by_arm.get("bare", {}), by_arm.get("nginx", {})
        lines.append(
            f"| {c} | {fmt(ratio(s['rps'], b.get('rps')), 2)} | "
            f"{fmt(ratio(s['cpu_us'], b.get('cpu_us')), 2)} | "
            f"{fmt(ratio(s['rps'], n.get('rps')), 2)} | "
            f"{fmt(ratio(s['cpu_us'], n.get('cpu_us')), 2)} | "
            f"{fmt(ratio(s['rps'], by_arm['direct']['rps']), 2)} |"
        )
    lines += [
        "",
        (
            "Direct, and the proxies once they are fast, are bounded by the Python load generator "
            "and backend sharing CPU1; CPU per request does not depend on that bound."
        ),
        "",
        (
            f"## Streams: {plan['streams']} concurrent, "
            f"{1000 / plan['interval_ms']:.0f} chunks/s, {plan['chunks']} chunks each"
        ),
        "",
        (
            f"Each figure is the median over {plan['stream_repeats']} interleaved runs of that "
            "run's percentile; each run's figure is in brackets. Added = arm - direct. CPU: the "
            "proxy's CPU time over a run over the streams in it. Before each run, a warm-up run of "
            f"3-chunk streams, then {plan.get('settle_s', 0)} s to settle."
        ),
        "",
        (
            "| starts | arm | TTFB p50 ms | TTFB p99 ms (runs) | added TTFB p99 ms | gap p50 ms "
            "| gap p99 ms (runs) | added gap p99 ms | CPU ms/stream (runs) | streams ok | errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, by_arm in streams.items():
        for arm in arms:
            s = by_arm[arm]
            direct = arm == "direct"
            added_ttfb = "-" if direct else f"{added(mode, arm, 'ttfb_p99'):.2f}"
            added_gap = "-" if direct else f"{added(mode, arm, 'gap_p99'):.2f}"
            lines.append(
                f"| {mode} | {arm} | {s['ttfb_p50']:.2f} | {s['ttfb_p99']:.2f} "
                f"({runs_text(s['ttfb_p99_runs'], 1)}) | {added_ttfb} | "
                f"{s['gap_p50']:.2f} | {s['gap_p99']:.2f} ({runs_text(s['gap_p99_runs'], 1)}) | "
                f"{added_gap} | "
                f"{fmt(s['cpu_ms_per_stream'], 2)} "
                f"({runs_text(s['cpu_ms_per_stream_runs'], 2)}) | {s['streams']} | {s['errors']} |"
            )
    lines += [
        "",
        "## Client disconnect -> backend sees its connection closed",
        "",
        (
            "Trials alternate 50 chunks/s and 2 chunks/s streams, arms interleaved; the client "
            "closes after two events."
        ),
        "",
        "| arm | trials | p50 ms | max ms |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        d = disc[arm]
        lines.append(f"| {arm} | {len(d)} | {pct(d, 50):.2f} | {max(d):.2f} |")
    if "nginx" not in arms:
        lines += [
            "",
            "nginx was not installed, so the nginx arm is missing (`apt-get install nginx`).",
        ]
    if profile:
        lines += [
            "",
            "## Profile",
            "",
            f"Where serve's time goes: [{profile}]({profile}).",
        ]
    return "\n".join(lines) + "\n"


PROFILE = ROOT / "benchmarks" / "results" / "proxy-profile.md"


def profile_link(out: Path) -> str | None:
    """The profile notes' path relative to the report, when they exist (they are written by
    hand; this benchmark does not profile)."""
    if not PROFILE.exists():
        return None
    return os.path.relpath(PROFILE, out.resolve().parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a short run to try it out"
    )
    default_out = ROOT / "benchmarks" / "results" / "proxy-load.md"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument(
        "--json", type=Path, help="where the raw results go (default: beside --out)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=600.0,
        metavar="S",
        help=f"wait up to S seconds for the 1-minute load average to fall below {QUIET_LOAD}",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only render the report of an earlier --json run",
    )
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        results["closed"] = {int(c): v for c, v in results["closed"].items()}
        text = report(results, profile_link(args.out))
        args.out.write_text(text)
        print(text)
        return
    results = run(QUICK if args.quick else Plan(), args.wait_quiet)
    text = report(results, profile_link(args.out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    json_out = args.json or args.out.with_suffix(".json")
    json_out.write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
