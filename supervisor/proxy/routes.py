"""The proxy's own routes, rendered from a `ServiceStatus`: /v1/models, /health, /status,
/metrics, and the admin actions' answers.

Rules kept here:
- pure: the service's status (and the proxy's counters) in, a `Reply` out; the server does the I/O;
- /health is 200 while the proxy can serve some model (a model that is stopped, loading or
  restarting can still be served; failed and unplaced ones cannot), else 503;
- /v1/models lists every configured name and alias in OpenAI's format, each with its state; in a
  fleet, every model of the fleet, each with the hosts that run it (`hosts`), those that run only
  elsewhere with the state "remote"; a request here for one of those is answered with where it
  runs (`elsewhere_error`), never as an unknown name;
- /status, /events (fed by the service's state feed) and the status page render a model, a GPU
  and the host through the same functions here (`model_json`, `gpu_json`, `host_json`,
  `status_body`), so that every view shows the same values.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from llama_smart_proxy.supervisor.proxy.backends import (
    FleetModelStatus,
    GpuStatus,
    HostStatus,
    ModelStatus,
    ServiceStatus,
)
from llama_smart_proxy.supervisor.proxy.http import HttpError, Reply, json_reply, unknown_model_error
from llama_smart_proxy.supervisor.proxy.metrics import CONTENT_TYPE, ProxyMetrics, render

OWNED_BY = "llama-smart-proxy"
ADMIN_PREFIX = b"/admin/"
ADMIN_ACTIONS = ("load", "unload", "reset")
READ_ALLOW = b"GET, HEAD"  # the Allow header of the read-only own routes
REMOTE = "remote"  # /v1/models' state of a model that only other hosts of the fleet run
MISDIRECTED = 421  # RFC 9110: this server cannot answer for that model; the answer says which can


def _model_entry(id_: str, status: ModelStatus, alias_of: str | None, service: ServiceStatus) -> dict[str, Any]:
    where = service.fleet.model(status.name) if service.fleet else None
    return _entry(id_, int(status.ready_since or 0), status.state.value, status.aliases, alias_of, where)


def _remote_entry(id_: str, model: FleetModelStatus, alias_of: str | None) -> dict[str, Any]:
    return _entry(id_, 0, REMOTE if model.hosts else "unplaced", model.aliases, alias_of, model)


def _entry(
    id_: str, created: int, state: str, aliases: tuple[str, ...], alias_of: str | None, where: FleetModelStatus | None
) -> dict[str, Any]:
    """One /v1/models entry: OpenAI's fields, our state, the aliases (or what it is an alias of),
    and in a fleet the hosts that run it."""
    entry: dict[str, Any] = {"id": id_, "object": "model", "created": created, "owned_by": OWNED_BY, "state": state}
    if alias_of is not None:
        entry["alias_of"] = alias_of
    else:
        entry["aliases"] = list(aliases)
    if where is not None:
        entry["hosts"] = _hosts_json(where)
    return entry


def _hosts_json(model: FleetModelStatus) -> list[dict[str, str]]:
    return [{"name": h.name, "address": h.address} for h in model.hosts]


def _remote_models(service: ServiceStatus) -> list[FleetModelStatus]:
    """The fleet's models this host does not run."""
    local = {s.name for s in service.models}
    return [m for m in service.fleet.models if m.name not in local] if service.fleet else []


def models_reply(service: ServiceStatus) -> Reply:
    entries: list[tuple[str, list[dict[str, Any]]]] = []
    for status in service.models:
        rows = [_model_entry(status.name, status, None, service)]
        rows += [_model_entry(alias, status, status.name, service) for alias in status.aliases]
        entries.append((status.name, rows))
    for model in _remote_models(service):
        rows = [_remote_entry(model.name, model, None)]
        rows += [_remote_entry(alias, model, model.name) for alias in model.aliases]
        entries.append((model.name, rows))
    data = [row for _, rows in sorted(entries, key=lambda e: e[0]) for row in rows]
    return json_reply(200, {"object": "list", "data": data})


def model_reply(service: ServiceStatus, name: str) -> Reply:
    for status in service.models:
        if name == status.name:
            return json_reply(200, _model_entry(name, status, None, service))
        if name in status.aliases:
            return json_reply(200, _model_entry(name, status, status.name, service))
    for model in _remote_models(service):
        if name in (model.name, *model.aliases):
            return json_reply(200, _remote_entry(name, model, None if name == model.name else model.name))
    raise unknown_model_error(name, service.known_names())


