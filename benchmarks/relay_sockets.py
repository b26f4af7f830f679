"""Does supervisor/proxy/sockets.py earn its place over anyio's own streams? One command:

    python -m benchmarks.relay_sockets [--rounds N] [--out benchmarks/results/relay-sockets.md]

The same proxy (supervisor/proxy/server.py, upstream.py) runs twice, on CPU0, in front of the fast
fake backend (benchmarks/fast_backend.py, CPU1, with the load generator):
- `sockets`: as shipped, on proxy/sockets.py (a syscall first, anyio's wait_readable/wait_writable
  only when the kernel has nothing to give or no room);
- `streams`: every client and upstream socket an anyio `SocketStream` (anyio.connect_tcp, and
  `SocketStream.from_socket` for accepted ones) behind the same small interface.
Arms are interleaved round by round, so drift hits both alike. Per round and arm: sequential
keep-alive requests (latency; the proxy's CPU time per request, from /proc, which a busy machine
disturbs far less than wall time), a closed loop at 8 connections (requests/s, CPU per request),
and 64 concurrent streams of 50 chunks (the proxy's CPU time per relayed chunk). First, the socket
layer alone: an echo between two loopback sockets in one process, on each. Figures are medians
over rounds. It writes benchmarks/results/relay-sockets.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.proxy_load import (
    LOAD_CPU,
    PROXY_CPU,
    ROOT,
    _spawn,
    closed_loop_rps,
    free_port,
    loadavg,
    machine,
    pct,
    pin,
    run_streams,
    sequential_ms,
    stop_all,
)

ARMS = ("sockets", "streams")


def stream_socket_class() -> type:
    """sockets.Socket's interface over an anyio SocketStream (the `streams` arm)."""
    import anyio
    from anyio.abc import SocketStream

    from llama_smart_proxy.supervisor.proxy.sockets import Socket

    class StreamSocket:
        """sockets.Socket's interface over an anyio SocketStream; an accepted socket is wrapped on
        first use (`SocketStream.from_socket` awaits, the constructor cannot)."""

        __slots__ = ("sock", "stream", "closed", "_wrapping")

        def __init__(self, sock: socket.socket, stream: SocketStream | None = None) -> None:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self.stream = stream
            self.closed = False
            self._wrapping: anyio.Event | None = None

        async def _stream(self) -> SocketStream:
            # the reader and the writer may both come first: one wraps, the other waits for it
            if self._wrapping is not None:
                await self._wrapping.wait()
            elif self.stream is None:
                self._wrapping = anyio.Event()
                self.stream = await SocketStream.from_socket(self.sock)
                self._wrapping.set()
            assert self.stream is not None
            return self.stream

        async def receive(self) -> bytes:
            stream = self.stream or await self._stream()
            try:
                return await stream.receive(65536)
            except anyio.EndOfStream:
                return b""
            except anyio.BrokenResourceError as exc:
                raise ConnectionResetError(str(exc)) from None

        async def send(self, data: bytes) -> None:
            stream = self.stream or await self._stream()
            try:
                await stream.send(data)
            except anyio.BrokenResourceError as exc:
                raise BrokenPipeError(str(exc)) from None

        # on the raw socket, as sockets.Socket does
        shutdown_write = Socket.shutdown_write
        is_readable = Socket.is_readable

        def close(self) -> None:
            # sockets.Socket closes without awaiting; so must this (a cancelled relay closes at once)
            if self.closed:
                return
            self.closed = True
            if self.stream is not None:
                self.stream._transport.close()  # type: ignore[attr-defined]  # asyncio backend
            else:
                self.sock.close()

    return StreamSocket


def use_anyio_streams() -> None:
    """Put anyio's SocketStream under the proxy, in place of proxy/sockets.py (role `proxy`)."""
    import anyio

    from llama_smart_proxy.supervisor.proxy import server, upstream

    StreamSocket = stream_socket_class()

    async def connect(host: str, port: int) -> StreamSocket:
        stream = await anyio.connect_tcp(host, port)
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        return StreamSocket(getattr(raw, "_sock", raw), stream)  # asyncio hands out a TransportSocket

    server.Socket = StreamSocket  # type: ignore[assignment,misc]
    upstream.Socket = StreamSocket  # type: ignore[assignment,misc]
    upstream.connect = connect  # type: ignore[assignment]


