"""Non-blocking TCP sockets for the proxy on anyio's asyncio backend: reads as asyncio's
transports do them, writes through anyio's wait_writable.

Reading: once a socket is first read from (one from `connect` at once), it stays registered
with the loop, and the loop's readiness callback reads what arrived into a buffer (up to
BUFFER_BYTES, then reading pauses until the reader takes some) and wakes the reader. anyio's
wait_readable registered and unregistered the socket around every wait (two epoll_ctl calls) and
each wait began with a recv() that found nothing: with this, serve's CPU per relayed request fell
~22 % and per streamed chunk more (benchmarks/results/proxy-profile.md).
Writing: a send() is tried first and the task waits only when the kernel has no room.
Why not anyio's SocketStream: its send always yields to the loop, and the pool needs what it does
not offer: a close that never awaits (a cancelled relay closes at once) and a look at an idle
connection (benchmarks/results/relay-sockets.md measured the rest).

Rules kept here:
- each socket has one reader task and one writer task at a time (BusyResourceError otherwise);
- a call that completes without waiting yields to the loop every YIELD_EVERY calls, so a fast
  peer cannot starve other connections and cancellation is still seen;
- `close()` stops the reading, wakes any waiter (the reader with ClosedResourceError, a writer
  through anyio.notify_closing) and closes; it is idempotent;
- errors are OSError subclasses (ConnectionError for a reset), raised to the reader once the bytes
  before them are taken; EOF is b"" from `receive`;
- `on_end`, when set, is called once, the moment reading meets EOF or an error, even with bytes
  still buffered: the proxy cancels a client's request by it without a task of its own reading.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections import deque
from collections.abc import Callable

import anyio
from anyio.lowlevel import checkpoint

YIELD_EVERY = 16  # calls that did not wait before one checkpoint
READ_SIZE = 64 * 1024  # bytes asked of the kernel per recv()
BUFFER_BYTES = 64 * 1024  # bytes read ahead of the socket's reader before reading pauses (memory per connection)


class Socket:
    """One connected TCP socket."""

    __slots__ = (
        "sock", "closed", "on_end", "_unyielded", "_loop", "_chunks", "_buffered", "_reading", "_ended", "_waiter",
    )  # fmt: skip

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.closed = False
        self.on_end: Callable[[], None] | None = None
        self._unyielded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading = False  # registered with the loop: bytes are read as they arrive
        self._ended: OSError | bool = False  # EOF (True) or the error that ended reading
        self._waiter: asyncio.Future[None] | None = None

    async def _maybe_yield(self) -> None:
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await checkpoint()

    async def receive(self) -> bytes:
        """Some bytes, or b'' at EOF. Raises OSError on a reset, ClosedResourceError if closed.

        Once a socket was read from, it stays registered with the loop and its bytes are read as
        they arrive (as asyncio's transports do), up to BUFFER_BYTES: a wait costs no
        registration and no second recv() that finds nothing."""
        waited = False
        while not self._chunks:
            if self.closed:
                raise anyio.ClosedResourceError
            if self._ended is True:
                return b""
            if self._ended:
                raise self._ended
            if self._waiter is not None:
                raise anyio.BusyResourceError("reading from")
            if not self._reading:
                self._resume_reading()
                continue  # the first read happens here, without a wait
            loop = self._loop
            assert loop is not None
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            waited = True
        if waited:
            self._unyielded = 0
        else:
            await self._maybe_yield()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if not self._reading and self._buffered < BUFFER_BYTES and self._ended is False and not self.closed:
            self._resume_reading()  # paused at the bound: below it again
        return data

    def _resume_reading(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._reading = True
        self._loop.add_reader(self.sock.fileno(), self._read_ready)
        self._read_ready()  # what is there already

    def _read_ready(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(exc)
            return
        if not data:
            self._end(True)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= BUFFER_BYTES:
            self._pause_reading()
        self._wake()

    def _end(self, why: OSError | bool) -> None:
        self._ended = why
        self._pause_reading()
        self._wake()
        if self.on_end is not None:
            self.on_end()

    def _pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            assert self._loop is not None
            self._loop.remove_reader(self.sock.fileno())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, data: bytes) -> None:
        """All of `data`. Raises OSError (BrokenPipeError, ConnectionResetError) if the peer is gone."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            await self._maybe_yield()
            return
        view = memoryview(data)[sent:]
        while view:
            await anyio.wait_writable(sock)
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]
        self._unyielded = 0

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def is_readable(self) -> bool:
        """Whether a receive would not wait (data, EOF or an error is pending)."""
        if self._chunks or self._ended is not False:
            return True
        if self._reading:
            return False  # the loop would have read what arrived
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(anyio.ClosedResourceError())
        anyio.notify_closing(self.sock)
        self.sock.close()

    def __repr__(self) -> str:
        return f"Socket(fd={self.sock.fileno()}, closed={self.closed})"


async def connect(host: str, port: int) -> Socket:
    """A connected socket to host:port (an IP address, or a name resolved through anyio)."""
    try:
        address = ipaddress.ip_address(host)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    except ValueError:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        host = str(sockaddr[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex((host, port))
        if error in (errno.EINPROGRESS, errno.EAGAIN):
            await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        anyio.notify_closing(sock)
        sock.close()
        raise
    connected = Socket(sock)
    # read from now on, as every socket is once read from: a connection that waits in the pool
    # (a successor, opened before a request needs it) then pays its registration while idle, and
    # the child's close of it shows without a system call when it is taken
    connected._resume_reading()
    return connected


async def accept(listener: socket.socket) -> tuple[socket.socket, object]:
    """The next connection on a non-blocking listening socket."""
    while True:
        try:
            return listener.accept()
        except BlockingIOError:
            await anyio.wait_readable(listener)
