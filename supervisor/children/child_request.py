"""What the supervisor itself asks a child's llama-server (its health, its slots, save and restore),
apart from the proxy's relay: one request over a fresh loopback connection, with h11.

A fresh connection per request: these requests are few (a health probe every 150 ms while a child
loads, a handful per start or stop), and llama-server closes idle keep-alive connections after
about 5 s (DESIGN.md), so a kept connection would cost more to track than it saves.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import h11

from llama_smart_proxy.supervisor.children.launch import CHILD_HOST

MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""A longer answer is refused: /slots of a server with many slots and long prompts is a few hundred
kB at most (the prompt text is not in it)."""


class ChildRequestError(Exception):
    """No usable answer: the connection failed, timed out, or closed before the answer."""


async def probe_health(
    port: int, *, timeout_s: float, path: str = "/health", host: str = CHILD_HOST
) -> int | None:
    """The status code of GET `path`, or None when nothing answered in `timeout_s`."""
    try:
        status, _ = await _exchange(host, port, "GET", path, None, timeout_s=timeout_s, read_body=False)
    except ChildRequestError:
        return None
    return status


async def request_json(
    port: int, method: str, path: str, body: Any = None, *, timeout_s: float, host: str = CHILD_HOST
) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request; ChildRequestError when there is none."""
    status, answer = await _exchange(host, port, method, path, body, timeout_s=timeout_s, read_body=True)
    try:
        return status, json.loads(answer or b"null")
    except ValueError:
        raise ChildRequestError(f"{method} {path}: the answer ({status}) is not JSON") from None


async def _exchange(
    host: str, port: int, method: str, path: str, body: Any, *, timeout_s: float, read_body: bool
) -> tuple[int, bytes]:
    """(status, body) of one request; with `read_body` false, it returns at the status line."""
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [("Host", f"{host}:{port}"), ("Connection", "close"), ("Content-Length", str(len(payload)))]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    connection = h11.Connection(h11.CLIENT)
    with anyio.move_on_after(timeout_s):
        try:
            async with await anyio.connect_tcp(host, port) as stream:
                await stream.send(
                    connection.send(h11.Request(method=method, target=path, headers=headers))
                    + connection.send(h11.Data(data=payload))
                    + connection.send(h11.EndOfMessage())
                )
                status = 0
                chunks: list[bytes] = []
                size = 0
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            connection.receive_data(await stream.receive())
                        except anyio.EndOfStream:
                            connection.receive_data(b"")
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        if not read_body:
                            return status, b""
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_ANSWER_BYTES:
                            raise ChildRequestError(f"{method} {path}: the answer exceeds {MAX_ANSWER_BYTES} bytes")
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        return status, b"".join(chunks)
                    elif isinstance(event, h11.ConnectionClosed):
                        raise ChildRequestError(f"{method} {path}: the connection closed before an answer")
        except (OSError, anyio.BrokenResourceError, h11.ProtocolError) as exc:
            raise ChildRequestError(f"{method} {path}: {exc}") from None
    raise ChildRequestError(f"{method} {path}: no answer within {timeout_s:g} s")