def run_proxy(port: int, backend_port: int, io: str) -> None:
    if io == "streams":
        use_anyio_streams()
    from benchmarks.proxy_load import run_proxy as serve

    serve(port, backend_port)


def socket_layer_us(round_trips: int, repeats: int) -> dict[str, list[float]]:
    """The socket layer alone, in this process: CPU microseconds per round trip of 512 bytes
    (two sends, two receives) between two loopback TCP sockets, on proxy/sockets.py and on anyio
    streams, interleaved."""
    import anyio

    from llama_smart_proxy.supervisor.proxy.sockets import Socket

    StreamSocket = stream_socket_class()
    payload = b"x" * 512

    async def one(kind: str) -> float:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server_side, _ = listener.accept()
        a, b = (Socket(client), Socket(server_side)) if kind == "sockets" else (StreamSocket(client), StreamSocket(server_side))

        async def echo() -> None:
            for _ in range(round_trips):
                data = b""
                while len(data) < len(payload):
                    data += await b.receive()
                await b.send(data)

        started = time.process_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(echo)
            for _ in range(round_trips):
                await a.send(payload)
                data = b""
                while len(data) < len(payload):
                    data += await a.receive()
        spent = time.process_time() - started
        a.close()
        b.close()
        return spent / round_trips * 1e6

    out: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for i in range(repeats):
        for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
            out[arm].append(anyio.run(one, arm))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(rounds: int, sequential: int, closed_s: float) -> dict[str, Any]:
    pin(PROXY_CPU)
    layer = socket_layer_us(20_000, rounds)
    pin(LOAD_CPU)
    py = sys.executable
    backend_port = free_port()
    ports = {arm: free_port() for arm in ARMS}
    services = []
    results: dict[str, Any] = {"machine": machine(), "load_before": loadavg(), "rounds": rounds, "socket_layer_us": layer}
    try:
        backend = _spawn("backend", [py, "-m", "benchmarks.fast_backend", str(backend_port)], backend_port, LOAD_CPU)
        services.append(backend)
        pids = {}
        for arm, port in ports.items():
            argv = [py, "-m", "benchmarks.relay_sockets", "--role", "proxy", "--io", arm, "--port", str(port), "--backend", str(backend_port)]
            service = _spawn(arm, argv, port, PROXY_CPU)
            services.append(service)
            pids[arm] = service.process.pid
        for port in ports.values():  # warm: imports, pools, caches
            sequential_ms(port, 200)
            asyncio.run(closed_loop_rps(port, 8, 0.5))
        per: dict[str, dict[str, list[float]]] = {
            arm: {"p50_ms": [], "p99_ms": [], "cpu_us_sequential": [], "rps_8": [], "cpu_us_closed": [], "cpu_us_chunk": []}
            for arm in ARMS
        }
        direct_p50: list[float] = []
        for i in range(rounds):
            order = ARMS if i % 2 == 0 else ARMS[::-1]
            direct_p50.append(pct(sequential_ms(backend_port, sequential), 50))
            for arm in order:
                port, pid, row = ports[arm], pids[arm], per[arm]
                before = cpu_seconds(pid)
                latencies = sequential_ms(port, sequential)
                row["cpu_us_sequential"].append((cpu_seconds(pid) - before) / sequential * 1e6)
                row["p50_ms"].append(pct(latencies, 50))
                row["p99_ms"].append(pct(latencies, 99))
                before, started = cpu_seconds(pid), time.monotonic()
                rps = asyncio.run(closed_loop_rps(port, 8, closed_s))
                row["rps_8"].append(rps)
                # requests over the whole run (warm-up and wind-down included) are about rps x wall
                row["cpu_us_closed"].append((cpu_seconds(pid) - before) / (rps * (time.monotonic() - started)) * 1e6)
                before = cpu_seconds(pid)
                streams = asyncio.run(run_streams(port, 64, 50, 20.0, 0.0))
                chunks = 64 * 51 - streams.errors * 51
                row["cpu_us_chunk"].append((cpu_seconds(pid) - before) / chunks * 1e6)
                row.setdefault("stream_errors", []).append(streams.errors)
        results["direct_p50_ms"] = direct_p50
        results["per_round"] = per
        results["median"] = {arm: {key: statistics.median(values) for key, values in row.items()} for arm, row in per.items()}
    finally:
        stop_all(services)
    results["load_after"] = loadavg()
    return results


