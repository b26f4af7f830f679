"""The memory a child process holds while it runs, as a child sees it: a `Hold` its owner gives
it right before each spawn and that it releases after the reap, or `NoRoom` when there can be
none, which the child reports (REFUSED) instead of spawning.

The service's memory ledger (supervisor/service/ledger.py) gives these out; a child alone (tests,
tools) holds nothing (`child.Unowned`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from llama_smart_proxy.schemas.units import MIB


def describe_bytes(count: int) -> str:
    return f"{count / MIB:.1f} MiB"


class NoRoom(Exception):
    """A start that cannot get its memory; `reason` names each GPU and the bytes it lacks."""

    def __init__(self, model: str, short_by_gpu: Mapping[int, int], detail: str = "") -> None:
        self.model = model
        self.short_by_gpu = dict(short_by_gpu)
        short = ", ".join(f"GPU {gpu} lacks {describe_bytes(b)}" for gpu, b in sorted(self.short_by_gpu.items()))
        if short:
            self.reason = f"no memory for {model}: {short}" + (f" ({detail})" if detail else "")
        else:
            self.reason = f"{model} not started: {detail}"
        super().__init__(self.reason)


class Hold(Protocol):
    """Memory held for one process: the service's is a ledger reservation (supervisor/service/ledger.py)."""

    def release(self) -> None: ...
