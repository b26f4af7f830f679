"""A reload as a transaction in two phases: the promise that a reload either applies a whole new
config or changes nothing.

Rules kept here:
- phase 1 (`_stage`) does everything that can fail and has no side effect: read and validate the
  config, take the inventory, read and estimate every header, plan, check that the new plan keeps
  every model being served, read the proxy's key files, check the binary, build every new child's
  command (`Runtime.stage`). Any failure, of any type, is a refused reload: logged, recorded in
  `last_reload` and `reloads_total{result="failed"}`, raised as ActionRefused (so `POST
  /admin/reload` answers 409 with the reason), the running config untouched;
- phase 2 installs the proxy's new settings and applies the difference (`Runtime.apply`); it
  cannot fail as a whole: a child that then fails to start is that child's state, and
  `last_reload` lists exactly what was applied and which changed settings wait for a later start;
- one reload at a time; systemd hears RELOADING=1, then READY=1 whatever the outcome;
- header reads, NVML and the binary check block: they run in worker threads, off the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.to_thread

from llama_smart_proxy.supervisor.children.llama_binary import check_llama_server, find_llama_server
from llama_smart_proxy.supervisor.errors import UserError
from llama_smart_proxy.supervisor.planning.prepare import Source, prepare
from llama_smart_proxy.supervisor.proxy.backends import ActionRefused
from llama_smart_proxy.supervisor.proxy.server import ProxyServer, Setup
from llama_smart_proxy.supervisor.service.reload_diff import ReloadRecord, refusal
from llama_smart_proxy.supervisor.service.runtime import Runtime, Staged
from llama_smart_proxy.supervisor.service.systemd import Notifier

log = logging.getLogger("llama-smart-proxy")


class ReloadTransaction:
    def __init__(
        self, source: Source, runtime: Runtime, proxy: ProxyServer, notifier: Notifier, status_line: Callable[[], str]
    ) -> None:
        self.source = source
        self.runtime = runtime
        self.proxy = proxy
        self.notifier = notifier
        self._status_line = status_line
        self._lock = anyio.Lock()

    async def run(self, problem: str | None = None, contents: Mapping[Path, bytes] | None = None) -> str:
        """Reload; returns what was applied, or raises ActionRefused having changed nothing.

        `problem`: the watcher saw a save it cannot read; it is refused as such. `contents`: the
        config files' bytes the watcher read, used instead of reading the files again."""
        async with self._lock:
            self.notifier.reloading()
            started = time.monotonic()
            try:
                try:
                    if problem is not None:
                        raise UserError(problem)
                    staged, setup = await self._stage(contents)
                except Exception as exc:
                    raise self._refused(exc) from None
                # phase 2: nothing below refuses
                self.proxy.install(setup)
                logging.getLogger().setLevel(staged.prepared.loaded.config.proxy.log_level.upper())
                applied = await self.runtime.apply(staged)
                summary = f"reloaded in {time.monotonic() - started:.1f}s: " + ", ".join(applied)
                if staged.deferred:
                    summary += "; not applied until a later start: " + "; ".join(staged.deferred)
                self.runtime.last_reload = ReloadRecord(time.time(), True, summary, tuple(applied), staged.deferred)
                self.runtime.reloads["ok"] += 1
                self.runtime.note_change()
                log.info("%s", summary)
                return summary
            finally:
                self.notifier.ready(self._status_line())

    async def _stage(self, contents: Mapping[Path, bytes] | None) -> tuple[Staged, Setup]:
        """Phase 1. Raises on any problem; changes nothing."""
        runtime = self.runtime
        source = self.source if contents is None else replace(self.source, contents=contents)
        # our children's memory shows as used in a fresh inventory: give it back to the planner
        credit = runtime.ledger.reserved_by_gpu()
        new = await anyio.to_thread.run_sync(lambda: prepare(source, credit=credit))
        why = refusal(runtime.prepared.plan, new.plan)
        if why is not None:
            raise ActionRefused(why)
        binary = await anyio.to_thread.run_sync(find_llama_server, new.loaded.config.llama_server.binary)
        if binary != runtime.binary:  # the running one was checked when it was chosen
            await anyio.to_thread.run_sync(check_llama_server, binary)
        setup = Setup.build(new.loaded.config.proxy, runtime)
        return runtime.stage(new, binary), setup

    def _refused(self, exc: Exception) -> ActionRefused:
        if isinstance(exc, UserError | ActionRefused):
            reason = str(exc)
        else:  # a bug, or a file broken in a way nobody foresaw: still only a refused reload
            log.error("reload: unexpected error while preparing it", exc_info=exc)
            reason = f"unexpected error while preparing it: {type(exc).__name__}: {exc}"
        summary = f"reload refused, the running config stays: {reason}"
        self.runtime.last_reload = ReloadRecord(time.time(), False, summary)
        self.runtime.reloads["failed"] += 1
        self.runtime.note_change()
        log.error("%s", summary)
        return ActionRefused(summary)
