"""Installed, the code lives under `llama_smart_proxy.*`: no file may import the repository's
folder names (`supervisor`, `schemas`) as top-level packages, which would work in a checkout and
break, or clash with Supervisor (supervisord), once installed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("supervisor", "schemas")


def python_files() -> list[Path]:
    skip = {".venv", ".git", "build"}
    return [p for p in ROOT.rglob("*.py") if not skip.intersection(p.relative_to(ROOT).parts)]


def test_no_file_imports_the_folders_as_top_level_packages() -> None:
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not offenders, "import these through llama_smart_proxy.*:\n" + "\n".join(offenders)
