"""HTTP semantics of the proxy over real sockets: HEAD on its own routes, reason phrases, error
bodies in our words, HTTP versions, chunk sizes, admin keys, and /metrics surviving any request.
A strict h11 client reads every answer, so a framing mistake fails the test; a scripted upstream
(tests/fakes/static_backends.py) stands in for the children."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.static_backends import ScriptedUpstream, StaticBackends, running_proxy


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: dict[bytes, bytes]
    body: bytes


class Client:
    """One keep-alive connection, read strictly with h11."""

    def __init__(self, base: str, timeout: float = 10.0) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"") -> Answer:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [(b"host", b"proxy"), (b"content-length", b"%d" % len(body)), *(headers or [])]
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        self.sock.sendall(data + self.conn.send(h11.EndOfMessage()))
        response: h11.Response | None = None
        parts = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.InformationalResponse):
                assert event.reason, event  # 100 Continue
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return Answer(response.status_code, response.reason, dict(response.headers), b"".join(parts))
            else:
                raise AssertionError(f"unexpected {event!r}")

    @property
    def kept_open(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def close(self) -> None:
        self.sock.close()


def exchange(base: str, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Raw bytes in; everything until the proxy closes, and how long that took."""
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: ScriptedUpstream) -> Iterator[str]:
    backends = StaticBackends({"m": upstream.upstream}, aliases={"alias": "m"})
    with running_proxy(backends, max_body_size=1024 * 1024, body_timeout=30.0) as (_, base):
        yield base


@pytest.fixture(scope="module")
def keyed_proxy(upstream: ScriptedUpstream) -> Iterator[str]:
    backends = StaticBackends({"m": upstream.upstream})
    with running_proxy(backends, api_keys=["user-key"], admin_api_keys=["admin-key"]) as (_, base):
        yield base


OWN_ROUTES = [b"/health", b"/v1/models", b"/v1/models/m", b"/v1/models/nope", b"/status", b"/metrics", b"/nowhere",
              b"/v1/chat/completions", b"/admin/reload"]  # fmt: skip


@pytest.mark.parametrize("target", OWN_ROUTES)
def test_head_answers_gets_headers_without_a_body_and_keeps_the_connection(proxy: str, target: bytes) -> None:
    client = Client(proxy)
    try:
        get = client.request(b"GET", target)
        head = client.request(b"HEAD", target)
        assert head.status == get.status
        assert head.body == b""
        assert head.headers[b"content-type"] == get.headers[b"content-type"]
        if target not in (b"/metrics", b"/status"):  # their counters and clock moved since the GET
            assert head.headers[b"content-length"] == get.headers[b"content-length"] == b"%d" % len(get.body)
        assert head.headers.get(b"allow") == get.headers.get(b"allow")
        assert client.kept_open
        assert client.request(b"GET", b"/health").status == 200  # the same connection goes on
    finally:
        client.close()


def test_head_on_a_model_route_is_405_allowing_post_and_on_upstream_routes_goes_to_the_child(
    proxy: str, upstream: ScriptedUpstream
) -> None:
    client = Client(proxy)
    try:
        answer = client.request(b"HEAD", b"/v1/chat/completions")
        assert (answer.status, answer.headers[b"allow"], answer.body) == (405, b"POST", b"")
        before = len(upstream.received)
        answer = client.request(b"HEAD", b"/upstream/m/props")
        assert answer.status == 200 and answer.body == b""
        assert upstream.received[before].method == b"HEAD"
        assert client.kept_open
    finally:
        client.close()


def test_head_with_keys_gets_401_and_403_headers_without_bodies(keyed_proxy: str) -> None:
    client = Client(keyed_proxy)
    try:
        assert client.request(b"HEAD", b"/health").status == 200
        unauthorized = client.request(b"HEAD", b"/v1/models")
        assert (unauthorized.status, unauthorized.body) == (401, b"")
        assert unauthorized.headers[b"www-authenticate"] == b"Bearer"
        forbidden = client.request(b"HEAD", b"/admin/reload", [(b"authorization", b"Bearer user-key")])
        assert (forbidden.status, forbidden.body) == (403, b"")
        assert client.kept_open
    finally:
        client.close()


