"""Loading progress for a streaming client whose model is not ready: SSE comment lines.

A chat client that asked for a stream and waits seconds or minutes for a cold model sees nothing
at all. Text put into the reply would be shown as the model's words (or as its "thinking"); an SSE
comment (a line starting with ":") is skipped by every SSE client by the spec (the OpenAI SDKs
included), yet a person watching the raw stream, or a client that reads comments, sees
`: loading MODEL 12.3 s (loading tensors 45%)`.

Rules kept here:
- only a streaming request that waited a whole `interval` gets notes: a warm model's stream is
  byte for byte what it was; a non-streaming request never gets any;
- the first note commits the response: a 200 head with `text/event-stream` goes out with it. What
  would have been an error reply after that (the model failed, the queue timed out, the child
  answered an error) is sent as one `data: {"error": {...}}` event, which the OpenAI SDKs raise
  as an APIError, and the stream ends;
- a note is written whole or not at all (shielded, and bounded by `WRITE_S`), so the chunked
  framing is never cut in the middle when the model becomes ready;
- the words come from the model's status, the same values /status shows (`describe`, pure).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import anyio

from llama_smart_proxy.supervisor.proxy.backends import ModelState, ModelStatus
from llama_smart_proxy.supervisor.proxy.events import sse_comment
from llama_smart_proxy.supervisor.proxy.loop_clock import now as loop_now

WRITE_S = 5.0
"""Longest one note's write may take; a client that reads nothing for that long is dropped."""


def wants_stream(body: bytes) -> bool:
    """Whether a JSON request body asks for a stream ("stream": true)."""
    if b'"stream"' not in body:  # the common case costs no second parse
        return False
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("stream") is True


def describe(model: str, status: ModelStatus | None, waited_s: float, now: float) -> str:
    """The comment's words: 'loading tiny 12.3 s (loading tensors 45%)'."""
    if status is None:
        return f"waiting for {model} {waited_s:.1f} s"
    if status.state is ModelState.READY:
        return f"waiting for {model} {waited_s:.1f} s (queued: {status.in_flight} requests in flight)"
    elapsed = waited_s
    if status.state is ModelState.STARTING and status.starting_since is not None:
        elapsed = max(waited_s, now - status.starting_since)
    detail = ""
    if status.state is ModelState.STARTING:
        if status.load_phase:
            detail = status.load_phase
            if status.load_progress is not None:
                detail += f" {status.load_progress:.0%}"
    elif status.state is ModelState.BACKOFF:
        detail = "restarting after a crash"
        if status.retry_at is not None:
            detail += f" in {max(0.0, status.retry_at - now):.1f} s"
    else:
        detail = status.state.value
    return f"loading {model} {elapsed:.1f} s" + (f" ({detail})" if detail else "")


def error_event(status: int, message: str, type_: str, code: str | None) -> bytes:
    """An error for a stream already answered 200: the shape OpenAI's SDKs raise from."""
    error = {"message": message, "type": type_, "param": None, "code": code if code is not None else status}
    return b"data: " + json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n\n"


def upstream_error_event(status: int, body: bytes) -> bytes:
    """The child's error answer (llama-server's is `{"error": {...}}`) as one SSE data event."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    text = body.decode("utf-8", "replace").strip() or f"the model's server answered {status}"
    return error_event(status, text, "server_error", None)


class LoadingNotes:
    """While one streaming request waits for its lease: a note every `interval_s`.

    `run()` is a task the request starts next to its wait; `stop()` ends it once the wait is over
    (the task then ends at once, or when the note being written is whole)."""

    def __init__(
        self,
        model: str,
        interval_s: float,
        *,
        status: Callable[[], Awaitable[ModelStatus | None]],
        open_stream: Callable[[], Awaitable[None]],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        self.model = model
        self.interval_s = interval_s
        self._status = status
        self._open_stream = open_stream
        self._send = send
        self._scope = anyio.CancelScope()
        self.committed = False
        """The 200 head went out: what follows must be stream data."""
        self.broken = False
        """A write failed or took too long: the connection must close."""
        self.notes = 0

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        started = loop_now()
        with self._scope:
            while not self.broken:
                await anyio.sleep(self.interval_s)
                status = await self._status()
                text = describe(self.model, status, loop_now() - started, time.time())
                with anyio.CancelScope(shield=True) as write:
                    write.deadline = loop_now() + WRITE_S
                    try:
                        if not self.committed:
                            self.committed = True
                            await self._open_stream()
                        await self._send(sse_comment(text))
                        self.notes += 1
                    except Exception:  # the client left; the request's own watch ends it
                        self.broken = True
                if write.cancelled_caught:
                    self.broken = True
