"""Ask a child `GET /health` (or another path, e.g. /slots) once, over a fresh loopback
connection, with h11.

A fresh connection per probe: llama-server closes idle keep-alive connections after about 5 s
(DESIGN.md), and a probe every 150 ms costs less than tracking that. Only the status line is read.
"""

from __future__ import annotations

import anyio
import h11

from llama_smart_proxy.supervisor.children.launch import CHILD_HOST


async def probe_health(
    port: int, *, timeout_s: float, path: str = "/health", host: str = CHILD_HOST
) -> int | None:
    """The status code of GET `path`, or None when nothing answered in `timeout_s`."""
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=path, headers=[("Host", f"{host}:{port}"), ("Connection", "close")]
    )
    with anyio.move_on_after(timeout_s):
        try:
            async with await anyio.connect_tcp(host, port) as stream:
                await stream.send(connection.send(request) + connection.send(h11.EndOfMessage()))
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            connection.receive_data(await stream.receive())
                        except anyio.EndOfStream:
                            connection.receive_data(b"")
                    elif isinstance(event, h11.Response):
                        return event.status_code
                    elif not isinstance(event, h11.InformationalResponse):
                        return None  # closed before a status line
        except (OSError, anyio.BrokenResourceError, h11.ProtocolError):
            return None
    return None
