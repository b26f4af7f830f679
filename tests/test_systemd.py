"""The notify protocol over a real datagram socket, path and abstract."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from supervisor.systemd import Notifier


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture
def path_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    yield sock, str(tmp_path / "notify")
    sock.close()


def test_ready_reloading_stopping_arrive_as_datagrams(path_socket) -> None:
    sock, address = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.ready("serving 2 models")
    assert receive(sock) == {"READY": "1", "STATUS": "serving 2 models"}
    before = time.monotonic_ns() // 1000
    notifier.reloading()
    message = receive(sock)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    notifier.stopping()
    assert receive(sock)["STOPPING"] == "1"


def test_abstract_socket_address() -> None:
    name = f"lsp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert receive(sock) == {"WATCHDOG": "1"}


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier({})
    assert not notifier.is_enabled
    notifier.ready("x")


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 2.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None
