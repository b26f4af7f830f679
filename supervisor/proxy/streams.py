"""The proxy's own event streams: `GET /events` (state changes) and `GET /logs/<model>` (a child's
output), as server-sent events. The server writes the head and frames the bytes; these loops
decide what to send, and run until the client leaves or the server drains.

Rules kept here:
- /events starts with a `snapshot` event (the very body /status answers) whose id is the number
  of the last change it includes, then every change after it, in order, each once; a client that
  reconnects with `Last-Event-ID` resumes after that change when this run of the service still
  holds it, and gets a new snapshot otherwise (a restart, a gap): either way its view ends right;
- a reader that falls behind the kept history gets a new snapshot instead of a gap;
- /logs/<model> starts with the last `tail` lines (or the lines after the client's Last-Event-ID),
  then each new batch of lines as it arrives, as one `lines` event with the number of its first
  line, so a reader can tell when lines fell out of the ring;
- a quiet stream gets a comment every KEEPALIVE_S.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from llama_smart_proxy.supervisor.proxy.backends import LogSource
from llama_smart_proxy.supervisor.proxy.events import (
    KEEPALIVE_S,
    EventLog,
    Lagged,
    sse_comment,
    sse_event,
    sse_retry,
)

Send = Callable[[bytes], Awaitable[None]]

LOG_TAIL_DEFAULT = 200
"""Lines a new /logs reader gets first, unless it asks for another number (`?tail=N`)."""


async def stream_events(
    events: EventLog,
    snapshot: Callable[[], Awaitable[dict[str, Any]]],
    send: Send,
    *,
    last_event_id: str | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> None:
    """Send state changes until cancelled (or until `send` raises: the client left)."""
    after = events.attach()
    try:
        resumed = events.resume_point(last_event_id)
        await send(sse_retry())
        if resumed is None:
            await send(sse_event("snapshot", await snapshot(), events.event_id(after)))
        else:
            after = resumed
        while True:
            try:
                batch = events.after(after)
            except Lagged:
                after = events.last_number
                await send(sse_event("snapshot", await snapshot(), events.event_id(after)))
                continue
            if batch:
                await send(
                    b"".join(
                        sse_event(e.kind, {**e.data, "time": e.time}, events.event_id(e.number)) for e in batch
                    )
                )
                after = batch[-1].number
                continue
            with anyio.move_on_after(keepalive_s) as quiet:
                await events.wait_after(after)
            if quiet.cancelled_caught:
                await send(sse_comment("keep-alive"))
    finally:
        events.detach()


def log_resume_point(epoch: str, last_event_id: str | None) -> int | None:
    """The line number to continue after, for a Last-Event-ID this run of the service gave."""
    if not last_event_id:
        return None
    given, _, text = last_event_id.partition(".")
    return int(text) if given == epoch and text.isdigit() else None


async def stream_log(
    model: str,
    log: LogSource,
    epoch: str,
    send: Send,
    *,
    tail: int = LOG_TAIL_DEFAULT,
    last_event_id: str | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> None:
    """Send `model`'s output lines until cancelled (or until `send` raises)."""
    after = log_resume_point(epoch, last_event_id)
    if after is None or after > log.last_number:  # a number from before a restart of the service
        after = max(0, log.last_number - tail)
    await send(sse_retry())
    first_batch = True
    while True:
        first, lines = log.lines_after(after)
        if lines or first_batch:
            last = first + len(lines) - 1 if lines else log.last_number
            data = {"model": model, "first": first, "lines": lines}
            await send(sse_event("lines", data, f"{epoch}.{last}"))
            after = max(after, last)
            first_batch = False
            continue
        with anyio.move_on_after(keepalive_s) as quiet:
            await log.wait_after(after)
        if quiet.cancelled_caught:
            await send(sse_comment("keep-alive"))
