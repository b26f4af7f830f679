"""Connections to llama-server children, pooled per child; their HTTP is upstream_http's.

Rules kept here (llama-server's HTTP library closes an idle keep-alive connection after about 5 s
or 100 requests, and each idle connection holds one of its few HTTP threads; DESIGN.md):
- a connection goes back to the pool only after a whole response that allows another request
  (upstream_http's rules); anything else is closed, never reused;
- an idle connection expires after IDLE_EXPIRY_S, well before the child's 5 s, and one the child
  already closed (readable while idle) is dropped before reuse;
- at most `Upstream.pool_size` idle connections per child; the oldest go first;
- a connection the child closes after a whole response (llama-server does after every streamed
  one) is replaced in the background, up to pool_size connections idle or in use, so that the next
  request, often the next stream, finds a connection open instead of opening one; unused, the
  successor expires as any idle connection does;
- a connection that waited in the pool and fails before any response byte is retried once on a
  fresh one;
- closing never awaits, so a cancelled relay still closes its socket at once (llama-server stops
  generating when its client goes away).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from llama_smart_proxy.supervisor.proxy.backends import Upstream, UpstreamUnreachable
from llama_smart_proxy.supervisor.proxy.http import Headers
from llama_smart_proxy.supervisor.proxy.loop_clock import now as loop_now
from llama_smart_proxy.supervisor.proxy.sockets import Socket, connect
from llama_smart_proxy.supervisor.proxy.upstream_http import (
    NEED_DATA,
    Head,
    ResponseClosed,
    ResponseError,
    ResponseReader,
    request_bytes,
)

log = logging.getLogger("llama-smart-proxy.upstream")

IDLE_EXPIRY_S = 2.0  # llama-server (cpp-httplib) closes idle keep-alive connections after 5 s
SWEEP_INTERVAL_S = 0.5  # how often idle connections past their expiry are closed
SUCCESSOR_CONNECT_TIMEOUT_S = 1.0  # a loopback connect takes microseconds; longer: the child is busy or gone


class UpstreamError(Exception):
    """The child could not give a response; `status` is what the client gets if nothing was sent yet."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamClosed(UpstreamError):
    """The child closed or reset the connection."""

    def __init__(self, message: str = "the model's server closed the connection") -> None:
        super().__init__(502, message)


class UpstreamRefused(UpstreamError, UpstreamUnreachable):
    """The child's port refused or reset the connection before it was made: nothing was sent (it
    may have just died; a death resets the connections waiting in its listen queue)."""

    def __init__(self, upstream: Upstream, reason: str) -> None:
        super().__init__(502, f"cannot connect to the model's server at {upstream.host}:{upstream.port}: {reason}")
        self.reason = reason


