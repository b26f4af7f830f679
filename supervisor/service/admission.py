"""Admission: how many requests of one model wait and how many run, owned by their leases.

Rules kept here (the admission promise of DESIGN.md):
- one `Admission` per configured model name, for as long as the name is configured: a reload
  keeps it, whatever else changes, so requests already waiting or running stay counted;
- a request holds a queue place while it waits and a permit while it runs; each is taken and
  given back by a context manager, so every path (success, error, cancellation) returns it;
- in flight <= limit at every instant, across reloads too: a new limit applies to the permits
  taken after it, and a lowered one lets nobody in until enough running requests have ended;
- no awaits here: waiting is the runtime's, which looks again after every `changed()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class QueueFull(Exception):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests already wait for it")
        self.waiting = waiting


class Admission:
    """Queue places and concurrency permits of one model."""

    def __init__(self, *, limit: int, queue_limit: int) -> None:
        self.limit = limit
        """Requests in flight at once; 0: no limit."""
        self.queue_limit = queue_limit
        self.in_flight = 0
        self.queued = 0

    def __repr__(self) -> str:
        return f"<Admission in_flight={self.in_flight}/{self.limit or '∞'} queued={self.queued}/{self.queue_limit}>"

    def configure(self, *, limit: int, queue_limit: int) -> None:
        """A reload's settings: they apply from the next permit or queue place on."""
        self.limit = limit
        self.queue_limit = queue_limit

    @property
    def is_idle(self) -> bool:
        return self.in_flight == 0 and self.queued == 0

    def has_permit(self) -> bool:
        """Whether one more request may run now."""
        return self.limit == 0 or self.in_flight < self.limit

    @contextmanager
    def queue_place(self) -> Iterator[None]:
        """Hold a place in the queue for the block; QueueFull when every place is taken."""
        if self.queued >= self.queue_limit:
            raise QueueFull(self.queued)
        self.queued += 1
        try:
            yield
        finally:
            self.queued -= 1

    @contextmanager
    def permit(self) -> Iterator[None]:
        """Run one request for the block. Take it only when `has_permit()`, with no await between."""
        if not self.has_permit():
            raise RuntimeError(f"{self!r}: no permit free")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
