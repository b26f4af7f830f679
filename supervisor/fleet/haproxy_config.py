"""`FleetRoutes` → the text of an HAProxy (2.6) config and the error files it names.

Rules kept here:
- pure: no file is read or written; `HaproxyConfig.files` are named relative to the config's
  folder (the config says `default-path config`, so HAProxy resolves them there);
- a name a client may send is never pasted into the config where HAProxy would parse it: a plain
  name (letters, digits, `._:/@+-`, not starting with `-`) is matched as written, any other by
  its hex (`var(txn.model),hex`), so quotes, spaces, `#`, `$` or `\\` in a model name cannot
  change the config; comments show names as JSON strings (no line breaks);
- every answer HAProxy makes itself is OpenAI-shaped JSON (`errorfile`), the shape of the hosts'
  own errors (`proxy.http.error_body`);
- each directive whose value is a decision says why, in the generated file, where an operator
  reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from llama_smart_proxy.schemas.config import parse_listen
from llama_smart_proxy.supervisor.fleet.routes import FleetRoutes, ModelRoute
from llama_smart_proxy.supervisor.proxy.http import MAX_HEADER_BYTES, error_body

# HAProxy keeps this much of each buffer free for header rewrites (tune.maxrewrite; its default is
# bufsize/2 capped at 1024): written out so that the body room below is exact.
MAXREWRITE_BYTES = 1024
# HTX (HAProxy's internal message form) spends a few bytes per header and per data block; 1 KiB
# covers a header block of MAX_HEADER_BYTES with room to spare (measured: a body of exactly the
# limit behind 15 KiB of headers is routed, see tests/test_haproxy_config.py).
HTX_SLACK_BYTES = 1024
# The hosts answer their own timeouts (504 naming the model) this much before HAProxy would cut
# the connection, so the client sees the host's clearer answer.
TIMEOUT_MARGIN_S = 5.0
# HAProxy splits a line into at most 64 words; names are matched this many per line.
NAMES_PER_LINE = 16
FILES_PREFIX = "llama-fleet-errors-"  # the error folder's name: this, then its content's digest
ANY_HOST = "any_host"
FRONTEND = "llama_fleet"
CHECK_PATH = "/health"

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*\Z")
_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class HaproxyConfig:
    """An HAProxy config: its text and the files it names (relative path → bytes)."""

    text: str
    files: dict[str, bytes] = field(default_factory=dict)
    files_dir: str = ""  # the one folder (beside the config) that holds every file


def render_haproxy(routes: FleetRoutes) -> HaproxyConfig:
    """The config for `routes`, and its error files in a folder named after their content (so
    that a new set never overwrites the files a running HAProxy was started with)."""
    backends = backend_names(routes.models)
    files = dict(_error_files(routes, backends))
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + body for name, body in sorted(files.items()))).hexdigest()
    files_dir = f"{FILES_PREFIX}{digest[:12]}"
    lines = [
        *_header(routes),
        *_global(routes),
        *_defaults(routes, files_dir),
        *_frontend(routes, backends),
        *_any_host_backend(routes),
    ]
    for model in routes.models:
        lines += _model_backend(routes, model, backends[model.name], files_dir)
    return HaproxyConfig("\n".join(lines) + "\n", {f"{files_dir}/{n}": b for n, b in files.items()}, files_dir)


def backend_names(models: Iterable[ModelRoute]) -> dict[str, str]:
    """Model name → an HAProxy identifier, unique and readable: `model_0_qwen2.5-7b`."""
    return {m.name: f"model_{i}_{_identifier(m.name)}" for i, m in enumerate(models)}


def server_names(routes: FleetRoutes) -> dict[str, str]:
    """Host name → an HAProxy server identifier, unique: the host's name where it is one."""
    names: dict[str, str] = {}
    for host in routes.hosts:
        base = _identifier(host.name)
        name, n = base, 1
        while name in names.values():
            n += 1
            name = f"{base}_{n}"
        names[host.name] = name
    return names


