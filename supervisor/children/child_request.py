"""One JSON request to a child's llama-server, over a fresh loopback connection, with h11: what the
supervisor itself asks a child (its slots, save and restore), apart from the proxy's relay.

A fresh connection per request, as supervisor/health_probe.py does: these requests are few (a
handful per start or stop), and llama-server closes idle keep-alive connections after about 5 s.
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
    """No usable answer: the connection failed, timed out, or the body was not JSON."""


async def request_json(
    port: int, method: str, path: str, body: Any = None, *, timeout_s: float, host: str = CHILD_HOST
) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request; ChildRequestError when there is none."""
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
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_ANSWER_BYTES:
                            raise ChildRequestError(f"{method} {path}: the answer exceeds {MAX_ANSWER_BYTES} bytes")
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise ChildRequestError(f"{method} {path}: the connection closed before an answer")
        except (OSError, anyio.BrokenResourceError, h11.ProtocolError) as exc:
            raise ChildRequestError(f"{method} {path}: {exc}") from None
        try:
            return status, json.loads(b"".join(chunks) or b"null")
        except ValueError:
            raise ChildRequestError(f"{method} {path}: the answer ({status}) is not JSON") from None
    raise ChildRequestError(f"{method} {path}: no answer within {timeout_s:g} s")
