"""A deliberately minimal HTTP/1.1 reverse proxy on anyio + h11: the baseline arm of
benchmarks/proxy_load.py, what a bare relay costs. Keep-alive on both sides and streamed
responses, but no routing, no metrics, no logging: every request goes to one upstream.

Run: python -m benchmarks.bare_relay LISTEN_PORT UPSTREAM_PORT  (both on 127.0.0.1)
"""

from __future__ import annotations

import signal
import socket
import sys
from contextlib import suppress
from functools import partial

import anyio
import h11
from anyio.abc import SocketAttribute, SocketStream

HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer"}
HOP_BY_HOP |= {b"upgrade", b"proxy-connection"}
REPLACED = HOP_BY_HOP | {b"host", b"content-length"}  # in requests
GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
pool: list[tuple[SocketStream, h11.Connection]] = []  # idle upstream connections


def nodelay(stream: SocketStream) -> SocketStream:
    sock = stream.extra(SocketAttribute.raw_socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


async def next_event(stream: SocketStream, conn: h11.Connection) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        try:
            conn.receive_data(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            conn.receive_data(b"")  # h11 judges whether EOF was allowed here
    return event


async def send(client: SocketStream, conn: h11.Connection, *events: h11.Event) -> None:
    for event in events:
        await client.send(conn.send(event))


async def send_error(client: SocketStream, conn: h11.Connection, status: int) -> None:
    headers = [(b"content-length", b"4"), (b"connection", b"close")]
    with suppress(*GONE):
        await send(client, conn, h11.Response(status_code=status, headers=headers))
        await send(client, conn, h11.Data(data=b"%d\n" % status), h11.EndOfMessage())


async def relay(
    client: SocketStream, conn: h11.Connection, req: h11.Request, body: bytes, port: int
) -> None:
    """Forward one request, stream the response back; conn's state says how it went."""
    upstream = pool.pop() if pool else None
    try:
        if upstream is None:
            stream = nodelay(await anyio.connect_tcp("127.0.0.1", port))
            upstream = (stream, h11.Connection(h11.CLIENT))
        stream, up = upstream
        headers = [(n, v) for n, v in req.headers if n not in REPLACED]
        headers.append((b"host", b"127.0.0.1:%d" % port))
        headers.append((b"content-length", b"%d" % len(body)))
        out = h11.Request(method=req.method, target=req.target, headers=headers)
        out = up.send(out) + up.send(h11.Data(data=body)) + up.send(h11.EndOfMessage())
        await stream.send(out)
        res = await next_event(stream, up)
        if not isinstance(res, h11.Response):  # 1xx, or a stale pooled connection
            raise h11.RemoteProtocolError("no response")
        kept = [(n, v) for n, v in res.headers if n not in HOP_BY_HOP]
        res = h11.Response(status_code=res.status_code, headers=kept, reason=res.reason)
        await send(client, conn, res)
        while isinstance(event := await next_event(stream, up), h11.Data):
            await send(client, conn, h11.Data(data=event.data))  # at once: SSE streams
        await send(client, conn, h11.EndOfMessage())
        if up.our_state is h11.DONE and up.their_state is h11.DONE:
            up.start_next_cycle()
            pool.append(upstream)
            upstream = None
    except (*GONE, OSError, h11.ProtocolError):  # the client's or the upstream's
        if conn.our_state is h11.SEND_RESPONSE:  # nothing sent yet
            await send_error(client, conn, 502)
    finally:
        if upstream is not None:  # also on cancellation: the backend must see the close
            await anyio.aclose_forcefully(upstream[0])


async def serve_client(port: int, client: SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)

    async def watch(scope: anyio.CancelScope) -> None:
        """Notice the client going away (EOF, reset) while its response is relayed."""
        with suppress(*GONE):
            while True:
                conn.receive_data(await client.receive())  # pipelined: waits in h11
        scope.cancel()

    async with nodelay(client):
        while True:
            try:
                request = await next_event(client, conn)
                if not isinstance(request, h11.Request):
                    return  # the client closed between requests
                body = b""
                while isinstance(event := await next_event(client, conn), h11.Data):
                    body += event.data
            except h11.RemoteProtocolError:
                await send_error(client, conn, 400)
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                await relay(client, conn, request, body, port)
                tg.cancel_scope.cancel()
            if conn.our_state is not h11.DONE:
                return  # the response was cut (the client went away?), or MUST_CLOSE
            conn.start_next_cycle()


async def main(port: int, upstream_port: int) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    print("ready", flush=True)
    await listener.serve(partial(serve_client, upstream_port))


if __name__ == "__main__":
    # SIGINT, like SIGTERM, ends it at once, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    anyio.run(main, int(sys.argv[1]), int(sys.argv[2]))
