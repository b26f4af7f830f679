"""The OpenAI-compatible HTTP/1.1 server: listener, one loop per client connection, and the relay
of each request to a child through a lease from `Backends`.

Rules kept here:
- every connection is its own failure boundary: nothing one connection raises reaches the
  listener (an exception escaping a handler would cancel the serving task group; DESIGN.md);
- one timeout per phase, each a named setting: header_timeout (first request, and a whole header
  block once its first byte came), keepalive_timeout (idle between requests), body_timeout (each
  wait for body bytes), upstream_connect_timeout, first_byte_timeout, stream_idle_timeout;
- while a request is forwarded, the client socket keeps reading (sockets.py) and its EOF or reset
  cancels the relay at once and the upstream connection is closed, so the child stops generating;
- responses are relayed as they arrive: what one read of the child gives is written before the
  next read, never held back; what is already in hand is coalesced into one write;
- settings and backends can be swapped with `configure()` while the listener stays bound; a
  request uses the setup that was current when its head arrived;
- a drain (`begin_drain`, on shutdown) accepts nothing new, closes connections that wait for a
  request, and closes every other one after the response it is sending (`Connection: close`);
- a child whose port refuses the connection may have just died: the request asks for a lease
  once more, which waits for the restart, instead of answering 502 at once;
- a streaming request that waits for its model gets SSE comments meanwhile (loading_notes.py);
- the proxy's own streams (/events, /logs/<model>: streams.py) end cleanly when a drain begins,
  so that a client reconnects to the next run of the service; the status page (/ui: ui_files.py)
  is served without a key, as /health is: it holds no data.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import h11
from anyio.abc import SocketAttribute, SocketListener, TaskStatus
from anyio.lowlevel import checkpoint

from llama_smart_proxy.schemas.config import ProxySettings, parse_listen
from llama_smart_proxy.supervisor.errors import RuntimeFailure
from llama_smart_proxy.supervisor.proxy import routes, streams, ui_files
from llama_smart_proxy.supervisor.proxy.access import ApiKeys, Cors, unauthorized
from llama_smart_proxy.supervisor.proxy.backends import BackendError, Backends, ModelUnavailable, Progress, Upstream
from llama_smart_proxy.supervisor.proxy.events import SSE_CONTENT_TYPE
from llama_smart_proxy.supervisor.proxy.http import (
    HTTP_VERSIONS,
    MAX_HEADER_BYTES,
    MODEL_ROUTES,
    READ_METHODS,
    ChunkSizeGuard,
    HttpError,
    ModelRename,
    Reply,
    connect_refused,
    declared_length,
    downstream_response_headers,
    framing_problem,
    head_size,
    header_value,
    missing_model_error,
    model_from_body,
    model_rename,
    protocol_error,
    reason_phrase,
    split_target,
    unknown_model_error,
    upstream_request_headers,
    upstream_route,
    version_error,
    without_length,
)
from llama_smart_proxy.supervisor.proxy.loading_notes import LoadingNotes, error_event, upstream_error_event, wants_stream
from llama_smart_proxy.supervisor.proxy.loop_clock import now as loop_now
from llama_smart_proxy.supervisor.proxy.metrics import MODEL_MISSING, MODEL_UNKNOWN, NO_MODEL, ProxyMetrics
from llama_smart_proxy.supervisor.proxy.relay_framing import RelayFraming, relay_head
from llama_smart_proxy.supervisor.proxy.sockets import Socket, accept
from llama_smart_proxy.supervisor.proxy.upstream_http import END, NEED_DATA, ResponseClosed, ResponseError
from llama_smart_proxy.supervisor.proxy.upstream import (
    UpstreamClosed,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamRefused,
)

log = logging.getLogger("llama-smart-proxy.proxy")

LINGER_S = 1.0  # after an early error reply, how long unread request bytes are drained before closing
SSE_PING = b":\n\n"  # what llama-server sends while a stream is silent (--sse-ping-interval)
STATUS_CLIENT_GONE = 499  # nginx's code for "client closed the request", used in metrics and logs
ACCEPT_BACKOFF_S = 0.1  # pause after accept() fails (out of file descriptors) before trying again
ACCEPT_BATCH = 64  # connections accepted in one pass of the event loop, at most
# Bodies larger than this (base64 images, long prompts) are JSON-parsed in a worker thread: 2-7 ms
# per MB of parsing on the event loop would stall every other connection.
THREAD_PARSE_BYTES = 256 * 1024
ERROR_BODY_BYTES = 64 * 1024
"""Of a child's error answer to a stream already answered 200 (loading notes), what is passed on."""
LOGS_PREFIX = b"/logs/"
STREAM_WRITE_S = 5.0
"""Longest one piece of an event stream of our own may take to write."""


