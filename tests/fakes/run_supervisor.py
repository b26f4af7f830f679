"""A supervisor process for tests/test_orphans.py: start N children, print their pids, wait.

    python -m tests.fakes.run_supervisor BINARY MODEL N [--no-death-signal]

Prints one JSON line {"pids": [...]} once every child is ready, then sleeps until killed. With
--no-death-signal it spawns without PR_SET_PDEATHSIG: the control that shows the test can fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio

from llama_smart_proxy.supervisor.children import process_group
from llama_smart_proxy.supervisor.children.child import Child
from llama_smart_proxy.supervisor.children.ports import PortPool
from llama_smart_proxy.supervisor.children.supervise import supervise
from tests.fakes.supervision import cpu_spec, quick_settings


async def main(binary: Path, model: Path, count: int) -> None:
    settings = quick_settings()
    ports = PortPool(settings.port_range)
    children = [Child(cpu_spec(model=f"m{i}", file=str(model)), settings, binary, ports) for i in range(count)]
    async with supervise(children) as running:
        results = await running.start_all()
        if any(results.values()):
            sys.exit(f"not every child started: {results}")
        print(json.dumps({"pids": [child.pid for child in children]}), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    if "--no-death-signal" in sys.argv:
        sys.argv.remove("--no-death-signal")
        process_group.uses_death_signal = lambda: False
    anyio.run(main, Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
