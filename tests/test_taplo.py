"""The config schema works in taplo, the engine of Even Better TOML, which the README recommends:
every example passes `taplo check` through its own `#:schema` line, and a broken config fails with
the file and line of the mistake.

taplo is the npm package `@taplo/cli`; `make test` (and so CI) installs it into the virtual
environment. A missing taplo fails here: an editor check that never runs proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCHEMA = ROOT / "schemas" / "config.schema.json"
INSTALL_HINT = "run `make test` (it installs taplo into .venv), or `npm install --global @taplo/cli`"


@pytest.fixture(scope="module")
def taplo() -> str:
    # the virtual environment's bin first: `make` puts taplo there even when it is not activated
    found = shutil.which("taplo", path=os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail(f"the taplo CLI is needed for this test and was not found: {INSTALL_HINT}")
    return found


def taplo_check(taplo: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    """One run over all `paths` (node starts slowly); no config file of the user's and no online
    catalogs: only each file's own `#:schema` line counts."""
    argv = [taplo, "check", "--colors", "never", "--no-auto-config", *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=paths[0].parent)


def test_taplo_accepts_every_example_through_its_schema_line(taplo: str) -> None:
    examples = sorted(EXAMPLES.glob("*.toml"))
    assert examples
    result = taplo_check(taplo, *examples)
    assert result.returncode == 0, result.stdout + result.stderr


# mistake -> (its section, its line, what taplo says about it)
BROKEN = {
    "boolean": ('[models.chat]\nfile = "chat.gguf"', 'allow_cpu = "yes"', '"yes" is not valid'),
    "unknown-key": ('[models.chat]\nfile = "chat.gguf"', "ctxx = 4096", "'ctxx' was unexpected"),
    "address": ("[proxy]", "listen = 8080", 'is not of type "string"'),
}


def test_taplo_rejects_broken_configs_naming_the_line(taplo: str, tmp_path: Path) -> None:
    configs = {}
    for mistake, (section, bad_line, _) in BROKEN.items():
        # the README's form of the schema line: an absolute path to the checkout's schema
        text = f"#:schema {SCHEMA}\n\n{section}\n{bad_line}\n"
        configs[mistake] = tmp_path / f"{mistake}.toml"
        configs[mistake].write_text(text)

    result = taplo_check(taplo, *configs.values())

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for mistake, (_, bad_line, message) in BROKEN.items():
        line = configs[mistake].read_text().splitlines().index(bad_line) + 1
        assert f"{configs[mistake]}:{line}:" in output, f"taplo did not name {configs[mistake].name} line {line}:\n{output}"
        assert message in output, output