@dataclass(frozen=True)
class Setup:
    """What a request is served with; replaced whole by `ProxyServer.configure`."""

    settings: ProxySettings
    backends: Backends
    keys: ApiKeys
    cors: Cors

    @classmethod
    def build(cls, settings: ProxySettings, backends: Backends) -> Setup:
        return cls(settings, backends, ApiKeys.from_settings(settings), Cors.from_settings(settings))


class CloseConnection(Exception):
    """End this client connection now, without a reply (one may be half sent)."""


class ClientGone(CloseConnection):
    """The client closed or reset its connection."""


class _Client:
    """One client socket. The socket tells the moment the client closes, even while a response
    is being relayed and nothing reads: that cancels the request being watched."""

    def __init__(self, sock: Socket, peer: str) -> None:
        self.socket = sock
        self.peer = peer
        self.at_eof = False
        self.head_request = False  # the request being answered is a HEAD: its replies carry no body
        self.relayed: RelayFraming | None = None
        """Set while a relayed response written without h11 is under way (h11 knows nothing of it)."""
        self.watch_scope: anyio.CancelScope | None = None
        sock.on_end = self._ended

    def _ended(self) -> None:
        self.at_eof = True
        if self.watch_scope is not None:
            self.watch_scope.cancel()

    async def receive(self) -> bytes:
        """The next bytes from the client; b'' once it closed."""
        try:
            return await self.socket.receive()
        except (anyio.ClosedResourceError, OSError):
            self.at_eof = True
            return b""

    async def send(self, data: bytes) -> None:
        try:
            await self.socket.send(data)
        except (anyio.ClosedResourceError, OSError):
            self.at_eof = True
            raise ClientGone() from None


