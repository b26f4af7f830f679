"""The proxy over real sockets on 127.0.0.1, in front of the fake llama-server and a scripted
upstream: routing, streaming, cancellation, child crashes, the upstream pool, own routes, admin."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import httpx
import pytest

from llama_smart_proxy.schemas.config import ProxySettings
from llama_smart_proxy.supervisor.proxy.backends import ModelUnavailable, Upstream
from llama_smart_proxy.supervisor.proxy.server import ProxyServer
from tests.fakes.static_backends import FakeLlama, ScriptedUpstream, StaticBackends, running_proxy
from tests.helpers import free_port, wait_for


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLlama]:
    server = FakeLlama(tmp_path_factory.mktemp("fake") / "events.jsonl")
    yield server
    server.stop()


@pytest.fixture()
def backends(fake: FakeLlama) -> StaticBackends:
    return StaticBackends({"chat": fake.upstream, "embed": fake.upstream}, aliases={"gpt-4o": "chat"})


@pytest.fixture()
def proxy(backends: StaticBackends) -> Iterator[tuple[ProxyServer, str]]:
    with running_proxy(backends) as running:
        yield running


def raw_request(path: str, body: dict, *, extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_non_streamed_chat_completion_is_answered_by_the_child(proxy, fake: FakeLlama) -> None:
    _, base = proxy
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "chat", "messages": []}, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["pid"] == fake.process.pid
    assert body["echo"] == {"model": "chat", "messages": []}


def test_streamed_completion_arrives_chunk_by_chunk_as_the_child_sends_it(proxy) -> None:
    _, base = proxy
    arrivals = []
    body = {"model": "chat", "stream": True, "fake": {"chunks": 5, "interval_ms": 150}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=10) as response:
        assert response.headers["content-type"] == "text/event-stream"
        start = time.monotonic()
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - start, line))
    assert [line for _, line in arrivals][-1] == "data: [DONE]"
    assert len(arrivals) == 6
    # Relayed as sent, not buffered: the first chunk comes long before the last.
    assert arrivals[-1][0] - arrivals[0][0] > 0.5
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps[:4]) > 0.08, gaps


def test_alias_routes_to_its_model_and_llama_routes_route_by_model(proxy, backends: StaticBackends) -> None:
    _, base = proxy
    with httpx.Client(base_url=base, timeout=10) as client:
        for path in ("/v1/chat/completions", "/v1/embeddings", "/completion", "/tokenize", "/apply-template", "/infill"):
            response = client.post(path, json={"model": "gpt-4o", "content": "x"})
            assert response.status_code == 200, (path, response.text)
            if "embedding" not in path:
                assert response.json()["path"] == path
    assert backends.leases == 6


def test_unknown_model_is_404_listing_the_known_models(proxy) -> None:
    _, base = proxy
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "nope"}, timeout=10)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["known_models"] == ["chat", "embed", "gpt-4o"]
    assert "chat, embed, gpt-4o" in error["message"]


def test_missing_model_is_400_without_a_default_and_uses_the_default_when_set(backends: StaticBackends) -> None:
    with running_proxy(backends) as (_, base):
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, timeout=10)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "model_required"
        assert httpx.post(f"{base}/v1/chat/completions", content=b"{bad", timeout=10).status_code == 400
    with running_proxy(backends, default_model="gpt-4o") as (_, base):
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, timeout=10)
        assert response.status_code == 200
        assert response.json()["echo"] == {"messages": []}


def test_wrong_method_and_unknown_path_answer_405_and_404(proxy) -> None:
    _, base = proxy
    assert httpx.get(f"{base}/v1/chat/completions", timeout=10).status_code == 405
    assert httpx.get(f"{base}/nowhere", timeout=10).status_code == 404


def test_upstream_route_passes_any_path_to_one_child(proxy) -> None:
    _, base = proxy
    response = httpx.get(f"{base}/upstream/gpt-4o/v1/models", timeout=10)
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "fake.gguf"
    assert httpx.get(f"{base}/upstream/nope/health", timeout=10).status_code == 404


def test_client_disconnect_closes_the_upstream_within_100_ms(proxy, fake: FakeLlama) -> None:
    _, base = proxy
    delays = []
    for trial in range(3):
        known = len(fake.events("disconnect"))
        sock = connect(base)
        body = {"model": "chat", "stream": True, "fake": {"chunks": 1000, "interval_ms": 400}, "trial": trial}
        sock.sendall(raw_request("/v1/chat/completions", body))
        assert b"tok0" in sock.recv(65536) or b"tok0" in sock.recv(65536)
        closed_at = time.monotonic()
        sock.close()
        events = wait_for(lambda: fake.events("disconnect")[known:], timeout=5, what="the fake's disconnect event")
        delays.append(events[0]["t"] - closed_at)
    print("disconnect delays", delays)
    assert max(delays) < 0.100, delays


def test_child_crash_mid_stream_ends_the_clients_stream_promptly(tmp_path: Path) -> None:
    dying = FakeLlama(tmp_path / "events.jsonl")
    try:
        with running_proxy(StaticBackends({"chat": dying.upstream})) as (server, base):
            body = {"model": "chat", "stream": True, "fake": {"chunks": 100, "interval_ms": 50, "die_after_chunks": 3}}
            lines = []
            with pytest.raises(httpx.RemoteProtocolError):
                with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=5) as response:
                    for line in response.iter_lines():
                        lines.append(line)
            ended_at = time.monotonic()
            died = dying.events("die")[0]
            assert ended_at - died["t"] < 1.0
            assert sum(line.startswith("data:") for line in lines) == 3
            assert server.metrics.requests[("chat", 502)] == 1  # counted as the child's failure
            # the listener is fine: the next request gets a clear 502 (the child is gone)
            response = httpx.post(f"{base}/v1/chat/completions", json={"model": "chat"}, timeout=5)
            assert response.status_code == 502
    finally:
        dying.stop()


def test_pool_reuses_a_connection_only_after_its_response_was_read_to_the_end(proxy) -> None:
    server, base = proxy
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(5):
            assert client.post("/v1/completions", json={"model": "chat"}).status_code == 200
    assert (server.pool.opened, server.pool.reused) == (1, 4)
    sock = connect(base)
    sock.sendall(raw_request("/v1/chat/completions", {"model": "chat", "stream": True, "fake": {"chunks": 100, "interval_ms": 100}}))
    sock.recv(65536)
    sock.close()
    wait_for(lambda: server.metrics.requests[("chat", 499)] == 1, timeout=5, what="the abandoned stream to end")
    assert httpx.post(f"{base}/v1/completions", json={"model": "chat"}, timeout=10).status_code == 200
    # the abandoned stream's connection was closed, not pooled: its slot was never idle
    assert server.pool.opened == 2


def test_a_connection_closed_after_a_whole_stream_is_replaced_before_the_next_request(proxy) -> None:
    # llama-server closes the connection after every streamed response: the pool opens its
    # successor in the background, so the next request (in a burst of streams, every one) finds one
    server, base = proxy
    body = {"model": "chat", "stream": True, "fake": {"chunks": 3, "interval_ms": 1}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=10) as response:
        assert sum(line.startswith("data:") for line in response.iter_lines()) >= 3
    wait_for(lambda: server.pool.idle_count() == 1, timeout=5, what="the successor connection")
    assert httpx.post(f"{base}/v1/completions", json={"model": "chat"}, timeout=10).status_code == 200
    assert (server.pool.opened, server.pool.reused) == (2, 1)


def test_no_successor_is_opened_while_requests_hold_every_pooled_connection(proxy) -> None:
    # the pool keeps 2 connections to "chat" (idle or in use): while 2 long streams hold theirs, a
    # third stream's end opens no successor (it would only wait to expire); theirs do
    server, base = proxy

    def stream(chunks: int, interval_ms: int) -> None:
        body = {"model": "chat", "stream": True, "fake": {"chunks": chunks, "interval_ms": interval_ms}}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=10) as response:
            assert sum(line.startswith("data:") for line in response.iter_lines()) >= chunks

    long_ones = [threading.Thread(target=stream, args=(10, 100)) for _ in range(2)]
    for thread in long_ones:
        thread.start()
    wait_for(lambda: server.pool.opened == 2, timeout=5, what="the long streams' connections")
    stream(2, 1)
    time.sleep(0.3)  # a successor, if one were opened, would be open by now
    assert (server.pool.opened, server.pool.idle_count()) == (3, 0)
    for thread in long_ones:
        thread.join(timeout=10)
    wait_for(lambda: server.pool.idle_count() == 2, timeout=5, what="the long streams' successors")
    assert server.pool.opened == 5


def test_a_reused_connection_that_fails_before_any_byte_is_retried_once_on_a_fresh_one() -> None:
    upstream = ScriptedUpstream(lambda connection, request: "close" if request == 2 else "ok")
    try:
        with running_proxy(StaticBackends({"m": upstream.upstream})) as (server, base):
            with httpx.Client(base_url=base, timeout=10) as client:
                first = client.post("/v1/completions", json={"model": "m"})
                second = client.post("/v1/completions", json={"model": "m"})
            assert (first.status_code, second.status_code) == (200, 200)
            assert second.json() == {"connection": 2, "request": 1}
            assert server.pool.retried == 1
            assert len(upstream.received) == 3  # the request reached the dead connection, then a fresh one
    finally:
        upstream.stop()


def test_a_fresh_connection_that_fails_is_not_retried_and_a_partial_answer_is_never_retried() -> None:
    upstream = ScriptedUpstream(lambda connection, request: "close" if connection == 1 else "partial")
    try:
        with running_proxy(StaticBackends({"m": upstream.upstream})) as (server, base):
            assert httpx.post(f"{base}/v1/completions", json={"model": "m"}, timeout=10).status_code == 502
            assert httpx.post(f"{base}/v1/completions", json={"model": "m"}, timeout=10).status_code == 502
            assert server.pool.retried == 0
            assert len(upstream.received) == 2
    finally:
        upstream.stop()


def test_a_connection_the_child_closed_while_idle_is_dropped_before_reuse() -> None:
    upstream = ScriptedUpstream(lambda connection, request: "ok-close")
    try:
        with running_proxy(StaticBackends({"m": upstream.upstream})) as (server, base):
            for _ in range(3):
                assert httpx.post(f"{base}/v1/completions", json={"model": "m"}, timeout=10).status_code == 200
                time.sleep(0.05)  # let the child's FIN arrive; the proxy must notice it unprompted
            assert server.pool.retried == 0
            assert server.pool.opened == 3
    finally:
        upstream.stop()


def test_upstream_sees_no_hop_by_hop_headers_our_framing_and_forwarded_for() -> None:
    upstream = ScriptedUpstream()
    try:
        with running_proxy(StaticBackends({"m": upstream.upstream})) as (_, base):
            sock = connect(base)
            body = b'{"model": "m"}'
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
                b"Keep-Alive: timeout=3\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nX-Forwarded-For: 10.1.1.1\r\n"
                b"X-End: yes\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.close()
        (received,) = upstream.received
        names = [name for name, _ in received.headers]
        assert not {b"connection", b"x-hop", b"keep-alive", b"te", b"upgrade", b"proxy-connection", b"transfer-encoding"} & set(names)
        headers = dict(received.headers)
        assert headers[b"x-end"] == b"yes"
        assert headers[b"x-forwarded-for"] == b"10.1.1.1, 127.0.0.1"
        assert headers[b"content-length"] == b"%d" % len(body)
        assert headers[b"host"] == b"127.0.0.1:%d" % upstream.port
        assert received.body == body
        assert upstream.malformed == []
    finally:
        upstream.stop()


def test_an_unavailable_model_is_503_with_retry_after(backends: StaticBackends) -> None:
    backends.refuse["chat"] = ModelUnavailable("chat", "queue_full", "64 requests already wait", retry_after_s=7)
    with running_proxy(backends) as (server, base):
        response = httpx.post(f"{base}/v1/chat/completions", json={"model": "chat"}, timeout=10)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "queue_full"
    assert server.metrics.requests[("chat", 503)] == 1


def test_own_routes_answer_from_the_backends_snapshot(proxy) -> None:
    server, base = proxy
    with httpx.Client(base_url=base, timeout=10) as client:
        client.post("/v1/chat/completions", json={"model": "chat"})
        models = client.get("/v1/models").json()
        assert {m["id"] for m in models["data"]} == {"chat", "embed", "gpt-4o"}
        assert client.get("/v1/models/gpt-4o").json()["alias_of"] == "chat"
        assert client.get("/health").json()["status"] == "ok"
        status = client.get("/status").json()
        assert [m["name"] for m in status["models"]] == ["chat", "embed"]
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'llama_smart_proxy_requests_total{model="chat",status="200"} 1' in metrics.text


def test_admin_routes_call_the_runtime(proxy, backends: StaticBackends) -> None:
    _, base = proxy
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.post("/admin/models/gpt-4o/load").json()["model"]["name"] == "chat"
        assert client.post("/admin/models/chat/unload").status_code == 200
        assert client.post("/admin/models/chat/reset").status_code == 200
        assert client.post("/admin/reload").json()["summary"] == "nothing changed"
        assert client.post("/admin/models/nope/load").status_code == 404
        assert client.get("/admin/reload").status_code == 405
    assert backends.actions == [("load", "chat"), ("unload", "chat"), ("reset", "chat"), ("reload", None)]


class ExplodingBackends(StaticBackends):
    async def status(self):  # type: ignore[override]
        raise RuntimeError("a bug in one request's path")


def test_an_exception_in_one_connection_never_stops_the_listener(fake: FakeLlama, caplog) -> None:
    with running_proxy(ExplodingBackends({"chat": fake.upstream})) as (_, base):
        for _ in range(3):
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.get(f"{base}/health", timeout=10)
        assert httpx.post(f"{base}/v1/completions", json={"model": "chat"}, timeout=10).status_code == 200
    assert "a connection failed" in caplog.text


def test_configure_swaps_backends_and_settings_while_the_listener_stays_bound(fake: FakeLlama, backends) -> None:
    with running_proxy(backends) as (server, base):
        assert httpx.post(f"{base}/v1/completions", json={"model": "chat"}, timeout=10).status_code == 200
        server.configure(ProxySettings(api_keys=["sk-new"]), StaticBackends({"other": fake.upstream}))
        assert httpx.post(f"{base}/v1/completions", json={"model": "other"}, timeout=10).status_code == 401
        auth = {"Authorization": "Bearer sk-new"}
        assert httpx.post(f"{base}/v1/completions", json={"model": "other"}, headers=auth, timeout=10).status_code == 200
        assert httpx.post(f"{base}/v1/completions", json={"model": "chat"}, headers=auth, timeout=10).status_code == 404


def test_serve_takes_an_already_bound_listener(fake: FakeLlama) -> None:
    port = free_port()
    server = ProxyServer(ProxySettings(), StaticBackends({"chat": fake.upstream}))

    async def main() -> int:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        async with listener, anyio.create_task_group() as tg:
            address = await tg.start(lambda task_status: server.serve(listener=listener.listeners[0], task_status=task_status))
            assert address == ("127.0.0.1", port)
            response = await anyio.to_thread.run_sync(
                lambda: httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "chat"}, timeout=10)
            )
            tg.cancel_scope.cancel()
            return response.status_code

    assert anyio.run(main) == 200


def test_pipelined_requests_are_answered_in_order(proxy) -> None:
    _, base = proxy
    sock = connect(base)
    sock.sendall(raw_request("/v1/completions", {"model": "chat", "n": 1}) + raw_request("/v1/completions", {"model": "chat", "n": 2}))
    data = b""
    while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}]}"):
        chunk = sock.recv(65536)
        assert chunk
        data += chunk
    sock.close()
    assert data.index(b'"n": 1') < data.index(b'"n": 2')


def test_connections_beyond_max_connections_wait_for_a_free_slot(backends: StaticBackends) -> None:
    with running_proxy(backends, max_connections=1) as (_, base):
        first = connect(base)
        first.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.recv(65536).startswith(b"HTTP/1.1 200")
        second = connect(base)
        second.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):
            second.recv(65536)
        first.close()
        second.settimeout(5)
        assert second.recv(65536).startswith(b"HTTP/1.1 200")
        second.close()


def test_cors_preflight_needs_no_key_and_answers_carry_the_allowed_origin(backends: StaticBackends) -> None:
    with running_proxy(backends, cors_origins=["https://app.example"], api_keys=["sk-1"]) as (_, base):
        preflight = httpx.options(
            f"{base}/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            timeout=10,
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "chat"},
            headers={"Origin": "https://app.example", "Authorization": "Bearer sk-1"},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(f"{base}/health", headers={"Origin": "https://evil.example"}, timeout=10)
        assert "access-control-allow-origin" not in other.headers


def test_upstream_connect_failure_is_a_502_naming_the_model(backends: StaticBackends) -> None:
    backends.upstreams["chat"] = Upstream("127.0.0.1", free_port())
    with running_proxy(backends) as (_, base):
        response = httpx.post(f"{base}/v1/chat/completions", json={"model": "chat"}, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


def test_idle_upstream_connections_are_closed_by_the_proxy_before_the_childs_own_timeout(monkeypatch) -> None:
    from llama_smart_proxy.supervisor.proxy import upstream as upstream_module

    monkeypatch.setattr(upstream_module, "IDLE_EXPIRY_S", 0.3)
    monkeypatch.setattr(upstream_module, "SWEEP_INTERVAL_S", 0.05)
    child = ScriptedUpstream()
    try:
        with running_proxy(StaticBackends({"m": child.upstream})) as (server, base):
            started = time.monotonic()
            assert httpx.post(f"{base}/v1/completions", json={"model": "m"}, timeout=10).status_code == 200
            wait_for(lambda: child.closed_connections == 1, timeout=5, what="the proxy to close its idle connection")
            assert 0.3 <= time.monotonic() - started < 1.5
            assert (server.pool.opened, server.pool.idle_count()) == (1, 0)
    finally:
        child.stop()


def test_idle_client_connections_close_at_the_keepalive_timeout_and_silent_ones_at_the_header_timeout(backends) -> None:
    with running_proxy(backends, keepalive_timeout=0.3, header_timeout=0.6) as (_, base):
        sock = connect(base)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed quietly, no 408 for an idle keep-alive connection
        assert 0.2 < time.monotonic() - started < 1.0
        silent = connect(base)
        started = time.monotonic()
        assert silent.recv(65536) == b""
        assert 0.5 < time.monotonic() - started < 1.5


def test_expect_100_continue_gets_a_continue_before_the_body_is_sent(proxy) -> None:
    _, base = proxy
    sock = connect(base)
    body = b'{"model": "chat"}'
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
    sock.sendall(body)
    answer = b""
    while not answer.endswith(b"}]}"):
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_a_stream_that_stalls_is_cut_at_the_stream_idle_timeout_and_a_silent_child_at_first_byte(proxy, backends) -> None:
    with running_proxy(backends, stream_idle_timeout=0.5, first_byte_timeout=0.5) as (server, base):
        body = {"model": "chat", "stream": True, "fake": {"chunks": 3, "interval_ms": 2000}}
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=10) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():
                    pass
        assert 0.4 < time.monotonic() - started < 1.5
        slow = httpx.post(f"{base}/v1/chat/completions", json={"model": "chat", "fake": {"delay_ms": 2000}}, timeout=10)
        assert slow.status_code == 504
        # counted once the proxy finished with the request, a moment after the client got its answer
        wait_for(lambda: server.metrics.requests[("chat", 504)] == 2, timeout=5, what="both 504s counted")


def test_a_large_body_is_forwarded_whole(proxy) -> None:
    _, base = proxy
    image = "A" * (3 * 1024 * 1024)  # a base64 image's worth
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "gpt-4o", "image": image}, timeout=30)
    assert response.status_code == 200
    assert response.json()["echo"]["image"] == image
