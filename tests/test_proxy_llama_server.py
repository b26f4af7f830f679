"""The real llama-server on the tiny model answers through the proxy: a non-streamed and a
streamed chat completion, the proxy's own routes, and the model name in responses."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

from llama_smart_proxy.schemas.config import LlamaServerSettings
from llama_smart_proxy.schemas.launch import served_model_name
from llama_smart_proxy.supervisor.children.launch import build_command
from llama_smart_proxy.supervisor.proxy.backends import Upstream
from tests.fakes.static_backends import StaticBackends, running_proxy
from tests.fakes.supervision import cpu_spec
from tests.helpers import free_port, llama_server_process, wait_for

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
        # llama-server (build 11434) closes the connection after a streamed response: the pool
        # opens its successor in the background
        wait_for(lambda: server.pool.idle_count() == 1, timeout=5, what="the successor connection")

        assert client.get("/upstream/tiny/props").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/health").status_code == 200
        assert 'model="tiny",status="200"' in client.get("/metrics").text
        # keep-alive carried the requests: the first connection, then the stream's successor
        assert (server.pool.opened, server.pool.reused) == (2, 2)



@pytest.fixture(scope="module", params=["tiny", "tiny, v2"])
def launched_tiny(request: pytest.FixtureRequest, llama_server, tiny_model) -> Iterator[tuple[str, int]]:
    """The real llama-server started with the argv the supervisor builds (`--alias` included) for a
    model named as the param says (a comma and a space are what `--alias` cannot carry as is)."""
    name = request.param
    port = free_port()
    command = build_command(cpu_spec(model=name, file=str(tiny_model)), binary=llama_server, port=port, settings=LlamaServerSettings())
    with llama_server_process(command.argv, port, env={**os.environ, **command.env}):
        yield name, port


def test_responses_carry_the_model_name_the_client_asked_for_never_the_file_path(launched_tiny, tiny_model) -> None:
    name, port = launched_tiny
    served = served_model_name(name)
    # The child itself answers to the config's name (--alias), not to the GGUF's path.
    direct = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
    assert direct["data"][0]["id"] == served
    backends = StaticBackends({name: Upstream("127.0.0.1", port)}, aliases={"gpt-4o-mini": name})
    messages = [{"role": "user", "content": "hello"}]
    with running_proxy(backends) as (_, base), httpx.Client(base_url=base, timeout=60) as client:
        for asked in (name, "gpt-4o-mini"):
            response = client.post("/v1/chat/completions", json={"model": asked, "messages": messages, "max_tokens": 4})
            assert response.status_code == 200, response.text
            assert response.json()["model"] == asked
            assert str(tiny_model) not in response.text
            response = client.post("/v1/completions", json={"model": asked, "prompt": "hi", "max_tokens": 4})
            assert response.json()["model"] == asked

            raw = b""
            request = {"model": asked, "messages": messages, "max_tokens": 8, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=request) as stream:
                assert stream.status_code == 200
                for data in stream.iter_raw():
                    raw += data
            events = [line.removeprefix(b"data: ") for line in raw.split(b"\n") if line.startswith(b"data: {")]
            assert len(events) >= 2
            assert {json.loads(e)["model"] for e in events} == {asked}
            assert str(tiny_model).encode() not in raw
