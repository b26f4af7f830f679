"""Pure HTTP framing rules of the proxy: which headers cross a hop, how a request is judged
ambiguous, where a request goes, and the shape of every error body.

Rules kept here:
- nothing awaits, nothing touches a socket; headers are h11's lists of (lowercase name, value) bytes;
- every hop is re-framed: Content-Length and Transfer-Encoding never cross, nor any hop-by-hop
  header (RFC 9110 §7.6.1) or a header that `Connection` names;
- a request with both Content-Length and Transfer-Encoding is an error (RFC 9112 §6.3), never
  forwarded;
- errors are OpenAI-shaped JSON: {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import h11

Headers = list[tuple[bytes, bytes]]

MAX_HEADER_BYTES = 16 * 1024  # h11's default max_incomplete_event_size; beyond it: 431
READ_SIZE = 64 * 1024  # bytes asked of a socket per receive

# RFC 9110 §7.6.1 hop-by-hop fields, plus Proxy-Connection (pre-standard, still sent) and the
# framing fields that each hop re-computes.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

# POST routes whose JSON body's "model" picks the child: OpenAI's and llama.cpp's own.
MODEL_ROUTES = frozenset(
    {
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/rerank",
        b"/v1/responses",
        b"/completion",
        b"/completions",
        b"/chat/completions",
        b"/infill",
        b"/embedding",
        b"/embeddings",
        b"/rerank",
        b"/reranking",
        b"/tokenize",
        b"/detokenize",
        b"/apply-template",
    }
)
UPSTREAM_PREFIX = b"/upstream/"


@dataclass(frozen=True)
class Reply:
    """A whole response the proxy writes itself (errors and its own routes)."""

    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: Headers = field(default_factory=list)
    close: bool = False
    """Close the connection after this reply (the request could not be read to its end)."""

    def head_headers(self) -> Headers:
        if self.status == 204:
            headers: Headers = []
        else:
            headers = [(b"content-type", self.content_type), (b"content-length", b"%d" % len(self.body))]
        headers.extend(self.headers)
        if self.close:
            headers.append((b"connection", b"close"))
        return headers


class HttpError(Exception):
    """A request we answer ourselves with an error; `status` is the HTTP status to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: Headers | None = None,
        close: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = headers or []
        self.close = close
        self.extra = extra or {}

    def reply(self) -> Reply:
        return Reply(
            self.status,
            error_body(self.message, type=self.type, code=self.code, **self.extra),
            headers=self.headers,
            close=self.close,
        )


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None, **extra: Any) -> bytes:
    """An OpenAI-style error body."""
    error = {"message": message, "type": type, "param": None, "code": code}
    error.update(extra)
    return json.dumps({"error": error}).encode()


def json_reply(status: int, payload: Any, headers: Headers | None = None) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers or [])


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of `name` (lowercase), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def framing_problem(headers: Headers) -> HttpError | None:
    """Why a request's framing is unsafe to act on, or None. h11 has already rejected conflicting
    Content-Lengths and transfer codings other than chunked; it lets CL + TE through (TE wins)."""
    has_length = has_chunked = False
    for name, _ in headers:
        if name == b"content-length":
            has_length = True
        elif name == b"transfer-encoding":
            has_chunked = True
    if has_length and has_chunked:
        return HttpError(
            400,
            "a request with both Content-Length and Transfer-Encoding is ambiguous",
            code="ambiguous_framing",
            close=True,
        )
    return None


def head_size(request: h11.Request) -> int:
    """The size of a request's head as sent, give or take whitespace."""
    return len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in request.headers.raw_items())


def declared_length(headers: Headers) -> int | None:
    """The Content-Length h11 validated (one value, digits only), or None."""
    value = header_value(headers, b"content-length")
    return int(value) if value is not None else None


def _connection_named(headers: Headers) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def end_to_end(headers: Headers) -> Headers:
    """`headers` without hop-by-hop and framing fields and without those `Connection` names."""
    kept = [(n, v) for n, v in headers if n not in HOP_BY_HOP]
    if len(kept) == len(headers) or not any(n == b"connection" for n, _ in headers):
        return kept
    named = _connection_named(headers)
    return [(n, v) for n, v in kept if n not in named]


def upstream_request_headers(
    headers: Headers, *, host: bytes, peer: bytes, body_length: int, drop_authorization: bool
) -> Headers:
    """The headers sent to a child: end-to-end only, our own Host and Content-Length,
    X-Forwarded-For with the client appended. The client's bearer key stays with us when we
    checked it (it is our credential, not the child's)."""
    out: Headers = [(b"host", host)]
    forwarded_for: bytes | None = None
    for name, value in end_to_end(headers):
        if name in _REPLACED:
            if name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif name == b"authorization" and not drop_authorization:
                out.append((name, value))
            continue
        out.append((name, value))
    out.append((b"x-forwarded-for", peer if forwarded_for is None else forwarded_for + b", " + peer))
    out.append((b"content-length", b"%d" % body_length))
    return out


_REPLACED = frozenset({b"host", b"x-forwarded-for", b"authorization"})


def downstream_response_headers(headers: Headers) -> tuple[Headers, int | None]:
    """A child's response headers for the client, and its Content-Length if it sent one
    (kept so that h11 frames the body by length; otherwise h11 chunks it)."""
    length = declared_length(headers)
    out = end_to_end(headers)
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out, length


def model_from_body(body: bytes) -> str | None:
    """The JSON body's "model", or None when it names none. Raises HttpError(400) for a body
    that is not a JSON object or a "model" that is not a string."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise HttpError(400, "the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise HttpError(400, '"model" must be a string', code="invalid_model")
    return model


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """b'/v1/x?a=1' -> (b'/v1/x', b'?a=1')."""
    path, sep, query = target.partition(b"?")
    return path, sep + query


def upstream_route(path: bytes, query: bytes) -> tuple[str, bytes] | None:
    """b'/upstream/m/props', b'?x' -> ('m', b'/props?x'); None unless the path starts with
    /upstream/<model>."""
    if not path.startswith(UPSTREAM_PREFIX):
        return None
    rest = path[len(UPSTREAM_PREFIX) :]
    model, _, tail = rest.partition(b"/")
    if not model:
        return None
    try:
        name = model.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name, b"/" + tail + query


def unknown_model_error(name: str, known: list[str]) -> HttpError:
    listing = ", ".join(known) if known else "none"
    return HttpError(
        404,
        f"The model {name!r} does not exist here; known models: {listing}",
        code="model_not_found",
        extra={"known_models": known},
    )


def missing_model_error(known: list[str]) -> HttpError:
    listing = ", ".join(known) if known else "none"
    return HttpError(
        400,
        f'The request names no "model" and no default model is configured; known models: {listing}',
        code="model_required",
        extra={"known_models": known},
    )


def protocol_error(status: int, message: str) -> HttpError:
    """A request h11 refused to parse; the connection closes after the answer."""
    if status == 431:
        message = f"request header block larger than {MAX_HEADER_BYTES} bytes"
    return HttpError(status, message, code="bad_request", close=True)
