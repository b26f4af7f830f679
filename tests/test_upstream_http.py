"""The proxy's reading of a child's responses (upstream_http) agrees with h11, the reference it
replaced on this side, on every framing and on any split of the bytes into reads; what h11 refuses
it refuses too, and a connection is reused only where another request may safely follow."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_smart_proxy.supervisor.proxy.upstream_http import (
    END,
    NEED_DATA,
    Head,
    ResponseClosed,
    ResponseError,
    ResponseReader,
    request_bytes,
)
from tests.helpers import h11_reads


def read_all(pieces: list[bytes], *, head_request: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """(status, headers, body, reusable) of one response fed in `pieces`, then EOF if needed."""
    reader = ResponseReader()
    reader.start(head_request=head_request)
    feed = iter([*pieces, b""])
    head: Head | None = None
    body = b""
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            reader.receive_data(next(feed))
        elif isinstance(event, Head):
            head = event
        elif event is END:
            assert head is not None
            return head.status, head.headers, body, reader.reusable
        else:
            assert isinstance(event, bytes) and event
            body += event


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)]) if raw[a:b]]


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        piece = body[pos : pos + size]
        if not piece:
            break
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
        pos += size
    if pos < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - pos, body[pos:])
    return out + b"0\r\n\r\n"


bodies = st.binary(max_size=300)
cut_points = st.lists(st.integers(min_value=0, max_value=2000), max_size=12)


@given(body=bodies, cuts=cut_points)
def test_a_sized_body_reads_as_h11_reads_it_however_it_is_split(body: bytes, cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    status, headers, got, reusable = read_all(split(raw, cuts))
    assert (status, headers, got) == h11_reads(raw)
    assert reusable


@given(body=bodies, sizes=st.lists(st.integers(min_value=1, max_value=80), max_size=8), cuts=cut_points)
def test_a_chunked_body_reads_as_h11_reads_it_however_it_is_split(body: bytes, sizes: list[int], cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
    status, headers, got, reusable = read_all(split(raw, cuts))
    assert (status, headers, got) == h11_reads(raw)
    assert not reusable  # llama-server closes the connection after a streamed response


@given(body=bodies, cuts=cut_points)
def test_a_body_without_framing_ends_with_the_connection(body: bytes, cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body
    status, headers, got, reusable = read_all(split(raw, cuts))
    assert (status, headers, got) == h11_reads(raw)
    assert not reusable


def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert read_all([raw])[:3] == (200, [(b"content-length", b"2")], b"ok")


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_follows_204_and_304(status: int) -> None:
    assert read_all([b"HTTP/1.1 %d X\r\n\r\n" % status])[2:] == (b"", True)


def test_the_answer_to_head_has_no_body_whatever_its_length_says() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
    assert read_all([raw], head_request=True) == (200, [(b"content-length", b"50")], b"", True)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_a_connection_the_child_will_close_is_not_reused(head: bytes) -> None:
    assert read_all([head])[3] is False


def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    assert read_all([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE"])[3] is False


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : value\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName: a\x00b\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n",
    ],
)
def test_what_is_not_valid_http_is_a_response_error(raw: bytes) -> None:
    with pytest.raises(ResponseError) as caught:
        read_all([raw])
    assert not isinstance(caught.value, ResponseClosed)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    ],
)
def test_a_connection_that_ends_before_the_response_is_a_response_closed(raw: bytes) -> None:
    with pytest.raises(ResponseClosed):
        read_all([raw] if raw else [])


def test_chunk_data_is_handed_over_as_it_arrives_not_when_the_chunk_is_whole() -> None:
    reader = ResponseReader()
    reader.start()
    reader.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nfirst")
    assert isinstance(reader.next_event(), Head)
    assert reader.next_event() == b"first"
    assert reader.next_event() is NEED_DATA


def test_a_request_is_written_as_h11_parses_it() -> None:
    raw = request_bytes(b"POST", b"/v1/chat/completions?x=1", [(b"host", b"127.0.0.1:9"), (b"content-length", b"2")], b"{}")
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target, list(request.headers)) == (
        b"POST",
        b"/v1/chat/completions?x=1",
        [(b"host", b"127.0.0.1:9"), (b"content-length", b"2")],
    )
    assert server.next_event() == h11.Data(data=b"{}")
    assert isinstance(server.next_event(), h11.EndOfMessage)
