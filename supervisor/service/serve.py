"""`llama-smart-proxy serve`: plan, start the children, serve the address, reload, shut down.

The order of things, and why:
1. plan completely before starting anything (a config that cannot be planned starts nothing);
2. bind the listener, then start the resident models concurrently, announcing each as it is
   ready; READY=1 goes to systemd once the listener is bound and every resident is ready (or
   has failed, which /health shows);
3. SIGHUP, POST /admin/reload and `--watch` reload: a new plan is made in full, then applied as a
   diff; any failure keeps the running config whole and is shown in /status;
4. SIGTERM or SIGINT: stop accepting, let in-flight requests finish (drain_timeout), stop every
   child, exit 0. A second signal skips the wait.
Every task lives in one task group inside `supervise()`, so leaving it stops every child.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup, TaskStatus

from llama_smart_proxy.schemas.config import Config, ModelConfig
from llama_smart_proxy.supervisor.children.llama_binary import check_llama_server, find_llama_server
from llama_smart_proxy.supervisor.children.supervise import Children, supervise
from llama_smart_proxy.supervisor.config.load import LoadedConfig
from llama_smart_proxy.supervisor.errors import EXIT_OK, PlanRefused
from llama_smart_proxy.supervisor.planning.prepare import Prepared, Source, prepare
from llama_smart_proxy.supervisor.proxy.backends import ActionRefused
from llama_smart_proxy.supervisor.proxy.server import ProxyServer
from llama_smart_proxy.supervisor.service.gpu_sampler import GpuSampler
from llama_smart_proxy.supervisor.service.reload_transaction import ReloadTransaction
from llama_smart_proxy.supervisor.service.runtime import Runtime
from llama_smart_proxy.supervisor.service.systemd import Notifier
from llama_smart_proxy.supervisor.service.tinymodel import ensure_default_model
from llama_smart_proxy.supervisor.service.watch import watch_config

log = logging.getLogger("llama-smart-proxy")


def demo_config(listen: str | None = None) -> LoadedConfig:
    """The built-in default: the tiny chat model (also named `chat`, as the README's client examples
    say) and a tiny embedding model (`embed`), planned on whatever this machine has."""
    from llama_smart_proxy.supervisor.service.tinymodel import ensure_default_embedding_model

    path = ensure_default_model()
    models = {
        "tiny": ModelConfig(file=path, aliases=["default", "chat"], ctx=2048),
        # an embedding takes its whole input in one micro-batch: llama-server sets -b to -ub anyway
        "tiny-embed": ModelConfig(
            file=ensure_default_embedding_model(), aliases=["embed"], ctx=512, batch=512, args=["--embeddings"]
        ),
    }
    config = Config.model_validate(
        {
            "proxy": {"listen": listen or "127.0.0.1:8080", "default_model": "tiny"},
            "models": {name: model.model_dump(exclude_none=True) for name, model in models.items()},
        }
    )
    return LoadedConfig(config=config, path=path.parent / "(built-in demo config)", files=())


def describe_plan(prepared: Prepared) -> list[str]:
    lines = [f"plan for {prepared.loaded.path} on {prepared.machine}: {prepared.inventory.message}"]
    if prepared.fleet is not None:
        fleet, host = prepared.fleet.fleet, prepared.fleet.host
        elsewhere = [f"{n} on {', '.join(m.hosts) or 'no host'}" for n, m in sorted(fleet.models.items()) if host not in m.hosts]
        lines.append(
            f"  fleet host {host} ({fleet.hosts[host].address}) of {len(fleet.hosts)}: runs "
            f"{', '.join(m.name for m in prepared.plan.models) or 'no model'}; elsewhere: {', '.join(elsewhere) or 'none'}"
        )
        lines += [f"  fleet: {u.reason}" for u in fleet.unplaced]
    for model in prepared.plan.models:
        lines.append(f"  {model.name}: {model.reason}")
    lines += [f"  note: {note}" for note in prepared.plan.notes]
    return lines


@dataclass
class Service:
    """What one `serve` run holds; the reload and shutdown paths share it."""

    source: Source
    runtime: Runtime
    proxy: ProxyServer
    notifier: Notifier
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    ready: anyio.Event = field(default_factory=anyio.Event)
    settles_heap: bool = False
    """Settle the heap (`_settle_heap`) after each reload too: set by the `serve` command, not by
    tests that run the service inside their own process."""

    def __post_init__(self) -> None:
        self.transaction = ReloadTransaction(self.source, self.runtime, self.proxy, self.notifier, self.status_line)

    def status_line(self) -> str:
        models = self.runtime.prepared.plan.models
        states = [status.state.value for status in self.runtime.model_statuses()]
        counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        host, port = self.proxy.address or ("?", 0)
        return f"{len(models)} models ({counts}) on {host}:{port}"

    async def reload(self, problem: str | None = None, contents: Mapping[Path, bytes] | None = None) -> str:
        """Reload the config as a transaction (supervisor/service/reload_transaction.py); ActionRefused
        when it is refused, the running config whole. `problem`, `contents`: from --watch."""
        await self.ready.wait()  # a reload asked for during start-up waits for the residents
        try:
            return await self.transaction.run(problem, contents)
        finally:
            if self.settles_heap:
                _settle_heap()

    async def reload_logged(self, problem: str | None = None, contents: Mapping[Path, bytes] | None = None) -> None:
        try:
            await self.reload(problem, contents)
        except ActionRefused:
            pass  # logged and recorded by reload()


def serve(source: Source, *, watch: bool = False) -> int:
    """Plan, then run the service until SIGTERM/SIGINT. Returns the exit code.

    A plan that `plan` would refuse (exit 3: a model, resident or on-demand, without a place) is
    refused here with the same words before anything is bound or started, and systemd never
    hears READY=1.
    """
    import os

    from llama_smart_proxy.supervisor.children.launch import ignored_llama_variables
    from llama_smart_proxy.supervisor.planning.report import verdict

    log.info("planning: reading the config, the GPUs and the model headers")
    prepared = prepare(source)
    config = prepared.loaded.config
    logging.getLogger().setLevel(config.proxy.log_level.upper())
    for line in describe_plan(prepared):
        log.info("%s", line)
    outcome = verdict(prepared.plan, strict=False)
    if outcome.exit_code:
        reasons = [f"  {m.reason}" for m in prepared.plan.models if m.placement == "unplaced"]
        raise PlanRefused("\n".join([f"{outcome.text}; nothing was started", *reasons]))
    ignored = ignored_llama_variables(os.environ)
    if ignored:
        log.warning(
            "children do not inherit %s: give llama-server options in the config's args or env, "
            "where the estimate sees them",
            ", ".join(ignored),
        )
    binary = find_llama_server(config.llama_server.binary)
    info = check_llama_server(binary)
    log.info("llama-server: %s (%s)", info.path, info.version)
    anyio.run(_main, source, prepared, binary, watch)
    return EXIT_OK


async def _main(source: Source, prepared: Prepared, binary: Path, watch: bool) -> None:
    async with anyio.create_task_group() as tg:

        async def serve_then_stop(*, task_status: TaskStatus[Service]) -> None:
            await run_service(source, prepared, binary, watch, task_status=task_status)
            tg.cancel_scope.cancel()  # the signal listener has nothing left to do

        service = await tg.start(serve_then_stop)
        tg.start_soon(_signals, service, tg)
        await service.ready.wait()
        service.settles_heap = True
        _settle_heap()
    log.info("stopped: every child is gone")


async def run_service(
    source: Source,
    prepared: Prepared,
    binary: Path,
    watch: bool = False,
    *,
    sampler: GpuSampler | None = None,
    task_status: TaskStatus[Service] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `service.stop_requested` is set, then drain and stop every child.

    Reports the Service once the listener is bound; `service.ready` is set once every resident
    model was started (or failed to). `sampler` reads live GPU memory (default: NVML).
    """
    notifier = Notifier()
    async with supervise() as children:
        async with anyio.create_task_group() as tg:
            service = _build(source, prepared, binary, children, notifier, sampler or GpuSampler())
            await tg.start(service.runtime.run)
            host, port = await tg.start(service.proxy.serve)
            task_status.started(service)

            if notifier.watchdog_interval is not None:
                tg.start_soon(_watchdog, notifier, notifier.watchdog_interval)

            async def start_residents() -> None:
                residents = [m for m in prepared.plan.models if m.mode == "resident" and m.launch is not None]
                log.info("listening on http://%s:%d; starting %d resident model(s)", host, port, len(residents))
                # each child announces itself as it becomes ready, with its load time
                results = await service.runtime.start_residents()
                for name, reason in results.items():
                    if reason:
                        log.error("model %s did not start: %s", name, reason)
                notifier.ready(service.status_line())
                log.info("ready: %s", service.status_line())
                if watch and source.config_path is not None:
                    tg.start_soon(
                        lambda: watch_config(lambda: service.runtime.prepared.loaded, service.reload_logged)
                    )
                service.ready.set()

            tg.start_soon(start_residents)
            await service.stop_requested.wait()
            notifier.stopping(f"stopping: {service.status_line()}")
            await _drain_service(service)
            tg.cancel_scope.cancel()


