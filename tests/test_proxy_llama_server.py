"""The real llama-server on the tiny model answers through the proxy: a non-streamed and a
streamed chat completion, and the proxy's own routes."""

from __future__ import annotations

import json

import httpx
import pytest

from llama_smart_proxy.supervisor.proxy.backends import Upstream
from tests.fakes.static_backends import StaticBackends, running_proxy

pytestmark = pytest.mark.llama_server


def test_real_llama_server_answers_streamed_and_non_streamed_chat_through_the_proxy(tiny_llama_server: int) -> None:
    port = tiny_llama_server
    backends = StaticBackends({"tiny": Upstream("127.0.0.1", port)}, aliases={"gpt-4o-mini": "tiny"})
    with running_proxy(backends) as (server, base), httpx.Client(base_url=base, timeout=60) as client:
        messages = [{"role": "user", "content": "hello"}]
        response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": messages, "max_tokens": 8})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 8

        request = {"model": "tiny", "messages": messages, "max_tokens": 8, "stream": True}
        events = []
        with client.stream("POST", "/v1/chat/completions", json=request) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content") is not None) >= 1

        assert client.get("/upstream/tiny/props").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/health").status_code == 200
        assert 'model="tiny",status="200"' in client.get("/metrics").text
        # Keep-alive carried the non-streamed requests; llama-server (build 11434) closes the
        # connection after a streamed response, so exactly one more was opened after it.
        assert server.pool.opened == 2

