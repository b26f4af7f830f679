"""HAProxy in master-worker mode on loopback, as the fleet tests run it: started on a config, its
servers' states read from its stats socket, stopped (and reaped) when the block ends; and small
HTTP backends that answer with their own name, for routing tests without llama-server."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from llama_smart_proxy.supervisor.fleet.haproxy_reload import HAPROXY, master_state
from tests.helpers import stop_process, wait_for

# A path on which NamedBackend answers server-sent events, one every interval.
SLOW_STREAM_PATH = "/slow-stream"
SLOW_STREAM_EVENTS = 10
SLOW_STREAM_INTERVAL_S = 0.1
# show servers state's columns (HAProxy 2.6): srv_op_state 2 is running, 0 stopped
_OP_STATES = {"0": "DOWN", "1": "STARTING", "2": "UP", "3": "STOPPING"}


@dataclass
class RunningHaproxy:
    process: subprocess.Popen
    directory: Path
    listen: str

    @property
    def pid_file(self) -> Path:
        return self.directory / "haproxy.pid"

    @property
    def master_socket(self) -> Path:
        return self.directory / "master.sock"

    @property
    def stats_socket(self) -> Path:
        return self.directory / "stats.sock"

    @property
    def log(self) -> Path:
        return self.directory / "haproxy.log"

    @property
    def base(self) -> str:
        return f"http://{self.listen}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) → UP / DOWN / ..., from `show servers state`."""
        states = {}
        for line in self.command("show servers state").splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[0].isdigit():
                states[(fields[1], fields[3])] = _OP_STATES.get(fields[5], fields[5])
        return states


@contextmanager
def running_haproxy(config: Path, directory: Path, listen: str) -> Iterator[RunningHaproxy]:
    """`haproxy -W` (master-worker, as Debian's unit runs it with -Ws) on `config` until the block
    ends; yields once it answers on `listen`. The config's stats socket must be `stats.sock` in
    `directory`."""
    log = (directory / "haproxy.log").open("ab")
    running = RunningHaproxy(None, directory, listen)  # type: ignore[arg-type]
    argv = [str(HAPROXY), "-W", "-f", str(config), "-p", str(running.pid_file), "-S", str(running.master_socket)]
    running.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:

        def answers() -> bool:
            assert running.process.poll() is None, f"haproxy exited {running.process.returncode}:\n{running.log.read_text()[-3000:]}"
            try:
                httpx.get(f"{running.base}/haproxy-harness-probe", timeout=1)
            except httpx.TransportError:
                return False
            try:
                return bool(master_state(running.master_socket).workers)
            except OSError:
                return False  # the master's socket is not there, or not listening, yet

        wait_for(answers, 15, "haproxy to answer")
        yield running
    finally:
        stop_process(running.process, 10)  # SIGTERM to the master stops every worker, old ones too
        log.close()


class NamedBackend:
    """An HTTP server on loopback that answers every request with JSON naming itself, the path
    and the body's length (or, on SLOW_STREAM_PATH, with slow server-sent events)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict] = []
        self.health_status = 200  # what GET /health answers
        self.stream_cut_at: float | None = None  # when a slow stream's write failed
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                backend.requests.append({"path": self.path, "length": len(body)})
                if self.path == SLOW_STREAM_PATH:
                    self._stream()
                    return
                payload = json.dumps({"host": backend.name, "path": self.path, "length": len(body)}).encode()
                status = backend.health_status if self.path == "/health" else 200
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(SLOW_STREAM_EVENTS):
                        event = f"data: {i}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        time.sleep(SLOW_STREAM_INTERVAL_S)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the peer (HAProxy) closed the connection
                    backend.stream_cut_at = time.monotonic()
                    self.close_connection = True

            do_GET = do_POST = _answer

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # HAProxy's checks close connections abruptly: not an error here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> NamedBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving and close the listening socket (idempotent: a test may stop it early)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()


def wait_server_state(haproxy: RunningHaproxy, backend: str, server: str, state: str, timeout: float = 10) -> None:
    wait_for(lambda: haproxy.server_states().get((backend, server)) == state, timeout, f"{backend}/{server} {state}")
