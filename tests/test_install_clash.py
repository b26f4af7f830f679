"""Installed, llama-smart-proxy clashes with nothing.

Supervisor (supervisord), common on the bare-metal servers this runs on, is imported as `supervisor`,
the name of this repository's own folder: a wheel that installed that folder at the top level
overwrote Supervisor's files, and uninstalling it deleted them. Here a fresh virtual environment
gets Supervisor from the package registry, then a wheel built from this checkout (without the
`llama` extra, which builds llama.cpp), then loses it again; supervisord must start a program
before, during and after, and every file Supervisor installed must stay as it was.

Needs the package registry (Supervisor, the build requirements and the runtime dependencies come
from it; pip's cache makes a second run fast), as CI has.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PROJECT["tool"]["setuptools"]["package-dir"]
IMPORT_NAME = "llama_smart_proxy"
PIP_TIMEOUT_S = 600  # a cold cache downloads every dependency; a warm one takes seconds

pytestmark = pytest.mark.slow


def run(*argv: str | Path, cwd: Path, timeout: float = PIP_TIMEOUT_S) -> str:
    """Run a command in `cwd`; fail the test with its output when it fails. Commands run beside the
    fresh environment, never in this checkout, whose own `supervisor/` folder would shadow
    Supervisor's for `python -c` (the current directory comes first on its path)."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment (with pip) holding Supervisor from the package registry."""
    path = tmp_path_factory.mktemp("clash") / "venv"
    run(sys.executable, "-m", "venv", path, cwd=path.parent)
    run(path / "bin/python", "-m", "pip", "install", "--quiet", "supervisor", cwd=path.parent)
    return path


@pytest.fixture(scope="module")
def wheel(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama-smart-proxy wheel, built from a copy of this checkout (a build writes `build/` and
    `*.egg-info` beside its sources)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", *PACKAGE_DIRS.values()):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        copy(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    argv = [venv / "bin/python", "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", dist, source]
    build = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, cwd=venv.parent)
    assert build.returncode == 0, f"the wheel build exited {build.returncode}:\n{build.stdout}\n{build.stderr}"
    (dist / BUILD_LOG).write_text(build.stdout + build.stderr)  # the build backend speaks on stderr
    (built,) = dist.glob("llama_smart_proxy-*.whl")
    return built


BUILD_LOG = "build.log"  # what `pip wheel -v` printed, beside the wheel
# Warnings that come from the machine, never from this project: pip's index settings and the
# interpreter's byte-compiling switch (PYTHONDONTWRITEBYTECODE).
MACHINE_WARNINGS = ("WARNING: Location ", "byte-compiling is disabled")


def test_building_the_wheel_prints_no_warning_the_project_causes(wheel: Path) -> None:
    # the `license` table form once made setuptools print a deprecation warning at every install
    log = (wheel.parent / BUILD_LOG).read_text()
    assert "Created wheel for" in log
    ours = [line for line in log.splitlines() if "warning" in line.lower() and not any(m in line for m in MACHINE_WARNINGS)]
    assert ours == []


def supervisor_damage(venv: Path) -> list[str]:
    """Every file of Supervisor's install record that is now missing or changed."""
    check = textwrap.dedent(
        """
        import base64, hashlib, importlib.metadata
        for f in importlib.metadata.distribution("supervisor").files:
            if f.hash is None:
                continue
            path = f.locate()
            if not path.is_file():
                print(f"missing {f}")
                continue
            digest = hashlib.new(f.hash.mode, path.read_bytes()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != f.hash.value:
                print(f"changed {f}")
        """
    )
    return run(venv / "bin/python", "-c", check, cwd=venv.parent).splitlines()


@pytest.fixture
def supervisord_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a short directory: the control socket's path must fit in a sockaddr_un (108 bytes)
    here = tmp_path_factory.mktemp("sv")
    config = here / "supervisord.conf"
    config.write_text(
        textwrap.dedent(
            """\
            [supervisord]
            nodaemon = true
            logfile = %(here)s/supervisord.log
            pidfile = %(here)s/supervisord.pid
            childlogdir = %(here)s

            [unix_http_server]
            file = %(here)s/control.sock

            [supervisorctl]
            serverurl = unix://%(here)s/control.sock

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [program:sleeper]
            command = sleep 600
            startsecs = 1
            """
        )
    )
    return config


def assert_supervisord_runs_a_program(venv: Path, config: Path) -> None:
    """supervisord starts, runs `sleep` (supervisorctl says RUNNING), and shuts down cleanly."""
    bin_dir = venv / "bin"
    daemon = subprocess.Popen([bin_dir / "supervisord", "-c", config], cwd=venv.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def running() -> bool:
            assert daemon.poll() is None, f"supervisord exited {daemon.returncode}:\n{daemon.communicate()[0]}"
            status = subprocess.run([bin_dir / "supervisorctl", "-c", config, "status", "sleeper"], capture_output=True, text=True, cwd=venv.parent)
            return " RUNNING " in status.stdout

        wait_for(running, timeout=30, what="supervisorctl status: sleeper RUNNING")
        run(bin_dir / "supervisorctl", "-c", config, "shutdown", cwd=venv.parent, timeout=30)
        assert daemon.wait(timeout=30) == 0, daemon.communicate()[0]
    finally:
        if daemon.poll() is None:
            daemon.terminate()  # supervisord stops its programs on SIGTERM
            daemon.wait(timeout=30)


def test_wheel_installs_only_its_own_import_name_and_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    dist_info = next(t for t in top_level if t.endswith(".dist-info"))
    assert top_level == {IMPORT_NAME, dist_info}, f"the wheel installs {sorted(top_level)}"
    assert dist_info.startswith("llama_smart_proxy-")
    # every module and schema of the checkout, under the name package-dir gives its folder
    expected = {
        f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}"
        for package, folder in PACKAGE_DIRS.items()
        for path in (ROOT / folder).rglob("*")
        if path.suffix == ".py" or path.name.endswith(".schema.json") or path.parent.name == "ui"  # the status page
        if "__pycache__" not in path.parts
    }
    assert expected - set(names) == set(), "the wheel lacks these (list the package in pyproject.toml)"


def test_supervisord_keeps_working_when_llama_smart_proxy_is_installed_and_removed(
    venv: Path, wheel: Path, supervisord_config: Path
) -> None:
    python = venv / "bin/python"
    assert_supervisord_runs_a_program(venv, supervisord_config)

    run(python, "-m", "pip", "install", "--quiet", wheel, cwd=venv.parent)
    assert supervisor_damage(venv) == []
    assert_supervisord_runs_a_program(venv, supervisord_config)
    # and the installed proxy itself works, under its own import name
    assert "plan" in run(venv / "bin/llama-smart-proxy", "--help", cwd=venv.parent)

    run(python, "-m", "pip", "uninstall", "--yes", "--quiet", "llama-smart-proxy", cwd=venv.parent)
    assert supervisor_damage(venv) == []
    assert_supervisord_runs_a_program(venv, supervisord_config)
    imports = run(python, "-c", "import supervisor.process, supervisor.options; print('ok')", cwd=venv.parent)
    assert imports.strip() == "ok"
