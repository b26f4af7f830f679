"""Several supervised children at once: what `serve` and the model manager build on.

Rules kept here:
- every child's `run()` is a task of one task group, opened by `supervise()`; leaving that block
  (normally, by an error, or by cancellation) stops every child concurrently, each within its
  stop_grace, and reaps it before the block returns;
- starting several models is concurrent: a slow or failing model delays no other, and each one is
  announced as it becomes ready, with its load time (the child logs it; `on_ready` may add more);
- a model that fails to start is reported, not raised: the others keep serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup, TaskStatus

from llama_smart_proxy.supervisor.children.child import Child, ChildError

log = logging.getLogger("llama-smart-proxy.process")


class Children:
    """The children of one `supervise()` block, by model name."""

    def __init__(self, task_group: TaskGroup):
        self._tg = task_group
        self._children: dict[str, Child] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._finished: dict[str, anyio.Event] = {}

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children.values()))

    def __len__(self) -> int:
        return len(self._children)

    def __contains__(self, name: object) -> bool:
        return name in self._children

    def __getitem__(self, name: str) -> Child:
        return self._children[name]

    async def add(self, child: Child) -> None:
        """Start supervising `child` (it stays stopped until asked for)."""
        if child.name in self._children:
            raise ValueError(f"model {child.name} is already supervised")
        self._children[child.name] = child
        await self._tg.start(self._own, child)

    async def remove(self, name: str) -> None:
        """Stop the model's child and end its supervision."""
        child = self._children[name]
        await child.stop()
        self._scopes[name].cancel()
        await self._finished.pop(name).wait()

    async def start_all(
        self,
        names: Iterable[str] | None = None,
        *,
        on_ready: Callable[[Child], None] | None = None,
    ) -> dict[str, ChildError | None]:
        """Bring the named models (default: all) up concurrently; call `on_ready` as each is.

        Each child logs "model X: ready in N s on port P" itself, on every start and restart;
        `on_ready` is for a caller that also wants to show it (`serve` on its console).

        Returns, by name, None for a model that became ready or the error of its first start; a
        model whose start failed keeps restarting with backoff until it is ready or FAILED.
        """
        chosen = [self._children[name] for name in (names if names is not None else self._children)]
        results: dict[str, ChildError | None] = {}

        async def start(child: Child) -> None:
            try:
                await child.ensure_ready()
            except ChildError as exc:
                log.error("%s", exc)
                results[child.name] = exc
            else:
                results[child.name] = None
                if on_ready is not None:
                    on_ready(child)

        async with anyio.create_task_group() as tg:
            for child in chosen:
                tg.start_soon(start, child)
        return results

    async def stop_all(self) -> None:
        """Stop every child concurrently; returns when all are reaped."""
        async with anyio.create_task_group() as tg:
            for child in self:
                tg.start_soon(child.stop)

    async def _own(self, child: Child, *, task_status: TaskStatus[None]) -> None:
        finished = self._finished[child.name] = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._scopes[child.name] = scope
                await child.run(task_status=task_status)
        finally:
            self._children.pop(child.name, None)
            self._scopes.pop(child.name, None)
            finished.set()


@asynccontextmanager
async def supervise(children: Iterable[Child] = ()) -> AsyncIterator[Children]:
    """Supervise `children` (and any added later) for the duration of the block.

    >>> async with supervise(children) as running:
    ...     await running.start_all()
    ...     await anyio.sleep_forever()   # until SIGINT/SIGTERM cancels the block
    """
    async with anyio.create_task_group() as tg:
        running = Children(tg)
        try:
            for child in children:
                await running.add(child)
            yield running
        finally:
            with anyio.CancelScope(shield=True):
                await running.stop_all()
            tg.cancel_scope.cancel()
