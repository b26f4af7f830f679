"""Read the TOML config (and the files it includes) into a `schemas.Config`, or say every problem.

Where a value comes from, highest first (written down here and nowhere else):
  1. command-line flags (`serve --listen`), passed in as `overrides`;
  2. environment variables LLAMA_SMART_PROXY_LISTEN, LLAMA_SMART_PROXY_API_KEYS (comma-separated),
     LLAMA_SMART_PROXY_LOG_LEVEL (read through pydantic-settings);
  3. the TOML file, and the [models.*] tables of the files its `include` names;
  4. the defaults in schemas/config.py; `prompt_cache.dir`'s depends on the environment
     ($XDG_CACHE_HOME, else ~/.cache), so it is filled in here and the plan never reads the
     environment.

Every problem is reported at once, each with its file, line, dotted key and what was expected;
nothing here prints or exits.

The merged tables are validated as the JSON they are, strictly (`strict=True` in pydantic's JSON
mode): a value is accepted exactly when schemas/config.schema.json, generated from the same models,
accepts its type (no "yes" for a boolean, no "8" for an integer). A TOML date or time, which JSON
lacks, is the string taplo also sees. Beyond the schema: files the config names exist and are
readable, each GGUF file is checked as far as it can be without loading weights
(supervisor/memory/check.py), and `args`/`env` may not set what the launch owns
(supervisor/config/owned_options.py).
"""

from __future__ import annotations

import datetime
import difflib
import glob
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from llama_smart_proxy.schemas.config import Config, fleet_problems, name_clashes, parse_listen
from llama_smart_proxy.supervisor.config.owned_options import owned_option, owned_variable
from llama_smart_proxy.supervisor.errors import ConfigError, ConfigProblem, UserError

KeyPath = tuple[str | int, ...]
ENV_PREFIX = "LLAMA_SMART_PROXY_"


