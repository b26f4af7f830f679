"""The proxy's pure parts, without sockets: framing rules, header rewriting, routing helpers,
access checks, metrics text and the own routes' rendering."""

from __future__ import annotations

import json

import h11
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llama_smart_proxy.schemas.config import ProxySettings
from llama_smart_proxy.supervisor.proxy.access import ApiKeys, Cors
from llama_smart_proxy.supervisor.proxy.backends import GpuStatus, ModelState, ModelStatus, ServiceStatus
from llama_smart_proxy.schemas.launch import served_model_name
from llama_smart_proxy.supervisor.proxy.http import (
    ChunkSizeGuard,
    HttpError,
    ModelRename,
    downstream_response_headers,
    end_to_end,
    framing_problem,
    model_from_body,
    model_rename,
    protocol_error,
    reason_phrase,
    upstream_request_headers,
    upstream_route,
)
from llama_smart_proxy.supervisor.proxy.metrics import ProxyMetrics, render
from llama_smart_proxy.supervisor.proxy.routes import admin_target, health_reply, models_reply, status_reply


def parsed_headers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Headers as h11 hands them to the server: parse a real request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return list(event.headers)


def test_h11_lets_content_length_with_transfer_encoding_through_and_framing_problem_rejects_it() -> None:
    headers = parsed_headers(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    problem = framing_problem(headers)
    assert isinstance(problem, HttpError)
    assert (problem.status, problem.close) == (400, True)
    assert framing_problem(parsed_headers(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")) is None


def test_hop_by_hop_headers_and_those_connection_names_are_dropped() -> None:
    headers = parsed_headers(
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: websocket\r\n"
        b"X-Secret-Hop: 1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    )
    kept = dict(end_to_end(headers))
    assert kept == {b"host": b"x", b"content-type": b"application/json"}


def test_upstream_headers_are_reframed_with_our_host_length_and_forwarded_for_appended() -> None:
    headers = parsed_headers(
        b"POST / HTTP/1.1\r\nHost: client.example\r\nX-Forwarded-For: 10.0.0.1\r\nAuthorization: Bearer k\r\n"
        b"Transfer-Encoding: chunked\r\nAccept: */*\r\n\r\n"
    )
    out = upstream_request_headers(headers, host=b"127.0.0.1:4000", peer=b"127.0.0.9", body_length=7, drop_authorization=True)
    assert out == [
        (b"host", b"127.0.0.1:4000"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"10.0.0.1, 127.0.0.9"),
        (b"content-length", b"7"),
    ]
    kept = upstream_request_headers(headers, host=b"h", peer=b"p", body_length=0, drop_authorization=False)
    assert (b"authorization", b"Bearer k") in kept


def test_downstream_headers_keep_a_content_length_and_drop_chunking() -> None:
    headers, length = downstream_response_headers(
        [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked"), (b"connection", b"keep-alive")]
    )
    assert (headers, length) == ([(b"content-type", b"text/event-stream")], None)
    headers, length = downstream_response_headers([(b"content-length", b"12"), (b"server", b"llama")])
    assert (headers, length) == ([(b"server", b"llama"), (b"content-length", b"12")], 12)


@pytest.mark.parametrize(
    ("body", "expected"),
    [(b'{"model": "qwen", "x": [1]}', "qwen"), (b'{"messages": []}', None), (b'{"model": ""}', None)],
)
def test_model_is_read_from_the_json_body(body: bytes, expected: str | None) -> None:
    assert model_from_body(body) == expected


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"model": 3}', b"\xff\xfe"])
def test_a_body_that_cannot_name_a_model_is_a_400(body: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        model_from_body(body)
    assert caught.value.status == 400


def test_upstream_route_splits_model_and_path_keeping_the_query() -> None:
    assert upstream_route(b"/upstream/qwen/props", b"?a=1") == ("qwen", b"/props?a=1")
    assert upstream_route(b"/upstream/qwen", b"") == ("qwen", b"/")
    assert upstream_route(b"/upstream//props", b"") is None
    assert upstream_route(b"/v1/models", b"") is None


def test_api_keys_accept_only_a_configured_bearer_key_and_never_show_it() -> None:
    keys = ApiKeys(["sk-one", "sk-two"])
    assert keys.accepts([(b"authorization", b"Bearer sk-two")])
    assert keys.accepts([(b"authorization", b"bearer  sk-one")])
    assert not keys.accepts([(b"authorization", b"Bearer sk-one-more")])
    assert not keys.accepts([(b"authorization", b"Basic sk-one")])
    assert not keys.accepts([])
    assert "sk-" not in repr(keys)
    assert not ApiKeys([]).enabled


def test_api_keys_are_read_from_settings_and_the_key_file(tmp_path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# ops\n\nsk-file\n")
    keys = ApiKeys.from_settings(ProxySettings(api_keys=["sk-inline"], api_keys_file=key_file))
    assert keys.accepts([(b"authorization", b"Bearer sk-file")])
    assert keys.accepts([(b"authorization", b"Bearer sk-inline")])
    assert not keys.accepts([(b"authorization", b"Bearer # ops")])


def test_cors_allows_listed_origins_and_answers_preflights() -> None:
    cors = Cors(frozenset({"https://app.example"}))
    ok = [(b"origin", b"https://app.example"), (b"access-control-request-method", b"POST")]
    assert cors.response_headers(ok)[0] == (b"access-control-allow-origin", b"https://app.example")
    assert cors.response_headers([(b"origin", b"https://evil.example")]) == []
    preflight = dict(cors.preflight_headers(ok) or [])
    assert preflight[b"access-control-allow-methods"] == b"GET, POST, OPTIONS"
    assert cors.preflight_headers([(b"origin", b"https://app.example")]) is None
    assert Cors(frozenset({"*"})).allow_origin([(b"origin", b"https://any")]) == b"*"


def snapshot(*states: ModelState) -> ServiceStatus:
    models = tuple(
        ModelStatus(name=f"m{i}", state=state, aliases=(f"a{i}",), restarts=i, load_seconds=1.5, queued=i)
        for i, state in enumerate(states)
    )
    gpus = (GpuStatus(index=0, name="RTX", uuid="GPU-1", total_bytes=24 * 2**30, planned_bytes=2**30, used_bytes=3 * 2**29),)
    return ServiceStatus(models=models, gpus=gpus, plan={"models": []})


def test_health_is_200_while_some_model_can_be_served_and_503_when_none_can() -> None:
    assert health_reply(snapshot(ModelState.READY, ModelState.STOPPED)).status == 200
    degraded = health_reply(snapshot(ModelState.FAILED, ModelState.STARTING))
    assert degraded.status == 200 and json.loads(degraded.body)["status"] == "degraded"
    down = health_reply(snapshot(ModelState.FAILED, ModelState.UNPLACED))
    assert down.status == 503
    assert json.loads(down.body)["gpus"][0]["used_bytes"] == 3 * 2**29
    assert health_reply(snapshot()).status == 503


def test_models_list_every_name_and_alias_with_state_in_openai_format() -> None:
    body = json.loads(models_reply(snapshot(ModelState.READY, ModelState.STOPPED)).body)
    assert body["object"] == "list"
    assert [(m["id"], m["state"]) for m in body["data"]] == [
        ("m0", "ready"), ("a0", "ready"), ("m1", "stopped"), ("a1", "stopped")
    ]  # fmt: skip
    assert body["data"][1]["alias_of"] == "m0"


def test_status_shows_plan_and_runtime_per_model() -> None:
    body = json.loads(status_reply(snapshot(ModelState.BACKOFF), {"listen": "x"}).body)
    assert body["plan"] == {"models": []}
    assert body["models"][0]["state"] == "backoff"
    assert {"pid", "port", "restarts", "last_error", "in_flight", "queued", "placement"} <= set(body["models"][0])


def test_metrics_text_counts_requests_buckets_latency_and_shows_runtime_state() -> None:
    metrics = ProxyMetrics()
    metrics.observe("m0", 200, 0.003)
    metrics.observe("m0", 200, 0.2)
    metrics.observe("m0", 503, 0.001)
    text = render(metrics, snapshot(ModelState.READY, ModelState.FAILED))
    lines = set(text.splitlines())
    # prometheus_client writes every value as a float (2.0, 1.610612736e+09): compare them parsed
    samples = {(s.name, *sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("llama_smart_proxy_requests_total", ("model", "m0"), ("status", "200"))] == 2
    assert samples[("llama_smart_proxy_request_duration_seconds_bucket", ("le", "0.005"), ("model", "m0"))] == 2
    assert samples[("llama_smart_proxy_request_duration_seconds_bucket", ("le", "+Inf"), ("model", "m0"))] == 3
    assert samples[("llama_smart_proxy_model_state", ("model", "m1"), ("state", "failed"))] == 1
    assert samples[("llama_smart_proxy_model_state", ("model", "m1"), ("state", "ready"))] == 0
    assert samples[("llama_smart_proxy_model_queue_length", ("model", "m1"))] == 1
    assert samples[("llama_smart_proxy_model_restarts_total", ("model", "m1"))] == 1
    assert samples[("llama_smart_proxy_gpu_used_bytes", ("gpu", "0"))] == 1610612736
    assert samples[("llama_smart_proxy_gpu_planned_bytes", ("gpu", "0"))] == 1073741824
    assert ("process_resident_memory_bytes",) in samples  # the standard process metrics come along
    # every sample line belongs to a declared family
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert any(name == f or name.startswith(f + "_") for f in families), line


def test_metrics_label_values_are_escaped() -> None:
    metrics = ProxyMetrics()
    metrics.observe('we"ird\\name\n', 200, 0.1)
    text = render(metrics, ServiceStatus(models=()))
    assert 'model="we\\"ird\\\\name\\n"' in text


def test_admin_targets_parse_model_actions_and_reload() -> None:
    assert admin_target(b"/admin/reload") == ("reload", None)
    assert admin_target(b"/admin/models/qwen/load") == ("load", "qwen")
    assert admin_target(b"/admin/models/qwen/reset") == ("reset", "qwen")
    assert admin_target(b"/admin/models/qwen/explode") is None
    assert admin_target(b"/admin/models//load") is None


def test_admin_without_keys_is_for_loopback_peers_only() -> None:
    from llama_smart_proxy.supervisor.proxy.access import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("192.168.1.5") and not is_loopback("unix")


def test_an_unreadable_key_file_is_one_user_error_naming_the_file(tmp_path) -> None:
    from llama_smart_proxy.supervisor.errors import UserError

    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as caught:
        ApiKeys.from_settings(ProxySettings(api_keys_file=missing))
    assert str(caught.value).startswith(f"{missing}: proxy.api_keys_file:")


def test_every_status_line_gets_a_reason_phrase() -> None:
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(404) == b"Not Found"
    assert reason_phrase(505) == b"HTTP Version Not Supported"
    assert reason_phrase(299) == b"Success"  # unregistered: its class's name
    assert reason_phrase(599) == b"Server Error"


H11_REFUSALS = [
    b"GET / HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: <script>\r\n\r\n",
    b"GET / HTTP/1.1\r\n continued\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("raw", H11_REFUSALS)
def test_what_h11_says_about_a_bad_request_never_reaches_the_client(raw: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    with pytest.raises(h11.RemoteProtocolError) as caught:
        conn.next_event()
    error = protocol_error(caught.value.error_status_hint, str(caught.value))
    body = json.loads(error.reply().body)["error"]
    assert set(body) >= {"message", "type", "code"}
    assert str(caught.value) not in body["message"]
    assert "<script>" not in body["message"] and "\\x00" not in body["message"]
    assert error.close


def test_the_client_bytes_h11_quotes_do_not_pick_the_message() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nNo Host here: Content-Length\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as caught:
        conn.next_event()
    assert protocol_error(400, str(caught.value)).message == "a header line is malformed"


def chunked(*sizes: int, last: bool = True) -> bytes:
    out = b"".join(b"%x;ext=1\r\n" % n + b"x" * n + b"\r\n" for n in sizes)
    return out + (b"0\r\n\r\n" if last else b"")


def feed_in_pieces(guard: ChunkSizeGuard, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        guard.feed(data[i : i + piece])


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_chunk_size_guard_follows_a_well_framed_body_in_any_pieces(piece: int) -> None:
    guard = ChunkSizeGuard(100)
    feed_in_pieces(guard, chunked(10, 40, 50) + b"POST /next HTTP/1.1\r\n", piece)
    assert guard.declared == 100


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_a_chunk_size_beyond_the_limit_is_400_at_its_size_line(piece: int) -> None:
    guard = ChunkSizeGuard(1024)
    with pytest.raises(HttpError) as caught:
        feed_in_pieces(guard, b"10\r\n" + b"x" * 16 + b"\r\n" + b"99999999999999999999\r\n", piece)
    assert caught.value.status == 400 and caught.value.close
    assert caught.value.code == "chunk_too_large"


def test_chunks_declaring_more_than_the_limit_together_are_413_before_their_bytes() -> None:
    guard = ChunkSizeGuard(100)
    guard.feed(b"40\r\n" + b"x" * 64 + b"\r\n")
    with pytest.raises(HttpError) as caught:
        guard.feed(b"40\r\n")  # 128 declared, nothing of the second chunk sent yet
    assert caught.value.status == 413


def test_chunk_size_guard_leaves_garbage_to_h11() -> None:
    guard = ChunkSizeGuard(10)
    guard.feed(b"zz\r\n" + b"9" * 40 + b"\r\n")  # not a size line: it stops watching
    guard.feed(b"f" * 40 + b"\r\n")
    assert guard.declared == 0


SERVED = b'data: {"choices":[],"model":"tiny","object":"chat.completion.chunk"}\n\n'


@pytest.mark.parametrize("cut", range(len(SERVED) + 1))
def test_model_rename_rewrites_the_field_wherever_a_read_splits_it(cut: int) -> None:
    rename = ModelRename("tiny", "gpt-4o")
    out = rename.feed(SERVED[:cut]) + rename.feed(SERVED[cut:]) + rename.flush()
    assert out == SERVED.replace(b'"model":"tiny"', b'"model":"gpt-4o"')


def test_model_rename_holds_back_only_what_could_begin_the_field() -> None:
    rename = ModelRename("tiny", "gpt-4o")
    assert rename.feed(b'{"id":"x","mod') == b'{"id":"x",'
    assert rename.feed(b'e":"other"}') == b'"mode":"other"}'  # not the field: passed on unchanged
    assert rename.feed(b'{"model":"tiny"}\n\n') == b'{"model":"gpt-4o"}\n\n'
    assert rename.flush() == b""


def test_model_rename_is_none_when_the_client_used_the_served_name_or_the_body_is_not_json() -> None:
    json_headers = [(b"content-type", b"application/json; charset=utf-8")]
    assert model_rename("tiny", "tiny", json_headers) is None
    assert model_rename("gpt-4o", "tiny", json_headers) is not None
    assert model_rename("gpt-4o", "tiny", [(b"content-type", b"text/event-stream")]) is not None
    assert model_rename("gpt-4o", "tiny", [(b"content-type", b"text/html")]) is None
    assert model_rename("gpt-4o", "tiny", [*json_headers, (b"content-encoding", b"gzip")]) is None
    # a name llama-server's --alias cannot carry as is is served under another, then renamed back
    assert model_rename("a,b", "a,b", json_headers) is not None


def test_served_name_is_what_llama_server_keeps_of_an_alias() -> None:
    assert served_model_name("qwen2.5-7b") == "qwen2.5-7b"
    assert served_model_name("a,b") == "a_b"  # --alias splits at commas
    assert served_model_name("  spaced ") == "spaced"  # and strips each part
    assert served_model_name(" ") == "model"


def test_admin_routes_take_admin_keys_and_refuse_other_keys_with_403() -> None:
    keys = ApiKeys(["user-key"], ["admin-key"])
    bearer = lambda key: [(b"authorization", b"Bearer " + key)]  # noqa: E731
    assert keys.accepts(bearer(b"user-key")) and keys.accepts(bearer(b"admin-key"))
    assert keys.admin_refusal(bearer(b"admin-key"), "192.168.1.5") is None
    assert keys.admin_refusal(bearer(b"user-key"), "127.0.0.1").status == 403
    assert keys.admin_refusal(bearer(b"wrong"), "127.0.0.1").status == 401
    assert keys.admin_refusal([], "127.0.0.1").status == 401
    # admin keys alone: the other routes stay open, the admin ones need the key
    admin_only = ApiKeys([], ["admin-key"])
    assert not admin_only.enabled
    assert admin_only.admin_refusal(bearer(b"admin-key"), "10.0.0.1") is None
    assert admin_only.admin_refusal([], "127.0.0.1").status == 401
    # api keys without admin keys: the admin routes are off, from loopback too
    refusal = ApiKeys(["user-key"]).admin_refusal(bearer(b"user-key"), "127.0.0.1")
    assert refusal is not None and refusal.status == 403 and "proxy.admin_api_keys" in refusal.message
    # no keys at all: loopback only
    assert ApiKeys([]).admin_refusal([], "::1") is None
    assert ApiKeys([]).admin_refusal([], "10.0.0.1").status == 403
    assert "admin-key" not in repr(keys)


def test_admin_keys_are_read_from_settings_and_their_file(tmp_path) -> None:
    from llama_smart_proxy.supervisor.errors import UserError

    path = tmp_path / "admin.txt"
    path.write_text("# admins\nfrom-file\n")
    keys = ApiKeys.from_settings(ProxySettings(admin_api_keys=["inline"], admin_api_keys_file=path))
    for key in (b"inline", b"from-file"):
        assert keys.admin_refusal([(b"authorization", b"Bearer " + key)], "10.0.0.1") is None
    with pytest.raises(UserError) as caught:
        ApiKeys.from_settings(ProxySettings(admin_api_keys_file=tmp_path / "missing.txt"))
    assert ": proxy.admin_api_keys_file: cannot read" in str(caught.value)


def test_metrics_parse_with_prometheus_client_whatever_the_model_labels() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from llama_smart_proxy.supervisor.proxy.metrics import MODEL_MISSING, MODEL_UNKNOWN, NO_MODEL

    metrics = ProxyMetrics()
    for label in (NO_MODEL, MODEL_MISSING, MODEL_UNKNOWN, "m0", 'we"ird\\'):
        metrics.observe(label, 404, 0.01)
    families = {f.name: f for f in text_string_to_metric_families(render(metrics, snapshot(ModelState.READY)))}
    requests = families["llama_smart_proxy_requests"].samples
    assert {s.labels["model"] for s in requests} == {"", "(none)", "(unknown)", "m0", 'we"ird\\'}