def elsewhere_error(service: ServiceStatus, name: str) -> HttpError | None:
    """The answer to a request here for a model of the fleet that this host does not run (it
    names the hosts that do), or None when `name` is no such model."""
    model = service.fleet.model(name) if service.fleet else None
    if model is None or service.model(model.name) is not None:
        return None
    this = service.fleet.host if service.fleet else ""
    if not model.hosts:
        return HttpError(
            503,
            f"The model {name!r} runs on no host of this fleet: {model.note or 'no host can take it'}",
            type="unavailable_error",
            code="model_unplaced",
            extra={"hosts": []},
        )
    where = ", ".join(f"{h.name} ({h.address})" for h in model.hosts)
    return HttpError(
        MISDIRECTED,
        f"The model {name!r} runs on {where}, not on this host ({this}); send the request there",
        code="model_on_other_host",
        extra={"hosts": _hosts_json(model)},
    )


def overall_health(service: ServiceStatus) -> str:
    """ok: every model servable; degraded: some are not; unavailable: none is (or none configured)."""
    servable = [s for s in service.models if s.is_servable]
    if not servable:
        return "unavailable"
    return "ok" if len(servable) == len(service.models) else "degraded"


def gpu_json(gpu: GpuStatus) -> dict[str, Any]:
    return asdict(gpu)


def host_json(host: HostStatus) -> dict[str, Any]:
    return asdict(host)


def health_reply(service: ServiceStatus) -> Reply:
    overall = overall_health(service)
    body = {
        "status": overall,
        "models": {
            s.name: {"state": s.state.value, **({"error": s.last_error} if s.last_error else {})}
            for s in sorted(service.models, key=lambda s: s.name)
        },
        "gpus": [gpu_json(g) for g in sorted(service.gpus, key=lambda g: g.index)],
    }
    if service.notes:
        body["notes"] = list(service.notes)
    return json_reply(503 if overall == "unavailable" else 200, body)


def model_json(status: ModelStatus) -> dict[str, Any]:
    data = asdict(status)
    data["state"] = status.state.value
    data["aliases"] = list(status.aliases)
    data["gpus"] = list(status.gpus)
    # JSON object keys are strings: a GPU index is written "0"
    data["planned_bytes_by_gpu"] = {str(gpu): size for gpu, size in sorted(status.planned_bytes_by_gpu.items())}
    return data


def status_body(service: ServiceStatus, proxy: dict[str, Any]) -> dict[str, Any]:
    """/status's answer; also the snapshot `GET /events` starts with."""
    return {
        "status": overall_health(service),
        "time": time.time(),
        "proxy": proxy,
        "models": [model_json(s) for s in sorted(service.models, key=lambda s: s.name)],
        "gpus": [gpu_json(g) for g in sorted(service.gpus, key=lambda g: g.index)],
        "host": host_json(service.host) if service.host is not None else None,
        "plan": service.plan,
        "notes": list(service.notes),
        **dict(service.extra),
    }


def status_reply(service: ServiceStatus, proxy: dict[str, Any]) -> Reply:
    return json_reply(200, status_body(service, proxy))


def metrics_reply(metrics: ProxyMetrics, service: ServiceStatus) -> Reply:
    """/metrics; it reads /proc (the process_* metrics): call it in a worker thread."""
    return Reply(200, render(metrics, service).encode(), content_type=CONTENT_TYPE)


def admin_target(path: bytes) -> tuple[str, str | None] | None:
    """b'/admin/reload' -> ('reload', None); b'/admin/models/m/load' -> ('load', 'm'); else None."""
    if path == b"/admin/reload":
        return "reload", None
    parts = path.split(b"/")
    # ['', 'admin', 'models', name, action]
    if len(parts) == 5 and parts[2] == b"models" and parts[3] and parts[4].decode("latin-1") in ADMIN_ACTIONS:
        try:
            return parts[4].decode(), parts[3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def admin_done_reply(action: str, model: str | None, service: ServiceStatus, summary: str | None = None) -> Reply:
    body: dict[str, Any] = {"action": action, "ok": True}
    if model is not None:
        status = service.model(model)
        body["model"] = model_json(status) if status else {"name": model}
    if summary is not None:
        body["summary"] = summary
    return json_reply(200, body)


def method_not_allowed(allowed: bytes) -> HttpError:
    return HttpError(
        405, f"method not allowed here; use {allowed.decode()}", code="method_not_allowed", headers=[(b"allow", allowed)]
    )


def not_found(path: bytes) -> HttpError:
    return HttpError(404, f"no route {path.decode('latin-1')!r}", code="not_found")

