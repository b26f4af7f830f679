"""The interface between the HTTP proxy and the runtime that owns the llama-server children.

The proxy knows models only through a `Backends`: it resolves names, holds a lease on a ready
child for the whole of each forwarded request (stream included), reads the service's status for its
own routes, and passes admin actions through. On-demand starts, queueing while a model loads,
per-model concurrency, eviction and TTL all live behind `lease()`.

Rules kept here:
- the data crossing is small frozen dataclasses; sizes are int bytes, durations float seconds;
- a request that cannot be served now raises `ModelUnavailable` (503 + Retry-After), never hangs:
  the runtime bounds every wait it makes;
- `resolve` is called on every request: it must not await and should be a dict lookup.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from llama_smart_proxy.supervisor.proxy.events import EventLog

DEFAULT_POOL_SIZE = 2
"""Idle upstream connections kept per child, at the least. llama-server serves connections from
n_threads_http = max(parallel + 2, cores - 1) threads and each idle keep-alive connection holds
one, so the pool stays below that and leaves a thread for health checks."""


def pool_size(parallel: int) -> int:
    """Idle connections kept to a child with `parallel` slots: one per slot, so that as many
    requests as it serves at once find a connection open, and two of its threads stay free."""
    return max(DEFAULT_POOL_SIZE, parallel)


class Progress:
    """When a child last sent data to one of its requests: the proxy writes it as response bytes
    arrive, the runtime reads it to tell a slow child from a hung one."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = 0.0
        """anyio.current_time() of the last data; 0.0: none yet."""


@dataclass(frozen=True)
class Upstream:
    """Where a ready child listens."""

    host: str
    port: int
    pool_size: int = DEFAULT_POOL_SIZE
    """Idle keep-alive connections the proxy may keep to this child."""
    progress: Progress | None = field(default=None, compare=False)
    """Where to note the child's data as it arrives; None: nobody watches."""


class ModelState(str, enum.Enum):
    """A model's state as clients see it in /status, /health, /metrics and /v1/models.

    It mirrors the supervised child's states (supervisor/children/state.py `ChildState`) and adds
    UNPLACED, which no child has: a model the plan gave no place has no child at all. The two are
    kept apart on purpose. The proxy imports no other stage, and these values are part of the HTTP
    contract, so a new child state must be a decision about what clients see, not a side effect of
    a change in the supervisor; the runtime converts with `ModelState(child.state.value)`, which
    fails at once if a child state has no counterpart here (a test checks every one).
    """

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"
    UNPLACED = "unplaced"


@dataclass(frozen=True)
class PromptCacheStatus:
    """A keep_cache model's saved prompt cache: what was saved and restored so far, what is on disk."""

    slots_saved: int = 0
    """Slots saved before planned stops, since the service started."""
    slots_restored: int = 0
    tokens_saved: int = 0
    tokens_restored: int = 0
    """Tokens restored into new children: prompt the model did not process again."""
    saves_discarded: int = 0
    """Saved caches thrown away because the launch changed (ctx, the file, the build, ...)."""
    bytes_on_disk: int = 0
    """What its directory under the cache root holds now."""
    last_save_s: float | None = None
    """How long the last save took (every slot of one planned stop)."""
    last_restore_s: float | None = None
    """How long the last restore took; part of that start's load time."""
    last_event: str | None = None
    """The last save, restore or discard, in words."""


