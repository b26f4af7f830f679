"""What `GET /events` streams: each change of what /status shows, published as it happens.

There is no second copy of the state: a change is found by reading the runtime's own status (the
very values /status renders, through the same functions of supervisor/proxy/routes.py) and
comparing it with the reading before.

Rules kept here:
- the runtime calls `notice()` at once, on the event loop, wherever its state changes (a child's
  transition, a request admitted, queued or ended, a reload): a change is read before the next
  one can happen, so none is lost between two readings, and `changes` lists them in one order
  (models by name, removed models, GPUs, host, reload);
- measured values (NVML, host RAM) change on their own clock: `run()` reads again every
  `POLL_S`, and a sample's age alone is no change;
- with no reader, nothing is read (the proxy's hot path pays nothing); when a reader arrives, what
  changed meanwhile is published first, as one change per model (so a client that resumes with
  Last-Event-ID after a gap with no reader still ends with the right state), and a new reader
  starts from a snapshot anyway;
- `changes` is pure: two readings in, events out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from llama_smart_proxy.supervisor.proxy import routes
from llama_smart_proxy.supervisor.proxy.backends import GpuStatus, HostStatus, ModelStatus
from llama_smart_proxy.supervisor.proxy.events import EventLog

POLL_S = 1.0
"""How often measured values are compared again (the GPU sampler reads every 2 s)."""


@dataclass(frozen=True)
class Reading:
    """What /status shows that can change, at one moment."""

    models: Mapping[str, ModelStatus]
    gpus: tuple[GpuStatus, ...] = ()
    host: HostStatus | None = None
    reload: Mapping[str, Any] | None = None
    """{"last_reload": ..., "reloads": {...}} as /status shows them."""


def _without_age(gpus: tuple[GpuStatus, ...]) -> tuple[GpuStatus, ...]:
    # the age grows between any two readings; the sample's time (measured_at) marks a new one
    return tuple(dataclasses.replace(g, measured_age_s=None) for g in gpus)


def changes(before: Reading, after: Reading) -> list[tuple[str, dict[str, Any]]]:
    """The events that take a reader from `before` to `after`, in the module's order."""
    found: list[tuple[str, dict[str, Any]]] = []
    for name in sorted(after.models):
        status = after.models[name]
        if before.models.get(name) != status:
            found.append(("model", routes.model_json(status)))
    for name in sorted(set(before.models) - set(after.models)):
        found.append(("model_removed", {"name": name}))
    if _without_age(before.gpus) != _without_age(after.gpus):
        found.append(("gpus", {"gpus": [routes.gpu_json(g) for g in after.gpus]}))
    if before.host != after.host and after.host is not None:
        found.append(("host", {"host": routes.host_json(after.host)}))
    if before.reload != after.reload and after.reload is not None:
        found.append(("reload", dict(after.reload)))
    return found


class StateFeed:
    """Publishes the runtime's changes into an `EventLog`; see the module's rules."""

    def __init__(self, read: Callable[[], Reading], events: EventLog | None = None) -> None:
        self._read = read
        self.events = events if events is not None else EventLog()
        self.events.on_first_reader = self._start_reading
        self._last: Reading | None = None

    def notice(self) -> None:
        """Something may have changed: publish what did."""
        if not self.events.has_readers:
            return  # _last stays: the next reader's arrival publishes what changed since
        self._publish_changes()

    def _start_reading(self) -> None:
        self._publish_changes()

    def _publish_changes(self) -> None:
        current = self._read()
        if self._last is not None:
            for kind, data in changes(self._last, current):
                self.events.publish(kind, data)
        self._last = current

    async def run(self, interval_s: float = POLL_S) -> None:
        """Compare measured values again every `interval_s`, until cancelled."""
        while True:
            await anyio.sleep(interval_s)
            self.notice()
