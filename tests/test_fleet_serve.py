"""`serve --host NAME` in a fleet: each host runs its share; every host's /v1/models lists the whole
fleet with where each model runs; a request for another host's model is told where it runs; a
reload moves a model from one host to the other. The routes first (pure), then two real services
on loopback ports with the real llama-server on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from llama_smart_proxy.supervisor.proxy.backends import (
    FleetHost,
    FleetModelStatus,
    FleetStatus,
    ModelState,
    ModelStatus,
    ServiceStatus,
)
from llama_smart_proxy.supervisor.proxy.routes import elsewhere_error, model_reply, models_reply
from tests.fakes.supervision import TEST_PORT_RANGE, pid_alive
from tests.helpers import free_port
from tests.test_serve import serve_process, wait_ready

ROOT = Path(__file__).parent.parent
NO_GPU = ROOT / "examples" / "inventory-no-gpu.json"

ALPHA, BETA = FleetHost("alpha", "10.0.0.1:8080"), FleetHost("beta", "10.0.0.2:8080")
FLEET = FleetStatus(
    host="alpha",
    models=(
        FleetModelStatus("a", ("chat-a",), (ALPHA,)),
        FleetModelStatus("b", ("chat-b",), (BETA, ALPHA)),
        FleetModelStatus("c", (), (BETA,)),
        FleetModelStatus("d", (), (), note="no host can take d: alpha: too big"),
    ),
)
SERVICE = ServiceStatus(
    models=(ModelStatus("a", ModelState.READY, aliases=("chat-a",)), ModelStatus("b", ModelState.STOPPED, aliases=("chat-b",))),
    fleet=FLEET,
)


def test_v1_models_lists_the_whole_fleet_with_where_each_model_runs() -> None:
    data = json.loads(models_reply(SERVICE).body)["data"]
    by_id = {entry["id"]: entry for entry in data}
    assert [e["id"] for e in data] == ["a", "chat-a", "b", "chat-b", "c", "d"]
    assert by_id["a"]["state"] == "ready" and by_id["a"]["hosts"] == [{"name": "alpha", "address": "10.0.0.1:8080"}]
    assert by_id["b"]["hosts"] == [{"name": "beta", "address": "10.0.0.2:8080"}, {"name": "alpha", "address": "10.0.0.1:8080"}]
    assert by_id["c"] == {
        "id": "c", "object": "model", "created": 0, "owned_by": "llama-smart-proxy", "state": "remote",
        "aliases": [], "hosts": [{"name": "beta", "address": "10.0.0.2:8080"}],
    }  # fmt: skip
    assert by_id["d"]["state"] == "unplaced" and by_id["d"]["hosts"] == []
    assert json.loads(model_reply(SERVICE, "c").body)["state"] == "remote"
    # one machine: the same answer as ever, no hosts field
    single = ServiceStatus(models=SERVICE.models)
    assert all("hosts" not in e for e in json.loads(models_reply(single).body)["data"])


def test_a_model_another_host_runs_is_answered_with_where_it_runs() -> None:
    error = elsewhere_error(SERVICE, "c")
    assert error is not None and error.status == 421
    body = json.loads(error.reply().body)["error"]
    assert body["code"] == "model_on_other_host" and body["type"] == "invalid_request_error"
    assert body["message"] == "The model 'c' runs on beta (10.0.0.2:8080), not on this host (alpha); send the request there"
    assert body["hosts"] == [{"name": "beta", "address": "10.0.0.2:8080"}]
    unplaced = elsewhere_error(SERVICE, "d")
    assert unplaced is not None and unplaced.status == 503 and "alpha: too big" in unplaced.message
    # served here, or no model of the fleet: not this error
    assert elsewhere_error(SERVICE, "chat-b") is None and elsewhere_error(SERVICE, "typo") is None
    assert elsewhere_error(ServiceStatus(models=SERVICE.models), "c") is None


def test_a_misspelt_name_is_answered_with_the_names_of_the_whole_fleet() -> None:
    # a balancer sends a typo to any host: its 404 must list what every host serves
    assert SERVICE.known_names() == ["a", "b", "c", "chat-a", "chat-b", "d"]


# --- two real services ----------------------------------------------------------------------------


def write_fleet(directory: Path, llama_server: Path, ports: dict[str, int], hosts_of_a: str) -> Path:
    path = directory / "fleet.toml"
    path.write_text(
        f"""
[llama_server]
binary = "{llama_server}"
port_range = [{TEST_PORT_RANGE[0]}, {TEST_PORT_RANGE[1]}]
stop_grace = "2s"

[proxy]
drain_timeout = "5s"