@dataclass(frozen=True)
class ModelStatus:
    """One configured model as the runtime sees it now."""

    name: str
    state: ModelState
    aliases: tuple[str, ...] = ()
    mode: Literal["resident", "on-demand"] = "resident"
    placement: str = "cpu"
    """gpu | split | partial | cpu | unplaced (the plan's word)."""
    gpus: tuple[int, ...] = ()
    pid: int | None = None
    port: int | None = None
    restarts: int = 0
    last_error: str | None = None
    in_flight: int = 0
    queued: int = 0
    load_seconds: float | None = None
    """How long the last successful load took."""
    ready_since: float | None = None
    """Unix time the child became ready (OpenAI's `created`)."""
    starting_since: float | None = None
    """Unix time the start under way began (waiting for memory, spawn, load); None unless starting."""
    load_phase: str | None = None
    """While starting: how far the load has come, in words, from the child's output."""
    load_progress: float | None = None
    """While starting: 0.0-1.0 where the child's output gives a figure (llama.cpp's progress dots)."""
    retry_at: float | None = None
    """Unix time of the next restart after a crash; None unless waiting for one (backoff)."""
    planned_bytes_by_gpu: Mapping[int, int] = field(default_factory=dict)
    """The plan's bytes for it on each GPU it uses (what a start reserves there)."""
    host_bytes: int = 0
    """The plan's host RAM for it."""
    prompt_cache: PromptCacheStatus | None = None
    """None unless the model has keep_cache."""

    @property
    def is_servable(self) -> bool:
        """Whether a request for it may succeed without an operator's action."""
        return self.state not in (ModelState.FAILED, ModelState.UNPLACED)


@dataclass(frozen=True)
class GpuStatus:
    index: int
    name: str
    uuid: str
    total_bytes: int
    planned_bytes: int
    """Reserved in the memory ledger now: the planned bytes of every child process that holds
    memory here (running, starting or stopping)."""
    used_bytes: int | None = None
    """Measured through NVML at the last sample; None when not measured."""
    free_bytes: int | None = None
    """Measured through NVML at the last sample; None when not measured."""
    usable_bytes: int | None = None
    """What the ledger may reserve here: free when the plan was made, minus the reserve."""
    reserved_by_model: Mapping[str, int] = field(default_factory=dict)
    """The ledger's reservations here, by model."""
    measured_age_s: float | None = None
    """How old the NVML sample is, in seconds; None when there is none."""
    measured_at: float | None = None
    """Unix time of the NVML sample; None when there is none."""
    used_by_model: Mapping[str, int] = field(default_factory=dict)
    """NVML's measured use here by each model's process, where the driver reports processes."""
    used_by_other_processes: int | None = None
    """NVML's measured use here by processes that are none of our children; None when the
    driver reports no processes."""


@dataclass(frozen=True)
class HostStatus:
    """Host RAM, as the GPUs are shown: what the plan allows, what each model was planned and
    what its process uses (resident set size), and what is available now."""

    total_bytes: int
    reserve_bytes: int
    usable_bytes: int
    """What the plan may fill: available when the plan was made, minus the reserve."""
    planned_by_model: Mapping[str, int] = field(default_factory=dict)
    """The plan's host bytes of each model whose process holds memory now."""
    available_bytes: int | None = None
    """MemAvailable at the last sample; None when not measured."""
    used_by_model: Mapping[str, int] = field(default_factory=dict)
    """Each running child's resident set size at the last sample."""
    measured_at: float | None = None
    """Unix time of the sample; None when there is none."""


@dataclass(frozen=True)
class FleetHost:
    """A host of the fleet: its name in [hosts] and where its service listens."""

    name: str
    address: str


@dataclass(frozen=True)
class FleetModelStatus:
    """A model of the fleet and the hosts that run it (this one among them, or not)."""

    name: str
    aliases: tuple[str, ...] = ()
    hosts: tuple[FleetHost, ...] = ()
    """Empty: no host of the fleet runs it (`note` says why)."""
    note: str = ""


@dataclass(frozen=True)
class FleetStatus:
    """Where every model of a fleet runs, as the fleet plan this host serves says."""

    host: str
    """This host's name in [hosts]."""
    models: tuple[FleetModelStatus, ...] = ()

    def model(self, name: str) -> FleetModelStatus | None:
        """The model a name or alias means, or None."""
        for model in self.models:
            if name == model.name or name in model.aliases:
                return model
        return None