def test_status_lines_carry_reason_phrases_own_and_forwarded(proxy: str) -> None:
    client = Client(proxy)
    try:
        assert client.request(b"GET", b"/health").reason == b"OK"
        assert client.request(b"GET", b"/nowhere").reason == b"Not Found"
        assert client.request(b"PUT", b"/health").reason == b"Method Not Allowed"
        forwarded = client.request(b"POST", b"/v1/completions", body=b'{"model": "m"}')
        assert (forwarded.status, forwarded.reason) == (200, b"OK")
    finally:
        client.close()
    answer, _ = exchange(proxy, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("raw", "status", "h11_words"),
    [
        (b"GET /health HTTP/1.1\r\n\r\n", 400, "Missing mandatory Host"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n", 400, "conflicting Content-Length"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "Only Transfer-Encoding"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: <b>\r\n\r\n", 400, "illegal header line"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "illegal chunk header"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "Receive buffer too long"),
    ],
)
def test_errors_are_openai_shaped_in_our_words_and_close_the_connection(proxy: str, raw: bytes, status: int, h11_words: str) -> None:
    answer, _ = exchange(proxy, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in head.lower()
    error = openai_error(body)
    assert h11_words.lower() not in error["message"].lower()
    assert "<b>" not in error["message"]


@pytest.mark.parametrize("version", [b"HTTP/9.9", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2"])
def test_http_versions_other_than_1_0_and_1_1_get_505(proxy: str, upstream: ScriptedUpstream, version: bytes) -> None:
    before = len(upstream.received)
    answer, _ = exchange(proxy, b'POST /v1/completions ' + version + b'\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"model": "m"}')
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert openai_error(body)["code"] == "http_version_not_supported"
    assert len(upstream.received) == before  # never forwarded
    answer, _ = exchange(proxy, b"GET /health HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_chunk_size_beyond_the_body_limit_is_400_at_once(proxy: str, upstream: ScriptedUpstream) -> None:
    before = len(upstream.received)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    # The size line in the same packet as the head, and in a later one: both refused at once,
    # though body_timeout is 30 s here.
    answer, took = exchange(proxy, head + b"99999999999999999999\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert openai_error(answer.partition(b"\r\n\r\n")[2])["code"] == "chunk_too_large"
    assert took < 5.0
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"10\r\n" + b"x" * 16 + b"\r\n")
        time.sleep(0.05)  # a separate read
        sock.sendall(b"1" + b"0" * 19 + b"\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert len(upstream.received) == before


def test_a_well_framed_chunked_body_is_still_forwarded(proxy: str, upstream: ScriptedUpstream) -> None:
    body = b'{"model": "m"}'
    answer, _ = exchange(
        proxy,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert upstream.received[-1].body == body


def metric_samples(client: Client) -> list:
    answer = client.request(b"GET", b"/metrics")
    assert answer.status == 200
    return [s for family in text_string_to_metric_families(answer.body.decode()) for s in family.samples]


def test_metrics_survive_unknown_and_missing_models_and_every_unknown_name_is_one_label(proxy: str) -> None:
    client = Client(proxy)
    try:
        for i in range(20):
            assert client.request(b"POST", b"/v1/chat/completions", body=b'{"model": "made-up-%d"}' % i).status == 404
            assert client.request(b"GET", b"/upstream/made-up-%d/props" % i).status == 404
        assert client.request(b"POST", b"/v1/chat/completions", body=b'{"messages": []}').status == 400
        assert client.request(b"POST", b"/v1/chat/completions", body=b'{"model": "alias"}').status == 200
        samples = metric_samples(client)
        models = {s.labels["model"] for s in samples if s.name == "llama_smart_proxy_requests_total"}
        assert models <= {"", "(none)", "(unknown)", "m"}
        assert {"(none)", "(unknown)", "m"} <= models
        unknown = [s for s in samples if s.name == "llama_smart_proxy_requests_total" and s.labels["model"] == "(unknown)"]
        assert sum(s.value for s in unknown) >= 40
        assert client.request(b"GET", b"/health").status == 200
    finally:
        client.close()


def test_admin_routes_take_admin_keys_and_other_keys_get_403(keyed_proxy: str) -> None:
    client = Client(keyed_proxy)
    user = [(b"authorization", b"Bearer user-key")]
    admin = [(b"authorization", b"Bearer admin-key")]
    try:
        assert client.request(b"POST", b"/admin/reload").status == 401
        forbidden = client.request(b"POST", b"/admin/reload", user)
        assert forbidden.status == 403
        assert openai_error(forbidden.body)["code"] == "admin_key_required"
        assert client.request(b"POST", b"/admin/models/m/load", user).status == 403
        assert client.request(b"POST", b"/admin/reload", admin).status == 200
        assert client.request(b"POST", b"/admin/models/m/load", admin).status == 200
        # an admin key is good on the other routes too; a user key there as before
        assert client.request(b"GET", b"/v1/models", admin).status == 200
        assert client.request(b"GET", b"/v1/models", user).status == 200
    finally:
        client.close()


def test_with_api_keys_but_no_admin_keys_the_admin_routes_are_off(upstream: ScriptedUpstream) -> None:
    backends = StaticBackends({"m": upstream.upstream})
    with running_proxy(backends, api_keys=["user-key"]) as (_, base):
        client = Client(base)
        try:
            answer = client.request(b"POST", b"/admin/reload", [(b"authorization", b"Bearer user-key")])
            assert answer.status == 403  # from loopback too
            assert "proxy.admin_api_keys" in openai_error(answer.body)["message"]
            assert backends.actions == []
        finally:
            client.close()


def test_admin_keys_alone_guard_the_admin_routes_and_leave_the_rest_open(upstream: ScriptedUpstream) -> None:
    backends = StaticBackends({"m": upstream.upstream})
    with running_proxy(backends, admin_api_keys=["admin-key"]) as (_, base):
        client = Client(base)
        try:
            assert client.request(b"GET", b"/v1/models").status == 200
            assert client.request(b"POST", b"/admin/reload").status == 401  # loopback is no key
            assert client.request(b"POST", b"/admin/reload", [(b"authorization", b"Bearer admin-key")]).status == 200
            assert backends.actions == [("reload", None)]
        finally:
            client.close()


def test_connect_is_501_and_never_forwarded(proxy: str, upstream: ScriptedUpstream) -> None:
    before = len(upstream.received)
    client = Client(proxy)
    try:
        answer = client.request(b"CONNECT", b"/upstream/m/x")
        assert answer.status == 501
        assert openai_error(answer.body)["code"] == "method_not_supported"
    finally:
        client.close()
    assert len(upstream.received) == before


def test_head_and_options_on_every_own_route_log_no_traceback(caplog: pytest.LogCaptureFixture, proxy: str) -> None:
    caplog.set_level(logging.DEBUG)
    for target in OWN_ROUTES:
        client = Client(proxy)
        try:
            client.request(b"HEAD", target)
            client.request(b"OPTIONS", target)
        finally:
            client.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ---- fuzz: random requests that parse, against a running proxy ------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
PATH_CHAR = VCHAR.replace("/", "").replace("?", "").replace("#", "")
METHODS = [b"GET", b"HEAD", b"POST", b"OPTIONS", b"PUT", b"DELETE", b"PATCH", b"TRACE", b"CONNECT"]
ROUTES = [b"/health", b"/v1/models", b"/status", b"/metrics", b"/admin/reload", b"/v1/chat/completions",
          b"/v1/completions", b"/v1/embeddings", b"/completion", b"/tokenize", b"/", b"*", b"/upstream/"]  # fmt: skip
EXTRA_HEADERS = [
    (b"origin", b"http://allowed.example"), (b"origin", b"http://other.example"),
    (b"access-control-request-method", b"POST"), (b"access-control-request-headers", b"x-any"),
    (b"authorization", b"Bearer user-key"), (b"authorization", b"Bearer admin-key"), (b"authorization", b"Basic eA=="),
    (b"content-type", b"application/json"), (b"accept-encoding", b"gzip"), (b"connection", b"close"),
    (b"connection", b"upgrade"), (b"upgrade", b"h2c"), (b"expect", b"100-continue"), (b"x-forwarded-for", b"10.0.0.1"),
]  # fmt: skip
MODEL_LABELS = {"", "(none)", "(unknown)", "m"}

names = st.one_of(st.sampled_from(["m", "alias"]), st.text(max_size=20))
segment = st.text(PATH_CHAR, min_size=1, max_size=12).map(str.encode)


def quoted(name: str) -> bytes:
    from urllib.parse import quote

    return quote(name, safe="").encode() or b"x"


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        path = draw(st.sampled_from(ROUTES))
    elif kind == 1:
        path = b"/upstream/" + quoted(draw(names)) + b"/" + draw(segment)
    elif kind == 2:
        path = b"/v1/models/" + quoted(draw(names))
    elif kind == 3:
        path = b"/admin/models/" + quoted(draw(names)) + b"/" + draw(st.sampled_from([b"load", b"unload", b"reset", b"x"]))
    else:
        path = b"/" + b"/".join(draw(st.lists(segment, min_size=1, max_size=4)))
    if draw(st.booleans()):
        path += b"?" + draw(segment)
    return path


json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return b""
    if kind == 1:
        return draw(st.binary(max_size=64))
    payload: dict = {"messages": []}
    if draw(st.booleans()):
        payload["model"] = draw(st.one_of(names, json_values))
    if draw(st.booleans()):
        payload["stream"] = draw(json_values)
    return json.dumps(payload).encode() if kind == 2 else json.dumps([payload]).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    method = draw(st.one_of(st.sampled_from(METHODS), st.text(TCHAR, min_size=1, max_size=10).map(str.encode)))
    headers = draw(st.lists(st.sampled_from(EXTRA_HEADERS), max_size=4, unique=True))
    headers += draw(st.lists(st.tuples(st.text("abcxyz-", min_size=1, max_size=8).map(lambda n: b"x-" + n.encode()),
                                        st.text(PATH_CHAR, max_size=20).map(str.encode)), max_size=2))  # fmt: skip
    return method, draw(targets()), headers, draw(bodies())


@pytest.fixture(scope="module")
def fuzzed_proxies(upstream: ScriptedUpstream) -> Iterator[dict[str, str]]:
    """One proxy open to all (CORS on), one behind user and admin keys."""
    open_backends = StaticBackends({"m": upstream.upstream}, aliases={"alias": "m"})
    keyed_backends = StaticBackends({"m": upstream.upstream}, aliases={"alias": "m"})
    cors = {"cors_origins": ["http://allowed.example"], "max_body_size": 4096}
    with running_proxy(open_backends, **cors) as (_, open_base), running_proxy(
        keyed_backends, api_keys=["user-key"], admin_api_keys=["admin-key"], **cors
    ) as (_, keyed_base):
        yield {"open": open_base, "keyed": keyed_base}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests(), which=st.sampled_from(["open", "keyed"]))
def test_fuzzed_requests_get_well_formed_answers_and_leave_metrics_and_health_whole(
    fuzzed_proxies: dict[str, str], upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture, request: tuple, which: str
) -> None:
    caplog.set_level(logging.DEBUG)
    before = len(upstream.received)
    base = fuzzed_proxies[which]
    method, target, headers, body = request
    client = Client(base)
    try:
        answer = client.request(method, target, headers, body)
        assert answer.reason, answer.status
        if method == b"HEAD" or answer.status in (204, 304):
            assert answer.body == b""
        elif answer.status >= 400:  # only the proxy answers errors here: the upstream always says 200
            openai_error(answer.body)
        if client.kept_open and (b"connection", b"close") not in headers:
            assert client.request(b"GET", b"/health").status == 200  # the same connection goes on
    finally:
        client.close()
    checker = Client(base)
    try:
        auth = [(b"authorization", b"Bearer user-key")]
        samples = metric_samples_with(checker, auth)
        models = {s.labels["model"] for s in samples if "model" in s.labels}
        assert models <= MODEL_LABELS, models
        assert checker.request(b"GET", b"/health").status == 200
    finally:
        checker.close()
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    # What reached the child parsed strictly, and no tunnel was asked of it.
    assert upstream.malformed == []
    assert all(r.method != b"CONNECT" for r in upstream.received[before:])


def metric_samples_with(client: Client, headers: list[tuple[bytes, bytes]]) -> list:
    answer = client.request(b"GET", b"/metrics", headers)
    assert answer.status == 200
    return [s for family in text_string_to_metric_families(answer.body.decode()) for s in family.samples]
