"""The running models: what the proxy leases, what reloads change, what eviction and TTL stop.

`Runtime` is the proxy's `Backends`. It owns one `ModelEntry` per configured model (its plan
entry and its supervised `Child`) plus the predecessors a reload retired that still drain, and it
is their only writer. Each promise has one owner that every path passes through:
- memory: the `MemoryLedger` (supervisor/service/ledger.py). A child asks `Runtime.reserve` right before
  each spawn; a start that does not fit stops idle on-demand models (supervisor/service/eviction.py),
  waits while only models that will go away (busy on-demand, retiring, stopping) are in its way,
  and is refused with the GPUs and bytes otherwise. Decisions are made under one lock;
- admission: one `Admission` per model name (supervisor/service/admission.py), kept across reloads;
  `lease()` takes a queue place while it waits and a permit while it runs, both returned on
  every path; a request never waits unbounded (queue_limit, queue_timeout);
- routing: the `RoutingTable` (supervisor/service/routing.py), swapped whole by a reload;
- reload: `stage()` builds everything a new config needs without side effects (or raises);
  `apply()` then acts on the difference and cannot fail as a whole: a changed or removed model
  stops taking requests, finishes its in-flight ones (up to drain_timeout), then stops, and its
  successor starts once it is reaped, since it needs the same memory;
- state changes: every change /status shows is told to the `StateFeed` (supervisor/service/state_feed.py)
  where it happens (`_wake`, and a request admitted or queued), for `GET /events`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from llama_smart_proxy.schemas.config import ModelSpec
from llama_smart_proxy.schemas.plan import ModelPlan, Plan
from llama_smart_proxy.supervisor.children.child import (
    LOG_TAIL_LINES,
    Child,
    ChildError,
    ChildRefused,
    ChildStartError,
    ChildStopped,
)
from llama_smart_proxy.supervisor.children.hold import NoRoom, describe_bytes
from llama_smart_proxy.supervisor.children.launch import CHILD_HOST
from llama_smart_proxy.supervisor.children.log_ring import LogRing
from llama_smart_proxy.supervisor.children.ports import PortPool
from llama_smart_proxy.supervisor.children.state import ChildState
from llama_smart_proxy.supervisor.children.supervise import Children
from llama_smart_proxy.supervisor.planning.prepare import Prepared
from llama_smart_proxy.supervisor.proxy.backends import (
    ActionRefused,
    FleetHost,
    FleetModelStatus,
    FleetStatus,
    GpuStatus,
    HostStatus,
    ModelState,
    ModelStatus,
    ModelUnavailable,
    Progress,
    ServiceStatus,
    UnknownModel,
    Upstream,
    UpstreamUnreachable,
    pool_size,
)
from llama_smart_proxy.supervisor.proxy.events import EventLog
from llama_smart_proxy.supervisor.service.admission import Admission, QueueFull
from llama_smart_proxy.supervisor.service.eviction import Occupant, choose_victims
from llama_smart_proxy.supervisor.service.gpu_sampler import GpuSampler
from llama_smart_proxy.supervisor.service.ledger import MemoryLedger, Reservation
from llama_smart_proxy.supervisor.service.prompt_cache import PromptCaches
from llama_smart_proxy.supervisor.service.reload_diff import (
    PlanDiff,
    ReloadRecord,
    deferred_settings,
    diff_plans,
    with_setting_changes,
)
from llama_smart_proxy.supervisor.service.routing import RoutingTable
from llama_smart_proxy.supervisor.service.state_feed import Reading, StateFeed

log = logging.getLogger("llama-smart-proxy.runtime")

TTL_CHECK_S = 1.0
RETRY_AFTER_LOADING_S = 2.0
RETRY_AFTER_FAILED_S = 30.0
UNREACHABLE_NOTICE_S = 1.0
"""After a child's port refused a connection, how long to wait for its exit to be noticed before
the request is answered 502 (a refused connection from a live child is not a death)."""


@dataclass(eq=False)
class ModelEntry:
    """One model as configured now, or a predecessor a reload retired that still drains."""

    spec: ModelSpec
    plan: ModelPlan
    admission: Admission
    """Shared by every entry of this name, across reloads."""
    child: Child | None = None
    """None when the plan could not place the model."""
    gate: anyio.Event = field(default_factory=anyio.Event)
    """Set once the child may start: a reload's successor waits here for its predecessor's reap."""
    retiring: bool = False
    """Replaced or removed by a reload: takes no new requests, stops once drained."""
    stopping: bool = False
    """Being stopped on purpose (evicted, idle past its TTL, unloaded): takes no new requests."""
    in_flight: int = 0
    """Requests this entry's child serves now (the admission counts the model's, all entries)."""
    last_used: float = field(default_factory=time.monotonic)
    progress: Progress = field(default_factory=Progress)
    reservation: Reservation | None = None
    """The ledger's reservation of the child's current process, if any."""
    waiting_for: str | None = None
    """What its start waits for (memory), shown in /status."""

    @property
    def name(self) -> str:
        return self.spec.name

    def bytes_by_gpu(self) -> dict[int, int]:
        estimate = self.plan.estimate
        if estimate is None:
            return {}
        return {index: device.total_bytes for index, device in zip(self.plan.gpus, estimate.gpus)}

    def holds_memory(self) -> bool:
        return self.reservation is not None and not self.reservation.released

    def may_start(self) -> bool:
        return self.gate.is_set() and not self.retiring and not self.stopping

    def takes_requests(self) -> bool:
        return self.may_start() and self.child is not None and self.child.accepts_requests

    def admits_one_more(self) -> bool:
        """Takes requests, and its model's limit lets one more in now."""
        return self.takes_requests() and self.admission.has_permit()

    def is_evictable(self) -> bool:
        """Idle on-demand, ready, and not already on its way out."""
        return (
            self.spec.mode == "on-demand"
            and self.may_start()
            and self.in_flight == 0
            and self.admission.is_idle
            and self.child is not None
            and self.child.state is ChildState.READY
            and self.holds_memory()
        )

    def idle_since(self) -> float:
        """When its idle_ttl began to run: the end of its last request, or its child's becoming
        ready if later (a model loaded and not yet asked for is not idle since the service began)."""
        ready = self.child.ready_since if self.child is not None else None
        return self.last_used if ready is None else max(self.last_used, ready)

    def is_permanent_holder(self) -> bool:
        """Holds memory that no wait will free: a configured resident model."""
        return self.spec.mode == "resident" and not self.retiring and not self.stopping

    def status(self) -> ModelStatus:
        child = self.child
        state = ModelState.UNPLACED if child is None else ModelState(child.state.value)
        error = None
        if state is not ModelState.READY:
            error = self.waiting_for or (child.last_error if child else self.plan.reason)
        step = child.load_step if child else None
        return ModelStatus(
            name=self.name,
            state=state,
            aliases=tuple(self.spec.aliases),
            mode=self.spec.mode,
            placement=self.plan.placement,
            gpus=tuple(self.plan.gpus),
            pid=child.pid if child else None,
            port=child.port if child else None,
            restarts=child.restarts if child else 0,
            last_error=error,
            in_flight=self.admission.in_flight,
            queued=self.admission.queued,
            load_seconds=child.load_seconds if child else None,
            ready_since=None,
            starting_since=child.starting_since if child else None,
            load_phase=step.phase if step else None,
            load_progress=step.fraction if step else None,
            retry_at=child.retry_at if child else None,
            planned_bytes_by_gpu=self.bytes_by_gpu(),
            host_bytes=self.plan.host_bytes,
        )


