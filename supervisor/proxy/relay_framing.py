"""A child's response as it goes to the client, framed without h11: the head's bytes and each
piece of the body's, by the choices h11's server makes (RFC 9112 §6 and §9.3).

Why not h11 on this path: its per-event validation and state machine were a tenth of serve's CPU
per relayed request, and more per streamed chunk (benchmarks/results/proxy-profile.md), for
headers that are valid already: the child's were checked as upstream_http read them, the rest are
ours. h11 still reads every request, and writes every response the proxy makes itself.

Rules kept here (tests/test_relay_framing.py holds them against h11's own output):
- a body of known length keeps its Content-Length; one of unknown length goes in chunks to an
  HTTP/1.1 client, and to an HTTP/1.0 client as it comes, ended by closing the connection;
- HEAD, 204 and 304 answers carry no body; a HEAD's head is the GET's;
- the connection stays open only for an HTTP/1.1 client, when neither side said
  `Connection: close` and the body's end does not need the close; otherwise the head says close.
"""

from __future__ import annotations

from llama_smart_proxy.supervisor.proxy.http import Headers, header_value, reason_phrase

LAST_CHUNK = b"0\r\n\r\n"


class RelayFraming:
    """How one relayed response's body goes to the client."""

    __slots__ = ("chunked", "keep_alive", "no_body")

    def __init__(self, *, chunked: bool, no_body: bool, keep_alive: bool) -> None:
        self.chunked = chunked
        self.no_body = no_body
        self.keep_alive = keep_alive
        """Another request may follow on the connection once the body is out."""

    def data(self, data: bytes) -> bytes:
        """The bytes that carry `data` to the client."""
        if self.no_body or not data:
            return b""
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        """The bytes that end the body (a close-delimited body ends with the connection)."""
        return LAST_CHUNK if self.chunked and not self.no_body else b""


def relay_head(
    status: int, headers: Headers, *, method: bytes, http_version: bytes, request_headers: Headers
) -> tuple[bytes, RelayFraming]:
    """The response head for the client and the framing of the body after it. `headers` are
    end-to-end and valid, with the child's Content-Length when the body keeps its length."""
    headers = list(headers)
    no_body = method == b"HEAD" or status == 204 or status == 304
    child_closes = _says_close(headers)
    keep_alive = http_version == b"1.1" and not _says_close(request_headers) and not child_closes
    chunked = False
    if status != 204 and status != 304 and header_value(headers, b"content-length") is None:
        if http_version == b"1.1":
            headers.append((b"transfer-encoding", b"chunked"))
            chunked = True
        elif method != b"HEAD":
            keep_alive = False  # the body ends with the connection
    if not keep_alive and not child_closes:
        headers = [(n, v) for n, v in headers if n != b"connection"]
        headers.append((b"connection", b"close"))
    lines = [b"HTTP/1.1 %d %b" % (status, reason_phrase(status))]
    lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"\r\n")
    return b"\r\n".join(lines), RelayFraming(chunked=chunked, no_body=no_body, keep_alive=keep_alive)


def _says_close(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"connection" and b"close" in [token.strip().lower() for token in value.split(b",")]:
            return True
    return False
