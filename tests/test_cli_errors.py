"""Every command ends with a documented exit code and, for anything a user causes, one line per
problem: errors raised inside anyio task groups are unwrapped at the CLI boundary; bugs keep their
traceback."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from llama_smart_proxy.supervisor import cli, errors
from llama_smart_proxy.supervisor.errors import PlanRefused, RuntimeFailure, UserError
from llama_smart_proxy.supervisor.proxy.access import ApiKeyFileError

README = Path(__file__).resolve().parent.parent / "README.md"


def run_validate_raising(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException) -> int:
    def handler(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_validate", handler)
    return cli.main(["validate", "--config", str(tmp_path / "c.toml")])


def test_user_errors_inside_nested_task_groups_are_one_line_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group = ExceptionGroup(
        "unhandled errors in a TaskGroup",
        [ApiKeyFileError("keys.txt: proxy.api_keys_file: cannot read: PermissionError"),
         ExceptionGroup("inner", [UserError("second"), UserError("second")])],
    )  # fmt: skip
    assert run_validate_raising(monkeypatch, tmp_path, group) == 2
    err = capsys.readouterr().err
    assert err == "llama-smart-proxy: keys.txt: proxy.api_keys_file: cannot read: PermissionError\nllama-smart-proxy: second\n"


@pytest.mark.parametrize(("error", "code"), [(RuntimeFailure("in use"), 1), (PlanRefused("no place"), 3), (KeyboardInterrupt(), 130)])
def test_the_first_error_in_a_group_gives_the_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException, code: int
) -> None:
    group = BaseExceptionGroup("unhandled errors in a TaskGroup", [error, UserError("also")])
    assert run_validate_raising(monkeypatch, tmp_path, group) == code


def test_a_bug_inside_a_group_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [UserError("fine"), ZeroDivisionError("a bug")])
    with pytest.raises(ExceptionGroup):
        run_validate_raising(monkeypatch, tmp_path, group)


def test_tiny_model_to_a_path_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    assert cli.main(["tiny-model", str(tmp_path / "file" / "tiny.gguf")]) == 2
    assert capsys.readouterr().err.startswith(f"llama-smart-proxy: {tmp_path / 'file' / 'tiny.gguf'}: cannot write: ")


def test_an_unknown_schema_name_is_invalid_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["schema", "configs"])
    assert exited.value.code == 2 and "invalid choice: 'configs'" in capsys.readouterr().err


def test_admin_against_a_proxy_that_does_not_answer_is_a_runtime_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert cli.main(["admin", "reload", "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"llama-smart-proxy: http://127.0.0.1:{port}/admin/reload: ") and err.count("\n") == 1


def test_the_readme_documents_every_exit_code_the_cli_uses() -> None:
    text = README.read_text()
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", text, re.MULTILINE)}
    used = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}  # defined once, there
    assert used == {0, 1, 2, 3, 4, 130} and used <= documented