class UpstreamConnection:
    """One keep-alive connection to one child."""

    __slots__ = ("upstream", "socket", "reader", "requests", "idle_since", "bytes_in", "was_idle")

    def __init__(self, upstream: Upstream, sock: Socket) -> None:
        self.upstream = upstream
        self.socket = sock
        self.reader = ResponseReader()
        self.requests = 0
        self.idle_since = 0.0
        self.bytes_in = 0
        self.was_idle = False
        """It waited in the pool before its request: the child may have closed it meanwhile."""

    @property
    def closed(self) -> bool:
        return self.socket.closed

    def is_reusable(self) -> bool:
        return not self.closed and self.reader.reusable

    def has_expired(self, now: float) -> bool:
        return now - self.idle_since >= IDLE_EXPIRY_S

    def is_dropped_by_peer(self) -> bool:
        """An idle connection with something to read was closed by the child (or is garbage)."""
        return self.socket.is_readable()

    def start_request(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> bytes:
        """The bytes of one whole request; the reader then expects its response."""
        self.requests += 1
        self.bytes_in = 0
        self.reader.start(head_request=method == b"HEAD")
        return request_bytes(method, target, headers, body)

    async def send(self, data: bytes) -> None:
        try:
            await self.socket.send(data)
        except (anyio.ClosedResourceError, OSError) as exc:
            log.debug("sending to %r failed: %r", self, exc)
            raise UpstreamClosed("the model's server closed the connection while the request was sent") from None

    async def receive_more(self) -> None:
        """Read once from the child into the reader (EOF and resets become b'', which it judges)."""
        try:
            data = await self.socket.receive()
        except (anyio.ClosedResourceError, OSError):
            data = b""
        self.bytes_in += len(data)
        self.reader.receive_data(data)

    async def receive_head(self) -> Head:
        reader = self.reader
        while True:
            try:
                event = reader.next_event()
            except ResponseClosed:
                raise UpstreamClosed() from None
            except ResponseError as exc:
                log.debug("%r: the response is malformed: %s", self, exc)
                raise UpstreamClosed("the model's server sent a malformed response") from None
            if event is NEED_DATA:
                await self.receive_more()
                continue
            assert isinstance(event, Head)
            return event

    def close(self) -> None:
        self.socket.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("done" if self.reader.done else "busy")
        return f"UpstreamConnection({self.upstream.host}:{self.upstream.port}, {state}, requests={self.requests})"


class UpstreamPool:
    """Idle keep-alive connections, per child (host, port)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._out: dict[tuple[str, int], set[UpstreamConnection]] = {}
        """Connections checked out, per child: a closed one is dropped when next counted."""
        self._successors: list[Upstream] = []
        """Children whose connection was closed after a whole response, one entry per connection."""
        self._successors_wanted: anyio.Event | None = None
        self.opened = 0
        self.reused = 0
        self.retried = 0

    def idle_count(self, upstream: Upstream | None = None) -> int:
        if upstream is not None:
            return len(self._idle.get((upstream.host, upstream.port), ()))
        return sum(len(conns) for conns in self._idle.values())

    async def checkout(self, upstream: Upstream, connect_timeout: float, *, fresh: bool = False) -> UpstreamConnection:
        """An idle connection to `upstream` that is still good, else a new one."""
        key = (upstream.host, upstream.port)
        if not fresh:
            idle = self._idle.get(key)
            now = loop_now()
            while idle:
                conn = idle.pop()
                if conn.has_expired(now) or conn.is_dropped_by_peer():
                    conn.close()
                    continue
                self.reused += 1
                conn.was_idle = True
                self._out.setdefault(key, set()).add(conn)
                return conn
        conn = await self._open(upstream, connect_timeout)
        self._out.setdefault(key, set()).add(conn)
        return conn

    def _in_use(self, upstream: Upstream) -> int:
        """Connections to `upstream` checked out and still open."""
        out = self._out.get((upstream.host, upstream.port))
        if not out:
            return 0
        out.difference_update([c for c in out if c.closed])
        return len(out)

    async def _open(self, upstream: Upstream, connect_timeout: float) -> UpstreamConnection:
        try:
            with anyio.fail_after(connect_timeout):
                sock = await connect(upstream.host, upstream.port)
        except TimeoutError:
            raise UpstreamError(
                504, f"connecting to the model's server at {upstream.host}:{upstream.port} timed out"
            ) from None
        except ConnectionRefusedError:
            raise UpstreamRefused(upstream, "connection refused") from None
        except ConnectionResetError:
            raise UpstreamRefused(upstream, "connection reset") from None
        except OSError as exc:
            raise UpstreamError(
                502,
                f"cannot connect to the model's server at {upstream.host}:{upstream.port}: "
                f"{exc.strerror or 'connection failed'}",
            ) from None
        self.opened += 1
        return UpstreamConnection(upstream, sock)

    def checkin(self, conn: UpstreamConnection) -> None:
        """Return a connection after its exchange: pooled if both sides are done, else closed."""
        out = self._out.get((conn.upstream.host, conn.upstream.port))
        if out is not None:
            out.discard(conn)
        if not conn.is_reusable():
            conn.close()
            if conn.reader.done and self._successors_wanted is not None:
                self._successors.append(conn.upstream)
                self._successors_wanted.set()
            return
        self._keep(conn)

    def _keep(self, conn: UpstreamConnection) -> None:
        conn.idle_since = loop_now()
        idle = self._idle.setdefault((conn.upstream.host, conn.upstream.port), [])
        idle.append(conn)
        if len(idle) > conn.upstream.pool_size:
            idle.pop(0).close()

    async def exchange(
        self,
        upstream: Upstream,
        build: Callable[[UpstreamConnection], bytes],
        *,
        connect_timeout: float,
        on_sent: Callable[[], None] = lambda: None,
    ) -> tuple[UpstreamConnection, Head]:
        """Send one request and wait for the response head; retry once on a fresh connection when
        a reused one fails before any response byte (the child closed it while idle). The caller
        owns the returned connection and must `checkin` it."""
        conn = await self.checkout(upstream, connect_timeout)
        for attempt in (1, 2):
            try:
                await conn.send(build(conn))
                on_sent()
                return conn, await conn.receive_head()
            except UpstreamClosed:
                conn.close()
                if attempt == 2 or not conn.was_idle or conn.bytes_in:
                    raise
                log.debug("retrying on a fresh connection after %r failed before any response byte", conn)
                self.retried += 1
                conn = await self.checkout(upstream, connect_timeout, fresh=True)
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def sweep(self) -> None:
        """Close idle connections past their expiry; forget checked-out ones closed since (a
        cancelled relay closes its connection without a checkin)."""
        for key, out in list(self._out.items()):
            out.difference_update([c for c in out if c.closed])
            if not out:
                del self._out[key]
        now = loop_now()
        for key in list(self._idle):
            idle = self._idle[key]
            keep = [c for c in idle if not c.has_expired(now)]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def run(self) -> None:
        """Sweep expired idle connections every SWEEP_INTERVAL_S and open the successors `checkin`
        asks for, until cancelled."""
        while True:
            self._successors_wanted = anyio.Event()
            with anyio.move_on_after(SWEEP_INTERVAL_S):
                await self._successors_wanted.wait()
            self.sweep()
            successors, self._successors = self._successors, []
            for upstream in successors:
                # counted with those in use: while requests hold every slot's connection (a burst
                # that began meanwhile opened its own), a successor would only wait to expire
                if self.idle_count(upstream) + self._in_use(upstream) >= upstream.pool_size:
                    continue
                try:
                    conn = await self._open(upstream, SUCCESSOR_CONNECT_TIMEOUT_S)
                except UpstreamError as exc:  # the child is going away: the next request will see
                    log.debug("no successor connection: %s", exc.message)
                    continue
                self._keep(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def __repr__(self) -> str:
        return f"UpstreamPool(idle={self.idle_count()}, opened={self.opened}, reused={self.reused}, retried={self.retried})"
