"""A relayed response framed by relay_framing reads, for any client, exactly as h11's server
would have written it: the same status, headers (but for order and case), body and keep-alive
decision. h11 is the reference; the proxy writes these bytes without it for speed."""

from __future__ import annotations

import h11
from hypothesis import given
from hypothesis import strategies as st

from llama_smart_proxy.supervisor.proxy.http import reason_phrase
from llama_smart_proxy.supervisor.proxy.relay_framing import relay_head
from tests.helpers import h11_reads

STATUSES = st.sampled_from([200, 201, 204, 304, 400, 404, 500, 502, 503])
METHODS = st.sampled_from([b"GET", b"POST", b"HEAD"])
VERSIONS = st.sampled_from([b"1.0", b"1.1"])
PIECES = st.lists(st.binary(max_size=40), max_size=5)


def client_request(method: bytes, version: bytes, close: bool) -> bytes:
    headers = b"Host: x\r\n" + (b"Connection: close\r\n" if close else b"")
    return b"%s / HTTP/%s\r\n%s\r\n" % (method, version, headers)


def read_as_client(method: bytes, raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """What a client sees in `raw`: (status, headers sorted, body)."""
    status, headers, body = h11_reads(raw, method)
    return status, sorted(headers), body


@given(
    status=STATUSES,
    method=METHODS,
    version=VERSIONS,
    request_close=st.booleans(),
    response_close=st.booleans(),
    sized=st.booleans(),
    pieces=PIECES,
)
def test_a_relayed_response_reads_as_h11_would_have_written_it(
    status: int, method: bytes, version: bytes, request_close: bool, response_close: bool, sized: bool, pieces: list[bytes]
) -> None:
    no_body = method == b"HEAD" or status in (204, 304)
    body = b"" if status in (204, 304) else b"".join(pieces)
    headers = [(b"content-type", b"text/event-stream")]
    if sized:
        headers.append((b"content-length", b"%d" % len(body)))
    if response_close:
        headers.append((b"connection", b"close"))

    server = h11.Connection(h11.SERVER)
    server.receive_data(client_request(method, version, request_close))
    request = server.next_event()
    assert isinstance(request, h11.Request)
    server.next_event()  # EndOfMessage
    expected = server.send(h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))) or b""
    if not no_body:
        for piece in pieces:
            expected += server.send(h11.Data(data=piece)) or b""
    expected += server.send(h11.EndOfMessage()) or b""

    head, framing = relay_head(
        status, headers, method=method, http_version=request.http_version, request_headers=list(request.headers)
    )
    ours = head + b"".join(framing.data(piece) for piece in ([] if status in (204, 304) else pieces)) + framing.end()

    assert read_as_client(method, ours) == read_as_client(method, expected)
    assert framing.keep_alive == (server.our_state is h11.DONE)
