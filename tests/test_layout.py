"""The layout holds: `supervisor/` is one package per stage of the flow, each stage imports only
what its `__init__` docstring allows on its `May import:` line, and no module imports itself back
through others (every import counts: at the top, inside a function, under TYPE_CHECKING).

Also: every stage's docstring names each of its modules, so a reader finds a file from there, and
the proxy imports no other stage (it talks to the service through `proxy.backends.Backends`).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llama_smart_proxy"
# repository folder -> import name (pyproject.toml's package-dir)
FOLDERS = {"supervisor": f"{PACKAGE}.supervisor", "schemas": f"{PACKAGE}.schemas"}
SHARED = {"errors"}  # modules beside the stages that every stage may import
TOP = {"cli", "__main__"}  # the entry points: they may import any stage
MAY_IMPORT = re.compile(r"^May import:\s*(.*?)\.?\s*$", re.MULTILINE)


def modules(root: Path) -> dict[str, Path]:
    """Every module under the folders, by import name (a package by its own name)."""
    found = {}
    for folder, name in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def imports(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """The modules of ours `path` imports: `from a.b import c` is a.b.c when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    # importing a module imports its packages first; ours hold only docstrings, so they add no edge
    return {t for t in targets if known[t].name != "__init__.py"}


def stage_of(module: str, stages: set[str]) -> str:
    """'planning' for llama_smart_proxy.supervisor.planning.search, 'schemas' for any schema, and
    'supervisor' for a module beside the stages (cli, errors)."""
    parts = module.split(".")
    if parts[1] == "schemas":
        return "schemas"
    return parts[2] if len(parts) > 2 and parts[2] in stages else "supervisor"


def allowed_stages(root: Path) -> dict[str, set[str]]:
    """Each stage's `May import:` line, read from its package docstring."""
    allowed = {}
    for init in sorted((root / "supervisor").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        match = MAY_IMPORT.search(doc)
        assert match, f"{init.relative_to(root)}: its docstring has no 'May import:' line"
        listed = re.sub(r"\([^)]*\)", "", match.group(1))
        allowed[init.parent.name] = {word.strip() for word in listed.split(",") if word.strip()}
    return allowed


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {module: imports(path, module, known) for module, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def forbidden(root: Path) -> list[str]:
    """Every import a stage's docstring does not allow, as 'module imports target'."""
    allowed = allowed_stages(root)
    stages = set(allowed)
    problems = []
    for module, targets in graph(root).items():
        stage = stage_of(module, stages)
        for target in sorted(targets):
            other = stage_of(target, stages)
            if other == stage or stage == "supervisor" and module.rpartition(".")[2] in TOP:
                continue
            if stage == "schemas" or (stage == "supervisor" and module.rpartition(".")[2] in SHARED):
                ok = False  # the contracts and the shared errors import nothing of the stages
            elif other == "supervisor":
                ok = target.rpartition(".")[2] in SHARED
            else:
                ok = other in allowed.get(stage, set())
            if not ok:
                problems.append(f"{module} imports {target} ({stage} may import: {', '.join(sorted(allowed.get(stage, ())))})")
    return problems


def test_no_module_imports_itself_back_through_others() -> None:
    found = cycles(graph(ROOT))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_each_stage_imports_only_what_its_docstring_allows() -> None:
    problems = forbidden(ROOT)
    assert not problems, "imports a stage's docstring does not allow:\n" + "\n".join(problems)


def test_the_stages_allow_each_other_in_one_direction() -> None:
    allowed = allowed_stages(ROOT)
    edges = {stage: {other for other in others if other in allowed} for stage, others in allowed.items()}
    assert not cycles(edges), f"stages that may import each other: {cycles(edges)}"
    assert allowed["proxy"] <= {"schemas", "errors"}, "the proxy imports no other stage (DESIGN.md)"
    known = set(allowed) | {"schemas", "errors"}
    assert all(others <= known for others in allowed.values()), allowed


def test_every_stage_names_each_of_its_modules() -> None:
    for init in sorted((ROOT / "supervisor").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        named = set(re.findall(r"^- `(\w+)`:", doc, re.MULTILINE))
        present = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
        assert named == present, f"{init.relative_to(ROOT)}: not named {sorted(present - named)}, gone {sorted(named - present)}"


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize("late", [False, True], ids=["at the top", "inside a function"])
def test_the_checks_see_a_cycle_and_a_forbidden_import(tmp_path: Path, late: bool) -> None:
    indent = "    " if late else ""
    prefix = "def later():\n" if late else ""
    write(
        tmp_path,
        {
            "schemas/__init__.py": "",
            "supervisor/__init__.py": "",
            "supervisor/errors.py": "",
            "supervisor/proxy/__init__.py": '"""Proxy.\n\nMay import: schemas, errors.\n"""\n',
            "supervisor/proxy/server.py": f"{prefix}{indent}from llama_smart_proxy.supervisor.service import runtime\n",
            "supervisor/service/__init__.py": '"""Service.\n\nMay import: schemas, errors, proxy.\n"""\n',
            "supervisor/service/runtime.py": "from llama_smart_proxy.supervisor.proxy.server import x\n",
        },
    )
    assert forbidden(tmp_path) == [
        f"{PACKAGE}.supervisor.proxy.server imports {PACKAGE}.supervisor.service.runtime (proxy may import: errors, schemas)"
    ]
    assert cycles(graph(tmp_path)) == [[f"{PACKAGE}.supervisor.proxy.server", f"{PACKAGE}.supervisor.service.runtime"]]
