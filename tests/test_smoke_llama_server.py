"""The real llama-server loads the tiny model made by code and answers a chat completion."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.llama_server


def test_real_llama_server_answers_chat_completion_on_tiny_model(tiny_llama_server: int) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{tiny_llama_server}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        timeout=30,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 8