@dataclass(frozen=True)
class Staged:
    """Everything a reload needs, built without side effects: `Runtime.apply` acts on it."""

    prepared: Prepared
    binary: Path
    diff: PlanDiff
    entries: Mapping[str, ModelEntry]
    """The new configuration's entries: kept ones (to be updated) and new ones."""
    new: tuple[str, ...]
    """Entries built for this reload (changed or added models), in name order."""
    deferred: tuple[str, ...]
    """Settings that changed but take effect only at the next start, in words."""
    ports: PortPool


class _Owner:
    """What one entry's child asks of the runtime (supervisor.children.child.ChildOwner)."""

    def __init__(self, runtime: Runtime, entry: ModelEntry) -> None:
        self.runtime = runtime
        self.entry = entry

    async def reserve(self, child: Child) -> Reservation:
        # from here until it is ready, others' saves (the models this start evicts among them) keep
        # this model's saved prompt cache: it restores it once loaded
        self.runtime.prompt_caches.set_starting(self.entry.name, True)
        return await self.runtime._reserve(self.entry)

    def activity(self, child: Child) -> tuple[bool, float]:
        return self.entry.in_flight > 0, self.entry.progress.at

    def changed(self, child: Child) -> None:
        if child.state is not ChildState.STARTING:
            self.runtime.prompt_caches.set_starting(self.entry.name, False)
        self.runtime._wake()

    async def after_load(self, child: Child, port: int) -> None:
        settings = self.runtime.prepared.loaded.config.prompt_cache
        await self.runtime.prompt_caches.restore(child.spec, child.binary, port, settings)

    async def before_stop(self, child: Child, port: int) -> None:
        settings = self.runtime.prepared.loaded.config.prompt_cache
        await self.runtime.prompt_caches.save(
            child.spec, child.binary, port, settings, self.entry.plan.estimate, slots_timeout_s=child.settings.health_timeout
        )


