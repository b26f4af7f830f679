"""A FAST FAKE backend for the proxy load benchmark: asyncio protocol, no HTTP library, so that it
is not the bottleneck. Answers any POST with a small chat.completion JSON, or, when the body says
"stream": true, with `chunks` SSE events every `interval_ms` (paced on the loop clock, so a
slow event does not shift the next ones). A stream whose client goes away is logged to stdout
as `disconnect <id> <CLOCK_MONOTONIC seconds>` the moment the backend sees EOF or a reset.

Run: python -m benchmarks.fast_backend PORT [CPU]

It also stands in for llama-server under `serve` (the benchmark's config names this file's
`fast-llama-server` wrapper as the binary): it takes llama-server's command line (--host, --port,
--help, --version; every other flag is accepted and ignored) and answers any GET (/health, /slots)
with 200. FAST_BACKEND_CPU=N pins it to CPU N, as the positional CPU does. FAST_BACKEND_EVENTS=PATH
also appends each `disconnect` line to the file PATH (serve keeps its children's stdout to itself).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

EVENTS = os.environ.get("FAST_BACKEND_EVENTS")

CHAT = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help?"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
).encode()
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def sse_chunk(i: int) -> bytes:
    event = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok%d "}}]}\n\n' % i
    return b"%x\r\n%s\r\n" % (len(event), event)


HEALTH = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}'
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


class Handler(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.stream_id: object = None
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            if head.startswith(b"get "):
                self.transport.write(HEALTH)  # type: ignore[attr-defined]
            elif b'"stream":true' in body or b'"stream": true' in body:
                payload = json.loads(body)
                self.stream_id = payload.get("id")
                self.task = asyncio.ensure_future(
                    self.stream(int(payload.get("chunks", 50)), float(payload.get("interval_ms", 20)) / 1000)
                )
            else:
                self.transport.write(RESPONSE)  # type: ignore[attr-defined]

    async def stream(self, chunks: int, interval: float) -> None:
        loop = asyncio.get_running_loop()
        write = self.transport.write  # type: ignore[attr-defined]
        write(STREAM_HEAD)
        start = loop.time()
        for i in range(chunks):
            write(sse_chunk(i))
            delay = start + (i + 1) * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        write(DONE)
        self.stream_id = None

    def eof_received(self) -> bool:
        self._gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        if self.stream_id is not None and self.task is not None and not self.task.done():
            line = f"disconnect {self.stream_id} {time.monotonic():.6f}"
            print(line, flush=True)
            if EVENTS:
                with open(EVENTS, "a") as events:
                    events.write(line + "\n")
            self.task.cancel()
            self.stream_id = None


async def main(port: int, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Handler, host, port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def llama_server_main(argv: list[str]) -> None:
    """The llama-server command line: --help, --version, or serve on --host/--port."""
    if "--help" in argv:
        from tests.fakes.fake_llama_server import HELP  # the flags the supervisor checks for

        print(HELP)
        return
    if "--version" in argv:
        print("version: 0 (fast fake)\nbuilt with FAST FAKE for benchmarks", file=sys.stderr)
        return
    options = dict(zip(argv, argv[1:]))
    asyncio.run(main(int(options.get("--port", "8080")), options.get("--host", "127.0.0.1")))


if __name__ == "__main__":
    cpu = os.environ.get("FAST_BACKEND_CPU") or (sys.argv[2] if len(sys.argv) > 2 and sys.argv[1].isdigit() else None)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})
    if len(sys.argv) > 1 and sys.argv[1].isdigit():
        asyncio.run(main(int(sys.argv[1])))
    else:
        llama_server_main(sys.argv[1:])