def buffer_bytes(body_limit_bytes: int) -> int:
    """tune.bufsize that holds a body of the limit behind a header block of the hosts' maximum."""
    return max(16384, body_limit_bytes + MAX_HEADER_BYTES + MAXREWRITE_BYTES + HTX_SLACK_BYTES)


def match_lines(backend: str, names: Iterable[str]) -> Iterator[str]:
    """`use_backend` lines for `names`: plain ones as written, the others by their hex, in each
    form HAProxy's JSON reader gives them (`as_read`)."""
    names = [n for n in names if n]  # "model": "" names no model; the hosts answer it
    plain = [n for n in names if _PLAIN_NAME.match(n)]
    other = list(dict.fromkeys(form.hex().upper() for n in names if not _PLAIN_NAME.match(n) for form in as_read(n)))
    for i in range(0, len(plain), NAMES_PER_LINE):
        yield f"    use_backend {backend} if {{ var(txn.model) -m str {' '.join(plain[i : i + NAMES_PER_LINE])} }}"
    for i in range(0, len(other), NAMES_PER_LINE):
        yield f"    use_backend {backend} if {{ var(txn.model),hex -m str {' '.join(other[i : i + NAMES_PER_LINE])} }}"


def as_read(name: str) -> list[bytes]:
    """The bytes json_query gives for `name`, whichever way a client's JSON writes it: UTF-8 as
    is, or escaped as \\uXXXX (Python's json.dumps, older httpx). HAProxy 2.6's JSON reader
    (mjson) turns \\u00XX into the one byte XX and gives up on any other \\u escape, so a name
    with a character above U+00FF is routed only when the client sends it unescaped
    (`unroutable_when_escaped`)."""
    forms = [name.encode()]
    if not name.isascii() and max(map(ord, name)) <= 0xFF:
        forms.append(name.encode("latin-1"))
    return forms


def unroutable_when_escaped(names: Iterable[str]) -> list[str]:
    """Names HAProxy cannot read from a body that escapes their non-ASCII characters."""
    return [n for n in names if n and max(map(ord, n)) > 0xFF]