class EnvOverrides(BaseSettings):
    """Deployment settings an environment may override (source 2 above)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    listen: str | None = None
    api_keys: str | None = None
    log_level: str | None = None

    def as_overrides(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self.listen is not None:
            values["proxy.listen"] = self.listen
        if self.api_keys is not None:
            values["proxy.api_keys"] = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.log_level is not None:
            values["proxy.log_level"] = self.log_level
        return values


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    path: Path
    files: tuple[Path, ...] = field(default=())
    """Every file read: the config itself, then its includes. A reload watches these."""
    digest: str = ""
    """files_digest of the bytes read: a save is new when the files no longer give this."""
    include_patterns: tuple[str, ...] = field(default=())
    """The `include` globs, absolute: a new file that matches one is a change too."""


@dataclass
class _Source:
    """One TOML file: its path, where each key sits, and the raw table."""

    path: Path
    lines: dict[KeyPath, int]
    data: dict[str, Any]
    raw: bytes


def load_config(
    path: Path | str,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_model_files: bool = True,
    contents: Mapping[Path, bytes] | None = None,
) -> LoadedConfig:
    """Parse, merge, validate and check the config; raise ConfigError listing every problem.

    require_model_files=False lets the GGUF files be absent (`plan` from a snapshot in CI, where
    the headers travel in the snapshot); every other file must still exist. `contents`: config
    files' bytes already read (absolute paths), parsed instead of reading those files again.
    """
    path = Path(path).absolute()
    problems: list[ConfigProblem] = []
    main = _read_toml(path, problems, contents)
    if main is None:
        raise ConfigError(problems)

    sources = [main]
    owner: dict[str, _Source] = {}  # model name -> the file that defines it
    for name in main.data.get("models", {}) if isinstance(main.data.get("models"), dict) else {}:
        owner[name] = main
    for included in _included_files(main, problems):
        source = _read_toml(included, problems, contents)
        if source is None:
            continue
        sources.append(source)
        _merge_models(main, source, owner, problems)

    origin: dict[KeyPath, str] = {}
    data = main.data
    env = EnvOverrides().as_overrides()
    for origin_name, values in (("environment", env), ("command line", overrides or {})):
        for dotted, value in values.items():
            key_path = tuple(dotted.split("."))
            _set(data, key_path, value)
            origin[key_path] = (
                f"{ENV_PREFIX}{key_path[-1].upper()}" if origin_name == "environment" else "command line"
            )
    _resolve_paths(data, owner, main)
    _default_cache_dir(data)

    def locate(key_path: KeyPath) -> tuple[Path | None, int | None]:
        for length in range(len(key_path), 0, -1):
            if key_path[:length] in origin:
                return Path(origin[key_path[:length]]), None
        source = main
        if len(key_path) >= 2 and key_path[0] == "models" and key_path[1] in owner:
            source = owner[str(key_path[1])]
        return source.path, _line_of(source.lines, key_path)

    models = data.get("models")
    if isinstance(models, dict):
        aliases = {
            name: [a for a in m.get("aliases", []) if isinstance(a, str)]
            for name, m in models.items()
            if isinstance(m, dict) and isinstance(m.get("aliases", []), list)
        }
        for key_path, message in name_clashes(aliases):
            problems.append(ConfigProblem(*locate(key_path), _dotted(key_path), message))
    for key_path, message in fleet_problems(*_fleet_tables(data)):
        problems.append(ConfigProblem(*locate(key_path), _dotted(key_path), message))

    config: Config | None = None
    try:
        config = Config.model_validate_json(json.dumps(data, default=_toml_only), strict=True)
    except ValidationError as exc:
        explained: dict[KeyPath, list[str]] = {}
        for error in exc.errors():
            if error["type"] in ("name_clash", "fleet"):
                continue  # reported above, with its key path
            key_path = _key_path(data, tuple(error["loc"]))
            if error["type"] == "unknown_model":
                key_path = ("proxy", "default_model")
            explained.setdefault(key_path, []).append(_explain(error))
        for key_path, messages in explained.items():
            problems.append(ConfigProblem(*locate(key_path), _dotted(key_path), _either(messages)))

    checks = _check_files(data, require_model_files) + _check_launch_options(data)
    checks += _check_ports(config) if config is not None else []
    for key_path, message in checks:
        problems.append(ConfigProblem(*locate(key_path), _dotted(key_path), message))

    if problems or config is None:
        problems.sort(key=lambda p: (str(p.file), p.line or 0))
        raise ConfigError(problems)
    return LoadedConfig(
        config=config,
        path=path,
        files=tuple(s.path for s in sources),
        digest=files_digest((s.path, s.raw) for s in sources),
        include_patterns=tuple(
            str(main.path.parent / p) for p in main.data.get("include", []) if isinstance(p, str)
        ),
    )


def _fleet_tables(data: dict[str, Any]) -> tuple[list[str], dict[str, tuple[list[str] | None, int | None]]]:
    """fleet_problems' inputs from the raw tables; a value of the wrong type is left to the schema."""
    hosts = data.get("hosts")
    names = list(hosts) if isinstance(hosts, dict) else []
    models = data.get("models")
    fleet: dict[str, tuple[list[str] | None, int | None]] = {}
    for name, table in models.items() if isinstance(models, dict) else ():
        if not isinstance(table, dict):
            continue
        chosen, replicas = table.get("hosts"), table.get("replicas")
        fleet[name] = (
            [h for h in chosen if isinstance(h, str)] if isinstance(chosen, list) else None,
            replicas if isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1 else None,
        )
    return names, fleet


