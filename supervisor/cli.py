"""The one entry point: `llama-smart-proxy <command>`.

Each command is a `cmd_<name>(args) -> exit code` function. A `UserError` anywhere becomes one
line on stderr and its exit code; no user mistake prints a traceback.

Exit codes: 0 success; 1 a runtime failure; 2 invalid input (config, flags, files);
`plan` adds 3 (a model cannot be placed) and 4 (--strict: a model fell back to partial or CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from supervisor.config import load_config
from supervisor.errors import UserError

log = logging.getLogger("llama-smart-proxy")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    config = loaded.config
    files = len(loaded.files)
    print(
        f"{loaded.path}: valid, {len(config.models)} model{'s' if len(config.models) != 1 else ''}"
        + (f", {files} files" if files > 1 else "")
    )
    return EXIT_OK


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from supervisor.tinymodel import write_tiny_model

    path = write_tiny_model(args.path)
    print(f"wrote {path} ({path.stat().st_size} bytes): a tiny random llama model for tests and demos")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.generate import schema_texts

    for name, text in schema_texts().items():
        if args.name in (None, name):
            print(text, end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-smart-proxy",
        description="Plan, launch and supervise llama-server for many GGUF models behind one "
        "OpenAI-compatible address.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("validate", cmd_validate, "check a config file and report every problem")
    p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config")

    p = command("tiny-model", cmd_tiny_model, "write the tiny test model (a few hundred KB)")
    p.add_argument("path", type=Path, help="where to write the GGUF file")

    p = command("schema", cmd_schema, "print the JSON Schema of the config, plan or inventory")
    p.add_argument("name", nargs="?", help="config, plan or inventory (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"llama-smart-proxy: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
