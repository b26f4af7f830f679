"""The HAProxy config for a fleet: rendered purely from `FleetRoutes`, accepted by the real
`haproxy -c`, and routing as it says when HAProxy runs it in front of small named backends
(no llama-server here; tests/test_haproxy_fleet.py runs the real services)."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from llama_smart_proxy.schemas.config import ProxySettings
from llama_smart_proxy.supervisor.fleet.haproxy_config import (
    HaproxyConfig,
    as_read,
    buffer_bytes,
    http_response,
    match_lines,
    render_haproxy,
    unroutable_when_escaped,
)
from llama_smart_proxy.supervisor.fleet.haproxy_reload import (
    HaproxyRefused,
    HaproxyReloadFailed,
    apply_config,
    check_config,
    install_config,
    master_state,
    parse_show_proc,
)
from llama_smart_proxy.supervisor.fleet.routes import FleetRoutes, HealthCheck, ModelRoute, fleet_routes
from tests.haproxy_harness import (
    SLOW_STREAM_EVENTS,
    SLOW_STREAM_INTERVAL_S,
    SLOW_STREAM_PATH,
    NamedBackend,
    RunningHaproxy,
    running_haproxy,
    wait_server_state,
)
from tests.helpers import free_port, h11_reads, wait_for

ODD = 'odd "name" #1 $HOME \\ é'  # quotes, a comment sign, a variable, a backslash, a space, UTF-8
FAST_CHECK = HealthCheck(interval_s=0.2, fast_interval_s=0.1, timeout_s=0.5, fall=2, rise=1)


def routes(hosts: dict[str, str] | None = None, **overrides: object) -> FleetRoutes:
    hosts = hosts or {"alpha": "10.0.0.1:8080", "beta": "10.0.0.2:8080"}
    models = [
        ModelRoute("qwen", ("qwen-latest", "qwen2.5:7b/q4.k_m"), ("alpha", "beta")),
        ModelRoute("llama", (ODD, "-i"), ("beta",)),
        ModelRoute("unplaced", (), ()),
    ]
    return fleet_routes(f"127.0.0.1:{free_port()}", hosts, models, ProxySettings(), **overrides)  # type: ignore[arg-type]


def write(config: HaproxyConfig, directory: Path) -> Path:
    return install_config(config, directory / "haproxy.cfg")


# ---- pure rendering


def test_every_name_and_alias_selects_its_models_backend_and_odd_names_only_by_hex() -> None:
    text = render_haproxy(routes()).text
    assert "use_backend model_1_qwen if { var(txn.model) -m str qwen qwen-latest qwen2.5:7b/q4.k_m }" in text
    odd_hex, odd_escaped_hex = ODD.encode().hex().upper(), ODD.encode("latin-1").hex().upper()
    assert f"use_backend model_0_llama if {{ var(txn.model) -m str llama }}" in text
    # UTF-8 as sent, and what HAProxy's JSON reader makes of "\u00e9" (one byte, E9)
    assert f"use_backend model_0_llama if {{ var(txn.model),hex -m str {odd_hex} {odd_escaped_hex} 2D69 }}" in text
    # the odd name appears only inside comments, JSON-quoted
    for line in text.splitlines():
        if "$HOME" in line:
            assert line.lstrip().startswith("#") and json.dumps(ODD) in line, line


def test_names_beyond_latin_1_are_flagged_as_unroutable_when_a_client_escapes_them() -> None:
    # HAProxy 2.6's JSON reader decodes only \u00XX escapes (to one byte): é is matched both ways
    # (test_requests_route_by_model_alias_odd_name_and_upstream_path), 中 only as UTF-8
    assert as_read("é") == ["é".encode(), b"\xe9"] and as_read("qwen") == [b"qwen"]
    assert unroutable_when_escaped(["qwen", ODD, "模型-7b"]) == ["模型-7b"]


def test_many_aliases_are_split_over_lines_haproxy_can_parse(tmp_path: Path) -> None:
    lines = list(match_lines("b", [f"n{i}" for i in range(40)]))
    assert len(lines) == 3 and all(len(line.split()) < 64 for line in lines)
    many = ModelRoute("m", tuple(f"alias-{i}" for i in range(100)) + tuple(f"odd {i}" for i in range(100)), ("a",))
    check_config(write(render_haproxy(fleet_routes("127.0.0.1:80", {"a": "10.0.0.1:1"}, [many], ProxySettings())), tmp_path))


def test_timeouts_outlast_the_hosts_load_queue_first_byte_and_stream_idle_timeouts_and_say_so() -> None:
    proxy = ProxySettings(first_byte_timeout=900, queue_timeout=60, stream_idle_timeout=120, upstream_connect_timeout=3)
    text = render_haproxy(fleet_routes("127.0.0.1:80", {"a": "10.0.0.1:1"}, [], proxy)).text
    assert "timeout server 965000ms" in text and "timeout client 965000ms" in text  # 60 + 900 + 5 s
    assert "timeout connect 3000ms" in text
    assert "queue_timeout (60 s" in text and "first_byte_timeout (900 s" in text and "stream_idle_timeout (120 s)" in text
    long_gaps = ProxySettings(first_byte_timeout=10, queue_timeout=10, stream_idle_timeout=3600)
    assert "timeout server 3605000ms" in render_haproxy(fleet_routes("127.0.0.1:80", {"a": "10.0.0.1:1"}, [], long_gaps)).text


def test_the_buffer_holds_a_body_of_the_limit_behind_a_full_header_block() -> None:
    config = render_haproxy(routes(body_limit_bytes=300_000))
    assert f"tune.bufsize {buffer_bytes(300_000)}" in config.text
    assert "if { req.body_size gt 300000 }" in config.text
    assert "up to 300000 bytes" in config.text  # stated in the file


def test_error_files_are_whole_http_responses_with_openai_shaped_json_naming_the_model() -> None:
    config = render_haproxy(routes(body_limit_bytes=1000))
    files = {Path(name).name: data for name, data in config.files.items()}
    status, headers, body = h11_reads(files["model_1_qwen.503.http"])
    error = json.loads(body)["error"]
    assert status == 503 and (b"content-type", b"application/json") in headers
    assert error["code"] == "no_host_up" and "'qwen'" in error["message"] and error["hosts"] == ["alpha", "beta"]
    assert "placed on no host" in json.loads(h11_reads(files["model_2_unplaced.503.http"])[2])["error"]["message"]
    status, _, body = h11_reads(files["413.http"])
    assert status == 413 and "1000 bytes" in json.loads(body)["error"]["message"]
    for name in ("400", "403", "408", "500", "502", "503", "504"):
        status, _, body = h11_reads(files[f"{name}.http"])
        assert status == int(name) and set(json.loads(body)["error"]) >= {"message", "type", "code"}


def test_the_same_routes_render_the_same_text_files_and_folder() -> None:
    fleet = routes()
    assert render_haproxy(fleet) == render_haproxy(fleet)


def test_routes_refuse_an_unknown_host_a_name_used_twice_and_a_bad_address() -> None:
    proxy = ProxySettings()
    with pytest.raises(ValueError, match=r"models.m.hosts: 'gamma' is not a host"):
        fleet_routes("127.0.0.1:80", {"a": "10.0.0.1:1"}, [ModelRoute("m", (), ("gamma",))], proxy)
    with pytest.raises(ValueError, match=r"alias 'm' is already a name of models.m"):
        fleet_routes("127.0.0.1:80", {"a": "10.0.0.1:1"}, [ModelRoute("m"), ModelRoute("n", ("m",))], proxy)
    with pytest.raises(ValueError, match=r"hosts.a.address"):
        fleet_routes("127.0.0.1:80", {"a": "10.0.0.1"}, [], proxy)


def test_show_proc_is_read_into_the_masters_reloads_and_workers() -> None:
    text = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>\n"
        "1319            master          1 [failed: 0]   0d00h00m11s     2.6.12\n"
        "# workers\n"
        "1612            worker          0               0d00h00m01s     2.6.12\n"
        "1346            worker          1               0d00h00m11s     2.6.12\n"
        "# programs\n"
    )
    state = parse_show_proc(text)
    assert (state.pid, state.reloads, state.failed, state.workers, state.old_workers) == (1319, 1, 0, (1612,), (1346,))


# ---- the real haproxy: its check, and installing


def test_haproxy_accepts_the_rendered_config_with_odd_names_and_ipv6_hosts(tmp_path: Path) -> None:
    config = render_haproxy(routes({"alpha": "[::1]:8080", "beta": "localhost:8081"}, stats_socket=str(tmp_path / "s.sock"), run_as="haproxy"))
    path = write(config, tmp_path)
    assert "server alpha [::1]:8080" in path.read_text() and "    user haproxy\n    group haproxy\n" in path.read_text()
    assert "ALERT" not in check_config(path)


def test_a_refused_config_leaves_the_old_file_and_its_error_files_untouched(tmp_path: Path) -> None:
    good = render_haproxy(routes())
    path = write(good, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    bad = HaproxyConfig(good.text.replace("balance leastconn", "balance no-such-algorithm"), {"x-errors/503.http": b"x"}, "x-errors")
    with pytest.raises(HaproxyRefused, match="balance only supports") as refused:
        install_config(bad, path)
    assert "nothing was replaced" in str(refused.value) and f"parsing [{path} (new):" in str(refused.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_installing_new_routes_replaces_the_file_and_drops_only_the_old_error_folder(tmp_path: Path) -> None:
    other = tmp_path / "llama-fleet-errors-0123456789ab"  # another config's folder, beside ours
    other.mkdir()
    first = render_haproxy(routes())
    write(first, tmp_path)
    second = render_haproxy(routes(body_limit_bytes=5000))
    write(second, tmp_path)
    assert first.files_dir != second.files_dir
    assert not (tmp_path / first.files_dir).exists() and (tmp_path / second.files_dir).is_dir() and other.is_dir()
    assert not [p.name for p in tmp_path.iterdir() if ".new-" in p.name]


# ---- the real haproxy routing in front of named backends


@pytest.fixture
def two_hosts() -> Iterator[tuple[NamedBackend, NamedBackend]]:
    with NamedBackend("alpha") as alpha, NamedBackend("beta") as beta:
        yield alpha, beta


def start(tmp_path: Path, alpha: NamedBackend, beta: NamedBackend, **overrides: object) -> tuple[FleetRoutes, AbstractContextManager[RunningHaproxy]]:
    settings = {"check": FAST_CHECK, "stats_socket": str(tmp_path / "stats.sock"), **overrides}
    fleet = routes({"alpha": alpha.address, "beta": beta.address}, **settings)
    path = write(render_haproxy(fleet), tmp_path)
    return fleet, running_haproxy(path, tmp_path, fleet.listen)


def test_requests_route_by_model_alias_odd_name_and_upstream_path(tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]) -> None:
    alpha, beta = two_hosts
    fleet, haproxy_running = start(tmp_path, alpha, beta)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "any_host", "alpha", "UP")
        wait_server_state(haproxy, "any_host", "beta", "UP")

        def host_for(model: str, escaped: bool = False) -> str:
            # JSON with UTF-8 as is (JSON.stringify, newer httpx) or with \uXXXX escapes (json.dumps)
            body = json.dumps({"model": model}, ensure_ascii=escaped).encode()
            response = httpx.post(f"{haproxy.base}/v1/chat/completions", content=body, timeout=5)
            assert response.status_code == 200, response.text
            return response.json()["host"]

        assert {host_for(name, escaped) for name in ("llama", ODD, "-i") for escaped in (False, True) for _ in range(3)} == {"beta"}
        assert {host_for("qwen-latest") for _ in range(6)} == {"alpha", "beta"}
        assert httpx.get(f"{haproxy.base}/upstream/llama/props", timeout=5).json()["host"] == "beta"
        # a typo and the routes naming no model go to any host, whose own answer names the models
        assert httpx.get(f"{haproxy.base}/v1/models", timeout=5).status_code == 200
        assert host_for("qwne") in ("alpha", "beta")
        refused = httpx.post(f"{haproxy.base}/admin/reload", timeout=5)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_per_host"
        unplaced = httpx.post(f"{haproxy.base}/v1/chat/completions", json={"model": "unplaced"}, timeout=5)
        assert unplaced.status_code == 503 and unplaced.json()["error"]["model"] == "unplaced"


def test_a_body_up_to_the_limit_is_routed_and_a_larger_one_gets_413_json(tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]) -> None:
    alpha, beta = two_hosts
    limit = 40_000
    fleet, haproxy_running = start(tmp_path, alpha, beta, body_limit_bytes=limit)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "any_host", "beta", "UP")
        big_headers = {f"x-pad-{i}": "v" * 900 for i in range(15)}  # about 14 KiB of headers

        def body(size: int) -> bytes:
            head = b'{"model":"llama","pad":"'
            return head + b"x" * (size - len(head) - 2) + b'"}'

        def chunked(data: bytes):
            for i in range(0, len(data), 4096):
                yield data[i : i + 4096]

        url = f"{haproxy.base}/v1/chat/completions"
        fits = httpx.post(url, content=body(limit), headers=big_headers, timeout=5)
        assert fits.status_code == 200 and fits.json() == {"host": "beta", "path": "/v1/chat/completions", "length": limit}
        for too_large in (
            httpx.post(url, content=body(limit + 1), timeout=5),
            httpx.post(url, content=chunked(body(limit + 1)), timeout=5),
            httpx.post(url, content=chunked(body(3 * limit)), timeout=5),
        ):
            assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "body_too_large"
        small_chunked = httpx.post(url, content=chunked(body(limit // 2)), timeout=5)
        assert small_chunked.status_code == 200 and small_chunked.json()["host"] == "beta"


def test_a_host_whose_health_answers_503_stays_up_and_a_dead_one_goes_down(tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]) -> None:
    alpha, beta = two_hosts
    fleet, haproxy_running = start(tmp_path, alpha, beta)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "any_host", "beta", "UP")
        beta.health_status = 503  # every model of the host failed: its service still answers
        wait_for(lambda: haproxy.server_states()[("any_host", "beta")] == "UP" and len(beta.requests) > 5, 5, "checks")
        assert haproxy.server_states()[("model_0_llama", "beta")] == "UP"
        beta.health_status = 500
        wait_server_state(haproxy, "model_0_llama", "beta", "DOWN", timeout=5)
        answer = httpx.post(f"{haproxy.base}/v1/chat/completions", json={"model": ODD}, timeout=5)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["message"] == "model 'llama' is unavailable: no host serving it is up (beta)"


def test_requests_to_a_replica_that_just_died_are_retried_on_the_other_before_any_check_notices(
    tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]
) -> None:
    alpha, beta = two_hosts
    slow_check = HealthCheck(interval_s=30, fast_interval_s=30, timeout_s=1, fall=2, rise=1)
    fleet, haproxy_running = start(tmp_path, alpha, beta, check=slow_check)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "any_host", "alpha", "UP")
        alpha.__exit__(None, None, None)  # its port now refuses connections; HAProxy checks in 30 s
        answers = [httpx.post(f"{haproxy.base}/v1/chat/completions", json={"model": "qwen"}, timeout=5) for _ in range(6)]
        assert [(a.status_code, a.json()["host"]) for a in answers] == [(200, "beta")] * 6
        assert haproxy.server_states()[("any_host", "alpha")] == "UP"  # no check has run yet


def test_a_slow_event_stream_passes_each_event_when_it_is_sent(tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]) -> None:
    alpha, beta = two_hosts
    fleet, haproxy_running = start(tmp_path, alpha, beta)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "any_host", "alpha", "UP")
        arrivals = []
        with httpx.stream("POST", f"{haproxy.base}{SLOW_STREAM_PATH}", json={"model": "qwen"}, timeout=10) as stream:
            start_at = time.monotonic()
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic() - start_at)
    assert len(arrivals) == SLOW_STREAM_EVENTS
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # each event arrives about one interval after the one before, not all at the end
    assert all(gap > SLOW_STREAM_INTERVAL_S / 2 for gap in gaps), gaps


def test_a_client_that_leaves_mid_stream_closes_the_hosts_connection(tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]) -> None:
    """So that llama-server stops generating for nobody (DESIGN.md's runtime rule holds through
    HAProxy too); the backend notices at its next write, one interval later."""
    alpha, beta = two_hosts
    fleet, haproxy_running = start(tmp_path, alpha, beta)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "any_host", "beta", "UP")
        with httpx.stream("POST", f"{haproxy.base}{SLOW_STREAM_PATH}", json={"model": "llama"}, timeout=10) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")) == "data: 0"
        left_at = time.monotonic()  # the block closed the client's connection
        wait_for(lambda: beta.stream_cut_at is not None, 5, "the backend's connection to be closed")
        assert beta.stream_cut_at is not None
        print(f"\nthe backend's write failed {beta.stream_cut_at - left_at:.3f} s after the client left")
        assert beta.stream_cut_at - left_at < 3 * SLOW_STREAM_INTERVAL_S


def test_a_reload_through_the_master_takes_the_new_routes(tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]) -> None:
    alpha, beta = two_hosts
    fleet, haproxy_running = start(tmp_path, alpha, beta)
    with haproxy_running as haproxy:
        wait_server_state(haproxy, "model_0_llama", "beta", "UP")
        moved = fleet_routes(
            fleet.listen, {"alpha": alpha.address, "beta": beta.address},
            [ModelRoute("llama", (ODD,), ("alpha",))], ProxySettings(), check=FAST_CHECK, stats_socket=fleet.stats_socket,
        )  # fmt: skip
        before = master_state(haproxy.master_socket).workers[0]
        state = apply_config(render_haproxy(moved), tmp_path / "haproxy.cfg", pid_file=haproxy.pid_file, master_socket=haproxy.master_socket)
        assert state is not None and state.reloads == 1 and before not in state.workers
        wait_server_state(haproxy, "model_0_llama", "alpha", "UP")
        answer = httpx.post(f"{haproxy.base}/v1/chat/completions", json={"model": "llama"}, timeout=5)
        assert answer.json()["host"] == "alpha"


def test_a_reload_haproxy_cannot_apply_puts_the_old_file_back_and_the_old_worker_keeps_serving(
    tmp_path: Path, two_hosts: tuple[NamedBackend, NamedBackend]
) -> None:
    alpha, beta = two_hosts
    fleet, haproxy_running = start(tmp_path, alpha, beta)
    with haproxy_running as haproxy, socket.socket() as taken:
        wait_server_state(haproxy, "any_host", "beta", "UP")
        path = tmp_path / "haproxy.cfg"
        before = path.read_text()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"  # haproxy -c accepts it; binding it fails
        moved = dataclasses.replace(fleet, listen=busy)
        with pytest.raises(HaproxyReloadFailed, match="failed to load the new config; it keeps the old one"):
            apply_config(render_haproxy(moved), path, pid_file=haproxy.pid_file, master_socket=haproxy.master_socket)
        assert path.read_text() == before
        assert sorted(p.name for p in tmp_path.glob("llama-fleet-errors-*")) == [render_haproxy(fleet).files_dir]
        answer = httpx.post(f"{haproxy.base}/v1/chat/completions", json={"model": "llama"}, timeout=5)
        assert answer.status_code == 200 and answer.json()["host"] == "beta"


def test_http_response_frames_an_error_file_h11_reads() -> None:
    status, headers, body = h11_reads(http_response(503, b"{}", [("retry-after", "2")]))
    assert status == 503 and (b"retry-after", b"2") in headers and body == b"{}"


# ---- the `haproxy` command: a fleet config in, a checked HAProxy config out


def write_fleet(directory: Path, model: Path, *, hosts: bool = True) -> Path:
    snapshot = Path(__file__).resolve().parent.parent / "examples" / "inventory-no-gpu.json"
    lines = ['[models.qwen]', f'file = "{model}"', 'aliases = ["qwen-latest"]']
    if hosts:
        lines += ['replicas = 2', '[models.llama]', f'file = "{model}"', 'hosts = ["beta"]']
        for name, address in (("alpha", "10.0.0.1:8080"), ("beta", "10.0.0.2:8080")):
            lines += [f"[hosts.{name}]", f'address = "{address}"', f'inventory = "{snapshot}"']
    path = directory / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_haproxy_command_writes_a_checked_config_routing_each_model_to_its_planned_hosts(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llama_smart_proxy.supervisor.cli import main

    output = tmp_path / "etc" / "haproxy.cfg"
    argv = ["haproxy", "--config", str(write_fleet(tmp_path, tiny_model)), "--listen", "0.0.0.0:8080", "--output", str(output)]
    assert main(argv) == 0
    assert f"{output}: 2 of 2 models on 2 hosts behind 0.0.0.0:8080; installed" in capsys.readouterr().out
    text = output.read_text()
    assert "bind 0.0.0.0:8080" in text
    check_config(output)  # what HAProxy itself says of the file, its error files beside it
    sections = {part.split()[0]: part for part in text.split("\nbackend ")[1:]}
    served = {name: [h for h in ("alpha", "beta") if f"server {h} " in body] for name, body in sections.items()}
    assert served == {"any_host": ["alpha", "beta"], "model_0_llama": ["beta"], "model_1_qwen": ["alpha", "beta"]}


def test_the_haproxy_command_refuses_a_config_without_hosts_naming_it(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llama_smart_proxy.supervisor.cli import main

    config = write_fleet(tmp_path, tiny_model, hosts=False)
    assert main(["haproxy", "--config", str(config), "--listen", "0.0.0.0:8080", "--output", str(tmp_path / "h.cfg")]) == 2
    assert f"{config} has no [hosts] table" in capsys.readouterr().err
    assert not (tmp_path / "h.cfg").exists()
