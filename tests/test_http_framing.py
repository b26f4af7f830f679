"""The proxy's pure parts, without sockets: framing rules, header rewriting, routing helpers,
access checks, metrics text and the own routes' rendering."""

from __future__ import annotations

import json

import h11
import pytest

from llama_smart_proxy.schemas.config import ProxySettings
from llama_smart_proxy.supervisor.proxy.access import ApiKeys, Cors
from llama_smart_proxy.supervisor.proxy.backends import GpuStatus, ModelState, ModelStatus, Snapshot
from llama_smart_proxy.supervisor.proxy.http import (
    HttpError,
    downstream_response_headers,
    end_to_end,
    framing_problem,
    model_from_body,
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


def snapshot(*states: ModelState) -> Snapshot:
    models = tuple(
        ModelStatus(name=f"m{i}", state=state, aliases=(f"a{i}",), restarts=i, load_seconds=1.5, queued=i)
        for i, state in enumerate(states)
    )
    gpus = (GpuStatus(index=0, name="RTX", uuid="GPU-1", total_bytes=24 * 2**30, planned_bytes=2**30, used_bytes=3 * 2**29),)
    return Snapshot(models=models, gpus=gpus, plan={"models": []})


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
    assert 'llama_smart_proxy_requests_total{model="m0",status="200"} 2' in lines
    assert 'llama_smart_proxy_request_duration_seconds_bucket{model="m0",le="0.005"} 2' in lines
    assert 'llama_smart_proxy_request_duration_seconds_bucket{model="m0",le="+Inf"} 3' in lines
    assert 'llama_smart_proxy_model_state{model="m1",state="failed"} 1' in lines
    assert 'llama_smart_proxy_model_state{model="m1",state="ready"} 0' in lines
    assert 'llama_smart_proxy_model_queue_length{model="m1"} 1' in lines
    assert 'llama_smart_proxy_model_restarts_total{model="m1"} 1' in lines
    assert 'llama_smart_proxy_gpu_used_bytes{gpu="0"} 1610612736' in lines
    assert 'llama_smart_proxy_gpu_planned_bytes{gpu="0"} 1073741824' in lines
    # every sample line belongs to a declared family
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert any(name == f or name.startswith(f + "_") for f in families), line


def test_metrics_label_values_are_escaped() -> None:
    metrics = ProxyMetrics()
    metrics.observe('we"ird\\name\n', 200, 0.1)
    text = render(metrics, Snapshot(models=()))
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
