"""The real llama-server loads the tiny model made by code and answers a chat completion."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.llama_server


def test_real_llama_server_answers_chat_completion_on_tiny_model(llama_server: Path, tiny_model: Path) -> None:
    port = free_port()
    argv = [str(llama_server), "-m", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "512", "-np", "1", "-ngl", "0", "--fit", "off"]  # fmt: skip
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert child.poll() is None, f"llama-server exited with {child.returncode}"
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=30, what="llama-server /health")
        response = httpx.post(
            f"{base}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
            timeout=30,
        )
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 8
    finally:
        child.terminate()
        child.wait(timeout=10)
