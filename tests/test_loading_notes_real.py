"""Loading notes against the REAL tiny llama-server: a streaming request to a cold model gets SSE
comments while it loads, and the OpenAI Python SDK parses that stream into the same chunks as a
warm model's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.service_harness import Harness

pytestmark = pytest.mark.llama_server

REQUEST: dict[str, Any] = {
    "model": "chat",
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 8,
    "temperature": 0,
    "seed": 7,
    "stream": True,
}


class _Tee(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, sink: list[bytes]) -> None:
        self._stream = stream
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._sink.append(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class RecordingTransport(httpx.BaseTransport):
    """Keeps the bytes of each response body the SDK reads, as they came."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.bodies: list[list[bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        sink: list[bytes] = []
        self.bodies.append(sink)
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Tee(response.stream, sink), extensions=response.extensions
        )

    def close(self) -> None:
        self._inner.close()


def chunk_view(chunk: Any) -> tuple:
    """What a client uses of a chunk (ids and timestamps differ between any two requests)."""
    return (
        chunk.object,
        chunk.model,
        tuple((c.index, c.delta.role, c.delta.content, c.finish_reason) for c in chunk.choices),
    )


def test_a_cold_stream_gets_loading_notes_and_the_sdk_yields_the_same_chunks_as_a_warm_one(
    tmp_path: Path, tiny_model: Path, llama_server: Path
) -> None:
    harness = Harness.create(tmp_path, tiny_model, binary=llama_server)
    # a tiny model loads in a fraction of a second: a note every 10 ms makes sure some are sent
    config = harness.write_config({"chat": {"mode": "on-demand"}}, proxy='loading_comment_interval = "10ms"')
    with harness.serving(config) as running:
        unload = f"{running.base}/admin/models/chat/unload"
        with httpx.stream("POST", f"{running.base}/v1/chat/completions", json=REQUEST, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = list(response.iter_lines())
        notes = [line for line in lines if line.startswith(":")]
        data = [line for line in lines if line.startswith("data: ")]
        # a note between the model's readiness and the request's lease says "waiting for"
        assert notes and all(note.startswith((": loading chat ", ": waiting for chat ")) for note in notes), notes
        assert lines.index(data[0]) > lines.index(notes[-1])  # every note before the child's first byte
        assert data[-1] == "data: [DONE]"

        assert httpx.post(unload, timeout=30).status_code == 200
        transport = RecordingTransport()
        client = OpenAI(base_url=f"{running.base}/v1", api_key="unused", http_client=httpx.Client(transport=transport))
        cold = [chunk_view(chunk) for chunk in client.chat.completions.create(**REQUEST)]
        warm = [chunk_view(chunk) for chunk in client.chat.completions.create(**REQUEST)]
        assert b": loading chat " in b"".join(transport.bodies[0])  # the SDK read a stream with notes
        assert b": loading" not in b"".join(transport.bodies[1])
        assert cold == warm
        assert any(view[2] and view[2][0][2] for view in cold)  # it said something
        assert cold[0][1] == "chat"