class ProxyServer:
    """The HTTP front. `serve()` runs until cancelled; `configure()` swaps settings and backends."""

    def __init__(self, settings: ProxySettings, backends: Backends) -> None:
        self._setup = Setup.build(settings, backends)
        self.metrics = ProxyMetrics()
        self.pool = UpstreamPool()
        self.address: tuple[str, int] | None = None
        self.started_at = time.time()
        self._slots: anyio.Semaphore | None = None
        self._accepting: anyio.CancelScope | None = None
        self._accept_stopped = False
        self.draining = False
        self._waiting_for_request: set[anyio.CancelScope] = set()
        """The scopes of connections waiting for a request's first byte: a drain closes them."""
        self._own_streams: set[anyio.CancelScope] = set()
        """The scopes of /events and /logs streams: a drain ends them."""
        self._own_listeners: list[socket.socket] = []
        """The listening sockets serve() bound itself (not a caller's)."""

    def stop_accepting(self) -> None:
        """Accept no more connections; connections already open are served on."""
        self._accept_stopped = True
        if self._accepting is not None:
            self._accepting.cancel()

    def begin_drain(self) -> None:
        """Shutdown: accept nothing new, close idle connections, and close each busy one after
        the response it is sending. Requests in flight go on."""
        self.stop_accepting()
        self.draining = True
        for scope in list(self._waiting_for_request) + list(self._own_streams):
            scope.cancel()
        for listener in self._own_listeners:
            # Linux takes a listening socket out of LISTEN on shutdown(): new connections are
            # refused at once (a balancer tries another host) instead of waiting in the backlog
            # for the drain to end; the descriptor itself is closed when serve() returns
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def configure(self, settings: ProxySettings, backends: Backends) -> None:
        """Serve new requests with these settings and backends; the listener stays bound and
        requests already running finish with what they started with. `listen` and
        `max_connections` take effect on the next start. Raises ApiKeyFileError, keeping the old
        setup, when api_keys_file cannot be read."""
        self.install(Setup.build(settings, backends))

    def install(self, setup: Setup) -> None:
        """Serve new requests with a setup built beforehand (a reload builds it in its phase 1)."""
        self._setup = setup

    @property
    def setup(self) -> Setup:
        return self._setup

    async def serve(
        self,
        *,
        listener: SocketListener | socket.socket | None = None,
        task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until cancelled. Binds `settings.listen` unless given an
        already-bound listening socket (anyio's or a plain one, which the caller then owns).
        Reports (host, port) once listening."""
        settings = self._setup.settings
        bound: list[SocketListener] = []
        if listener is None:
            host, port = parse_listen(settings.listen)
            try:
                multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
            except OSError as exc:  # in use, not this host's address, a privileged port: one line
                raise RuntimeFailure(f"proxy.listen {settings.listen}: cannot listen: {exc.strerror or exc}") from None
            bound = list(multi.listeners)  # type: ignore[arg-type]
            raw = [one.extra(SocketAttribute.raw_socket) for one in bound]
            self._own_listeners = list(raw)
        elif isinstance(listener, socket.socket):
            raw = [listener]
        else:
            raw = [listener.extra(SocketAttribute.raw_socket)]
        for one in raw:
            one.setblocking(False)
        sockname = raw[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self._slots = anyio.Semaphore(settings.max_connections)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.pool.run)
                tg.start_soon(self._accept_all, raw, tg)
                log.info("listening on %s:%d", *self.address)
                task_status.started(self.address)
        finally:
            self.pool.close()
            with anyio.CancelScope(shield=True):
                for one in bound:
                    await one.aclose()

    async def _accept_all(self, listeners: list[socket.socket], tg: anyio.abc.TaskGroup) -> None:
        with anyio.CancelScope() as self._accepting:
            if self._accept_stopped:
                return
            async with anyio.create_task_group() as accepting:
                for one in listeners:
                    accepting.start_soon(self._accept_loop, one, tg)

    async def _accept_loop(self, listener: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        assert self._slots is not None
        accepted = 0
        while True:
            # a burst of connections is accepted without a pass of the loop for each, ACCEPT_BATCH
            # at most (as asyncio's own servers do): a flood does not hold the loop
            if accepted == ACCEPT_BATCH:
                accepted = 0
                await checkpoint()
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                await self._slots.acquire()
            try:
                sock, address = await accept(listener)
            except OSError as exc:  # out of file descriptors, mostly: wait, never die
                self._slots.release()
                log.warning("accept failed: %s", exc)
                await anyio.sleep(ACCEPT_BACKOFF_S)
                continue
            except BaseException:
                self._slots.release()
                raise
            tg.start_soon(self._connection, sock, address)
            accepted += 1

    async def _connection(self, raw: socket.socket, address: Any) -> None:
        """One client connection; its own failure boundary."""
        self.metrics.connections += 1
        self.metrics.connections_total += 1
        sock = Socket(raw)
        try:
            peer = str(address[0]) if isinstance(address, tuple) else "unix"
            try:
                await self._serve_requests(_Client(sock, peer))
            except CloseConnection:
                pass
        except Exception:
            log.exception("a connection failed; it was closed, the server goes on")
        finally:
            self.metrics.connections -= 1
            assert self._slots is not None
            self._slots.release()
            sock.close()

    # ---- one connection's requests -------------------------------------------------------

    async def _serve_requests(self, client: _Client) -> None:
        conn = _request_reader()
        first = True
        while True:
            setup = self._setup
            if self.draining and not first:
                return  # the response just sent said Connection: close
            try:
                request = await self._read_head(conn, client, setup, first)
            except HttpError as error:
                if conn.our_state is h11.IDLE or conn.our_state is h11.SEND_RESPONSE:
                    await self._reply(conn, client, error.reply(), [])
                    await self._linger(client)
                return
            if request is None:
                return
            first = False
            await self._handle(conn, client, self._setup, request)
            relayed, client.relayed = client.relayed, None
            if relayed is not None:  # the response went out without h11: a fresh h11 reads the next request
                if not relayed.keep_alive:
                    return
                conn = _next_request_connection(conn)
                continue
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                if conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                    await self._linger(client)  # the request was not read to its end
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_head(self, conn: h11.Connection, client: _Client, setup: Setup, first: bool) -> h11.Request | None:
        """The next request's head, or None when the client closed or idled out between requests."""
        settings = setup.settings
        client.head_request = False
        fed = len(conn.trailing_data[0])
        waited_for_first_byte = not fed
        with anyio.move_on_after(settings.header_timeout if first else settings.keepalive_timeout) as scope:
            if waited_for_first_byte:
                if self.draining:
                    scope.cancel()
                self._waiting_for_request.add(scope)
            head_began = False  # and the deadline is not yet header_timeout from then
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    log.debug("client %s: refused a request h11 cannot parse: %s", client.peer, exc)
                    raise protocol_error(exc.error_status_hint, str(exc)) from None
                if isinstance(event, h11.Request):
                    client.head_request = event.method == b"HEAD"
                    # h11 bounds only a head still incomplete; one that arrived whole in a big read
                    # is measured here.
                    if fed > MAX_HEADER_BYTES and head_size(event) > MAX_HEADER_BYTES:
                        raise protocol_error(431, "")
                    if event.http_version not in HTTP_VERSIONS:
                        raise version_error(event.http_version)
                    return event
                if event is h11.NEED_DATA:
                    if head_began:  # moved only now: a head that came whole in one read needs no timer
                        head_began = False
                        scope.deadline = loop_now() + settings.header_timeout
                    try:
                        data = await client.receive()
                    finally:
                        self._waiting_for_request.discard(scope)
                    fed += len(data)
                    if data and waited_for_first_byte:
                        waited_for_first_byte = False
                        head_began = True
                    conn.receive_data(data)
                    continue
                # ConnectionClosed (or PAUSED, which cannot happen between requests)
                return None
        if waited_for_first_byte:
            return None  # idle keep-alive connection: close quietly
        raise HttpError(408, "request header not received in time", code="timeout", close=True)

    async def _read_body(self, conn: h11.Connection, client: _Client, setup: Setup, request: h11.Request) -> bytes:
        limit = setup.settings.max_body_size
        length = declared_length(request.headers)
        if length is not None and length > limit:
            raise HttpError(413, f"request body larger than {limit} bytes", code="body_too_large", close=True)
        guard: ChunkSizeGuard | None = None
        if length is None and header_value(request.headers, b"transfer-encoding") is not None:
            guard = ChunkSizeGuard(limit)
            guard.feed(conn.trailing_data[0])  # what arrived with the head
        if conn.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=reason_phrase(100))
            await client.send(conn.send(continue_) or b"")
        parts: list[bytes] = []
        total = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                log.debug("client %s: refused a request body h11 cannot parse: %s", client.peer, exc)
                raise protocol_error(exc.error_status_hint, str(exc)) from None
            if event is h11.NEED_DATA:
                with anyio.move_on_after(setup.settings.body_timeout):
                    data = await client.receive()
                    if not data:
                        raise ClientGone()
                    if guard is not None:
                        guard.feed(data)
                    conn.receive_data(data)
                    continue
                raise HttpError(408, "request body not received in time", code="timeout", close=True)
            if isinstance(event, h11.Data):
                total += len(event.data)
                if total > limit:
                    raise HttpError(413, f"request body larger than {limit} bytes", code="body_too_large", close=True)
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return parts[0] if len(parts) == 1 else b"".join(parts)
            else:
                raise ClientGone()

    async def _handle(self, conn: h11.Connection, client: _Client, setup: Setup, request: h11.Request) -> None:
        started = time.perf_counter()
        model = NO_MODEL
        cors = setup.cors.response_headers(request.headers) if setup.cors.enabled else []
        try:
            problem = framing_problem(request.headers)
            if problem is not None:
                raise problem
            method = request.method
            if method == b"CONNECT":
                raise connect_refused()
            path, query = split_target(request.target)
            if method == b"OPTIONS" and setup.cors.enabled:
                preflight = setup.cors.preflight_headers(request.headers)
                if preflight is not None:
                    await self._reply(conn, client, Reply(204, headers=preflight), [])
                    self._observe(model, 204, started)
                    return
            if path == b"/health":
                if method not in READ_METHODS:
                    raise routes.method_not_allowed(routes.READ_ALLOW)
                reply = routes.health_reply(await setup.backends.status())
                await self._reply(conn, client, reply, cors)
                self._observe(model, reply.status, started)
                return
            if path.startswith(ui_files.PREFIX) and (ui_name := ui_files.file_name(path)) is not None:
                if method not in READ_METHODS:
                    raise routes.method_not_allowed(routes.READ_ALLOW)
                reply = await ui_files.ui_reply(ui_name)
                await self._reply(conn, client, reply, cors)
                self._observe(model, reply.status, started)
                return
            if setup.keys.enabled and not setup.keys.accepts(request.headers):
                raise unauthorized()
            if path in MODEL_ROUTES:
                if method != b"POST":
                    raise routes.method_not_allowed(b"POST")
                body = await self._read_body(conn, client, setup, request)
                if len(body) > THREAD_PARSE_BYTES:
                    name = await anyio.to_thread.run_sync(model_from_body, body)
                else:
                    name = model_from_body(body)
                name = name or setup.settings.default_model
                model = setup.backends.resolve(name) if name is not None else None
                if model is None:
                    model = MODEL_MISSING if name is None else MODEL_UNKNOWN
                    raise await self._resolve_failed(setup, name)
                await self._forward(conn, client, setup, request, model, request.target, body, cors, started, asked=name)
                return
            routed = upstream_route(path, query)
            if routed is not None:
                name, target = routed
                model = setup.backends.resolve(name)
                if model is None:
                    model = MODEL_UNKNOWN
                    raise await self._resolve_failed(setup, name)
                body = await self._read_body(conn, client, setup, request)
                await self._forward(conn, client, setup, request, model, target, body, cors, started, asked=name)
                return
            if path == b"/events" or path.startswith(LOGS_PREFIX):
                if method not in READ_METHODS:
                    raise routes.method_not_allowed(routes.READ_ALLOW)
                # counted once its head is out: a stream's length is no request's latency
                await self._own_stream(
                    conn, client, setup, request, path, query, cors, opened=lambda: self._observe(model, 200, started)
                )
                return
            reply = await self._own_route(conn, client, setup, request, method, path)
            await self._reply(conn, client, reply, cors)
            self._observe(model, reply.status, started)
        except HttpError as error:
            await self._reply(conn, client, error.reply(), cors)
            self._observe(model, error.status, started)
        except BackendError as error:
            await self._reply(conn, client, _backend_error_reply(error), cors)
            self._observe(model, error.status, started)

    async def _resolve_failed(self, setup: Setup, name: str | None) -> HttpError:
        service = await setup.backends.status()
        if name is None:
            return missing_model_error(service.known_names())
        # a model another host of the fleet runs is no typo: say where it runs
        return routes.elsewhere_error(service, name) or unknown_model_error(name, service.known_names())

    async def _own_route(
        self, conn: h11.Connection, client: _Client, setup: Setup, request: h11.Request, method: bytes, path: bytes
    ) -> Reply:
        backends = setup.backends
        if path == b"/v1/models" or path.startswith(b"/v1/models/"):
            if method not in READ_METHODS:
                raise routes.method_not_allowed(routes.READ_ALLOW)
            service = await backends.status()
            if path == b"/v1/models":
                return routes.models_reply(service)
            return routes.model_reply(service, path[len(b"/v1/models/") :].decode("utf-8", "replace"))
        if path == b"/status":
            if method not in READ_METHODS:
                raise routes.method_not_allowed(routes.READ_ALLOW)
            return routes.status_reply(await backends.status(), self._proxy_status())
        if path == b"/metrics":
            if method not in READ_METHODS:
                raise routes.method_not_allowed(routes.READ_ALLOW)
            service = await backends.status()
            # rendered from a copy, in a worker thread: the process_* metrics read /proc
            return await anyio.to_thread.run_sync(routes.metrics_reply, self.metrics.copy(), service)
        if path.startswith(routes.ADMIN_PREFIX):
            refusal = setup.keys.admin_refusal(request.headers, client.peer)
            if refusal is not None:
                raise refusal
            target = routes.admin_target(path)
            if target is None:
                raise routes.not_found(path)
            if method != b"POST":
                raise routes.method_not_allowed(b"POST")
            await self._read_body(conn, client, setup, request)
            action, name = target
            summary = None
            if name is not None:
                model = backends.resolve(name)
                if model is None:
                    raise await self._resolve_failed(setup, name)
                name = model
                log.info("admin: %s %s", action, model)
                if action == "load":
                    await backends.load(model)
                elif action == "unload":
                    await backends.unload(model)
                else:
                    await backends.reset_failed(model)
            else:
                log.info("admin: reload")
                summary = await backends.reload()
            return routes.admin_done_reply(action, name, await backends.status(), summary)
        raise routes.not_found(path)

    async def _own_stream(
        self,
        conn: h11.Connection,
        client: _Client,
        setup: Setup,
        request: h11.Request,
        path: bytes,
        query: bytes,
        cors: list[tuple[bytes, bytes]],
        *,
        opened: Callable[[], None],
    ) -> None:
        """GET /events or /logs/<model>: server-sent events until the client leaves or a drain
        begins (then the stream ends whole, and the client reconnects)."""
        backends = setup.backends
        raw_id = header_value(request.headers, b"last-event-id")
        last_event_id = raw_id.decode("latin-1") if raw_id else None
        run: Callable[[streams.Send], Awaitable[None]]
        if path == b"/events":

            async def snapshot() -> dict[str, Any]:
                return routes.status_body(await backends.status(), self._proxy_status())

            run = partial(streams.stream_events, backends.events, snapshot, last_event_id=last_event_id)
        else:
            name = path[len(LOGS_PREFIX) :].decode("utf-8", "replace")
            model = backends.resolve(name)
            if model is None:
                raise await self._resolve_failed(setup, name)
            lines = backends.log(model)
            if lines is None:
                raise HttpError(404, f"model {model!r} is not placed, so it has no server output", code="not_found")
            tail = _query_int(query, "tail", streams.LOG_TAIL_DEFAULT)
            run = partial(
                streams.stream_log, model, lines, backends.events.epoch, tail=tail, last_event_id=last_event_id
            )
        await self._open_event_stream(conn, client, cors)
        opened()
        if client.head_request:
            await client.send(conn.send(h11.EndOfMessage()) or b"")
            return

        async def send(data: bytes) -> None:
            await self._send_whole(conn, client, data)

        try:
            with anyio.CancelScope() as scope:
                client.watch_scope = scope
                if client.at_eof or self.draining:
                    scope.cancel()
                self._own_streams.add(scope)
                await run(send)
        finally:
            self._own_streams.discard(scope)
            client.watch_scope = None
            if not client.at_eof and conn.our_state is h11.SEND_BODY:
                # a drain (or the serving task group's end, right after it): end the stream whole,
                # so that the client sees an ended stream and reconnects, not a broken one
                with anyio.CancelScope(shield=True) as ending:
                    ending.deadline = loop_now() + STREAM_WRITE_S
                    try:
                        await client.send(conn.send(h11.EndOfMessage()) or b"")
                    except ClientGone:
                        pass
        if client.at_eof:
            raise ClientGone()

    async def _open_event_stream(self, conn: h11.Connection, client: _Client, cors: list[tuple[bytes, bytes]]) -> None:
        """A 200 head for server-sent events (chunked, never cached or buffered on the way)."""
        headers = [
            (b"content-type", SSE_CONTENT_TYPE),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx would hold the events back
            *cors,
        ]
        if self.draining:
            headers.append((b"connection", b"close"))
        await client.send(conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK")) or b"")

    async def _send_whole(self, conn: h11.Connection, client: _Client, data: bytes) -> None:
        """One piece of a stream of our own, written whole or not begun: a cancellation (a drain)
        never cuts a chunk in two. A client that takes none of it for STREAM_WRITE_S is dropped."""
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = loop_now() + STREAM_WRITE_S
            await client.send(conn.send(h11.Data(data=data)) or b"")
        if scope.cancelled_caught:
            raise ClientGone()

    def _proxy_status(self) -> dict[str, Any]:
        settings = self._setup.settings
        return {
            "listen": f"{self.address[0]}:{self.address[1]}" if self.address else settings.listen,
            "started_at": self.started_at,
            "connections": self.metrics.connections,
            "in_flight": dict(self.metrics.in_flight),
            "upstream_idle_connections": self.pool.idle_count(),
            "auth": self._setup.keys.enabled,
        }

    # ---- forwarding ----------------------------------------------------------------------

    async def _forward(
        self,
        conn: h11.Connection,
        client: _Client,
        setup: Setup,
        request: h11.Request,
        model: str,
        target: bytes,
        body: bytes,
        cors: list[tuple[bytes, bytes]],
        started: float,
        *,
        asked: str | None = None,
    ) -> None:
        """Relay one request to `model`'s child; `asked` is the name the client used, which the
        response's "model" is renamed to."""
        settings = setup.settings
        status = STATUS_CLIENT_GONE
        responded = False  # a response head went to the client
        upstream_conn: UpstreamConnection | None = None
        in_flight = self.metrics.in_flight
        in_flight[model] += 1
        try:
            with anyio.CancelScope() as scope:
                client.watch_scope = scope
                if client.at_eof:
                    scope.cancel()
                refused_once = False
                notes = self._loading_notes(conn, client, setup, model, body, cors)

                async def answer_error(error: HttpError) -> None:
                    if notes is not None and notes.committed:  # the 200 head went out with a note
                        await self._end_stream_with_error(conn, client, error)
                    else:
                        await self._reply(conn, client, error.reply(), cors)

                while True:
                    try:
                        async with AsyncExitStack() as held:
                            upstream = await self._lease(held, setup, model, notes)
                            host = f"{upstream.host}:{upstream.port}".encode()
                            headers = upstream_request_headers(
                                request.headers,
                                host=host,
                                peer=client.peer.encode(),
                                body_length=len(body),
                                drop_authorization=setup.keys.enabled,
                            )

                            def on_sent() -> None:
                                scope.deadline = loop_now() + settings.first_byte_timeout

                            upstream_conn, response = await self.pool.exchange(
                                upstream,
                                lambda c: c.start_request(request.method, target, headers, body),
                                connect_timeout=settings.upstream_connect_timeout,
                                on_sent=on_sent,
                            )
                            status = response.status
                            response_headers, _ = downstream_response_headers(response.headers)
                            rename = model_rename(asked, model, response_headers) if asked is not None else None
                            if notes is not None and notes.committed:
                                # our 200 head and notes went out: only the child's stream may follow
                                responded = True
                                if status != 200:
                                    await self._relay_error_into_stream(conn, client, upstream_conn, status)
                                    upstream_conn = None
                                    break
                                pending: list[bytes] = []
                                body_framing: RelayFraming | _H11Body = _H11Body(conn)
                            else:
                                if rename is not None:
                                    response_headers = without_length(response_headers)
                                if cors:
                                    response_headers.extend(cors)
                                if self.draining:
                                    response_headers.append((b"connection", b"close"))
                                head, body_framing = relay_head(
                                    status,
                                    response_headers,
                                    method=request.method,
                                    http_version=request.http_version,
                                    request_headers=request.headers,
                                )
                                client.relayed = body_framing
                                pending = [head]
                                responded = True
                            await self._relay_body(
                                body_framing, client, upstream_conn, pending, scope, settings.stream_idle_timeout,
                                upstream.progress, rename,
                            )  # fmt: skip
                            self.pool.checkin(upstream_conn)
                            upstream_conn = None
                        break
                    except ModelUnavailable as error:
                        status = error.status
                        await answer_error(_backend_http_error(error))
                        break
                    except UpstreamRefused as error:
                        if not refused_once:  # it may have just died: the next lease waits for it
                            refused_once = True
                            log.info("model %s: %s; asking for it again", model, error.message)
                            if notes is None:  # that wait may be a restart: notes, as for any wait
                                notes = self._loading_notes(conn, client, setup, model, body, cors)
                            continue
                        status = error.status
                        await self._upstream_failed(conn, client, model, error, responded, answer_error)
                        break
                    except UpstreamError as error:
                        status = error.status
                        await self._upstream_failed(conn, client, model, error, responded, answer_error)
                        break
                if notes is not None and notes.broken:
                    raise ClientGone()
            if scope.cancelled_caught:
                if client.at_eof:
                    raise ClientGone()
                # a phase deadline passed: first byte or stream idle
                status = 504
                if responded:
                    raise CloseConnection()
                await answer_error(
                    HttpError(504, f"model {model!r} did not answer in time", type="server_error", code="timeout")
                )
        except ClientGone:
            status = STATUS_CLIENT_GONE
            raise
        finally:
            client.watch_scope = None
            in_flight[model] -= 1
            if upstream_conn is not None:
                upstream_conn.close()
            self._observe(model, status, started)

    async def _upstream_failed(
        self,
        conn: h11.Connection,
        client: _Client,
        model: str,
        error: UpstreamError,
        responded: bool,
        answer_error: Callable[[HttpError], Awaitable[None]],
    ) -> None:
        """Tell the client, in our own words, that the model's server failed it."""
        if responded:
            log.warning("model %s: %s; the client's response ends unfinished", model, error.message)
            raise CloseConnection() from None  # the client sees its response end unfinished
        log.warning("model %s: %s", model, error.message)
        if isinstance(error, UpstreamClosed):
            message = f"model {model!r}: its server stopped or closed the connection before answering"
        elif isinstance(error, UpstreamRefused):
            message = f"model {model!r}: its server is not reachable ({error.reason})"
        else:
            message = f"model {model!r}: {error.message}"
        await answer_error(HttpError(error.status, message, type="server_error", code="upstream_error"))

    # ---- loading notes: a streaming request that waits for its model --------------------

    def _loading_notes(
        self, conn: h11.Connection, client: _Client, setup: Setup, model: str, body: bytes, cors: list[tuple[bytes, bytes]]
    ) -> LoadingNotes | None:
        """Notes for this request while it waits for a lease, or None when it gets none."""
        interval = setup.settings.loading_comment_interval
        if interval <= 0 or client.head_request or setup.backends.admits_now(model) or not wants_stream(body):
            return None

        async def status() -> Any:
            return (await setup.backends.status()).model(model)

        return LoadingNotes(
            model,
            interval,
            status=status,
            open_stream=lambda: self._open_event_stream(conn, client, cors),
            send=lambda data: client.send(conn.send(h11.Data(data=data)) or b""),
        )

    async def _lease(self, held: AsyncExitStack, setup: Setup, model: str, notes: LoadingNotes | None) -> Upstream:
        """A lease on `model`, held until `held` closes; with `notes`, they run while it waits."""
        if notes is None:
            return await held.enter_async_context(setup.backends.lease(model))
        failure: Exception | None = None
        upstream: Upstream | None = None
        # the notes' task lives only while the lease is being waited for; the lease itself is
        # held by this task (the exit stack) for the rest of the request
        async with anyio.create_task_group() as waiting:
            waiting.start_soon(notes.run)
            try:
                upstream = await held.enter_async_context(setup.backends.lease(model))
            except Exception as exc:  # raised below, outside the task group, unwrapped
                failure = exc
            finally:
                notes.stop()
        if notes.broken:
            raise ClientGone()
        if failure is not None:
            raise failure
        assert upstream is not None
        return upstream

    async def _end_stream_with_error(self, conn: h11.Connection, client: _Client, error: HttpError) -> None:
        """After notes: the error as one SSE data event, then the stream's end."""
        await self._send_whole(conn, client, error_event(error.status, error.message, error.type, error.code))
        await client.send(conn.send(h11.EndOfMessage()) or b"")

    async def _relay_error_into_stream(
        self, conn: h11.Connection, client: _Client, upstream: UpstreamConnection, status: int
    ) -> None:
        """After notes, the child answered an error: pass it on as one SSE data event. Closes or
        checks in `upstream`."""
        reader = upstream.reader
        parts: list[bytes] = []
        size = 0
        complete = False
        while size <= ERROR_BODY_BYTES:
            try:
                event = reader.next_event()
            except ResponseError:
                break
            if event is NEED_DATA:
                await upstream.receive_more()
                continue
            if type(event) is bytes:
                parts.append(event)
                size += len(event)
                continue
            complete = event is END
            break
        if complete:
            self.pool.checkin(upstream)
        else:
            upstream.close()
        await self._send_whole(conn, client, upstream_error_event(status, b"".join(parts)[:ERROR_BODY_BYTES]))
        await client.send(conn.send(h11.EndOfMessage()) or b"")

    async def _relay_body(
        self,
        framing: RelayFraming | _H11Body,
        client: _Client,
        upstream: UpstreamConnection,
        pending: list[bytes],
        scope: anyio.CancelScope,
        idle_timeout: float,
        progress: Progress | None,
        rename: ModelRename | None = None,
    ) -> None:
        """Relay the child's response body as it arrives; write what is in hand before each read.

        Each read that brought data (not only llama-server's SSE keep-alive pings) is noted in
        `progress`: the runtime tells a slow child from a hung one with it."""
        reader = upstream.reader
        idle_phase = False  # the deadline still is the first byte's
        got_data = True  # the response head itself
        while True:
            try:
                event = reader.next_event()
            except ResponseClosed:
                raise UpstreamError(502, "the model's server closed the connection mid-response") from None
            except ResponseError as exc:
                raise UpstreamError(502, f"the model's server broke the response: {exc}") from None
            if event is NEED_DATA:
                if pending:
                    await client.send(b"".join(pending))
                    pending.clear()
                # Push the idle deadline only once half of it is used: re-arming a timer per
                # chunk is measurable at thousands of chunks a second.
                now = loop_now()
                if got_data and progress is not None:
                    progress.at = now
                    got_data = False
                if not idle_phase or scope.deadline - now < idle_timeout / 2:
                    scope.deadline = now + idle_timeout
                    idle_phase = True
                await upstream.receive_more()
                continue
            if type(event) is bytes:
                pending.append(framing.data(event if rename is None else rename.feed(event)))
                if event != SSE_PING:
                    got_data = True
            else:  # END
                if rename is not None:
                    pending.append(framing.data(rename.flush()))
                pending.append(framing.end())
                await client.send(b"".join(pending))
                return

    # ---- writing -------------------------------------------------------------------------

    async def _reply(self, conn: h11.Connection, client: _Client, reply: Reply, cors: list[tuple[bytes, bytes]]) -> None:
        """Send a whole reply; ask to close when the request was not read to its end."""
        if client.relayed is not None or (conn.our_state is not h11.SEND_RESPONSE and conn.our_state is not h11.IDLE):
            raise CloseConnection()  # a response already started: nothing sensible can follow
        if conn.their_state is h11.SEND_BODY and not reply.close:
            _drop_buffered_body(conn)
        close = reply.close or conn.their_state is not h11.DONE or self.draining
        headers = reply.head_headers()
        if cors:
            headers.extend(cors)
        if close and not reply.close:
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason_phrase(reply.status))) or b""
        if reply.body and not client.head_request:  # HEAD: GET's headers, Content-Length included
            data += conn.send(h11.Data(data=reply.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await client.send(data)

    async def _linger(self, client: _Client) -> None:
        """Half-close, then read and drop what the client still sends for a moment, so that a client
        still sending its body reads our answer instead of a reset."""
        client.socket.shutdown_write()
        with anyio.move_on_after(LINGER_S):
            while await client.receive():
                pass

    def _observe(self, model: str, status: int, started: float) -> None:
        self.metrics.observe(model, status, time.perf_counter() - started)


class _H11Body:
    """A relayed body framed by h11, whose head h11 wrote (a stream that had loading notes)."""

    __slots__ = ("conn",)

    def __init__(self, conn: h11.Connection) -> None:
        self.conn = conn

    def data(self, data: bytes) -> bytes:
        return self.conn.send(h11.Data(data=data)) or b""

    def end(self) -> bytes:
        return self.conn.send(h11.EndOfMessage()) or b""


def _request_reader() -> h11.Connection:
    """h11's server side of a client connection, which reads its requests."""
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)


def _next_request_connection(conn: h11.Connection) -> h11.Connection:
    """A fresh h11 connection for the next request, fed what already arrived after this one."""
    data, closed = conn.trailing_data
    fresh = _request_reader()
    if data:
        fresh.receive_data(bytes(data))
    if closed:
        fresh.receive_data(b"")
    return fresh


def _drop_buffered_body(conn: h11.Connection) -> None:
    """Read the rest of a request we answer without its body (a GET's empty one, or a small body
    already received), so that the connection can stay open; stop at the first need for I/O."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or type(event) is h11.EndOfMessage:
                return
    except h11.RemoteProtocolError:
        return


def _query_int(query: bytes, name: str, default: int) -> int:
    values = parse_qs(query.lstrip(b"?").decode("latin-1")).get(name)
    if not values:
        return default
    try:
        return max(0, int(values[0]))
    except ValueError:
        raise HttpError(400, f"query parameter {name!r} must be a whole number, not {values[0]!r}") from None


def _backend_http_error(error: BackendError) -> HttpError:
    headers = []
    if isinstance(error, ModelUnavailable):
        headers.append((b"retry-after", b"%d" % max(1, round(error.retry_after_s))))
    return HttpError(error.status, error.message, type=error.error_type, code=getattr(error, "kind", None), headers=headers)


def _backend_error_reply(error: BackendError) -> Reply:
    return _backend_http_error(error).reply()