@dataclass(frozen=True)
class ServiceStatus:
    """Everything the proxy's own routes show, taken at one moment."""

    models: tuple[ModelStatus, ...]
    gpus: tuple[GpuStatus, ...] = ()
    plan: Mapping[str, Any] | None = None
    """The plan as JSON data (`Plan.model_dump(mode="json")`), shown by /status."""
    notes: tuple[str, ...] = ()
    """Plain statements for /status and /health, e.g. the last reload's error."""
    reloads: Mapping[str, int] = field(default_factory=dict)
    """Config reloads so far by result: {"ok": n, "failed": m}."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Runtime facts for /status that have no field here yet."""
    host: HostStatus | None = None
    fleet: FleetStatus | None = None
    """With [hosts]: every model of the fleet and where it runs; None on one machine."""

    def model(self, name: str) -> ModelStatus | None:
        for status in self.models:
            if status.name == name:
                return status
        return None

    def known_names(self) -> list[str]:
        """Every name and alias a client may send, sorted; in a fleet, every host's (a balancer
        sends a misspelt name to any host, whose answer should suggest from the whole fleet)."""
        names: set[str] = set()
        for status in self.models:
            names.add(status.name)
            names.update(status.aliases)
        for model in self.fleet.models if self.fleet is not None else ():
            names.add(model.name)
            names.update(model.aliases)
        return sorted(names)


UnavailableKind = Literal["queue_full", "load_timeout", "failed", "unplaced", "stopping", "busy", "no_memory"]


class UpstreamUnreachable(Exception):
    """Raised by the proxy inside a lease when the child's port refused the connection before
    anything was sent (it may have just died): the runtime lets go of that child, and the proxy
    may ask for a lease once more, which then waits for the restart."""


class BackendError(Exception):
    """A refusal the proxy answers with `status` and an OpenAI-style error body."""

    status = 503
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelUnavailable(BackendError):
    """The model cannot take this request now: answered 503 with Retry-After."""

    error_type = "unavailable_error"

    def __init__(self, model: str, kind: UnavailableKind, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"model {model!r} is unavailable ({kind}): {reason}")
        self.model = model
        self.kind = kind
        self.reason = reason
        self.retry_after_s = retry_after_s


class UnknownModel(BackendError):
    """An admin action named a model that is not configured (404)."""

    status = 404
    error_type = "invalid_request_error"


class ActionRefused(BackendError):
    """An admin action that cannot be done in the current state, e.g. a reload whose new config
    is invalid (409; the message says why)."""

    status = 409
    error_type = "invalid_request_error"


class LogSource(Protocol):
    """A model's output lines, numbered (the service hands over supervisor/children/log_ring.py's
    rings): what `/logs/<model>` streams."""

    @property
    def last_number(self) -> int: ...

    def lines_after(self, number: int) -> tuple[int, list[str]]:
        """(the first line's number, the kept lines numbered above `number`)."""
        ...

    async def wait_after(self, number: int) -> None:
        """Return once a line numbered above `number` is kept."""
        ...


class Backends(Protocol):
    """What the proxy needs from the runtime."""

    @property
    def events(self) -> EventLog:
        """Every change of what `status()` shows, published as it happens (`GET /events`)."""
        ...

    def log(self, model: str) -> LogSource | None:
        """`model`'s (canonical) output lines; None when it has none (not placed)."""
        ...

    def resolve(self, name: str) -> str | None:
        """The canonical model for a name or alias, or None when nothing is called that."""
        ...

    def lease(self, model: str) -> AbstractAsyncContextManager[Upstream]:
        """Wait until `model` (canonical) has a ready child that may take one more request and
        hold it for the caller until the context exits (in-flight counting, concurrency limits
        and eviction live behind this). Raises ModelUnavailable instead of waiting unboundedly.
        The caller may be cancelled at any point while waiting or holding."""
        ...

    def admits_now(self, model: str) -> bool:
        """Whether a lease on `model` would be granted at once, without waiting (a request that
        will not wait needs no loading notes)."""
        ...

    async def status(self) -> ServiceStatus:
        """The state of every configured model and GPU now."""
        ...

    async def load(self, model: str) -> None:
        """Start `model` now and wait until it is ready (or raise BackendError)."""
        ...

    async def unload(self, model: str) -> None:
        """Stop `model` once its in-flight requests have finished."""
        ...

    async def reset_failed(self, model: str) -> None:
        """Clear a failed model's crash history so the next request may start it again."""
        ...

    async def reload(self) -> str:
        """Re-read the config and apply the difference; returns a one-line summary, or raises
        ActionRefused (the old config keeps serving)."""
        ...
