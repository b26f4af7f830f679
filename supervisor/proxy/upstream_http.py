"""HTTP/1.1 toward a child, without I/O: the bytes of a request we built, and the events of the
response read from bytes as they arrive (as h11 keeps its state machine apart from sockets).

Why not h11 on this side: the request's parts were already validated (h11 parsed them from the
client) or are ours, and the peer is our own llama-server child; h11's per-event validation and
state machine were a third of the proxy's CPU per request (benchmarks/results/proxy-profile.md).
The client side keeps h11: that is where hostile input comes from.

Rules kept here:
- a response is framed by Transfer-Encoding: chunked, by one Content-Length, or by the
  connection's close; anything else (both, another coding, a malformed or conflicting length, a
  malformed status or header line, a head over MAX_HEADER_BYTES) is a `ResponseError`;
- 1xx responses are skipped (they are per hop); 204, 304 and the answer to HEAD have no body;
- a connection is reusable only after a whole response that was neither close-delimited nor
  chunked (llama-server closes the connection after a streamed response, DESIGN.md) nor said
  `Connection: close`, with nothing left over;
- the connection's end before the response's is a `ResponseClosed`;
- body data is handed over as it arrives, never held until a chunk is whole.
"""

from __future__ import annotations

import re
from typing import Final

from llama_smart_proxy.supervisor.proxy.http import MAX_HEADER_BYTES, Headers


class ResponseError(Exception):
    """The child's response is not valid HTTP/1.1 as this proxy reads it."""


class ResponseClosed(ResponseError):
    """The connection ended before the response did."""


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
END: Final = _Sentinel("END")
"""The response is complete."""


class Head:
    """A response's status line and headers (names lowercase, as h11 gives them)."""

    __slots__ = ("status", "headers")

    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers


def request_bytes(method: bytes, target: bytes, headers: Headers, body: bytes) -> bytes:
    """One whole request; `headers` must carry Host and Content-Length and be valid already."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"")
    return b"\r\n".join(lines) + b"\r\n" + body


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[^\x00\s](?:[ \t]*[^\x00\s])*)?)[ \t]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\x00\r\n]*)?")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")

# states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class ResponseReader:
    """Reads the responses of one connection, one at a time: `start()` before each request's
    response, `receive_data()` with what the socket gave (b'' at its end), then `next_event()`
    until END: a Head, then body bytes, as many as arrive."""

    __slots__ = ("_buffer", "_eof", "_state", "_remaining", "_head_request", "_keep_alive")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._state = _DONE
        self._remaining = 0
        self._head_request = False
        self._keep_alive = False

    def start(self, *, head_request: bool = False) -> None:
        """Expect the response to a request just sent (a HEAD's has no body)."""
        self._state = _HEAD
        self._head_request = head_request
        self._keep_alive = False

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def reusable(self) -> bool:
        """Whether another request may follow on this connection."""
        return self._state == _DONE and self._keep_alive and not self._buffer and not self._eof

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Head | bytes | _Sentinel:
        """The next Head, body bytes, END, or NEED_DATA; raises ResponseError."""
        while True:
            state = self._state
            if state == _HEAD:
                head = self._head()
                if head is None:
                    return NEED_DATA
                if head.status >= 200:
                    return head
                continue  # a 1xx: the real response follows
            if state == _DONE:
                return END
            if state == _CHUNK_SIZE or state == _CHUNK_END or state == _TRAILER:
                if not self._chunk_framing():
                    return NEED_DATA
                continue
            buffer = self._buffer
            if not buffer:
                if not self._eof:
                    return NEED_DATA
                if state == _UNTIL_CLOSE:
                    self._state = _DONE
                    return END
                raise ResponseClosed("the connection closed in the middle of the response body")
            if state == _UNTIL_CLOSE:
                data = bytes(buffer)
                buffer.clear()
                return data
            # _LENGTH or _CHUNK_DATA: at most what the framing still allows
            remaining = self._remaining
            if len(buffer) <= remaining:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:remaining])
                del buffer[:remaining]
            self._remaining = remaining = remaining - len(data)
            if not remaining:
                self._state = _DONE if state == _LENGTH else _CHUNK_END
            return data

    def _head(self) -> Head | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEADER_BYTES:
            if len(buffer) > MAX_HEADER_BYTES:
                raise ResponseError(f"the response head is larger than {MAX_HEADER_BYTES} bytes")
            if self._eof:
                raise ResponseClosed("the connection closed before a complete response head")
            return None
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise ResponseError(f"malformed status line {lines[0][:100]!r}")
        status = int(status_line[2])
        headers: Headers = []
        length: bytes | None = None
        chunked = close = False
        for line in lines[1:]:
            field = _HEADER_LINE.fullmatch(line)
            if field is None:
                raise ResponseError(f"malformed header line {line[:100]!r}")
            name, value = field[1].lower(), field[2]
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18 or (length is not None and value != length):
                    raise ResponseError(f"malformed Content-Length {value[:40]!r}")
                length = value
            elif name == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    raise ResponseError(f"unsupported Transfer-Encoding {value[:40]!r}")
                chunked = True
            elif name == b"connection":
                close = close or b"close" in [token.strip().lower() for token in value.split(b",")]
            headers.append((name, value))
        if status < 200:
            if status == 101:
                raise ResponseError("the child switched protocols, which the proxy never asks for")
            return Head(status, headers)  # skipped by next_event; the state stays _HEAD
        if chunked and length is not None:
            raise ResponseError("a response with both Content-Length and Transfer-Encoding is ambiguous")
        self._keep_alive = status_line[1] == b"1" and not close and not chunked
        if self._head_request or status == 204 or status == 304 or (length is not None and not int(length)):
            self._state = _DONE
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state, self._remaining = _LENGTH, int(length)
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False
        return Head(status, headers)

    def _chunk_framing(self) -> bool:
        """Consume one piece of chunk framing (size line, data's CRLF, trailer line); False when
        more bytes are needed."""
        buffer = self._buffer
        newline = buffer.find(b"\r\n")
        if newline < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise ResponseError("a chunk size or trailer line is too long")
            if self._eof:
                raise ResponseClosed("the connection closed in the middle of the response body")
            return False
        line = bytes(buffer[:newline])
        del buffer[: newline + 2]
        state = self._state
        if state == _CHUNK_END:
            if line:
                raise ResponseError("chunk data longer than its declared size")
            self._state = _CHUNK_SIZE
        elif state == _CHUNK_SIZE:
            size = _CHUNK_LINE.fullmatch(line)
            if size is None:
                raise ResponseError(f"malformed chunk size line {line[:40]!r}")
            self._remaining = int(size[1], 16)
            self._state = _CHUNK_DATA if self._remaining else _TRAILER
        elif not line:  # _TRAILER: the empty line ends the body (trailer fields are dropped)
            self._state = _DONE
        elif _HEADER_LINE.fullmatch(line) is None:
            raise ResponseError(f"malformed trailer line {line[:100]!r}")
        return True
