"""Ports for children: leased once, skipped when in use, handed out round the range."""

from __future__ import annotations

import socket

import pytest

from llama_smart_proxy.supervisor.children.ports import NoFreePort, PortPool, is_port_free


def test_leases_go_round_the_range_and_skip_leased_and_busy_ports() -> None:
    busy = {102}
    pool = PortPool((100, 104), is_free=lambda port: port not in busy)
    assert [pool.acquire() for _ in range(4)] == [100, 101, 103, 104]
    pool.release(101)
    assert pool.acquire() == 101  # wrapped round; 100, 103, 104 still leased, 102 busy
    with pytest.raises(NoFreePort, match=r"\[100, 104\]: 4 leased"):
        pool.acquire()


def test_a_released_port_is_not_handed_out_again_at_once() -> None:
    pool = PortPool((100, 109), is_free=lambda port: True)
    first = pool.acquire()
    pool.release(first)
    # a retry after "couldn't bind" must meet another port, not the one that just failed
    assert pool.acquire() != first


def test_a_port_someone_listens_on_is_found_in_use() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not is_port_free(port)
    assert is_port_free(port)