def http_response(status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.1 response, as `errorfile` wants it."""
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "cache-control: no-store", *(f"{k}: {v}" for k, v in headers)]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# ---- sections


def _header(routes: FleetRoutes) -> list[str]:
    hosts = ", ".join(f"{json.dumps(h.name)} ({h.address})" for h in routes.hosts)
    return [
        "# HAProxy config for a llama-smart-proxy fleet, generated by `llama-smart-proxy haproxy`:",
        "# do not edit it, regenerate it from the fleet config.",
        f"# Hosts: {hosts}.",
        "# Routing: a request goes to a host serving the model its JSON body names (\"model\", or",
        "# /upstream/<model>/...), least connections first; anything else (GET /v1/models, /health,",
        "# /status, a model no host serves) to any healthy host, whose own answer lists the models.",
        f"# Request bodies: HAProxy reads a body whole to find its model, up to {routes.body_limit_bytes} bytes",
        f"# (tune.bufsize below); a larger one is refused with 413 here, as is one not read whole (the",
        "# hosts themselves accept up to their proxy.max_body_size: send larger bodies to a host directly).",
        "",
    ]


def _global(routes: FleetRoutes) -> list[str]:
    lines = [
        "global",
        "    # error files are named relative to this file's folder",
        "    default-path config",
        "    log stdout format raw local0 info",
        f"    tune.bufsize {buffer_bytes(routes.body_limit_bytes)}",
        f"    tune.maxrewrite {MAXREWRITE_BYTES}",
        "    # after a reload the old worker finishes the streams it holds, for this long at most",
        f"    hard-stop-after {_ms(routes.old_worker_grace_s)}",
    ]
    if routes.run_as:
        # the master keeps root (to bind and reload); the workers that talk to clients do not
        lines += [f"    user {routes.run_as}", f"    group {routes.run_as}"]
    if routes.stats_socket:
        # expose-fd listeners: a reloaded worker takes the listening sockets over from the old one,
        # so no connection is refused during a reload
        lines.append(f"    stats socket {routes.stats_socket} mode 600 level admin expose-fd listeners")
    return [*lines, ""]


def _defaults(routes: FleetRoutes, files_dir: str) -> list[str]:
    t = routes.timeouts
    wait_s = t.longest_silence_s + TIMEOUT_MARGIN_S
    lines = [
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    # keep-alive to the hosts (HAProxy's default): HAProxy closes half of its idle server",
        "    # connections every pool-purge-delay (5 s), well before a host's keepalive_timeout;",
        "    # a request sent on one the host closed at that moment is retried (retry-on below)",
        "    option http-keep-alive",
        "    # send each chunk of a streamed answer at once, without waiting to fill a packet",
        "    option http-no-delay",
        "    # a request whose client left while it waited (for a connection, in a queue) is",
        "    # dropped, not sent to a host to generate for nobody",
        "    option abortonclose",
        "    # on a reload, an idle keep-alive client connection of the old worker is not cut (the",
        "    # client could be sending on it): its next answer carries `Connection: close` instead",
        "    option idle-close-on-response",
        "    # a connection refused or closed before any answer byte (a host that just died) is",
        "    # tried again, on another replica where there is one",
        "    retry-on conn-failure empty-response",
        "    retries 2",
        "    option redispatch 1",
        f"    timeout connect {_ms(t.connect_s)}",
        "    # the hosts' header_timeout + body_timeout: HAProxy reads the whole body before routing",
        f"    timeout http-request {_ms(t.request_s)}",
        f"    timeout http-keep-alive {_ms(t.keepalive_s)}",
        f"    # a host may send nothing for queue_timeout ({t.queue_s:g} s, its model loading) plus",
        f"    # first_byte_timeout ({t.first_byte_s:g} s; a whole answer unless streamed), or for",
        f"    # stream_idle_timeout ({t.stream_idle_s:g} s) between chunks; HAProxy waits {TIMEOUT_MARGIN_S:g} s",
        "    # longer on both sides, so the host answers its own timeout (503, 504) first",
        f"    timeout server {_ms(wait_s)}",
        f"    timeout client {_ms(wait_s)}",
        f"    timeout queue {_ms(t.connect_s)}",
        f"    timeout check {_ms(routes.check.timeout_s)}",
    ]
    for status in sorted([*_GENERIC_ERRORS, 413]):
        lines.append(f"    errorfile {status} {files_dir}/{status}.http")
    return [*lines, ""]


def _frontend(routes: FleetRoutes, backends: dict[str, str]) -> list[str]:
    host, port = parse_listen(routes.listen)
    lines = [
        f"frontend {FRONTEND}",
        f"    bind {_address(host, port)}",
        "    # wait for the whole request body (up to the buffer) so that its \"model\" can be read;",
        "    # responses are never buffered: a stream passes chunk by chunk",
        "    option http-buffer-request",
        "    # the admin routes act on one host: call that host's own address",
        "    http-request deny deny_status 403 if { path_beg /admin/ }",
        "    # a body over the limit, or one the buffer could not hold whole, would be routed on",
        "    # a partial read: refuse it (413) rather than send it to a host that may not serve it",
        "    http-request set-var(txn.body_len) req.body_len",
        f"    http-request deny deny_status 413 if {{ req.body_size gt {routes.body_limit_bytes} }}",
        "    http-request deny deny_status 413 if { req.body_size,sub(txn.body_len) gt 0 }",
        "    http-request set-var(txn.model) path,field(3,/) if { path_beg /upstream/ }",
        "    http-request set-var(txn.model) req.body,json_query('$.model') unless { path_beg /upstream/ }",
    ]
    for model in routes.models:
        lines.append(f"    # {_names_comment(model)}")
        lines.extend(match_lines(backends[model.name], model.names))
    lines += [f"    default_backend {ANY_HOST}", ""]
    return lines


def _any_host_backend(routes: FleetRoutes) -> list[str]:
    check = routes.check
    servers = server_names(routes)
    lines = [
        f"backend {ANY_HOST}",
        "    # routes that name no model, and models no host serves, go to any healthy host",
        "    balance leastconn",
        "    # The one health check per host; every model backend tracks it. /health answers 200",
        "    # while the host can serve some model and 503 when it can serve none (every model",
        "    # failed): both mean its service is up, and its own 503 says why, so a host is down",
        "    # only when its service does not answer.",
        "    option httpchk",
        f"    http-check send meth GET uri {CHECK_PATH} ver HTTP/1.1 hdr host haproxy-check",
        "    http-check expect rstatus ^(200|503)$",
        f"    # down {check.down_after_s:g} s at most after a host stops (interval + (fall - 1) x fastinter)",
        f"    default-server check inter {_ms(check.interval_s)} fastinter {_ms(check.fast_interval_s)} "
        f"downinter {_ms(check.interval_s)} fall {check.fall} rise {check.rise}",
    ]
    for host in routes.hosts:
        lines.append(f"    server {servers[host.name]} {_address(*parse_listen(host.address))}")
    return [*lines, ""]


def _model_backend(routes: FleetRoutes, model: ModelRoute, backend: str, files_dir: str) -> list[str]:
    servers = server_names(routes)
    lines = [f"backend {backend}", f"    # {_names_comment(model)}", "    balance leastconn"]
    lines.append(f"    errorfile 503 {files_dir}/{backend}.503.http")
    for name in model.hosts:
        address = _address(*parse_listen(routes.host(name).address))
        lines.append(f"    server {servers[name]} {address} track {ANY_HOST}/{servers[name]}")
    return [*lines, ""]


# ---- error files

_GENERIC_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "bad_request", "the request could not be read as HTTP"),
    403: ("permission_error", "admin_per_host", "admin routes act on one host: call that host's own address, not the fleet's"),
    408: ("invalid_request_error", "timeout", "the request was not received in time"),
    500: ("server_error", "internal_error", "the fleet's router failed"),
    502: ("server_error", "upstream_error", "the host answered with an invalid response"),
    503: ("unavailable_error", "no_host_up", "no host of the fleet is up"),
    504: ("server_error", "timeout", "the host did not answer in time"),
}


def _error_files(routes: FleetRoutes, backends: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    for status, (type_, code, message) in _GENERIC_ERRORS.items():
        yield f"{status}.http", http_response(status, error_body(message, type=type_, code=code))
    too_large = (
        f"request body larger than {routes.body_limit_bytes} bytes, the most the fleet's router reads "
        "to find the model; send it to a host serving the model directly"
    )
    yield "413.http", http_response(413, error_body(too_large, code="body_too_large"))
    retry_after = str(max(1, math.ceil(routes.check.up_after_s)))
    for model in routes.models:
        if model.hosts:
            reason = f"no host serving it is up ({', '.join(model.hosts)})"
        else:
            reason = "it is placed on no host of the fleet"
        message = f"model {model.name!r} is unavailable: {reason}"
        extra: dict[str, Any] = {"model": model.name, "hosts": list(model.hosts)}
        body = error_body(message, type="unavailable_error", code="no_host_up", **extra)
        yield f"{backends[model.name]}.503.http", http_response(503, body, [("retry-after", retry_after)])


# ---- small helpers


def _identifier(name: str) -> str:
    return _NOT_IDENTIFIER.sub("_", name).strip("_")[:48] or "x"


def _names_comment(model: ModelRoute) -> str:
    hosts = ", ".join(map(json.dumps, model.hosts)) if model.hosts else "no host"
    return f"model {json.dumps(model.name)}, aliases {json.dumps(list(model.aliases))}: served by {hosts}"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"
