"""Where serve's event loop spends its CPU, from a py-spy profile: the share of main-thread
samples by where the innermost frame's code lives (h11, anyio, the loop, the socket syscalls, our
own code). How the profiles in benchmarks/results/proxy-profile.md were taken:

    py-spy record -r 500 -d 6 -f raw -o serve.txt -p <serve pid>   # while a c=8 closed loop runs
    python -m benchmarks.proxy_profile serve.txt

Only stacks under the event loop count: py-spy also samples anyio's idle worker threads and
asyncio's child watcher, which wait and cost nothing.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_LEAF_FILE = re.compile(r"\(([^()]*?):\d+\)$")
_OURS = ("server.py", "upstream.py", "http.py", "metrics.py", "runtime.py", "admission.py", "state_feed.py",
         "backends.py", "loading_notes.py", "access.py")  # fmt: skip


def group(path: str) -> str:
    if "h11/" in path:
        return "h11"
    if "anyio/" in path or path.endswith(("_asyncio.py", "_eventloop.py", "_tasks.py", "_synchronization.py")):
        return "anyio"
    if "selectors" in path:
        return "selectors (epoll register, unregister, poll)"
    if "asyncio/" in path or path in ("base_events.py", "events.py", "tasks.py", "futures.py", "locks.py", "mixins.py"):
        return "asyncio (loop, tasks, futures)"
    if path.endswith("sockets.py"):
        return "proxy/sockets.py (mostly the send and recv syscalls)"
    if path.endswith("upstream_http.py"):
        return "proxy/upstream_http.py"
    if path.endswith(_OURS):
        return "proxy and runtime code (routing, lease, headers, metrics)"
    if "json" in path or path.endswith("decoder.py"):
        return 'json (the body\'s "model")'
    return "other standard library (contextlib, socket, abc, ...)"


def shares(raw: str) -> list[tuple[str, float]]:
    """(group, share of event-loop samples), largest first."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if "BaseEventLoop._run_once" not in stack:
            continue
        leaf = _LEAF_FILE.search(stack.split(";")[-1])
        counts[group(leaf.group(1) if leaf else "?")] += int(count)
    total = sum(counts.values()) or 1
    return [(name, count / total) for name, count in counts.most_common()]


if __name__ == "__main__":
    for name, share in shares(Path(sys.argv[1]).read_text()):
        print(f"| {name} | {share * 100:.0f} % |")