class Runtime:
    """Implements supervisor.proxy.backends.Backends over supervised children."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        binary: Path,
        children: Children,
        reload: Callable[[], Awaitable[str]] | None = None,
        sampler: GpuSampler | None = None,
    ) -> None:
        self.prepared = prepared
        self.binary = binary
        self._children = children
        self._reload_hook = reload
        self.sampler = sampler
        self.ledger = MemoryLedger(_usable_by_gpu(prepared.plan))
        self._ports = PortPool(prepared.loaded.config.llama_server.port_range)
        self._start_lock = anyio.Lock()
        self._changed = anyio.Event()
        """Set (and replaced) on every change a waiter may care about: a child's state, a request
        ending, a reservation released, a reload."""
        self.last_reload: ReloadRecord | None = None
        self.reloads = {"ok": 0, "failed": 0}
        self.feed = StateFeed(self._reading)
        self._logs: dict[str, LogRing] = {}
        """Each model's output lines, kept across its children (restarts and reloads)."""
        self._entries: dict[str, ModelEntry] = {}
        self._retiring: list[ModelEntry] = []
        self._routing = RoutingTable()
        self.prompt_caches = PromptCaches()
        """keep_cache models' saved slots (supervisor/service/prompt_cache.py), kept across reloads."""
        entries = self._build_entries(prepared, binary, self._ports, keep={})
        for entry in entries.values():
            entry.gate.set()
        self._install(entries)

    # ---- Backends: routing and leases

    def resolve(self, name: str) -> str | None:
        return self._routing.resolve(name)

    @property
    def events(self) -> EventLog:
        return self.feed.events

    def log(self, model: str) -> LogRing | None:
        return self._logs.get(model)

    def note_change(self) -> None:
        """Something /status shows changed outside this class (a reload's record)."""
        self.feed.notice()

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Upstream]:
        entry = self._entries.get(model)
        if entry is None:
            raise ModelUnavailable(model, "stopping", "it is no longer configured")
        admission = entry.admission
        ready = self._admit_now(model, admission)
        if ready is None:
            try:
                ready = await self._queue_for(model, admission)
            except BaseException:
                self.feed.notice()  # its place in the queue was given back
                raise
        # no await between the check above and taking the permit: nobody can take it meanwhile
        with self._noticing(), admission.permit():  # the permit's return is a change too
            ready.in_flight += 1
            self.feed.notice()
            assert ready.child is not None and ready.child.port is not None
            try:
                yield Upstream(CHILD_HOST, ready.child.port, pool_size(ready.spec.parallel), ready.progress)
            except UpstreamUnreachable:
                # the port refused: most likely the child just died; let its exit be noticed, so
                # that the proxy's next lease waits for the restart instead of trying it again
                with anyio.move_on_after(UNREACHABLE_NOTICE_S):
                    await ready.child.wait_for(lambda c: not c.accepts_requests)
                raise
            finally:
                ready.in_flight -= 1
                ready.last_used = time.monotonic()
                ready.progress.at = anyio.current_time()  # an answered request is progress too
                self._wake()

    def admits_now(self, model: str) -> bool:
        entry = self._entries.get(model)
        return entry is not None and entry.admits_one_more()

    @contextmanager
    def _noticing(self) -> Iterator[None]:
        """Tell the state feed once the block has exited."""
        try:
            yield
        finally:
            self.feed.notice()

    def _admit_now(self, model: str, admission: Admission) -> ModelEntry | None:
        """The entry that may take one more request now; None to wait; raises when waiting cannot help."""
        entry = self._entries.get(model)
        if entry is None or entry.admission is not admission:  # removed (and maybe added again)
            raise ModelUnavailable(model, "stopping", "it is no longer configured")
        child = entry.child
        if child is None:
            raise ModelUnavailable(model, "unplaced", entry.plan.reason, RETRY_AFTER_FAILED_S)
        if child.state is ChildState.FAILED:
            raise ModelUnavailable(model, "failed", child.last_error or "failed", RETRY_AFTER_FAILED_S)
        if entry.admits_one_more():  # entry.admission is `admission` (checked above)
            return entry
        return None

    async def _queue_for(self, model: str, admission: Admission) -> ModelEntry:
        """Wait in the model's queue until it may take the request, starting it if it is down."""
        timeout = self.prepared.loaded.config.proxy.queue_timeout
        try:
            with admission.queue_place():
                self.feed.notice()
                with anyio.fail_after(timeout):
                    asked: tuple[Child, int] | None = None  # the start this request asked for
                    while True:
                        entry = self._admit_now(model, admission)
                        if entry is not None:
                            return entry
                        entry = self._entries[model]
                        child = entry.child
                        assert child is not None
                        if asked is not None and asked[0] is child and (why := child.refused(asked[1])):
                            raise ModelUnavailable(model, "no_memory", why, RETRY_AFTER_LOADING_S)
                        if not child.is_supervised and entry.gate.is_set():
                            raise ModelUnavailable(model, "stopping", "the service is stopping")
                        if entry.may_start() and child.state is ChildState.STOPPED:
                            asked = (child, child.start_soon())
                        await self._changed.wait()
        except QueueFull as full:
            raise ModelUnavailable(model, "queue_full", str(full), RETRY_AFTER_LOADING_S) from None
        except TimeoutError:
            raise ModelUnavailable(
                model, "load_timeout", f"not ready within {timeout:g} s: {self._why_waiting(model)}", RETRY_AFTER_LOADING_S
            ) from None

    def _why_waiting(self, model: str) -> str:
        entry = self._entries.get(model)
        if entry is None or entry.child is None:
            return "it is no longer configured"
        if entry.waiting_for:
            return entry.waiting_for
        if entry.child.accepts_requests and not entry.admission.has_permit():
            return f"all {entry.admission.limit} of its concurrency permits are in use (max_concurrency)"
        return f"its server is {entry.child.state.value}" + (
            f" ({entry.child.last_error})" if entry.child.last_error else ""
        )

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self.feed.notice()

    # ---- memory: the one path every start takes

    async def _reserve(self, entry: ModelEntry) -> Reservation:
        """Reserve `entry`'s planned bytes for one spawn: make room by stopping idle on-demand
        models, wait while the way is held only by models that will go away, else NoRoom."""
        need = entry.bytes_by_gpu()
        if entry.retiring:  # it crashed while draining: its successor starts instead
            raise NoRoom(entry.name, {}, "it was replaced by a reload")
        while True:
            async with self._start_lock:
                short = self.ledger.shortfall(need)
                if short:
                    victims = choose_victims(short, self._occupants(lambda o: o.is_evictable() and o is not entry))
                    if victims is not None:
                        await self._stop_for_room(victims, entry)
                        short = self.ledger.shortfall(need)
                if not short:
                    entry.reservation = self.ledger.reserve(entry.name, need)
                    entry.waiting_for = None
                    return entry.reservation
                lasting = self._lasting_shortfall(need, entry)
                if lasting:
                    entry.waiting_for = None
                    raise NoRoom(entry.name, lasting, "held by resident models")
                waiting = "waiting for memory: " + ", ".join(
                    f"GPU {gpu} lacks {describe_bytes(size)}" for gpu, size in sorted(short.items())
                ) + f" until {self._holders_of(short, entry)} let go"
                changed = self._changed
            if entry.waiting_for != waiting:
                log.info("model %s: %s", entry.name, waiting)
                entry.waiting_for = waiting
            await changed.wait()

    def _occupants(self, keep: Callable[[ModelEntry], bool]) -> list[Occupant]:
        return [
            Occupant(e.name, e.reservation.bytes_by_gpu, e.spec.priority, e.idle_since())
            for e in self._all_entries()
            if e.holds_memory() and e.reservation is not None and keep(e)
        ]

    def _lasting_shortfall(self, need: Mapping[int, int], entry: ModelEntry) -> dict[int, int]:
        """What `need` would lack even once every holder that will go away has gone."""
        usable = self.ledger.usable_by_gpu
        lasting: dict[int, int] = {}
        for gpu, size in need.items():
            permanent = sum(
                o.bytes_by_gpu.get(gpu, 0) for o in self._occupants(lambda e: e.is_permanent_holder() and e is not entry)
            )
            if size + permanent > usable.get(gpu, 0):
                lasting[gpu] = size + permanent - usable.get(gpu, 0)
        return lasting

    def _holders_of(self, short: Mapping[int, int], entry: ModelEntry) -> str:
        names = sorted({o.name for o in self._occupants(lambda e: e is not entry) if any(g in short for g in o.bytes_by_gpu)})
        return ", ".join(names) or "memory being released"

    async def _stop_for_room(self, victims: tuple[str, ...], entry: ModelEntry) -> None:
        chosen = [e for e in self._entries.values() if e.name in victims]
        for victim in chosen:
            log.info("model %s: stopping idle %s to make room", entry.name, victim.name)
        await self._stop_entries(chosen, reason=f"evicted to make room for {entry.name}")

    async def _stop_entries(self, entries: list[ModelEntry], reason: str) -> None:
        """Stop these entries' children together; they take no requests meanwhile."""
        for entry in entries:
            entry.stopping = True
        self._wake()
        try:
            async with anyio.create_task_group() as tg:
                for entry in entries:
                    if entry.child is not None:
                        tg.start_soon(entry.child.stop)
        finally:
            for entry in entries:
                entry.stopping = False
                log.info("model %s: stopped (%s)", entry.name, reason)
            self._wake()

    def _all_entries(self) -> list[ModelEntry]:
        """Current entries and retiring predecessors (they may still hold memory)."""
        return [*self._entries.values(), *self._retiring]

    # ---- Backends: status and admin

    def model_statuses(self) -> list[ModelStatus]:
        return [self._model_status(e) for e in sorted(self._entries.values(), key=lambda e: e.name)]

    def _model_status(self, entry: ModelEntry) -> ModelStatus:
        return replace(entry.status(), prompt_cache=self.prompt_caches.status(entry.name, entry.spec.keep_cache))

    def holders(self) -> list[str]:
        """Models whose children hold memory now (running, starting or stopping)."""
        return sorted({e.name for e in self._all_entries() if e.holds_memory()})

    def gpu_statuses(self) -> tuple[GpuStatus, ...]:
        sample = self.sampler.latest if self.sampler is not None else None
        reserved = self.ledger.reserved_by_gpu()
        by_model: dict[int, dict[str, int]] = {}
        for held in self.ledger.reservations():
            for gpu, size in held.bytes_by_gpu.items():
                by_model.setdefault(gpu, {})
                by_model[gpu][held.model] = by_model[gpu].get(held.model, 0) + size
        usable = self.ledger.usable_by_gpu
        pids = self._pids_by_model()
        return tuple(
            GpuStatus(
                index=g.index,
                name=g.name,
                uuid=g.uuid,
                total_bytes=g.total_bytes,
                planned_bytes=reserved.get(g.index, 0),
                used_bytes=sample.used_by_gpu.get(g.index) if sample else None,
                free_bytes=sample.free_by_gpu.get(g.index) if sample else None,
                usable_bytes=usable.get(g.index),
                reserved_by_model=dict(sorted(by_model.get(g.index, {}).items())),
                measured_age_s=round(sample.age_s(), 3) if sample else None,
                measured_at=sample.taken_at_unix if sample else None,
                **_by_process(sample.used_by_process.get(g.index) if sample else None, pids),
            )
            for g in self.prepared.plan.gpus
        )

    def _pids_by_model(self) -> dict[int, str]:
        return {e.child.pid: e.name for e in self._all_entries() if e.child is not None and e.child.pid is not None}

    def host_status(self) -> HostStatus | None:
        host = self.prepared.plan.host
        if host is None:
            return None
        sample = self.sampler.latest_host if self.sampler is not None else None
        holders = {e.name: e.plan.host_bytes for e in self._all_entries() if e.holds_memory()}
        pids = self._pids_by_model()
        used: dict[str, int] = {}
        for pid, size in (sample.rss_by_pid.items() if sample else ()):
            if pid in pids:
                used[pids[pid]] = used.get(pids[pid], 0) + size
        return HostStatus(
            total_bytes=host.ram_total_bytes,
            reserve_bytes=host.reserve_bytes,
            usable_bytes=host.usable_bytes,
            planned_by_model=dict(sorted(holders.items())),
            available_bytes=sample.available_bytes if sample else None,
            used_by_model=dict(sorted(used.items())),
            measured_at=sample.taken_at_unix if sample else None,
        )

    def _reading(self) -> Reading:
        """What the state feed compares (supervisor/service/state_feed.py)."""
        return Reading(
            models={e.name: self._model_status(e) for e in self._entries.values()},
            gpus=self.gpu_statuses(),
            host=self.host_status(),
            reload={
                "last_reload": None if self.last_reload is None else self.last_reload.as_json(),
                "reloads": dict(self.reloads),
            },
        )

    async def status(self) -> ServiceStatus:
        notes = list(self.prepared.plan.notes)
        if self.last_reload is not None and not self.last_reload.ok:
            notes.append(f"last reload failed: {self.last_reload.summary}")
        extra = {
            "config": str(self.prepared.loaded.path),
            "machine": self.prepared.machine,
            "fleet_host": self.prepared.fleet.host if self.prepared.fleet else None,
            "last_reload": None if self.last_reload is None else self.last_reload.as_json(),
            "reloads": dict(self.reloads),
            "children": {
                e.name: {"log_tail": list(e.child.status(tail_lines=10).log_tail)}
                for e in self._entries.values()
                if e.child is not None
            },
            "ledger": [
                {"model": r.model, "bytes_by_gpu": {str(g): b for g, b in sorted(r.bytes_by_gpu.items())}}
                for r in self.ledger.reservations()
            ],
        }
        return ServiceStatus(
            models=tuple(self.model_statuses()),
            gpus=self.gpu_statuses(),
            plan=self.prepared.plan.model_dump(mode="json"),
            notes=tuple(notes),
            reloads=dict(self.reloads),
            extra=extra,
            host=self.host_status(),
            fleet=fleet_status(self.prepared),
        )

    def _admin_entry(self, model: str) -> ModelEntry:
        entry = self._entries.get(model)
        if entry is None:
            raise UnknownModel(f"no model {model!r}")
        return entry

    async def load(self, model: str) -> None:
        entry = self._admin_entry(model)
        if entry.child is None:
            raise ActionRefused(f"model {model!r} is not placed: {entry.plan.reason}")
        if entry.child.state is ChildState.FAILED:
            raise ActionRefused(f"model {model!r} failed ({entry.child.last_error}); reset it first")
        timeout = self.prepared.loaded.config.proxy.queue_timeout
        try:
            with anyio.fail_after(timeout):
                await entry.gate.wait()
                if not entry.child.is_supervised:
                    raise ActionRefused("the service is stopping")
                while True:
                    try:
                        await entry.child.ensure_ready()
                        return
                    except ChildStartError as exc:  # it restarts after a backoff: keep waiting
                        log.info("model %s: %s; still waiting for it", model, exc.reason)
        except TimeoutError:
            raise ModelUnavailable(model, "load_timeout", f"not ready within {timeout:g} s: {self._why_waiting(model)}") from None
        except ChildRefused as exc:
            raise ModelUnavailable(model, "no_memory", exc.reason, RETRY_AFTER_LOADING_S) from None
        except ChildStopped as exc:
            raise ModelUnavailable(model, "stopping", exc.reason, RETRY_AFTER_LOADING_S) from None
        except ChildError as exc:
            raise ModelUnavailable(model, "failed", exc.reason, RETRY_AFTER_FAILED_S) from None

    async def unload(self, model: str) -> None:
        entry = self._admin_entry(model)
        entry.stopping = True  # new requests wait from now on
        try:
            await self._drain_model(entry, self.prepared.loaded.config.proxy.drain_timeout)
        finally:
            entry.stopping = False
        await self._stop_entries([entry], reason="unloaded by an admin")

    async def reset_failed(self, model: str) -> None:
        entry = self._admin_entry(model)
        if entry.child is not None:
            entry.child.reset()
            if entry.child.state is ChildState.STOPPED and entry.spec.mode == "resident" and entry.may_start():
                entry.child.start_soon()

    async def reload(self) -> str:
        if self._reload_hook is None:
            raise ActionRefused("no config file to reload (serve --demo)")
        return await self._reload_hook()

    async def wait_idle(self) -> None:
        """Return once no request is in flight to any model (shutdown drains with this)."""
        while any(e.in_flight for e in self._all_entries()):
            await self._changed.wait()

    # ---- lifetime

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise every placed model, sample the GPUs, and unload idle on-demand models."""
        async with anyio.create_task_group() as tg:
            for entry in self._entries.values():
                if entry.child is not None:
                    await self._children.add(entry.child)
            if self.sampler is not None:
                tg.start_soon(
                    partial(self.sampler.run, has_gpus=lambda: bool(self.prepared.plan.gpus), pids=self._child_pids)
                )
            tg.start_soon(self.prompt_caches.open, [e.child.spec for e in self._entries.values() if e.child])
            tg.start_soon(self.feed.run)
            task_status.started()
            while True:
                await anyio.sleep(TTL_CHECK_S)
                await self._unload_expired()

    def _child_pids(self) -> list[int]:
        return sorted(self._pids_by_model())

    async def start_residents(self) -> dict[str, str | None]:
        """Start every placed resident model concurrently; {name: None or why it failed}."""
        names = [e.name for e in self._entries.values() if e.child is not None and e.spec.mode == "resident"]
        results = await self._children.start_all(names)
        return {name: (error.reason if error else None) for name, error in results.items()}

    async def _unload_expired(self) -> None:
        def expired(entry: ModelEntry, now: float) -> bool:
            ttl = entry.spec.idle_ttl
            return ttl > 0 and entry.is_evictable() and now - entry.idle_since() >= ttl

        if not any(expired(e, time.monotonic()) for e in self._entries.values()):
            return
        async with self._start_lock:  # no start decides on memory while these stop
            now = time.monotonic()
            due = [e for e in self._entries.values() if expired(e, now)]
            if due:
                await self._stop_entries(due, reason="idle past its idle_ttl")

    # ---- reload

    def stage(self, new: Prepared, binary: Path) -> Staged:
        """Phase 1 of a reload: the new entries and what would change; no side effects.

        Raises ActionRefused when the new config may not replace the running one."""
        diff = with_setting_changes(diff_plans(self.prepared.plan, new.plan), self.prepared.loaded.config, new.loaded.config)
        if binary != self.binary:
            # every child runs the binary: a new one means every placed model restarts with it
            moved = [n for n in diff.unchanged + diff.updated if new.plan.model(n).launch is not None]
            diff = PlanDiff(
                unchanged=[n for n in diff.unchanged if n not in moved],
                updated=[n for n in diff.updated if n not in moved],
                changed=sorted(diff.changed + moved),
                added=diff.added,
                removed=diff.removed,
            )
        settings = new.loaded.config.llama_server
        old_settings = self.prepared.loaded.config.llama_server
        ports = self._ports if settings.port_range == old_settings.port_range else PortPool(settings.port_range)
        keep = {name: self._entries[name] for name in diff.unchanged + diff.updated}
        entries = self._build_entries(new, binary, ports, keep=keep)
        usable = _usable_by_gpu(new.plan)
        for name, entry in keep.items():
            for gpu, size in (entry.reservation.bytes_by_gpu.items() if entry.holds_memory() and entry.reservation else ()):
                if size > usable.get(gpu, 0):
                    raise ActionRefused(
                        f"the new plan leaves GPU {gpu} {describe_bytes(usable.get(gpu, 0))} usable, less than "
                        f"{name} holds there now ({describe_bytes(size)})"
                    )
        new_names = tuple(sorted(n for n in entries if n not in keep))
        deferred = tuple(deferred_settings(self.prepared.loaded.config, new.loaded.config))
        return Staged(new, binary, diff, entries, new_names, deferred, ports)

    async def apply(self, staged: Staged) -> list[str]:
        """Phase 2 of a reload: act on the difference. Returns what was done, a line per model."""
        new, diff = staged.prepared, staged.diff
        leaving = [self._entries[name] for name in diff.changed + diff.removed]
        for entry in leaving:
            entry.retiring = True
        self._retiring.extend(leaving)
        for name, entry in staged.entries.items():
            entry.spec = new.loaded.config.model_spec(name)
            entry.plan = new.plan.model(name)
            entry.admission.configure(limit=entry.spec.max_concurrency, queue_limit=new.loaded.config.proxy.queue_limit)
        self.prepared, self.binary, self._ports = new, staged.binary, staged.ports
        self.ledger.set_usable(_usable_by_gpu(new.plan))
        self._install(dict(staged.entries))  # routing and aliases switch here, in one step
        self._wake()

        drain_s = new.loaded.config.proxy.drain_timeout
        async with anyio.create_task_group() as tg:
            for entry in leaving:
                tg.start_soon(self._retire, entry, drain_s)
        for name in staged.new:
            entry = staged.entries[name]
            if entry.child is not None:
                await self._children.add(entry.child)
            entry.gate.set()
        self._wake()
        became_resident = [n for n in diff.updated if self._entries[n].spec.mode == "resident" and n not in staged.new]
        starting = [
            n for n in [*staged.new, *became_resident]
            if staged.entries[n].child is not None and staged.entries[n].spec.mode == "resident"
        ]  # fmt: skip
        results = await self._children.start_all(starting) if starting else {}
        lines = []
        for verb, names in (("restart", diff.changed), ("start", diff.added), ("stop", diff.removed), ("update", diff.updated)):
            for name in names:
                outcome = results.get(name)
                lines.append(f"{verb} {name}" + (f" (its start failed: {outcome.reason})" if outcome else ""))
        return lines or ["no change"]

    async def _retire(self, entry: ModelEntry, drain_s: float) -> None:
        try:
            await self._drain_model(entry, drain_s)
            if entry.child is not None and entry.child.name in self._children and self._children[entry.child.name] is entry.child:
                await self._children.remove(entry.child.name)
        finally:
            self._retiring.remove(entry)
            self._wake()

    async def _drain_model(self, entry: ModelEntry, deadline_s: float) -> None:
        """Wait until `entry` has no request in flight, at most deadline_s."""
        with anyio.move_on_after(deadline_s) as scope:
            while entry.in_flight:
                await self._changed.wait()
        if scope.cancelled_caught:
            log.warning(
                "model %s: %d requests still in flight after %g s; stopping anyway", entry.name, entry.in_flight, deadline_s
            )

    # ---- helpers

    def _build_entries(
        self, prepared: Prepared, binary: Path, ports: PortPool, *, keep: Mapping[str, ModelEntry]
    ) -> dict[str, ModelEntry]:
        """Entries for `prepared`'s models: `keep`'s as they are, new ones for the rest (their
        gates closed). Builds every new child's command, so a launch llama-server cannot be given
        fails here, before anything changes."""
        config = prepared.loaded.config
        entries: dict[str, ModelEntry] = {}
        for plan in prepared.plan.models:
            if plan.name in keep:
                entries[plan.name] = keep[plan.name]
                continue
            spec = config.model_spec(plan.name)
            current = self._entries.get(plan.name)
            admission = (
                current.admission
                if current is not None
                else Admission(limit=spec.max_concurrency, queue_limit=config.proxy.queue_limit)
            )
            entry = ModelEntry(spec=spec, plan=plan, admission=admission)
            if plan.launch is not None:
                ring = self._logs.setdefault(plan.name, LogRing(LOG_TAIL_LINES))
                entry.child = Child(plan.launch, config.llama_server, binary, ports, owner=_Owner(self, entry), log=ring)
            entries[plan.name] = entry
        return entries

    def _install(self, entries: dict[str, ModelEntry]) -> None:
        self._entries = entries
        self._routing = RoutingTable.of(e.spec for e in entries.values())


def fleet_status(prepared: Prepared) -> FleetStatus | None:
    """Where every model of the fleet runs, from the fleet plan this host's share came from."""
    if prepared.fleet is None:
        return None
    fleet = prepared.fleet.fleet
    addresses = {name: host.address for name, host in fleet.hosts.items()}
    return FleetStatus(
        host=prepared.fleet.host,
        models=tuple(
            FleetModelStatus(
                name=name,
                aliases=tuple(model.aliases),
                hosts=tuple(FleetHost(h, addresses[h]) for h in model.hosts),
                note="; ".join(u.reason for u in fleet.unplaced if u.model == name),
            )
            for name, model in sorted(fleet.models.items())
        ),
    )


def _usable_by_gpu(plan: Plan) -> dict[int, int]:
    return {g.index: g.usable_bytes for g in plan.gpus}


def _by_process(used_by_pid: Mapping[int, int] | None, models: Mapping[int, str]) -> dict[str, object]:
    """NVML's per-process use on one GPU, split into our models' and everyone else's."""
    if used_by_pid is None:
        return {}
    mine: dict[str, int] = {}
    others = 0
    for pid, size in used_by_pid.items():
        if pid in models:
            mine[models[pid]] = mine.get(models[pid], 0) + size
        else:
            others += size
    return {"used_by_model": dict(sorted(mine.items())), "used_by_other_processes": others}
