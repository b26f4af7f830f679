"""The exceptions a user can act on, translated to one line each at the CLI boundary, and the
exit codes every command ends with (the README's tables).

Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0  # success (`serve`: stopped by SIGTERM or SIGINT)
EXIT_FAILURE = 1  # a runtime failure: an address that cannot be bound, a proxy that does not answer
EXIT_INVALID = 2  # invalid input: the config, a flag, a file, the snapshot, the llama-server binary
EXIT_UNPLACED = 3  # a model cannot be placed (`plan`, and `serve`, which then starts nothing)
EXIT_FALLBACK = 4  # `plan --strict`: a model fell back to partial offload or the CPU
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C) before `serve` was serving: 128 + SIGINT, as a shell reports it


class UserError(Exception):
    """A mistake the user can fix (a file, a flag, the machine); printed without a traceback."""

    exit_code = EXIT_INVALID


@dataclass(frozen=True)
class ConfigProblem:
    file: Path | None
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = str(self.file) if self.file else "<config>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class RuntimeFailure(UserError):
    """Not a mistake in the input but the state of the machine or of a service (an address in use,
    a proxy that does not answer); one line all the same, exit 1."""

    exit_code = EXIT_FAILURE


class PlanRefused(UserError):
    """A plan that leaves a model without a place: `serve` starts nothing, as `plan` exits 3."""

    exit_code = EXIT_UNPLACED


class ConfigError(UserError):
    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"invalid config ({count}):\n" + "\n".join(f"  {p}" for p in problems))


class ModelFileError(UserError):
    """A GGUF file that cannot be read: missing, truncated, not GGUF, a split part missing."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class InventoryError(UserError):
    """An inventory snapshot that cannot be read."""


class LlamaServerError(UserError):
    """The llama-server binary is missing, does not run, or lacks a flag we use."""
