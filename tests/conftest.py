from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_smart_proxy.supervisor.children.llama_binary import find_llama_server
from llama_smart_proxy.supervisor.errors import LlamaServerError
from llama_smart_proxy.supervisor.service.tinymodel import write_tiny_model
from tests.helpers import free_port, llama_server_process


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


@pytest.fixture(scope="session")
def tiny_llama_server(llama_server: Path, tiny_model: Path) -> Iterator[int]:
    """The real llama-server on the tiny model, on the CPU, started directly; yields its port."""
    port = free_port()
    argv = [str(llama_server), "-m", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "512", "-np", "1", "-ngl", "0", "--fit", "off"]  # fmt: skip
    with llama_server_process(argv, port):
        yield port