def files_digest(contents: Iterable[tuple[Path, bytes]]) -> str:
    """One digest of several files' names and bytes, in order."""
    digest = hashlib.sha256()
    for path, data in contents:
        digest.update(str(path).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def _toml_only(value: Any) -> str:
    """TOML's dates and times, which JSON lacks, as the strings taplo validates them as."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a TOML value")


def _read_toml(path: Path, problems: list[ConfigProblem], contents: Mapping[Path, bytes] | None) -> _Source | None:
    try:
        raw = contents[path] if contents is not None and path in contents else path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        problems.append(ConfigProblem(path, None, "", "file not found"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(ConfigProblem(path, None, "", f"cannot read: {exc}"))
        return None
    if not text.strip():  # an editor truncates before it writes: a file caught then would stop every model
        problems.append(ConfigProblem(path, None, "", "the file is empty (a comment makes an empty file deliberate)"))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        line = int(match.group(1)) if match else None
        if match:
            message += f" (column {match.group(2)})"
        problems.append(ConfigProblem(path, line, "", f"TOML syntax error: {message}"))
        return None
    return _Source(path=path, lines=locate_keys(text), data=data, raw=raw)


def _included_files(main: _Source, problems: list[ConfigProblem]) -> list[Path]:
    patterns = main.data.get("include", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        return []  # the schema reports the wrong type
    found: list[Path] = []
    for i, pattern in enumerate(patterns):
        full = main.path.parent / pattern
        matches = sorted(Path(p) for p in glob.glob(str(full)))
        if not matches and not glob.has_magic(pattern):
            line = _line_of(main.lines, ("include", i))
            problems.append(ConfigProblem(main.path, line, f"include.{i}", f"file not found: {full}"))
        found.extend(m.absolute() for m in matches if m.absolute() not in found)
    return found


def _merge_models(
    main: _Source, source: _Source, owner: dict[str, _Source], problems: list[ConfigProblem]
) -> None:
    for key in source.data:
        if key != "models":
            problems.append(
                ConfigProblem(
                    source.path,
                    _line_of(source.lines, (key,)),
                    key,
                    "an included file may hold only [models.*] tables",
                )
            )
    models = source.data.get("models", {})
    if not isinstance(models, dict):
        return
    merged = main.data.setdefault("models", {})
    for name, table in models.items():
        if name in owner:
            first = owner[name]
            problems.append(
                ConfigProblem(
                    source.path,
                    _line_of(source.lines, ("models", name)),
                    f"models.{name}",
                    f"model defined twice; first at {first.path}:{_line_of(first.lines, ('models', name))}",
                )
            )
            continue
        owner[name] = source
        merged[name] = table


def _resolve_paths(data: dict[str, Any], owner: dict[str, _Source], main: _Source) -> None:
    """Relative paths are relative to the file that wrote them."""

    def resolve(table: Any, key: str, base: Path) -> None:
        if isinstance(table, dict) and isinstance(table.get(key), str):
            value = Path(table[key]).expanduser()
            table[key] = str(value if value.is_absolute() else base / value)

    for name, table in (data.get("models") or {}).items() if isinstance(data.get("models"), dict) else ():
        base = owner.get(name, main).path.parent
        resolve(table, "file", base)
        resolve(table, "mmproj", base)
    resolve(data.get("proxy"), "api_keys_file", main.path.parent)
    resolve(data.get("proxy"), "admin_api_keys_file", main.path.parent)
    for table in data["hosts"].values() if isinstance(data.get("hosts"), dict) else ():
        resolve(table, "inventory", main.path.parent)
    llama = data.get("llama_server")
    if isinstance(llama, dict) and isinstance(llama.get("binary"), str) and "/" in llama["binary"]:
        resolve(llama, "binary", main.path.parent)
    resolve(data.get("prompt_cache"), "dir", main.path.parent)


def default_prompt_cache_dir() -> Path:
    """Where keep_cache models save their slots when prompt_cache.dir is unset: the user's cache
    directory, as the tiny models' (the systemd unit sets XDG_CACHE_HOME to its CacheDirectory)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-smart-proxy" / "prompt-cache"


def _default_cache_dir(data: dict[str, Any]) -> None:
    table = data.setdefault("prompt_cache", {})
    if isinstance(table, dict) and "dir" not in table:
        table["dir"] = str(default_prompt_cache_dir())


def _check_files(data: dict[str, Any], require_model_files: bool = True) -> list[tuple[KeyPath, str]]:
    """Files the config names must exist and be readable, and GGUF files sound as far as their
    header shows; checked on the raw tables so that a schema error elsewhere does not hide them."""
    problems: list[tuple[KeyPath, str]] = []
    wanted: list[tuple[KeyPath, Any]] = []
    if isinstance(data.get("hosts"), dict) and data["hosts"]:
        # a fleet: a model's file need be only on the hosts that run it; the share planned for this
        # host says which of its files are missing (supervisor/planning/prepare.py)
        require_model_files = False
    models = data.get("models")
    for name, table in models.items() if isinstance(models, dict) else ():
        if isinstance(table, dict):
            wanted += [(("models", name, key), table.get(key)) for key in ("file", "mmproj")]
    proxy = data.get("proxy")
    if isinstance(proxy, dict):
        wanted += [(("proxy", key), proxy.get(key)) for key in ("api_keys_file", "admin_api_keys_file")]
    llama = data.get("llama_server")
    if isinstance(llama, dict) and "/" in str(llama.get("binary", "")):
        wanted.append((("llama_server", "binary"), llama.get("binary")))
    for key_path, value in wanted:
        if not isinstance(value, str):
            continue  # absent, or a wrong type the schema reports
        if not require_model_files and key_path[0] == "models" and not Path(value).exists():
            continue
        if not Path(value).exists():
            problems.append((key_path, f"file not found: {value}"))
        elif not Path(value).is_file():
            problems.append((key_path, f"not a file: {value}"))
        elif key_path[0] == "models":
            problem = _model_file_problem(Path(value), projector=key_path[-1] == "mmproj")
            if problem:
                problems.append((key_path, problem))
        elif key_path == ("proxy", "api_keys_file"):
            try:
                Path(value).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((key_path, f"cannot read {value}: {getattr(exc, 'strerror', None) or exc}"))
    return problems


def _model_file_problem(path: Path, *, projector: bool) -> str | None:
    from llama_smart_proxy.supervisor.memory.check import check_model_file

    try:
        check_model_file(path, projector=projector)
    except UserError as exc:
        return str(exc)
    return None


def _check_launch_options(data: dict[str, Any]) -> list[tuple[KeyPath, str]]:
    """`args` and `env` (of [llama_server], [defaults] and each model) may not set what the
    launch owns; each such entry is a problem that names the key to use instead."""
    tables: list[tuple[KeyPath, Any]] = [(("llama_server",), data.get("llama_server")), (("defaults",), data.get("defaults"))]
    models = data.get("models")
    tables += [(("models", name), table) for name, table in (models.items() if isinstance(models, dict) else ())]
    problems: list[tuple[KeyPath, str]] = []
    for where, table in tables:
        if not isinstance(table, dict):
            continue
        args, env = table.get("args"), table.get("env")
        for i, arg in enumerate(args if isinstance(args, list) else ()):
            option = owned_option(arg) if isinstance(arg, str) else None
            if option is not None:
                problems.append(((*where, "args", i), f"{arg!r} is set by llama-smart-proxy; use {option.instead} instead"))
        for name in env if isinstance(env, dict) else ():
            option = owned_variable(name)
            if option is not None:
                problems.append(((*where, "env", name), f"{name} is set by llama-smart-proxy; use {option.instead} instead"))
    return problems


def _check_ports(config: Config) -> list[tuple[KeyPath, str]]:
    problems: list[tuple[KeyPath, str]] = []
    first, last = config.llama_server.port_range
    _, listen_port = parse_listen(config.proxy.listen)
    if first <= listen_port <= last:
        problems.append(
            (
                ("llama_server", "port_range"),
                f"contains the proxy's own port {listen_port} (proxy.listen); choose a range without it",
            )
        )
    if last - first + 1 < len(config.models):
        problems.append(
            (
                ("llama_server", "port_range"),
                f"{last - first + 1} ports for {len(config.models)} models; widen the range",
            )
        )
    return problems


def _key_path(data: Any, loc: KeyPath) -> KeyPath:
    """An error's location without the names pydantic gives the members of a union (`gpus.0.int`
    is `gpus.0`): below a value that is not a table or an array, no part of `loc` is a key."""
    value = data
    for depth, part in enumerate(loc):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif value is not None:
            return loc[:depth]
    return loc


def _either(messages: list[str]) -> str:
    """The errors of one value against each member of a union, as one sentence."""
    if len(messages) == 1:
        return messages[0]
    got = re.search(r" \(got .*\)$", messages[0])
    suffix = got.group(0) if got and all(m.endswith(got.group(0)) for m in messages) else ""
    parts = [m.removesuffix(suffix).removeprefix("Input should be ") for m in messages]
    return "Input should be " + " or ".join(dict.fromkeys(parts)) + suffix


def _explain(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence: what was wrong, what was expected."""
    kind = error["type"]
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        allowed = sorted(_fields_at(loc[:-1]))
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key{hint} (expected one of: {', '.join(allowed)})"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if "input" in error and kind not in ("name_clash", "unknown_model") and ", got " not in message:
        shown = error["input"]
        if isinstance(shown, (dict, list)) or len(repr(shown)) > 60:
            shown = type(shown).__name__
        return f"{message} (got {shown!r})"
    return message


def _fields_at(loc: KeyPath) -> list[str]:
    """The keys allowed in the table at `loc` of a Config."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return []
            annotation = info.annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _set(data: dict[str, Any], key_path: KeyPath, value: Any) -> None:
    table = data
    for part in key_path[:-1]:
        table = table.setdefault(str(part), {})
    table[str(key_path[-1])] = value


def _dotted(key_path: KeyPath) -> str:
    return ".".join(str(p) for p in key_path)


def _line_of(lines: dict[KeyPath, int], key_path: KeyPath) -> int | None:
    """The line of the longest prefix of key_path that the file spells out."""
    for length in range(len(key_path), 0, -1):
        if key_path[:length] in lines:
            return lines[key_path[:length]]
    return None


# --- where keys sit in a TOML text -------------------------------------------------------------
# tomllib keeps no positions, so a small scanner finds table headers and `key =` lines at the top
# level of each table (not inside multi-line strings or arrays). Good enough to point a person at
# the right line; never used to read values.

_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf'(?:{_BARE_KEY}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED_KEY})\s*\]\]?")
_KEY_RE = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_INLINE_KEY_RE = re.compile(rf"[{{,]\s*({_DOTTED_KEY})\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(_KEY_PART, text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def locate_keys(text: str) -> dict[KeyPath, int]:
    """Map each dotted key path spelled out in `text` to its 1-based line."""
    lines: dict[KeyPath, int] = {}
    table: tuple[str, ...] = ()
    array_counts: dict[tuple[str, ...], int] = {}
    depth = 0  # open brackets/braces of a multi-line value
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if in_string in line:
                in_string = None
            continue
        if depth == 0:
            header = _HEADER_RE.match(line)
            if header:
                table = _split_key(header.group(2))
                if header.group(1) == "[[":
                    index = array_counts.get(table, 0)
                    array_counts[table] = index + 1
                    lines.setdefault(table, number)
                    table = (*table, index)  # type: ignore[assignment]
                lines.setdefault(table, number)
                continue
            key = _KEY_RE.match(line)
            if key:
                path = (*table, *_split_key(key.group(1)))
                lines.setdefault(path, number)
                value = line[key.end() :]
                for inline in _INLINE_KEY_RE.finditer(value):
                    lines.setdefault((*path, *_split_key(inline.group(1))), number)
                depth, in_string = _scan_value(value)
                continue
        else:
            delta, in_string = _scan_value(line)
            depth = max(depth + delta, 0)
    return lines


def _scan_value(text: str) -> tuple[int, str | None]:
    """Net bracket depth of a value fragment, and an unclosed multi-line string's quote."""
    depth = 0
    i = 0
    while i < len(text):
        for quote in ('"""', "'''"):
            if text.startswith(quote, i):
                end = text.find(quote, i + 3)
                if end < 0:
                    return depth, quote
                i = end + 3
                break
        else:
            char = text[i]
            if char == "#":
                break
            if char in "\"'":
                end = i + 1
                while end < len(text) and text[end] != char:
                    end += 2 if char == '"' and text[end] == "\\" else 1
                i = end + 1
                continue
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
            i += 1
    return depth, None
