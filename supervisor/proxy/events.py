"""The state-change log behind `GET /events`, and server-sent events' framing.

Whoever owns the state publishes each change of what /status shows as one `Event` (the service's
supervisor/service/state_feed.py does); each `GET /events` subscriber reads them after a snapshot.

Rules kept here:
- one writer, many readers: `publish` numbers each event (1, 2, 3, ...) and never waits; every
  reader reads the same numbered list, so each sees each event once and in order, however many
  there are and whatever their speed;
- bounded: the last `HISTORY_EVENTS` are kept; a reader that falls further behind is told so
  (`Lagged`) and starts over from a snapshot, instead of the writer waiting for it or the memory
  growing;
- an event's id is "<epoch>.<number>", the epoch new in every process: a client that resumes with
  `Last-Event-ID` from an earlier run of the service (or from before a gap) gets a snapshot,
  never events numbered in another run;
- SSE framing is pure: text in, bytes out (`sse_event`, `sse_comment`); a `data:` line never
  holds a newline (JSON is written compact, so it has none).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

HISTORY_EVENTS = 2000
"""Events kept for readers that are behind; a state change is a few hundred bytes, so about 1 MB."""


@dataclass(frozen=True)
class Event:
    number: int
    kind: str
    """"model", "model_removed", "gpus", "host", "reload" (see supervisor/state_feed.py)."""
    data: Mapping[str, Any]
    time: float
    """Unix time it was published."""


class Lagged(Exception):
    """The reader is further behind than the history kept: start over from a snapshot."""


class EventLog:
    """Numbered state changes; see the module's rules."""

    def __init__(self, history: int = HISTORY_EVENTS) -> None:
        self.epoch = secrets.token_hex(4)
        self._events: deque[Event] = deque(maxlen=history)
        self._last = 0
        self._readers = 0
        self._arrived: anyio.Event | None = None
        self.on_first_reader: Callable[[], None] | None = None
        """Called when a reader arrives with none there: the publisher may then catch up on
        what it skipped while nobody read (it need not work for no reader)."""

    @property
    def last_number(self) -> int:
        return self._last

    @property
    def has_readers(self) -> bool:
        return self._readers > 0

    def publish(self, kind: str, data: Mapping[str, Any]) -> Event:
        self._last += 1
        event = Event(self._last, kind, data, time.time())
        self._events.append(event)
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None
        return event

    def attach(self) -> int:
        """A reader arrives; returns the number to read after. Pair with `detach`."""
        if self._readers == 0 and self.on_first_reader is not None:
            self.on_first_reader()
        self._readers += 1
        return self._last

    def detach(self) -> None:
        self._readers -= 1

    def after(self, number: int) -> list[Event]:
        """The events numbered above `number`; raises Lagged when some of them are gone."""
        if number >= self._last:
            return []
        oldest = self._events[0].number  # numbers are consecutive: event n is at n - oldest
        if number + 1 < oldest:
            raise Lagged()
        return list(itertools.islice(self._events, number + 1 - oldest, None))

    async def wait_after(self, number: int) -> None:
        """Return once an event numbered above `number` is published."""
        while self._last <= number:
            if self._arrived is None:
                self._arrived = anyio.Event()
            await self._arrived.wait()

    def event_id(self, number: int) -> str:
        return f"{self.epoch}.{number}"

    def resume_point(self, last_event_id: str | None) -> int | None:
        """The number to read after for a client's Last-Event-ID, or None when it must start
        from a snapshot (no id, another run's id, or one older than the history)."""
        if not last_event_id:
            return None
        epoch, _, text = last_event_id.partition(".")
        if epoch != self.epoch or not text.isdigit():
            return None
        number = int(text)
        if number > self._last:
            return None
        try:
            self.after(number)
        except Lagged:
            return None
        return number

    def __repr__(self) -> str:
        return f"<EventLog {self.epoch} last {self._last}, {len(self._events)} kept, {self._readers} readers>"


# ---- server-sent events (https://html.spec.whatwg.org/multipage/server-sent-events.html)

SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
KEEPALIVE_S = 15.0
"""A comment this often on a quiet stream: a client (or a proxy between) sees the stream is alive,
and a client that left is noticed by the failed write."""
RETRY_MS = 1000
"""The reconnection delay an EventSource is told to use after the stream ends (a restart)."""


def sse_event(kind: str, data: Any, event_id: str | None = None) -> bytes:
    """One event: `data` written as compact JSON on a single data line."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {text}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A comment line, which every SSE client skips by the spec; newlines become spaces."""
    return b": " + " ".join(text.splitlines()).encode() + b"\n\n"


def sse_retry(milliseconds: int = RETRY_MS) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()