def report(r: dict[str, Any]) -> str:
    m = r["median"]
    s, a = m["sockets"], m["streams"]
    rows = [
        ("sequential p50, ms", "p50_ms", 3, "lower"),
        ("sequential p99, ms", "p99_ms", 3, "lower"),
        ("proxy CPU per sequential request, µs", "cpu_us_sequential", 1, "lower"),
        ("closed loop, 8 connections, requests/s", "rps_8", 0, "higher"),
        ("proxy CPU per request in the closed loop, µs", "cpu_us_closed", 1, "lower"),
        ("proxy CPU per relayed stream chunk, µs", "cpu_us_chunk", 1, "lower"),
    ]
    lines = [
        "# proxy/sockets.py against anyio's own streams",
        "",
        "Produced by `python -m benchmarks.relay_sockets` (loopback; fast fake backend; each proxy pinned to CPU0, "
        "backend and load generator to CPU1; arms interleaved, medians over rounds).",
        "",
        f"Machine: {r['machine']}. Rounds: {r['rounds']}. Load average before: {r['load_before']}, after: {r['load_after']}.",
        f"Direct to the backend, sequential p50: {statistics.median(r['direct_p50_ms']):.3f} ms.",
        "",
        "| measure | sockets.py | anyio streams | streams / sockets.py |",
        "|---|---|---|---|",
    ]
    for label, key, digits, _ in rows:
        lines.append(f"| {label} | {s[key]:,.{digits}f} | {a[key]:,.{digits}f} | {a[key] / s[key]:.2f} |")
    layer = {arm: statistics.median(values) for arm, values in r["socket_layer_us"].items()}
    lines += [
        "",
        "The socket layer alone (one process on CPU0, two loopback TCP sockets, 512-byte echo; CPU time per round "
        f"trip of two sends and two receives, median of {len(r['socket_layer_us']['sockets'])} interleaved runs of 20,000): "
        f"sockets.py {layer['sockets']:.1f} µs, anyio streams {layer['streams']:.1f} µs "
        f"({layer['streams'] / layer['sockets']:.2f}; runs: sockets.py "
        + ", ".join(f"{x:.1f}" for x in r["socket_layer_us"]["sockets"])
        + "; streams "
        + ", ".join(f"{x:.1f}" for x in r["socket_layer_us"]["streams"])
        + ").",
    ]
    lines += ["", "Per round (sockets.py / anyio streams):", ""]
    for label, key, digits, _ in rows:
        pairs = ", ".join(
            f"{x:,.{digits}f}/{y:,.{digits}f}" for x, y in zip(r["per_round"]["sockets"][key], r["per_round"]["streams"][key])
        )
        lines.append(f"- {label}: {pairs}")
    errors = sum(r["per_round"]["sockets"]["stream_errors"]) + sum(r["per_round"]["streams"]["stream_errors"])
    lines += ["", f"Streams that did not arrive whole: {errors}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["run", "proxy"], default="run")
    parser.add_argument("--io", choices=ARMS)
    parser.add_argument("--port", type=int)
    parser.add_argument("--backend", type=int)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--closed-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "relay-sockets.md")
    args = parser.parse_args()
    if args.role == "proxy":
        run_proxy(args.port, args.backend, args.io)
        return
    results = measure(args.rounds, args.sequential, args.closed_s)
    text = report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
