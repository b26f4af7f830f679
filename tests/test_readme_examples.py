"""The README's client examples run as written against `make run` (`serve --demo`).

The examples are read from README.md itself, so the README cannot drift from what the demo serves:
every `curl` line aimed at the demo's address, and every Python block that uses the OpenAI SDK,
runs against a real `llama-smart-proxy serve --demo` (the real llama-server, the tiny models) on a
free port; only the address changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_ADDRESS = "127.0.0.1:8080"  # what `make run` listens on, and so what the README's examples name
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

pytestmark = [pytest.mark.llama_server, pytest.mark.slow]


@dataclass(frozen=True)
class Example:
    kind: str  # "curl" or "python"
    line: int  # where it starts in README.md
    code: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.kind}"


def readme_examples(text: str) -> list[Example]:
    examples = []
    for fence in FENCE.finditer(text):
        language, body = fence.group(1), fence.group(2)
        first_line = text.count("\n", 0, fence.start(2)) + 1
        if language == "python" and "from openai import" in body:
            examples.append(Example("python", first_line, body))
        elif language in ("sh", "bash", "shell"):
            # one command per logical line: a trailing backslash continues it
            offset = 0
            for command in re.split(r"(?<!\\)\n", body):
                if command.startswith("curl ") and DEMO_ADDRESS in command:
                    examples.append(Example("curl", first_line + offset, command))
                offset += command.count("\n") + 1
    return examples


EXAMPLES = readme_examples(README.read_text())


def test_the_readme_has_client_examples_for_chat_embeddings_and_the_sdk() -> None:
    curls = " ".join(e.code for e in EXAMPLES if e.kind == "curl")
    assert "/v1/chat/completions" in curls and "/v1/embeddings" in curls, curls
    python = [e for e in EXAMPLES if e.kind == "python"]
    assert python and any("embeddings.create" in e.code for e in python)


@pytest.fixture(scope="module")
def demo(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`llama-smart-proxy serve --demo` on a free port, with every resident model ready."""
    directory = tmp_path_factory.mktemp("demo")
    address = f"127.0.0.1:{free_port()}"
    # its own cache directory for the tiny models, and the llama-server the suite uses
    env = {**os.environ, "XDG_CACHE_HOME": str(directory / "cache"), "PATH": f"{llama_server.parent}{os.pathsep}{os.environ['PATH']}"}
    log = directory / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_smart_proxy.supervisor", "serve", "--demo", "--listen", address],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert process.poll() is None, f"serve --demo exited {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                models = httpx.get(f"http://{address}/status", timeout=2).json()["models"]
            except httpx.HTTPError:
                return False
            return bool(models) and all(m["state"] == "ready" for m in models)

        wait_for(ready, timeout=90, what="serve --demo to be ready")
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def check_curl_output(command: str, output: str) -> None:
    """What a person would see: a stream that ends with [DONE], the proxy's own event streams, or
    JSON with what they asked for."""
    if "/events" in command or "/logs/" in command:
        data = [json.loads(line[len("data: "):]) for line in output.splitlines() if line.startswith("data: ")]
        assert data, output
        if "/events" in command:  # starts with /status's body
            assert {m["name"] for m in data[0]["models"]} >= {"tiny", "tiny-embed"}, output
        else:
            assert data[0]["model"] == "tiny" and data[0]["lines"], output
        return
    if '"stream": true' in command:
        events = [line for line in output.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", output
        chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks), output
        return
    answer = json.loads(output)
    assert "error" not in answer, output
    if "/v1/embeddings" in command:
        vector = answer["data"][0]["embedding"]
        assert len(vector) > 1 and all(isinstance(x, float) for x in vector), output
    elif "/chat/completions" in command:
        assert answer["choices"][0]["message"]["content"], output


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example_runs_as_written_against_the_demo(example: Example, demo: str, tmp_path: Path) -> None:
    code = example.code.replace(DEMO_ADDRESS, demo)
    if example.kind == "curl":
        assert shutil.which("curl"), "the README's examples use curl: install it"
        argv = ["bash", "-c", code]
    else:
        script = tmp_path / "example.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # curl's --max-time ends an endless event stream with its exit code 28 ("timed out")
    ended = {0, 28} if example.kind == "curl" and "--max-time" in code else {0}
    assert result.returncode in ended, f"{example.id} failed:\n{result.stdout}\n{result.stderr}"
    if example.kind == "curl":
        check_curl_output(code, result.stdout)
    else:
        assert result.stdout.strip(), f"{example.id} printed nothing"
        assert not result.stderr.strip(), f"{example.id} wrote to stderr:\n{result.stderr}"
