"""The notify protocol over a real datagram socket, path and abstract."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_smart_proxy.supervisor.service.systemd import Notifier


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


UNIT = Path(__file__).parent.parent / "examples" / "llama-smart-proxy.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_example_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    # verify also checks that ExecStart exists; point it at an executable this machine has
    installed = "/opt/llama-smart-proxy/bin/llama-smart-proxy"
    assert installed in text
    unit = tmp_path / "llama-smart-proxy.service"
    unit.write_text(text.replace(installed, sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "llama-smart-proxy.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_example_unit_is_a_notify_service_with_reload_watchdog_and_cgroup_kill() -> None:
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["KillMode"] == "control-group"
    assert settings["Restart"] == "on-failure"
    assert "WatchdogSec" in settings and "RestartSec" in settings
