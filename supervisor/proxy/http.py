"""Pure HTTP framing rules of the proxy: which headers cross a hop, how a request is judged
ambiguous, where a request goes, and the shape of every error body.

Rules kept here:
- nothing awaits, nothing touches a socket; headers are h11's lists of (lowercase name, value) bytes;
- every hop is re-framed: Content-Length and Transfer-Encoding never cross, nor any hop-by-hop
  header (RFC 9110 §7.6.1) or a header that `Connection` names;
- a request with both Content-Length and Transfer-Encoding is an error (RFC 9112 §6.3), never
  forwarded;
- errors are OpenAI-shaped JSON: {"error": {"message", "type", "code"}}, in our own words: what
  h11 says about a request it refused is mapped to a message of ours, never passed on;
- every status line carries a reason phrase (h11 writes none unless given one);
- only HTTP/1.0 and 1.1 are served (h11 parses any `HTTP/d.d`);
- a chunked body is watched as it arrives (`ChunkSizeGuard`): a chunk the body limit rules out is
  refused at its size line, not after waiting for its bytes;
- a response's `"model"` is the name the client asked for (`ModelRename`), never a file path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from llama_smart_proxy.schemas.launch import served_model_name

Headers = list[tuple[bytes, bytes]]

MAX_HEADER_BYTES = 16 * 1024  # h11's default max_incomplete_event_size; beyond it: 431

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
READ_METHODS = frozenset({b"GET", b"HEAD"})
"""Methods of the proxy's own read-only routes; HEAD answers GET's headers without the body."""
HTTP_VERSIONS = frozenset({b"1.0", b"1.1"})

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_CLASS_REASONS = {1: b"Informational", 2: b"Success", 3: b"Redirection", 4: b"Client Error", 5: b"Server Error"}


def reason_phrase(status: int) -> bytes:
    """The status line's reason phrase: RFC 9110's for a registered code, else its class's name."""
    return _REASONS.get(status) or _CLASS_REASONS.get(status // 100, b"Unknown")


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


# What h11 says when it refuses a request, mapped to our words; the first needle found in h11's
# message, before the client's bytes it quotes (b'...'), picks the answer. h11's own text is never
# sent.
_PROTOCOL_MESSAGES = (
    ("Host", "an HTTP/1.1 request needs exactly one Host header"),
    ("Content-Length", "the Content-Length header is malformed or given twice with different values"),
    ("Transfer-Encoding", "a request body is framed by Content-Length or by one Transfer-Encoding: chunked header"),
    ("chunk", "the chunked request body is malformed"),
    ("request line", "the request line is malformed; expected METHOD TARGET HTTP/1.1"),
    ("method", "the request line is malformed; expected METHOD TARGET HTTP/1.1"),
    ("header", "a header line is malformed"),
    ("continuation line", "a header line is malformed"),
)
BAD_REQUEST_MESSAGE = "the request is not valid HTTP/1.1"
_QUOTED_BYTES = re.compile(r"""b['"]""")


def protocol_error(status: int, detail: str) -> HttpError:
    """A request h11 refused to parse (`detail` is h11's reason, for the log only); the connection
    closes after the answer."""
    if status == 431:
        message = f"request header block larger than {MAX_HEADER_BYTES} bytes"
    else:
        said = _QUOTED_BYTES.split(detail, maxsplit=1)[0]
        message = next((ours for needle, ours in _PROTOCOL_MESSAGES if needle in said), BAD_REQUEST_MESSAGE)
    return HttpError(status, message, code="bad_request", close=True)


def version_error(version: bytes) -> HttpError:
    """A request in an HTTP version other than 1.0 and 1.1: 505, and the connection closes."""
    return HttpError(
        505,
        f"HTTP/{version.decode('ascii', 'replace')} is not supported; use HTTP/1.1",
        code="http_version_not_supported",
        close=True,
    )


def connect_refused() -> HttpError:
    """CONNECT asks for a tunnel, which the proxy never opens (forwarded, it would switch the
    child's connection out of HTTP)."""
    return HttpError(501, "CONNECT is not supported: this server opens no tunnels", code="method_not_supported")


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,20}")  # h11's bound: 20 hex digits


