"""systemd's notify protocol, spoken directly over $NOTIFY_SOCKET (no libsystemd).

Rules kept here:
- every message is one datagram of KEY=VALUE lines; an abstract socket is written "@name";
- with no $NOTIFY_SOCKET (not under systemd, or Type=simple) every call does nothing;
- RELOADING=1 carries MONOTONIC_USEC (CLOCK_MONOTONIC, as systemd reads it), which
  Type=notify-reload needs to tie the reload to the request (systemd >= 253);
- the watchdog is pinged from the serving loop's own task group, so a stuck event loop stops the
  pings and systemd restarts us; never from a thread or timer of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("llama-smart-proxy.systemd")


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(environ)
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for."""

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        family = socket.AF_UNIX
        with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(message, self._address)
            except OSError as exc:
                # systemd gone or socket unwritable: the service still serves, so only log it
                log.warning("sd_notify to %s failed: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING=1, STATUS=status)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were exec'd by a wrapper that kept the env)
    return int(usec) / 1_000_000 / 2