def _build(
    source: Source, prepared: Prepared, binary: Path, children: Children, notifier: Notifier, sampler: GpuSampler
) -> Service:
    service: Service
    runtime = Runtime(prepared, binary=binary, children=children, reload=lambda: service.reload(), sampler=sampler)
    proxy = ProxyServer(prepared.loaded.config.proxy, runtime)
    service = Service(source, runtime, proxy, notifier)
    return service


async def _signals(service: Service, tg: TaskGroup) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", service.source.config_path or "(no config file)")
                tg.start_soon(service.reload_logged)
            elif service.stop_requested.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                return
            else:
                log.info("%s: finishing in-flight requests, then stopping", signal.Signals(signum).name)
                service.stop_requested.set()


async def _drain_service(service: Service) -> None:
    """Stop accepting, close idle connections and close the others after their current response,
    then wait for in-flight requests, at most drain_timeout."""
    service.proxy.begin_drain()
    deadline = service.runtime.prepared.loaded.config.proxy.drain_timeout
    with anyio.move_on_after(deadline):
        await service.runtime.wait_idle()


def _settle_heap() -> None:
    """Collect once, then leave what survived (imports, config, plan, runtime) out of every later
    collection: a full collection walked all of it and stalled the event loop ~35 ms, a tail in
    every latency figure (benchmarks/results/proxy-profile.md). What is made later is collected as
    before, and frozen objects still go when their last reference does; what an earlier settle
    froze is judged again each time (a reload may have left cycles of it behind)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    # Pinged from a task of the serving task group: if the event loop stalls, pings stop.
    while True:
        notifier.watchdog()
        await anyio.sleep(interval_s)
