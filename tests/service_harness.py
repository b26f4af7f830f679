"""A whole `serve` in a background event loop, over the FAKE llama-server (or the real one, where
a test names it): configs, snapshots, events. What the runtime, reload and on-demand tests share."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx

from llama_smart_proxy.supervisor.planning.inventory import dump_inventory
from llama_smart_proxy.supervisor.planning.prepare import Source, prepare
from llama_smart_proxy.supervisor.service.gpu_sampler import GpuSample, GpuSampler
from llama_smart_proxy.supervisor.service.serve import Service, run_service
from tests.fakes.supervision import TEST_PORT_RANGE, write_fake_llama_server
from tests.helpers import free_port, wait_for
from tests.planning import make_inventory


@dataclass
class Harness:
    directory: Path
    tiny_model: Path
    events_path: Path
    listen: str
    """The proxy's address, the same in every config this harness writes (a reload keeps it)."""
    binary: Path
    """The llama-server the configs name: the FAKE one unless a test gives the real one."""

    @classmethod
    def create(cls, directory: Path, tiny_model: Path, binary: Path | None = None) -> Harness:
        directory.mkdir(parents=True, exist_ok=True)
        fake = write_fake_llama_server(directory)
        return cls(directory, tiny_model, directory / "events.jsonl", f"127.0.0.1:{free_port()}", binary or fake)

    @property
    def fake_binary(self) -> Path:
        return self.directory / "fake-llama-server"

    def model_file(self, name: str) -> Path:
        path = self.directory / f"{name}.gguf"
        if not path.exists():
            shutil.copyfile(self.tiny_model, path)
        return path

    def write_config(self, models: dict[str, dict[str, Any]], *, name: str = "config.toml", **sections: str) -> Path:
        """A TOML config serving `models` (tables of model keys) through the fake binary."""
        lines = [
            "[proxy]",
            f'listen = "{self.listen}"',
            'drain_timeout = "10s"',
            *sections.pop("proxy", "").splitlines(),
            "[llama_server]",
            f'binary = "{self.binary}"',
            f"port_range = [{TEST_PORT_RANGE[0]}, {TEST_PORT_RANGE[1]}]",
            'stop_grace = "2s"',
            'restart_delay = "50ms"',
            f'env = {{ FAKE_LLAMA_EVENTS = "{self.events_path}" }}',
            *sections.pop("llama_server", "").splitlines(),
            "[gpus]",
            'reserve = "0MiB"',
            *sections.pop("gpus", "").splitlines(),
        ]
        for section, body in sections.items():
            lines += [f"[{section}]", *body.splitlines()]
        for model, table in models.items():
            self.model_file(model)
            lines.append(f"[models.{model}]")
            lines.append(f'file = "{model}.gguf"')
            lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        path = self.directory / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def write_inventory(self, gpu_bytes: list[int], name: str = "inventory.json") -> Path:
        path = self.directory / name
        path.write_text(dump_inventory(make_inventory(gpu_bytes)))
        return path

    def events(self, kind: str | None = None) -> list[dict]:
        if not self.events_path.exists():
            return []
        lines = [json.loads(line) for line in self.events_path.read_text().splitlines() if line]
        return [e for e in lines if kind is None or e["event"] == kind]

    @contextmanager
    def serving(
        self, config: Path, inventory: Path | None = None, *, watch: bool = False, sampler: GpuSampler | None = None
    ) -> Iterator[Running]:
        """Run the service until the block ends; yields once every resident was started.

        `sampler` stands in for NVML's live readings (default: one that reads nothing)."""
        source = Source(config, inventory_path=inventory)
        prepared = prepare(source)
        sampler = sampler or GpuSampler(read=lambda: GpuSample(time.monotonic(), {}, {}))
        with anyio.from_thread.start_blocking_portal() as portal:
            future, service = portal.start_task(
                partial(run_service, source, prepared, self.binary, watch, sampler=sampler)
            )
            portal.call(service.ready.wait)
            host, port = service.proxy.address
            running = Running(service, portal, f"http://{host}:{port}")
            try:
                yield running
            finally:
                portal.call(service.stop_requested.set)
                future.result(timeout=60)


@dataclass
class Running:
    service: Service
    portal: anyio.from_thread.BlockingPortal
    base: str

    def status(self) -> dict:
        response = httpx.get(f"{self.base}/status", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def model(self, name: str) -> dict:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def chat(self, model: str, **extra: Any) -> httpx.Response:
        return httpx.post(f"{self.base}/v1/chat/completions", json={"model": model, "messages": [], **extra}, timeout=30)

    def wait_state(self, model: str, state: str, timeout: float = 15) -> dict:
        return wait_for(lambda: (m := self.model(model))["state"] == state and m, timeout, f"{model} {state}")

    def reload(self) -> str:
        return self.portal.call(self.service.reload)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)
