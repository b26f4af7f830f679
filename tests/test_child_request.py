"""The supervisor's own requests to a child: the health probe answers at the status line, so a
child slow to finish its body does not slow readiness; a JSON request reads the whole body, and
each way of not answering is a `ChildRequestError` (None for the probe)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketStream

from llama_smart_proxy.supervisor.children.child_request import (
    ChildRequestError,
    probe_health,
    request_json,
)

pytestmark = pytest.mark.anyio

Handler = Callable[[SocketStream], "anyio.abc.Awaitable[None]"]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """A loopback server that reads the request head and then runs `handler`; yields its port."""

    async def handle(stream: SocketStream) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive()
            await handler(stream)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tasks.cancel_scope.cancel()


async def test_the_probe_returns_at_the_status_line_without_waiting_for_the_body() -> None:
    async def status_then_hang(stream: SocketStream) -> None:
        await stream.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\n{")
        await anyio.sleep_forever()

    async with serving(status_then_hang) as port:
        with anyio.fail_after(2):
            assert await probe_health(port, timeout_s=5) == 503


async def test_the_probe_is_none_when_the_child_closes_before_a_status_line() -> None:
    async def close_at_once(stream: SocketStream) -> None:
        return

    async with serving(close_at_once) as port:
        assert await probe_health(port, timeout_s=5) is None


async def test_the_probe_is_none_when_nothing_answers_in_time() -> None:
    async def never_answer(stream: SocketStream) -> None:
        await anyio.sleep_forever()

    async with serving(never_answer) as port:
        assert await probe_health(port, timeout_s=0.2) is None


async def test_a_json_request_reads_the_whole_body() -> None:
    async def answer_in_two_pieces(stream: SocketStream) -> None:
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n[{\"id\":")
        await anyio.sleep(0.05)
        await stream.send(b" 0}]\n")

    async with serving(answer_in_two_pieces) as port:
        assert await request_json(port, "GET", "/slots", timeout_s=5) == (200, [{"id": 0}])


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!", "is not JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "without sending complete message body"),
    ],
)
async def test_a_json_request_without_a_usable_answer_says_why(answer: bytes, message: str) -> None:
    async def send_and_close(stream: SocketStream) -> None:
        await stream.send(answer)

    async with serving(send_and_close) as port:
        with pytest.raises(ChildRequestError, match=message):
            await request_json(port, "POST", "/slots/0?action=save", {"filename": "x"}, timeout_s=5)
