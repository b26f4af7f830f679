"""Hostile input against the proxy over real sockets: smuggling shapes, oversized heads and
bodies, a slowloris client, API keys, and a fuzz of raw request bytes. Behind the proxy sits a
scripted upstream that parses strictly and records exactly what was forwarded."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.static_backends import ScriptedUpstream, StaticBackends, running_proxy

BODY = b'{"model": "m"}'


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream: ScriptedUpstream) -> Iterator[str]:
    settings = {"header_timeout": 1.0, "body_timeout": 1.0, "max_body_size": 1024 * 1024}
    with running_proxy(StaticBackends({"m": upstream.upstream}), **settings) as (_, base):
        yield base


def exchange(base: str, data: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the proxy closed the connection."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return answer, True
            except TimeoutError:
                return answer, False
            if not chunk:
                return answer, True
            answer += chunk
        return answer, False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_content_length_with_transfer_encoding_is_400_closed_and_never_forwarded(proxy: str, upstream: ScriptedUpstream) -> None:
    before = len(upstream.received)
    answer, closed = exchange(
        proxy,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"e\r\n" + BODY + b"\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert status_of(answer) == 400
    assert answer.count(b"HTTP/1.1") == 1  # the smuggled second request was not answered either
    assert closed
    assert len(upstream.received) == before


@pytest.mark.parametrize(
    "lengths", [b"Content-Length: 14\r\nContent-Length: 15\r\n", b"Content-Length: 14, 15\r\n", b"Content-Length: +14\r\n"]
)
def test_conflicting_or_malformed_content_length_is_400_and_closed(proxy: str, upstream: ScriptedUpstream, lengths: bytes) -> None:
    before = len(upstream.received)
    answer, closed = exchange(proxy, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\n" + BODY)
    assert status_of(answer) == 400
    assert closed
    assert len(upstream.received) == before


def test_a_header_block_over_16_kib_is_431(proxy: str) -> None:
    answer, closed = exchange(proxy, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert closed


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(proxy: str, upstream: ScriptedUpstream) -> None:
    before = len(upstream.received)
    started = time.monotonic()
    answer, closed = exchange(proxy, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n" + BODY)
    assert status_of(answer) == 413
    assert closed
    assert time.monotonic() - started < 2.0  # answered without waiting for 10 MiB that never comes
    assert len(upstream.received) == before


def test_a_chunked_body_growing_over_the_limit_is_413(proxy: str, upstream: ScriptedUpstream) -> None:
    before = len(upstream.received)
    chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"  # 1 MiB per chunk; the limit is 1 MiB
    answer, closed = exchange(proxy, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2)
    assert status_of(answer) == 413
    assert closed
    assert len(upstream.received) == before


def test_a_body_that_stops_arriving_is_408_at_the_body_timeout(proxy: str) -> None:
    started = time.monotonic()
    answer, closed = exchange(proxy, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert status_of(answer) == 408
    assert closed
    assert 0.8 < time.monotonic() - started < 3.0


def test_slowloris_is_closed_at_the_header_timeout_while_normal_requests_keep_flowing(proxy: str) -> None:
    host, port = proxy.removeprefix("http://").split(":")
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    outcome: dict[str, float] = {}

    def slow_client() -> None:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            started = time.monotonic()
            for byte in head:  # one byte a second
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                readable, _, _ = select.select([sock], [], [], 1.0)
                if readable and sock.recv(65536) == b"":
                    break
            outcome["closed_after"] = time.monotonic() - started

    slow = [threading.Thread(target=slow_client) for _ in range(20)]
    for thread in slow:
        thread.start()
    served = 0
    with httpx.Client(base_url=proxy, timeout=5) as client:
        while any(thread.is_alive() for thread in slow):
            assert client.post("/v1/completions", json={"model": "m"}).status_code == 200
            served += 1
    for thread in slow:
        thread.join()
    assert served > 10
    assert 0.9 < outcome["closed_after"] < 1.5  # the header timeout is 1 s


def test_api_keys_guard_every_route_but_health_and_are_never_forwarded_or_logged(
    upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = "sk-very-secret-0123456789"
    with running_proxy(StaticBackends({"m": upstream.upstream}), api_keys=[key]) as (_, base):
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.get("/health").status_code == 200
            for method, path in [("GET", "/v1/models"), ("GET", "/status"), ("GET", "/metrics"), ("POST", "/admin/reload"),
                                 ("POST", "/v1/chat/completions"), ("GET", "/upstream/m/props")]:  # fmt: skip
                response = client.request(method, path, json={"model": "m"})
                assert response.status_code == 401, path
                assert response.headers["www-authenticate"] == "Bearer"
                wrong = client.request(method, path, json={"model": "m"}, headers={"Authorization": f"Bearer {key}x"})
                assert wrong.status_code == 401
            before = len(upstream.received)
            auth = {"Authorization": f"Bearer {key}"}
            assert client.post("/v1/chat/completions", json={"model": "m"}, headers=auth).status_code == 200
            assert client.get("/v1/models", headers=auth).status_code == 200
    forwarded = upstream.received[before:]
    assert len(forwarded) == 1
    assert b"authorization" not in dict(forwarded[0].headers)
    assert key not in caplog.text


# ---- fuzz ------------------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"PUT", b"OPTIONS", b"G\x00T", b"POST ", b""]
TARGETS = [b"/v1/chat/completions", b"/upstream/m/x", b"/health", b"/v1/models", b"*", b"/v1/completions?a=b", b"/\r\n"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"]
HEADERS = [
    b"Host: x", b"Content-Length: 14", b"Content-Length: 0", b"Content-Length: 99", b"Content-Length: -1",
    b"Content-Length: 14, 14", b"Content-Length: 1e3", b"Transfer-Encoding: chunked", b"Transfer-Encoding: CHUNKED",
    b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding: identity", b"Transfer-Encoding : chunked",
    b" Transfer-Encoding: chunked", b"Transfer-Encoding:\tchunked", b"X-Folded: a\r\n b", b"Connection: close",
    b"Connection: content-length", b"Expect: 100-continue", b"X-Nul: a\x00b", b"Bad Header: x", b"X-Bare: a\nb",
    b"Content-Type: application/json", b"Upgrade: h2c", b"Connection: Upgrade",
]  # fmt: skip
BODIES = [BODY, b"e\r\n" + BODY + b"\r\n0\r\n\r\n", b"E\r\n" + BODY + b"\r\n0\r\n\r\n", b"0\r\n\r\n",
          b"e;ext=1\r\n" + BODY + b"\r\n0\r\n\r\n", b"f\r\n" + BODY + b"\r\n0\r\n\r\n", b"e\n" + BODY + b"\n0\n\n", b""]  # fmt: skip
EOL = [b"\r\n", b"\n", b"\r"]


FORWARDED: list[int] = []


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    eol = draw(st.sampled_from(EOL)) if draw(st.integers(0, 4)) == 0 else b"\r\n"
    if draw(st.booleans()):
        # a forwardable request, well framed, with hostile extras mixed into its headers
        line = b"POST " + draw(st.sampled_from(TARGETS[:2])) + b" HTTP/1.1"
        framing, body = draw(st.sampled_from([(b"Content-Length: 14", BODY), (b"Transfer-Encoding: chunked", BODIES[1])]))
        headers = draw(st.permutations([b"Host: x", framing, *draw(st.lists(st.sampled_from(HEADERS), max_size=3))]))
    else:
        line = b" ".join([draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)), draw(st.sampled_from(VERSIONS))])
        headers = draw(st.lists(st.sampled_from(HEADERS), max_size=5))
        body = draw(st.sampled_from(BODIES))
    data = line + eol + b"".join(h + eol for h in headers) + eol + body
    if draw(st.booleans()):
        data += data  # a pipelined copy
    if draw(st.integers(0, 3)) == 0:
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=20)) + data[cut:]
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=raw_requests())
def test_fuzzed_request_bytes_never_crash_the_server_nor_forward_an_ambiguous_message(
    proxy: str, upstream: ScriptedUpstream, data: bytes
) -> None:
    before = len(upstream.received)
    # A closing request after the fuzz ends the exchange as soon as the proxy gets that far.
    answer, _ = exchange(proxy, data + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=3.0)
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
        assert b"HTTP/1.1 500" not in answer, answer[:300]
    # What reached the child parsed strictly and is framed by one Content-Length only.
    assert upstream.malformed == []
    for received in upstream.received[before:]:
        names = [name for name, _ in received.headers]
        assert names.count(b"content-length") == 1
        assert b"transfer-encoding" not in names
        assert int(dict(received.headers)[b"content-length"]) == len(received.body)
        assert not {b"connection", b"upgrade", b"te", b"keep-alive"} & set(names)
    lowered = data.lower()
    if b"\ncontent-length" in lowered and b"\ntransfer-encoding" in lowered and data.count(b"HTTP/1.1") <= 1:
        assert len(upstream.received) == before
    FORWARDED.append(len(upstream.received) - before)
    # ... and the server goes on serving.
    assert httpx.get(f"{proxy}/health", timeout=5).status_code == 200


def test_the_fuzz_forwarded_some_requests() -> None:
    """The fuzz above is only worth something if some of its requests reached the child."""
    assert sum(FORWARDED) >= 10, FORWARDED
