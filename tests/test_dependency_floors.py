"""The installed libraries have every name the code takes from them.

CI runs the suite twice: with the newest versions pyproject.toml allows and with the lowest
(`.ci/run`). A floor set below the release that added a function the code calls (anyio's
`wait_readable` came in 4.7, `notify_closing` in 4.10) fails here by name, even where no other test
reaches the call: NVML's functions, for one, run only on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
# the runtime dependencies, by import name (nvidia-ml-py is imported as pynvml)
LIBRARIES = {"anyio", "h11", "pydantic", "pydantic_settings", "gguf", "pynvml", "numpy", "prometheus_client"}


def used_names(path: Path) -> set[str]:
    """Dotted names taken from LIBRARIES in one file: `anyio.notify_closing`, `pydantic.Field`..."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}  # local name -> module
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in LIBRARIES:
                    # `import anyio.to_thread` binds `anyio`; `import pynvml as nvml` binds `nvml`
                    aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in LIBRARIES:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = []
            inner: ast.expr = node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                names.add(".".join([aliases[inner.id], *reversed(chain)]))
    return names


def missing(dotted: str) -> bool:
    """Whether the installed library lacks `dotted`: modules are walked (importing submodules), and
    the first name that is not a module must exist; attributes of what it names are not checked."""
    parts = dotted.split(".")
    found: object = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=2):
        if not isinstance(found, ModuleType):
            return False
        if hasattr(found, part):
            found = getattr(found, part)
            continue
        try:
            found = importlib.import_module(".".join(parts[:depth]))
        except ImportError:
            return True
    return False


def test_every_name_the_code_takes_from_a_dependency_exists_in_the_installed_version() -> None:
    sources = [p for folder in ("supervisor", "schemas") for p in (ROOT / folder).rglob("*.py")]
    used = {name: path for path in sources for name in used_names(path)}
    assert any(name.startswith("anyio.") for name in used) and any(name.startswith("pynvml.") for name in used)
    absent = sorted(f"{name} (used in {used[name].relative_to(ROOT)})" for name in used if missing(name))
    assert not absent, "the installed versions lack these; raise the floors in pyproject.toml:\n" + "\n".join(absent)


def test_the_check_sees_a_name_a_library_lacks(tmp_path: Path) -> None:
    source = tmp_path / "uses.py"
    source.write_text("import anyio\nimport pynvml as nvml\nanyio.no_such_function()\nnvml.nvmlInit()\n")
    names = used_names(source)
    assert names == {"anyio.no_such_function", "pynvml.nvmlInit"}
    assert [name for name in sorted(names) if missing(name)] == ["anyio.no_such_function"]