[hosts.alpha]
address = "127.0.0.1:{ports["alpha"]}"
inventory = "no-gpu.json"

[hosts.beta]
address = "127.0.0.1:{ports["beta"]}"
inventory = "no-gpu.json"

[defaults]
ctx = 512

[models.a]
file = "a.gguf"
aliases = ["chat-a"]
hosts = ["{hosts_of_a}"]

[models.b]
file = "b.gguf"
hosts = ["beta"]
"""
    )
    return path


def models_of(base: str) -> dict[str, dict]:  # type: ignore[type-arg]
    return {entry["id"]: entry for entry in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]}


@pytest.mark.llama_server
def test_two_hosts_serve_their_shares_and_a_reload_moves_a_model(tmp_path: Path, llama_server: Path, tiny_model: Path) -> None:
    for name in ("a", "b"):
        shutil.copyfile(tiny_model, tmp_path / f"{name}.gguf")
    shutil.copyfile(NO_GPU, tmp_path / "no-gpu.json")
    ports = {"alpha": free_port(), "beta": free_port()}
    config = write_fleet(tmp_path, llama_server, ports, hosts_of_a="alpha")
    base = {host: f"http://127.0.0.1:{port}" for host, port in ports.items()}
    where = {host: [{"name": host, "address": f"127.0.0.1:{port}"}] for host, port in ports.items()}

    def serve_host(host: str):  # type: ignore[no-untyped-def]
        args = ["--config", str(config), "--host", host, "--listen", f"127.0.0.1:{ports[host]}", "--inventory", str(NO_GPU)]
        return serve_process(args, tmp_path / f"{host}.log")

    with serve_host("alpha") as alpha, serve_host("beta") as beta:
        wait_ready(base["alpha"], alpha, tmp_path / "alpha.log")
        wait_ready(base["beta"], beta, tmp_path / "beta.log")
        status = {host: httpx.get(f"{base[host]}/status", timeout=10).json() for host in base}
        assert [m["name"] for m in status["alpha"]["models"]] == ["a"]
        assert [m["name"] for m in status["beta"]["models"]] == ["b"]
        pid_of_a = status["alpha"]["models"][0]["pid"]

        on_alpha, on_beta = models_of(base["alpha"]), models_of(base["beta"])
        assert on_alpha["a"]["state"] == "ready" and on_alpha["a"]["hosts"] == where["alpha"]
        assert on_alpha["b"]["state"] == "remote" and on_alpha["b"]["hosts"] == where["beta"]
        assert on_beta["a"]["state"] == "remote" and on_beta["a"]["hosts"] == where["alpha"]
        assert on_beta["chat-a"]["alias_of"] == "a" and on_beta["b"]["state"] == "ready"

        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = httpx.post(f"{base['alpha']}/v1/chat/completions", json={"model": "chat-a", **chat}, timeout=30)
        assert answer.status_code == 200, answer.text
        refused = httpx.post(f"{base['alpha']}/v1/chat/completions", json={"model": "b", **chat}, timeout=30)
        assert refused.status_code == 421
        error = refused.json()["error"]
        assert error["code"] == "model_on_other_host" and error["hosts"] == where["beta"]
        assert f"runs on beta (127.0.0.1:{ports['beta']})" in error["message"]
        admin = httpx.post(f"{base['alpha']}/admin/models/b/load", timeout=30)  # admin acts on its own host
        assert admin.status_code == 421 and admin.json()["error"]["hosts"] == where["beta"]

        # a moves to beta: beta starts it, alpha stops it, and each says so
        write_fleet(tmp_path, llama_server, ports, hosts_of_a="beta")
        started = httpx.post(f"{base['beta']}/admin/reload", timeout=60)
        assert started.status_code == 200 and "start a" in started.json()["summary"], started.text
        stopped = httpx.post(f"{base['alpha']}/admin/reload", timeout=60)
        assert stopped.status_code == 200 and "stop a" in stopped.json()["summary"], stopped.text
        assert not pid_alive(pid_of_a)
        on_alpha, on_beta = models_of(base["alpha"]), models_of(base["beta"])
        assert on_alpha["a"]["state"] == "remote" and on_alpha["a"]["hosts"] == where["beta"]
        assert on_beta["a"]["state"] == "ready" and on_beta["a"]["hosts"] == where["beta"]
        moved = httpx.post(f"{base['alpha']}/v1/chat/completions", json={"model": "chat-a", **chat}, timeout=30)
        assert moved.status_code == 421 and moved.json()["error"]["hosts"] == where["beta"]
        answer = httpx.post(f"{base['beta']}/v1/chat/completions", json={"model": "chat-a", **chat}, timeout=30)
        assert answer.status_code == 200, answer.text
