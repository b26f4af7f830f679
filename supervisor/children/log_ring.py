"""The last lines a model's llama-server printed, numbered, kept in memory, and waited on by readers.

Rules kept here:
- one ring per model name, kept across the model's restarts and reloads (a child replaced by a
  reload writes into the ring its successor writes into), so a reader sees why the last one ended;
- bounded: the last `capacity` lines; each line has a number, one more than the line before it,
  so a reader resumes after the last number it saw and knows how many it missed;
- writing never waits and never fails (the child's output reader calls `append`); readers wait with
  `wait_after`, which wakes at the next line;
- it knows nothing of HTTP: the proxy streams it (`/logs/<model>`) through the `LogSource` protocol
  of supervisor/proxy/backends.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import anyio


class LogRing:
    """A bounded, numbered list of lines. Iterating gives the kept lines, oldest first, like the
    deque it replaces (`Child.log_tail`)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lines: deque[str] = deque(maxlen=capacity)
        self._last = 0
        """The number of the newest line; 0: none yet."""
        self._arrived: anyio.Event | None = None
        """Created by the first waiter (an anyio Event needs a running event loop), set and
        dropped by the next line."""

    def append(self, line: str) -> None:
        self._lines.append(line)
        self._last += 1
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def last_number(self) -> int:
        """The newest line's number (0 before the first line)."""
        return self._last

    def lines_after(self, number: int) -> tuple[int, list[str]]:
        """(the number of the first line returned, the kept lines numbered above `number`).
        Lines that fell out of the ring are skipped: the first number tells how many."""
        kept_first = self._last - len(self._lines) + 1
        start = max(number + 1, kept_first)
        count = self._last - start + 1
        if count <= 0:
            return self._last + 1, []
        return start, list(self._lines)[-count:]

    async def wait_after(self, number: int) -> None:
        """Return once a line numbered above `number` is kept."""
        while self._last <= number:
            if self._arrived is None:
                self._arrived = anyio.Event()
            await self._arrived.wait()

    def __repr__(self) -> str:
        return f"<LogRing {len(self._lines)}/{self.capacity} lines, last {self._last}>"
