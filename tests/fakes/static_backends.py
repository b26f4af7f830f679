"""A TEST DOUBLE of `supervisor.proxy.backends.Backends`: fixed models at fixed ports, always
ready (or refusing with a given `ModelUnavailable`), for testing the HTTP side on its own.

It also runs a proxy in a background thread (`running_proxy`) and starts fake llama-servers
(`FakeLlama`), so the tests drive everything with plain blocking clients over real sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.from_thread
import httpx

from llama_smart_proxy.schemas.config import ProxySettings
from llama_smart_proxy.supervisor.proxy.backends import ModelState, ModelStatus, ModelUnavailable, ServiceStatus, UnknownModel, Upstream
from llama_smart_proxy.supervisor.proxy.server import ProxyServer
from tests.helpers import free_port, wait_for

FAKE_SERVER = Path(__file__).with_name("fake_llama_server.py")


@dataclass
class StaticBackends:
    """Models at fixed upstreams. `refuse[model]` makes every lease of it raise that error."""

    upstreams: dict[str, Upstream]
    aliases: dict[str, str] = field(default_factory=dict)
    refuse: dict[str, ModelUnavailable] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    leases: int = 0
    actions: list[tuple[str, str | None]] = field(default_factory=list)

    def resolve(self, name: str) -> str | None:
        if name in self.upstreams:
            return name
        return self.aliases.get(name)

    def admits_now(self, model: str) -> bool:
        return model in self.upstreams and model not in self.refuse

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Upstream]:
        if model in self.refuse:
            raise self.refuse[model]
        self.leases += 1
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        try:
            yield self.upstreams[model]
        finally:
            self.in_flight[model] -= 1

    async def status(self) -> ServiceStatus:
        models = []
        for name, upstream in sorted(self.upstreams.items()):
            state = ModelState.FAILED if name in self.refuse and self.refuse[name].kind == "failed" else ModelState.READY
            models.append(
                ModelStatus(
                    name=name,
                    state=state,
                    aliases=tuple(sorted(a for a, m in self.aliases.items() if m == name)),
                    port=upstream.port,
                    in_flight=self.in_flight.get(name, 0),
                    last_error=self.refuse[name].reason if name in self.refuse else None,
                )
            )
        return ServiceStatus(models=tuple(models))

    async def _act(self, action: str, model: str | None) -> None:
        if model is not None and model not in self.upstreams:
            raise UnknownModel(f"no model {model!r}")
        self.actions.append((action, model))

    async def load(self, model: str) -> None:
        await self._act("load", model)

    async def unload(self, model: str) -> None:
        await self._act("unload", model)

    async def reset_failed(self, model: str) -> None:
        self.refuse.pop(model, None)
        await self._act("reset", model)

    async def reload(self) -> str:
        await self._act("reload", None)
        return "nothing changed"


@contextmanager
def running_proxy(backends: StaticBackends, **settings: object) -> Iterator[tuple[ProxyServer, str]]:
    """A proxy on a free loopback port in a background event loop; yields (server, base URL)."""
    proxy_settings = ProxySettings(listen=f"127.0.0.1:{free_port()}", **settings)  # type: ignore[arg-type]
    server = ProxyServer(proxy_settings, backends)
    with anyio.from_thread.start_blocking_portal() as portal:
        future, (host, port) = portal.start_task(server.serve)
        try:
            yield server, f"http://{host}:{port}"
        finally:
            future.cancel()


class FakeLlama:
    """A fake llama-server process (tests/fakes/fake_llama_server.py) recording its events."""

    def __init__(self, events: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.events_path = events
        environment = {**os.environ, "FAKE_LLAMA_EVENTS": str(events), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, str(FAKE_SERVER), "--host", "127.0.0.1", "--port", str(self.port), "-m", "fake.gguf"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._healthy, timeout=15, what="the fake llama-server")

    def _healthy(self) -> bool:
        assert self.process.poll() is None, "the fake llama-server exited"
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def upstream(self) -> Upstream:
        return Upstream("127.0.0.1", self.port)

    def events(self, kind: str | None = None) -> list[dict]:
        if not self.events_path.exists():
            return []
        lines = [json.loads(line) for line in self.events_path.read_text().splitlines() if line]
        return [e for e in lines if kind is None or e["event"] == kind]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: int


class ScriptedUpstream:
    """A FAKE child for exact wire checks: a raw socket server in a thread that parses each request
    strictly with h11, records it, and answers as `script(connection_no, request_no)` says:
    "ok" (200 JSON), "close" (read the request, close without a byte), "partial" (half a head,
    then close), "ok-close" (200, then close the connection while the proxy thinks it idle).
    A request h11 refuses to parse is recorded in `malformed`."""

    def __init__(self, script=lambda connection, request: "ok") -> None:
        import socket
        import threading

        self.script = script
        self.received: list[Received] = []
        self.malformed: list[str] = []
        self.connections = 0
        self.closed_connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def upstream(self) -> Upstream:
        return Upstream("127.0.0.1", self.port)

    def _accept(self) -> None:
        import threading

        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock, number: int) -> None:
        try:
            self._serve_requests(sock, number)
        finally:
            sock.close()
            self.closed_connections += 1

    def _serve_requests(self, sock, number: int) -> None:
        import h11

        conn = h11.Connection(h11.SERVER)
        request_no = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.malformed.append(str(exc))
                return
            if event is h11.NEED_DATA:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                self.malformed.append(f"unexpected {event!r}")
                return
            body = b""
            while True:
                try:
                    part = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    self.malformed.append(str(exc))
                    return
                if part is h11.NEED_DATA:
                    data = sock.recv(65536)
                    if not data:
                        self.malformed.append("connection closed mid-body")
                        return
                    conn.receive_data(data)
                elif isinstance(part, h11.Data):
                    body += part.data
                else:
                    break
            request_no += 1
            self.received.append(Received(event.method, event.target, list(event.headers), body, number))
            action = self.script(number, request_no)
            if action == "close":
                return
            if action == "partial":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-")
                return
            payload = json.dumps({"connection": number, "request": request_no}).encode()
            out = conn.send(h11.Response(status_code=200, headers=[("content-type", "application/json"), ("content-length", str(len(payload)))]))
            if event.method != b"HEAD":  # a HEAD's answer has GET's headers and no body
                out += conn.send(h11.Data(data=payload))
            out += conn.send(h11.EndOfMessage())
            sock.sendall(out)
            if action == "ok-close":
                return
            conn.start_next_cycle()

    def stop(self) -> None:
        self._stopping = True
        self._sock.close()

    def __enter__(self) -> ScriptedUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
