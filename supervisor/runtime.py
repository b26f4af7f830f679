"""The running models: what the proxy leases, what reloads change, what eviction and TTL stop.

`Runtime` is the proxy's `Backends`. It owns one `ModelRuntime` per configured model (its plan
entry, its supervised `Child`, its in-flight and queued requests) and is the only writer of them.

Rules kept here:
- routing is a dict swapped whole: a reload switches every name and alias in one step;
- a request waits for its model in a bounded queue (queue_limit, queue_timeout) and never hangs:
  a full queue, a timeout or a failed model is `ModelUnavailable`, answered 503 + Retry-After;
- memory decides on-demand starts: a model is started only once its planned bytes fit next to
  the models already committed to its GPUs, stopping idle on-demand models if that makes room
  (supervisor/eviction.py); the decision and the commitment happen under one lock, so two first
  requests start a model once, and a busy model is never stopped (callers wait instead);
- a reload never touches a model whose launch is unchanged; a changed or removed model stops
  taking requests, finishes its in-flight ones (up to drain_timeout), then stops; its successor
  starts only after that, since it needs the same memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup, TaskStatus

from llama_smart_proxy.schemas.config import ModelSpec
from llama_smart_proxy.schemas.plan import ModelPlan
from llama_smart_proxy.supervisor.child_state import ChildState
from llama_smart_proxy.supervisor.children import Children
from llama_smart_proxy.supervisor.eviction import Resident, make_room
from llama_smart_proxy.supervisor.planning import Prepared
from llama_smart_proxy.supervisor.ports import PortPool
from llama_smart_proxy.supervisor.process import Child, ChildError, ChildFailed
from llama_smart_proxy.supervisor.proxy.backends import (
    ActionRefused,
    GpuStatus,
    ModelState,
    ModelStatus,
    ModelUnavailable,
    Snapshot,
    UnknownModel,
    Upstream,
)
from llama_smart_proxy.supervisor.reload import PlanDiff, diff_plans

log = logging.getLogger("llama-smart-proxy.runtime")

CHILD_HOST = "127.0.0.1"
TTL_CHECK_S = 1.0
RETRY_AFTER_LOADING_S = 2.0
RETRY_AFTER_FAILED_S = 30.0


@dataclass(eq=False)
class ModelRuntime:
    """One configured model now. Mutated by `Runtime` only."""

    spec: ModelSpec
    plan: ModelPlan
    child: Child | None
    """None when the plan could not place the model."""
    gate: anyio.Event = field(default_factory=anyio.Event)
    """Set once the child may start: a reload's successor waits here for its predecessor to stop."""
    committed: bool = False
    """Counted against its GPUs' memory: started, or about to be."""
    draining: bool = False
    in_flight: int = 0
    queued: int = 0
    last_used: float = field(default_factory=time.monotonic)
    limiter: anyio.Semaphore | None = None
    watchers: set[anyio.CancelScope] = field(default_factory=set)
    """Requests waiting for this model to be ready; a reload that retires it cancels them over
    to its successor."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_idle(self) -> bool:
        return self.in_flight == 0 and self.queued == 0

    def bytes_by_gpu(self) -> dict[int, int]:
        estimate = self.plan.estimate
        if estimate is None:
            return {}
        return {index: device.total_bytes for index, device in zip(self.plan.gpus, estimate.gpus)}

    def status(self) -> ModelStatus:
        child = self.child
        if child is None:
            state = ModelState.UNPLACED
        else:
            state = ModelState(child.state.value)
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
            last_error=(child.last_error if child else self.plan.reason) if state is not ModelState.READY else None,
            in_flight=self.in_flight,
            queued=self.queued,
            load_seconds=child.load_seconds if child else None,
            ready_since=None,
        )


@dataclass
class ReloadRecord:
    time: float
    ok: bool
    summary: str


class Runtime:
    """Implements supervisor.proxy.backends.Backends over supervised children."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        binary: Path,
        children: Children,
        reload: Callable[[], Awaitable[str]] | None = None,
        live_gpus: Callable[[], Mapping[int, tuple[int, int]]] | None = None,
    ) -> None:
        self.prepared = prepared
        self.binary = binary
        self._children = children
        self._reload_hook = reload
        self._live_gpus = live_gpus
        settings = prepared.loaded.config.llama_server
        self._ports = PortPool(settings.port_range)
        self._start_lock = anyio.Lock()
        self._changed = anyio.Event()
        """Set (and replaced) whenever a model becomes idle or stops: waiting starts look again."""
        self._tg: TaskGroup | None = None
        self.last_reload: ReloadRecord | None = None
        self.reloads = {"ok": 0, "failed": 0}
        self._models: dict[str, ModelRuntime] = {}
        self._draining: list[ModelRuntime] = []
        self._routes: dict[str, ModelRuntime] = {}
        self._install({m.name: self._new_model(m, gate_open=True) for m in prepared.plan.models})

    # ---- Backends: routing and leases

    def resolve(self, name: str) -> str | None:
        model = self._routes.get(name)
        return model.name if model is not None else None

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Upstream]:
        m, port = await self._wait_turn(model)
        m.in_flight += 1
        try:
            yield Upstream(CHILD_HOST, port)
        finally:
            m.in_flight -= 1
            m.last_used = time.monotonic()
            if m.limiter is not None:
                m.limiter.release()
            self._wake()

    async def _wait_turn(self, model: str) -> tuple[ModelRuntime, int]:
        """Wait until the model is ready and has a free concurrency slot; return it and its port.

        A reload may replace the model while its requests wait: they move to the successor.
        """
        settings = self.prepared.loaded.config.proxy
        deadline = time.monotonic() + settings.queue_timeout
        while True:
            m = self._models.get(model)
            if m is None:
                raise ModelUnavailable(model, "stopping", "no longer configured")
            child = m.child
            if child is None:
                raise ModelUnavailable(m.name, "unplaced", m.plan.reason, RETRY_AFTER_FAILED_S)
            if child.state is ChildState.FAILED:
                raise ModelUnavailable(m.name, "failed", child.last_error or "failed", RETRY_AFTER_FAILED_S)
            ready_now = child.state is ChildState.READY and m.gate.is_set()
            if ready_now and (m.limiter is None or m.limiter.value > 0):
                if m.limiter is not None:
                    m.limiter.acquire_nowait()
                return m, self._port_of(m)
            if m.queued >= settings.queue_limit:
                raise ModelUnavailable(
                    m.name, "queue_full", f"{m.queued} requests already wait for it", RETRY_AFTER_LOADING_S
                )
            m.queued += 1
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0)):
                    if not await self._ensure_ready(m):
                        continue  # superseded by a reload: wait for the successor instead
                    if m.limiter is not None:
                        await m.limiter.acquire()
            except TimeoutError:
                raise ModelUnavailable(
                    m.name, "load_timeout", f"not ready within {settings.queue_timeout:g}s", RETRY_AFTER_LOADING_S
                ) from None
            finally:
                m.queued -= 1
            return m, self._port_of(m)

    def _port_of(self, m: ModelRuntime) -> int:
        assert m.child is not None
        port = m.child.port
        if port is None:  # died between ready and now; the proxy answers 502/503
            raise ModelUnavailable(m.name, "stopping", "its child just exited", RETRY_AFTER_LOADING_S)
        return port

    async def _ensure_ready(self, m: ModelRuntime) -> bool:
        """Start m if it is not up (making room by memory first) and wait until it is ready.

        Returns False when a reload retired m meanwhile."""
        assert m.child is not None
        while not m.draining:
            with anyio.CancelScope() as scope:
                m.watchers.add(scope)
                try:
                    await m.gate.wait()
                    if m.child.state is ChildState.READY:
                        return True
                    await self._commit(m)
                    await m.child.ensure_ready()
                    return True
                except ChildFailed as exc:
                    raise ModelUnavailable(m.name, "failed", exc.reason, RETRY_AFTER_FAILED_S) from None
                except ChildError as exc:
                    # a start that failed restarts after a backoff, or m was evicted meanwhile:
                    # keep waiting, bounded by the caller's queue timeout
                    log.info("model %s: %s; still waiting for it", m.name, exc.reason)
                finally:
                    m.watchers.discard(scope)
            if not scope.cancelled_caught:
                await anyio.sleep(0.05)
        return False

    async def _commit(self, m: ModelRuntime) -> None:
        """Count m against its GPUs' memory, stopping idle on-demand models if that makes room."""
        while not m.committed:
            async with self._start_lock:
                if m.committed:
                    return
                need = m.bytes_by_gpu()
                usable = {g.index: g.usable_bytes for g in self.prepared.plan.gpus}
                running = [
                    Resident(
                        name=o.name,
                        bytes_by_gpu=o.bytes_by_gpu(),
                        priority=o.spec.priority,
                        last_used=o.last_used,
                        evictable=o.spec.mode == "on-demand" and o.is_idle and not o.draining,
                    )
                    for o in self._all_models()
                    if o.committed and o is not m
                ]
                verdict = make_room(need, usable, running)
                if verdict.fits:
                    for name in verdict.evict:
                        victim = self._models[name]
                        log.info("model %s: stopping idle %s to make room", m.name, name)
                        await self._stop_model(victim, reason=f"evicted to make room for {m.name}")
                    m.committed = True
                    return
                changed = self._changed
            short = ", ".join(f"GPU {g} short {b} bytes" for g, b in sorted((verdict.short_by_gpu or {}).items()))
            log.info("model %s: waiting for busy models to become idle (%s)", m.name, short)
            await changed.wait()

    async def _stop_model(self, m: ModelRuntime, reason: str) -> None:
        if m.child is not None:
            await m.child.stop()
        m.committed = False
        log.info("model %s: stopped (%s)", m.name, reason)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def statuses(self) -> list[ModelStatus]:
        return [m.status() for m in sorted(self._models.values(), key=lambda m: m.name)]

    def committed(self) -> list[str]:
        """Models counted against GPU memory now (running, starting, or draining)."""
        return [m.name for m in self._all_models() if m.committed]

    def _all_models(self) -> list[ModelRuntime]:
        """Current models and draining predecessors (they still hold memory)."""
        return list(self._models.values()) + [d for d in self._draining if d not in self._models.values()]

    # ---- Backends: snapshot and admin

    async def snapshot(self) -> Snapshot:
        live = self._live_gpus() if self._live_gpus is not None else {}
        planned: dict[int, int] = {}
        for m in self._models.values():
            if m.committed:
                for index, size in m.bytes_by_gpu().items():
                    planned[index] = planned.get(index, 0) + size
        gpus = tuple(
            GpuStatus(
                index=g.index,
                name=g.name,
                uuid=g.uuid,
                total_bytes=g.total_bytes,
                planned_bytes=planned.get(g.index, 0),
                used_bytes=live.get(g.index, (None, None))[0],
                free_bytes=live.get(g.index, (None, None))[1],
            )
            for g in self.prepared.plan.gpus
        )
        notes = list(self.prepared.plan.notes)
        if self.last_reload is not None and not self.last_reload.ok:
            notes.append(f"last reload failed: {self.last_reload.summary}")
        extra = {
            "config": str(self.prepared.loaded.path),
            "machine": self.prepared.machine,
            "last_reload": None
            if self.last_reload is None
            else {"time": self.last_reload.time, "ok": self.last_reload.ok, "summary": self.last_reload.summary},
            "reloads": dict(self.reloads),
            "children": {
                m.name: {"log_tail": list(m.child.snapshot(tail_lines=10).log_tail)}
                for m in self._models.values()
                if m.child is not None
            },
        }
        return Snapshot(
            models=tuple(self.statuses()),
            gpus=gpus,
            plan=self.prepared.plan.model_dump(mode="json"),
            notes=tuple(notes),
            reloads=dict(self.reloads),
            extra=extra,
        )

    def _admin_model(self, model: str) -> ModelRuntime:
        m = self._models.get(model)
        if m is None:
            raise UnknownModel(f"no model {model!r}")
        return m

    async def load(self, model: str) -> None:
        m = self._admin_model(model)
        if m.child is None:
            raise ActionRefused(f"model {model!r} is not placed: {m.plan.reason}")
        if m.child.state is ChildState.FAILED:
            raise ActionRefused(f"model {model!r} failed ({m.child.last_error}); reset it first")
        await self._ensure_ready(m)

    async def unload(self, model: str) -> None:
        m = self._admin_model(model)
        await self._drain(m, self.prepared.loaded.config.proxy.drain_timeout)
        await self._stop_model(m, reason="unloaded by an admin")

    async def reset_failed(self, model: str) -> None:
        m = self._admin_model(model)
        if m.child is not None:
            m.child.reset()
            if m.child.state is ChildState.STOPPED and m.spec.mode == "resident":
                self._start_soon(m)

    async def reload(self) -> str:
        if self._reload_hook is None:
            raise ActionRefused("no config file to reload (serve --demo)")
        return await self._reload_hook()

    async def wait_idle(self) -> None:
        """Return once no request is in flight to any model (shutdown drains with this)."""
        while any(m.in_flight for m in self._all_models()):
            await self._changed.wait()

    # ---- lifetime

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise every placed model and unload idle on-demand ones after their TTL."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for m in self._models.values():
                if m.child is not None:
                    await self._children.add(m.child)
            task_status.started()
            while True:
                await anyio.sleep(TTL_CHECK_S)
                await self._unload_expired()

    async def start_residents(self) -> dict[str, str | None]:
        """Start every placed resident model concurrently; {name: None or why it failed}."""
        residents = [m for m in self._models.values() if m.child is not None and m.spec.mode == "resident"]
        for m in residents:
            m.committed = True
        results = await self._children.start_all([m.name for m in residents])
        return {name: (error.reason if error else None) for name, error in results.items()}

    def _start_soon(self, m: ModelRuntime) -> None:
        assert self._tg is not None

        async def start() -> None:
            try:
                await self._ensure_ready(m)
            except ModelUnavailable as exc:
                log.error("model %s: %s", m.name, exc.reason)

        self._tg.start_soon(start)

    async def _unload_expired(self) -> None:
        now = time.monotonic()
        for m in list(self._models.values()):
            ttl = m.spec.idle_ttl
            if (
                m.spec.mode == "on-demand"
                and ttl > 0
                and m.committed
                and m.is_idle
                and m.child is not None
                and m.child.state is ChildState.READY
                and now - m.last_used >= ttl
            ):
                async with self._start_lock:
                    if m.is_idle and now - m.last_used >= ttl:
                        await self._stop_model(m, reason=f"idle for {ttl:g}s")

    # ---- reload

    async def apply(self, new: Prepared) -> PlanDiff:
        """Switch to a new, already validated plan; returns once every change is applied."""
        diff = diff_plans(self.prepared.plan, new.plan)
        old_models = self._models
        new_plans = {m.name: m for m in new.plan.models}
        models: dict[str, ModelRuntime] = {}
        leaving: list[ModelRuntime] = []
        successors: list[ModelRuntime] = []
        for name in diff.unchanged + diff.updated:
            m = old_models[name]
            m.spec = new.loaded.config.model_spec(name)
            m.plan = new_plans[name]
            m.limiter = _limiter(m.spec)
            models[name] = m
        for name in diff.changed:
            leaving.append(old_models[name])
            successor = self._new_model(new_plans[name], gate_open=False, spec=new.loaded.config.model_spec(name))
            successors.append(successor)
            models[name] = successor
        for name in diff.removed:
            leaving.append(old_models[name])
        for m in leaving:
            m.draining = True
            for scope in list(m.watchers):
                scope.cancel()
        added = [self._new_model(new_plans[name], gate_open=False, spec=new.loaded.config.model_spec(name)) for name in diff.added]
        for m in added:
            models[m.name] = m
            successors.append(m)

        self._draining = leaving
        self.prepared = new
        self._install(models)  # routing and aliases switch here, in one step

        drain_s = new.loaded.config.proxy.drain_timeout
        async with anyio.create_task_group() as tg:
            for m in leaving:
                tg.start_soon(self._retire, m, drain_s)
        self._draining = []
        for m in successors:
            if m.child is not None:
                await self._children.add(m.child)
            m.gate.set()
        starting = [m for m in successors if m.child is not None and m.spec.mode == "resident"]
        if starting:
            for m in starting:
                m.committed = True
            await self._children.start_all([m.name for m in starting])
        return diff

    async def _retire(self, m: ModelRuntime, drain_s: float) -> None:
        await self._drain(m, drain_s)
        if m.child is not None and m.child.name in self._children:
            await self._children.remove(m.child.name)
        m.committed = False
        self._wake()

    async def _drain(self, m: ModelRuntime, deadline_s: float) -> None:
        """Wait until m has no request in flight, at most deadline_s."""
        with anyio.move_on_after(deadline_s) as scope:
            while m.in_flight:
                changed = self._changed
                await changed.wait()
        if scope.cancelled_caught:
            log.warning("model %s: %d requests still in flight after %gs; stopping anyway", m.name, m.in_flight, deadline_s)

    # ---- helpers

    def _new_model(self, plan: ModelPlan, *, gate_open: bool, spec: ModelSpec | None = None) -> ModelRuntime:
        spec = spec or self.prepared.loaded.config.model_spec(plan.name)
        child = None
        if plan.launch is not None:
            child = Child(plan.launch, self.prepared.loaded.config.llama_server, self.binary, self._ports)
        m = ModelRuntime(spec=spec, plan=plan, child=child, limiter=_limiter(spec))
        if gate_open:
            m.gate.set()
        return m

    def _install(self, models: dict[str, ModelRuntime]) -> None:
        routes: dict[str, ModelRuntime] = {}
        for m in models.values():
            routes[m.name] = m
            for alias in m.spec.aliases:
                routes[alias] = m
        self._models, self._routes = models, routes


def _limiter(spec: ModelSpec) -> anyio.Semaphore | None:
    return anyio.Semaphore(spec.max_concurrency) if spec.max_concurrency > 0 else None
