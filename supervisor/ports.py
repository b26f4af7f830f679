"""Loopback ports for children, from llama_server.port_range; shared by every child of one proxy.

Rules kept here:
- a port is leased to one child at a time and returned when that child is gone;
- a port something else listens on is skipped (found by binding it, as llama-server will);
- leases go round the range, so a retry after "couldn't bind" gets another port, not the same one;
- the probe is only a hint: another program may take the port between the probe and the child's
  bind, which supervisor/process.py recognises in the child's output and retries; meanwhile that
  program's answers are not the child's (supervisor/listener.py tells whose socket listens).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from llama_smart_proxy.supervisor.launch import CHILD_HOST


class NoFreePort(RuntimeError):
    pass


def is_port_free(port: int, host: str = CHILD_HOST) -> bool:
    """Whether a listener could bind `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # cpp-httplib sets SO_REUSEADDR; do the same, so a port in TIME_WAIT counts as free for it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class PortPool:
    def __init__(self, port_range: tuple[int, int], *, is_free: Callable[[int], bool] = is_port_free):
        self.first, self.last = port_range
        self._is_free = is_free
        self._leased: set[int] = set()
        self._cursor = self.first

    def acquire(self) -> int:
        """Lease the next port that is neither leased nor in use; NoFreePort if none is."""
        size = self.last - self.first + 1
        for step in range(size):
            port = self.first + (self._cursor - self.first + step) % size
            if port in self._leased or not self._is_free(port):
                continue
            self._leased.add(port)
            self._cursor = port + 1 if port < self.last else self.first
            return port
        raise NoFreePort(
            f"no free port in llama_server.port_range [{self.first}, {self.last}]: "
            f"{len(self._leased)} leased to children, the rest in use by other programs"
        )

    def release(self, port: int) -> None:
        self._leased.discard(port)

    @property
    def leased(self) -> frozenset[int]:
        return frozenset(self._leased)

    def __repr__(self) -> str:
        return f"PortPool([{self.first}, {self.last}], leased={sorted(self._leased)})"
