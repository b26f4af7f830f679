"""Small helpers the tests share: free ports, waiting on a condition with a deadline, stopping a
process (SIGTERM, then SIGKILL), a llama-server process started until healthy, and h11's reading of a response (the reference the
proxy's own HTTP code is held to)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import h11

T = TypeVar("T")


def h11_reads(raw: bytes, method: bytes = b"GET") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of the response in `raw` to a `method` request, as h11's client
    reads it; the connection ends after `raw`."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")
    status, headers, body = 0, [], b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, headers, body


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `condition` until it returns a truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextmanager
def llama_server_process(argv: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a llama-server (argv listening on `port`) until its /health answers 200; stop it after."""
    import httpx

    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def healthy() -> bool:
            assert child.poll() is None, f"llama-server exited with {child.returncode}"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=60, what="llama-server /health")
        yield
    finally:
        child.terminate()
        child.wait(timeout=10)