def _chunk_size(line: bytes) -> int | None:
    """The size a chunk-size line declares (extensions and trailing whitespace aside), or None
    when it is not one; h11 then refuses the body itself."""
    size = line.rstrip(b"\r").partition(b";")[0].rstrip(b" \t")
    return int(size, 16) if _CHUNK_SIZE.fullmatch(size) else None


class ChunkSizeGuard:
    """Follows a chunked request body's framing in the bytes as they arrive and refuses a chunk
    the body limit rules out at its size line: h11 hands over a chunk's bytes only as they come, so
    a 20-digit chunk size would otherwise hold the connection until body_timeout. It stops
    watching at the last chunk, or at anything that is not a chunk-size line (h11 refuses that).
    The cost is per chunk, not per byte."""

    __slots__ = ("limit", "declared", "_skip", "_line", "_done")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.declared = 0
        self._skip = 0  # bytes of chunk data and its CRLF still to pass over
        self._line = b""  # a size line not yet ended
        self._done = False

    def feed(self, data: bytes) -> None:
        """Account for `data`; raises HttpError(400) for a chunk larger than the limit, or (413)
        when the chunks declared so far add up to more."""
        pos, end = 0, len(data)
        while pos < end and not self._done:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            newline = data.find(b"\n", pos)
            if newline == -1:
                self._line += data[pos:]
                if len(self._line) > MAX_HEADER_BYTES:
                    self._done = True  # not a size line; h11 answers it
                return
            line, self._line = self._line + data[pos:newline], b""
            pos = newline + 1
            size = _chunk_size(line)
            if size is None or size == 0:
                self._done = True  # garbage (h11 refuses it) or the last chunk
                return
            if size > self.limit:
                raise HttpError(
                    400,
                    f"a chunk of the request body declares {size} bytes; the body limit is {self.limit}",
                    code="chunk_too_large",
                    close=True,
                )
            self.declared += size
            if self.declared > self.limit:
                raise HttpError(413, f"request body larger than {self.limit} bytes", code="body_too_large", close=True)
            self._skip = size + 2


class ModelRename:
    """Rewrites the `"model"` a child reports into the name the client asked for, in a response
    body as it streams. The child is started with `--alias <served name>` (supervisor/children/launch.py),
    so the exact bytes to look for are known; a pattern split across two reads is held back (a
    few bytes of an unfinished JSON line) until the next read completes or refutes it."""

    __slots__ = ("old", "new", "_held")

    def __init__(self, served: str, asked: str) -> None:
        self.old = b'"model":' + json.dumps(served, ensure_ascii=False).encode()
        self.new = b'"model":' + json.dumps(asked, ensure_ascii=False).encode()
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """What of `data` may go to the client now, renamed."""
        if self._held:
            data = self._held + data
            self._held = b""
        data = data.replace(self.old, self.new)
        # Hold back a tail that could begin the pattern; it starts with the quote of "model".
        start = data.find(b'"', max(0, len(data) - len(self.old) + 1))
        while start != -1:
            if self.old.startswith(data[start:]):
                self._held = data[start:]
                return data[:start]
            start = data.find(b'"', start + 1)
        return data

    def flush(self) -> bytes:
        """Whatever was held back, at the end of the body."""
        held, self._held = self._held, b""
        return held


_RENAMED_TYPES = (b"application/json", b"text/event-stream")


def model_rename(asked: str, canonical: str, response_headers: Headers) -> ModelRename | None:
    """A ModelRename when the child reports a name other than `asked` in a JSON or event-stream
    body it sends uncompressed; None otherwise (the common case: the client used the name)."""
    served = served_model_name(canonical)
    if asked == served:
        return None
    content_type = header_value(response_headers, b"content-type") or b""
    if not content_type.startswith(_RENAMED_TYPES) or header_value(response_headers, b"content-encoding"):
        return None
    return ModelRename(served, asked)


def without_length(headers: Headers) -> Headers:
    """`headers` without Content-Length, for a body whose length changes on the way (h11 then
    chunks it, or closes after it for an HTTP/1.0 client)."""
    return [(n, v) for n, v in headers if n != b"content-length"]
