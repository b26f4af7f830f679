"""A connection to a child that fails before anything was sent is an `UpstreamRefused`, which the
proxy answers by asking for the model again (the child may have just died); any other failure is
the request's own error."""

from __future__ import annotations

import socket

import pytest

from llama_smart_proxy.supervisor.proxy import upstream as upstream_module
from llama_smart_proxy.supervisor.proxy.backends import Upstream
from llama_smart_proxy.supervisor.proxy.upstream import UpstreamError, UpstreamPool, UpstreamRefused

pytestmark = pytest.mark.anyio


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nobody listens there once the probe is closed


async def test_a_port_nobody_listens_on_is_refused() -> None:
    with pytest.raises(UpstreamRefused) as caught:
        await UpstreamPool().checkout(Upstream("127.0.0.1", closed_port()), connect_timeout=5)
    assert caught.value.reason == "connection refused" and caught.value.status == 502


async def test_a_connection_reset_while_connecting_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # a child killed with connections in its listen queue resets them; the kernel's timing decides
    # whether the client sees it in connect(), so the reset is injected here
    async def reset(host: str, port: int) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(upstream_module, "connect", reset)
    with pytest.raises(UpstreamRefused) as caught:
        await UpstreamPool().checkout(Upstream("127.0.0.1", 1), connect_timeout=5)
    assert caught.value.reason == "connection reset"


async def test_other_connect_failures_are_the_requests_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def unreachable(host: str, port: int) -> None:
        raise OSError(113, "No route to host")

    monkeypatch.setattr(upstream_module, "connect", unreachable)
    with pytest.raises(UpstreamError) as caught:
        await UpstreamPool().checkout(Upstream("127.0.0.1", 1), connect_timeout=5)
    assert not isinstance(caught.value, UpstreamRefused)
    assert "No route to host" in caught.value.message
