"""/proc tells whose socket listens on a port."""

from __future__ import annotations

import os
import socket

from llama_smart_proxy.supervisor.listener import group_listens_on, listening_inodes


def test_a_listening_socket_belongs_to_its_process_group_and_no_other() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert listening_inodes(port) == set()  # bound, not listening yet
        sock.listen()
        assert len(listening_inodes(port) or ()) == 1
        assert group_listens_on(os.getpgrp(), port) is True
        assert group_listens_on(os.getpgrp() + 1_000_000, port) is False  # no such group holds it


def test_a_port_nobody_listens_on_belongs_to_nobody() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert group_listens_on(os.getpgrp(), port) is False
