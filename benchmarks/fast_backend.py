"""A FAST FAKE backend for the proxy load benchmark: asyncio protocol, no HTTP library, so that it
is not the bottleneck. Answers any POST with a small chat.completion JSON, or, when the body says
"stream": true, with `chunks` SSE events every `interval_ms` (paced on the loop clock, so a
slow event does not shift the next ones). A stream whose client goes away is logged to stdout
as `disconnect <id> <CLOCK_MONOTONIC seconds>` the moment the backend sees EOF or a reset.

Run: python -m benchmarks.fast_backend PORT [CPU]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

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
            if b'"stream":true' in body or b'"stream": true' in body:
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
            print(f"disconnect {self.stream_id} {time.monotonic():.6f}", flush=True)
            self.task.cancel()
            self.stream_id = None


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Handler, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) > 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(sys.argv[2])})
    asyncio.run(main(int(sys.argv[1])))
