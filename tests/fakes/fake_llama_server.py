#!/usr/bin/env python3
"""A FAKE llama-server for fault injection: things the real one will not do on demand.

It speaks enough of llama-server's HTTP API for the supervisor and the proxy (`/health` 503 while
"loading", then 200; chat/completions/embeddings, streamed as SSE or not) and takes llama-server's
command line, using only --host, --port and --model. Standard library only, so it starts in
milliseconds and depends on nothing under test.

Faults, from the environment (a test sets them through the model's `env`):
  FAKE_LLAMA_LOAD_S=2.5        answer /health with 503 "Loading model" for this long
  FAKE_LLAMA_SILENT_LOAD=1     print nothing while loading (a stalled load)
  FAKE_LLAMA_DOTS=1            while loading print "." with no newline, as llama.cpp's progress does
  FAKE_LLAMA_NEVER_READY=1     stay loading forever
  FAKE_LLAMA_EXIT_CODE=3       print an error and exit at once with this code
  FAKE_LLAMA_IGNORE_SIGTERM=1  ignore SIGTERM (only SIGKILL stops it)
  FAKE_LLAMA_EVENTS=/path      append one JSON line per event: start, request, done, disconnect
  FAKE_LLAMA_SLOT_SAVE_MS=100  take this long to answer a slot save (with --slot-save-path)
  FAKE_LLAMA_BIND_DELAY_S=0.5  wait this long before binding the port (a slow start that another
                               program's listener on the same port can answer for)
SIGUSR1 is a crash that the service cannot see at once: the port closes and every connection is
reset, and the process exits DYING_S later. It widens, on demand, the window a loaded machine
opens between a child's death and the service noticing it.
Per request, a JSON body may carry "fake": {"chunks": 50, "interval_ms": 20, "delay_ms": 0,
"die_after_chunks": 3, "hang": true} to shape the response (die_after_chunks kills the process
mid-stream; hang wedges its "inference loop": this request never answers, and neither does GET
/slots from then on, while /health still answers 200, as a llama-server whose inference hangs does).
GET /slots answers from the "inference loop": after a request's delay_ms, like llama-server between
two batches of a long prompt, it still answers. One slot, 0: each answered request adds 100 tokens
to it, and it is processing while a request is; with --slot-save-path, POST /slots/0?action=save
and ?action=restore write and read a file of the ctx it was saved with and 10 bytes per token,
recording both ctx values at a restore, which, like llama-server's, accepts any.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

ENV = os.environ
DYING_S = 0.1


def record(event: str, **fields: object) -> None:
    path = ENV.get("FAKE_LLAMA_EVENTS")
    if path:
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.monotonic(), **fields})
        with open(path, "a") as f:
            f.write(line + "\n")


def arg(names: tuple[str, ...], default: str) -> str:
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
    return default


HELP = """usage: llama-server [options]  (FAKE llama-server for tests)
-m, --model FNAME  --host HOST  --port PORT  -c, --ctx-size N  -np, --parallel N
-kvu, --kv-unified  -no-kvu, --no-kv-unified  -ctk, --cache-type-k TYPE  -ctv, --cache-type-v TYPE
-fa, --flash-attn [on|off|auto]  -b, --batch-size N  -ub, --ubatch-size N  -ngl, --gpu-layers N
-sm, --split-mode  -ts, --tensor-split  -mg, --main-gpu  -fit, --fit [on|off]  -dev, --device
--mmproj FILE  --no-webui  --metrics  --alias  -v, --verbose  --slot-save-path PATH
"""


class State:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.load_s = float(ENV.get("FAKE_LLAMA_LOAD_S", "0"))
        self.never_ready = ENV.get("FAKE_LLAMA_NEVER_READY") == "1"
        self.wedged = asyncio.Event()
        """Set once a request asked to hang: the inference loop answers nothing from then on."""
        self.tokens = 0
        """What slot 0 holds."""
        self.tasks = 0
        self.busy = 0
        """Requests being answered now: slot 0 is processing."""

    def is_ready(self) -> bool:
        return not self.never_ready and time.monotonic() - self.started >= self.load_s


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, target, headers, body


def response(status: int, payload: object, reason: str = "OK") -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def stream(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, rid: int, shape: dict) -> bool:
    """Send an SSE stream; return False if the client went away first."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\n\r\n"
    )
    # Watch for the client closing while we stream, as llama-server does, to stop generating.
    eof = asyncio.ensure_future(reader.read(1))
    try:
        for i in range(int(shape.get("chunks", 5))):
            if i == shape.get("die_after_chunks"):
                record("die", id=rid, chunk=i)
                os._exit(1)
            event = {"id": f"fake-{rid}", "object": "chat.completion.chunk", "index": i,
                     "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}  # fmt: skip
            writer.write(chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            await writer.drain()
            interval = float(shape.get("interval_ms", 0)) / 1000
            if interval:
                await asyncio.wait({eof}, timeout=interval)
            if eof.done():
                record("disconnect", id=rid, chunk=i)
                return False
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True
    except ConnectionError:
        record("disconnect", id=rid)
        return False
    finally:
        eof.cancel()
        try:
            await eof
        except (asyncio.CancelledError, ConnectionError):
            pass


class Server:
    def __init__(self, state: State) -> None:
        self.state = state
        self.requests = 0
        self.writers: set[asyncio.StreamWriter] = set()

    def reset_connections(self) -> None:
        for writer in self.writers:
            writer.transport.abort()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                method, target, _, body = request
                if not await self.respond(method, target, body, reader, writer):
                    return
        except ConnectionError:
            return
        finally:
            self.writers.discard(writer)
            writer.close()

    async def respond(self, method: str, target: str, body: bytes, reader, writer) -> bool:
        path = target.split("?", 1)[0]
        if path in ("/health", "/v1/health"):
            if self.state.is_ready():
                writer.write(response(200, {"status": "ok"}))
            else:
                writer.write(response(503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}, "Service Unavailable"))
            await writer.drain()
            return True
        if not self.state.is_ready():
            writer.write(response(503, {"error": {"message": "Loading model", "code": 503}}, "Service Unavailable"))
            await writer.drain()
            return True
        if method == "GET" and path == "/slots":
            if self.state.wedged.is_set():
                await asyncio.Event().wait()  # the inference loop never comes back
            slot: dict = {"id": 0, "is_processing": self.state.busy > 0}
            if self.state.tasks:
                slot.update(id_task=self.state.tasks, n_prompt_tokens=self.state.tokens, next_token=[{"n_decoded": 0}])
            writer.write(response(200, [slot]))
            await writer.drain()
            return True
        if method == "POST" and path.startswith("/slots/"):
            writer.write(await self.slot_action(path, target, body))
            await writer.drain()
            return True
        if method == "GET" and path == "/v1/models":
            writer.write(response(200, {"object": "list", "data": [{"id": arg(("-m", "--model"), "fake"), "object": "model"}]}))
            await writer.drain()
            return True
        if method != "POST":
            writer.write(response(404, {"error": {"message": "File Not Found", "code": 404}}, "Not Found"))
            await writer.drain()
            return True
        self.requests += 1
        rid = self.requests
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            writer.write(response(400, {"error": {"message": "invalid JSON", "code": 400}}, "Bad Request"))
            await writer.drain()
            return True
        shape = payload.get("fake", {}) if isinstance(payload, dict) else {}
        record("request", id=rid, path=path, model=payload.get("model"), stream=bool(payload.get("stream")))
        self.state.busy += 1
        try:
            return await self.answer(path, payload, shape, rid, reader, writer)
        finally:
            self.state.busy -= 1
            self.state.tasks += 1
            self.state.tokens += 100

    async def slot_action(self, path: str, target: str, body: bytes) -> bytes:
        directory = arg(("--slot-save-path",), "")
        action = target.partition("action=")[2]
        filename = json.loads(body or b"{}").get("filename", "")
        if not directory or path != "/slots/0" or "/" in filename or action not in ("save", "restore"):
            return response(400, {"error": {"message": "Invalid request", "code": 400}}, "Bad Request")
        file = os.path.join(directory, filename)
        ctx = int(arg(("-c", "--ctx-size"), "4096"))
        if action == "save":
            await asyncio.sleep(float(ENV.get("FAKE_LLAMA_SLOT_SAVE_MS", "0")) / 1000)
            data = f"{ctx}\n".encode() + b"k" * (10 * self.state.tokens)  # the ctx it was made with
            with open(file, "wb") as f:
                f.write(data)
            record("slot_save", tokens=self.state.tokens, ctx=ctx)
            return response(200, {"id_slot": 0, "filename": filename, "n_saved": self.state.tokens, "n_written": len(data)})
        try:
            with open(file, "rb") as f:
                saved_ctx, _, cells = f.read().partition(b"\n")
        except OSError:
            return response(400, {"error": {"message": "Unable to restore slot", "code": 400}}, "Bad Request")
        # like llama-server, it restores a slot saved with another ctx without a word (DESIGN.md)
        self.state.tokens = len(cells) // 10
        record("slot_restore", tokens=self.state.tokens, ctx=ctx, saved_ctx=int(saved_ctx))
        return response(200, {"id_slot": 0, "filename": filename, "n_restored": self.state.tokens, "n_read": len(cells)})

    async def answer(self, path: str, payload: dict, shape: dict, rid: int, reader, writer) -> bool:
        if shape.get("hang"):
            self.state.wedged.set()
            record("hang", id=rid)
            await asyncio.Event().wait()
        if shape.get("delay_ms"):
            await asyncio.sleep(float(shape["delay_ms"]) / 1000)
        if payload.get("stream"):
            finished = await stream(writer, reader, rid, shape)
            record("done" if finished else "aborted", id=rid)
            return finished
        if "embedding" in path:
            result: dict = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}]}
        else:
            result = {"id": f"fake-{rid}", "object": "chat.completion", "path": path, "pid": os.getpid(),
                      "echo": payload, "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake"}}]}  # fmt: skip
        writer.write(response(200, result))
        await writer.drain()
        record("done", id=rid)
        return True


