"""The proxy's sockets read as asyncio's transports do: what arrives is read by the loop into a
bounded buffer and handed to the one reader in order, ended by b'' at EOF or by the error that
ended it; nothing is lost to a cancelled read, and closing wakes a waiting reader."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from llama_smart_proxy.supervisor.proxy.sockets import BUFFER_BYTES, Socket

pytestmark = pytest.mark.anyio


@contextmanager
def pair() -> Iterator[tuple[Socket, socket.socket]]:
    """(our end, the peer's plain socket) of one loopback connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    wrapped = Socket(ours)
    try:
        yield wrapped, peer
    finally:
        wrapped.close()
        peer.close()


async def read_until(sock: Socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await sock.receive()
        assert chunk, "EOF before the bytes"
        data += chunk
    return data


async def test_bytes_arrive_in_order_then_eof_is_empty_bytes() -> None:
    with pair() as (ours, peer):
        peer.sendall(b"first ")
        assert await read_until(ours, 6) == b"first "
        peer.sendall(b"second")
        peer.shutdown(socket.SHUT_WR)
        assert await read_until(ours, 6) == b"second"
        assert await ours.receive() == b""
        assert await ours.receive() == b""  # EOF stays EOF


async def test_reading_stops_at_the_buffer_limit_and_goes_on_when_the_reader_takes_some() -> None:
    with pair() as (ours, peer):
        peer.sendall(b"x")
        assert await ours.receive() == b"x"  # registered with the loop from now on
        peer.setblocking(False)
        sent = 0
        block = b"y" * 65536
        for _ in range(2000):  # up to 128 MiB: far more than any kernel buffers
            try:
                sent += peer.send(block)
            except BlockingIOError:
                await anyio.sleep(0.01)  # let the loop read, if it still reads
                try:
                    sent += peer.send(block)
                except BlockingIOError:
                    break
        assert sent < 2000 * 65536, "the socket read without bound"
        assert BUFFER_BYTES <= ours._buffered < BUFFER_BYTES + 65536 * 2
        received = 0
        while received < sent:
            received += len(await ours.receive())
        assert received == sent  # nothing lost while reading was paused
        peer.setblocking(True)
        peer.sendall(b"z")
        assert await ours.receive() == b"z"  # and reading went on


async def test_a_reset_is_raised_after_the_bytes_that_came_before_it() -> None:
    with pair() as (ours, peer):
        peer.sendall(b"last words")
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # linger 0: RST
        await anyio.sleep(0.05)
        data = b""
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = await ours.receive()
                assert chunk  # a reset is not an EOF
                data += chunk
        assert data in (b"", b"last words")  # the kernel may drop unread bytes at a reset


async def test_a_cancelled_read_loses_nothing() -> None:
    with pair() as (ours, peer):
        with anyio.move_on_after(0.05):
            await ours.receive()  # nothing comes: cancelled while waiting
        peer.sendall(b"after")
        assert await read_until(ours, 5) == b"after"


async def test_closing_wakes_a_waiting_reader() -> None:
    with pair() as (ours, _):
        async with anyio.create_task_group() as tasks:
            failure: list[BaseException] = []

            async def read() -> None:
                try:
                    await ours.receive()
                except anyio.ClosedResourceError as exc:
                    failure.append(exc)

            tasks.start_soon(read)
            await anyio.sleep(0.05)
            ours.close()
        assert failure
        with pytest.raises(anyio.ClosedResourceError):
            await ours.receive()


async def test_a_second_reader_at_once_is_refused() -> None:
    with pair() as (ours, peer):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ours.receive)
            await anyio.sleep(0.05)
            with pytest.raises(anyio.BusyResourceError):
                await ours.receive()
            peer.sendall(b"!")


async def test_on_end_is_called_once_when_the_peer_closes_though_nobody_reads() -> None:
    with pair() as (ours, peer):
        ends: list[bool] = []
        ours.on_end = lambda: ends.append(True)
        peer.sendall(b"x")
        assert await ours.receive() == b"x"  # registered with the loop from now on
        peer.sendall(b"unread")
        peer.shutdown(socket.SHUT_WR)
        with anyio.fail_after(2):
            while not ends:  # nobody calls receive(): the loop's own read sees the EOF
                await anyio.sleep(0.01)
        assert await read_until(ours, 6) == b"unread"  # bytes before the EOF are kept
        assert await ours.receive() == b""
        assert ends == [True]