async def serve() -> None:
    host = arg(("--host",), "127.0.0.1")
    port = int(arg(("--port",), "8080"))
    state = State()
    await asyncio.sleep(float(ENV.get("FAKE_LLAMA_BIND_DELAY_S", "0")))
    handler = Server(state)
    try:
        server = await asyncio.start_server(handler.handle, host, port)
    except OSError:
        # llama-server's own words (tools/server/server-http.cpp), which the supervisor recognises
        print(f"srv    start: couldn't bind HTTP server socket, hostname: {host}, port: {port}", file=sys.stderr, flush=True)
        sys.exit(1)
    record("start", port=port, argv=sys.argv[1:])

    dying = asyncio.Event()

    def die_slowly() -> None:
        record("dying")
        dying.set()
        server.close()
        handler.reset_connections()
        asyncio.get_running_loop().call_later(DYING_S, os._exit, 1)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, die_slowly)
    print(f"main: server is listening on http://{host}:{port} - starting the main loop (FAKE)", file=sys.stderr, flush=True)
    async with server:
        if not ENV.get("FAKE_LLAMA_SILENT_LOAD") and (state.load_s or state.never_ready):
            while not state.is_ready():
                if ENV.get("FAKE_LLAMA_DOTS") == "1":
                    print(".", end="", file=sys.stderr, flush=True)
                else:
                    print("llama_model_load: loading tensors ... (FAKE)", file=sys.stderr, flush=True)
                await asyncio.sleep(0.1)
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            if not dying.is_set():
                raise
            await asyncio.sleep(3600)  # until die_slowly's exit


def main() -> None:
    if "--help" in sys.argv[1:]:
        print(HELP)
        return
    if "--version" in sys.argv[1:]:
        print("version: 0 (fake)\nbuilt with FAKE for tests", file=sys.stderr)
        return
    if "FAKE_LLAMA_EXIT_CODE" in ENV:
        print("error: FAKE failure at start", file=sys.stderr, flush=True)
        sys.exit(int(ENV["FAKE_LLAMA_EXIT_CODE"]))
    if ENV.get("FAKE_LLAMA_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(serve())


if __name__ == "__main__":
    main()
