"""The config contract and its loader: defaults, sources, and one clear line per mistake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.supervisor.cli import main
from llama_smart_proxy.supervisor.config.load import load_config, locate_keys
from llama_smart_proxy.supervisor.config.owned_options import OWNED_OPTIONS, OwnedOption
from llama_smart_proxy.supervisor.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model: Path) -> Path:
    (tmp_path / "a.gguf").write_bytes(tiny_model.read_bytes())
    return tmp_path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_minimal_config_gets_documented_defaults(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", '[models.m]\nfile = "a.gguf"\n')
    config = load_config(path).config
    spec = config.model_spec("m")
    assert spec.file == model_dir / "a.gguf"
    assert (spec.ctx, spec.parallel, spec.cache_type_k, spec.mode) == (4096, 1, "f16", "resident")
    assert spec.gpus is None
    assert config.proxy.listen == "127.0.0.1:8080"


def test_model_keys_override_defaults_section(model_dir: Path) -> None:
    path = write(
        model_dir / "c.toml",
        '[defaults]\nctx = 8192\nparallel = 2\n[models.m]\nfile = "a.gguf"\nparallel = 4\n'
        '[models.n]\nfile = "a.gguf"\n',
    )
    config = load_config(path).config
    assert (config.model_spec("m").ctx, config.model_spec("m").parallel) == (8192, 4)
    assert config.model_spec("n").parallel == 2


def test_sizes_and_durations_parse_from_strings(model_dir: Path) -> None:
    path = write(
        model_dir / "c.toml",
        '[gpus]\nreserve = "1.5GiB"\n[proxy]\nheader_timeout = "1m30s"\nmax_body_size = 1000\n'
        '[models.m]\nfile = "a.gguf"\nidle_ttl = "15m"\n',
    )
    config = load_config(path).config
    assert config.gpus.reserve == 1536 * 1024**2
    assert config.proxy.header_timeout == 90.0
    assert config.proxy.max_body_size == 1000
    assert config.model_spec("m").idle_ttl == 900.0


def test_five_mistakes_in_two_files_each_reported_with_key_and_line(model_dir: Path) -> None:
    main_file = write(
        model_dir / "config.toml",
        'include = ["more/*.toml"]\n'  # 1
        "\n"  # 2
        "[proxy]\n"  # 3
        "lissen = 3\n"  # 4: unknown key
        "\n"  # 5
        "[models.alpha]\n"  # 6
        'file = "a.gguf"\n'  # 7
        'aliases = ["first"]\n'  # 8
        'ctx = "big"\n'  # 9: wrong type
        "\n"  # 10
        "[models.beta]\n"  # 11
        'file = "missing.gguf"\n'  # 12: missing GGUF
        'aliases = ["first"]\n',  # 13: duplicate alias
    )
    write(model_dir / "more" / "extra.toml", '[models.gamma]\nfile = "../a.gguf"\nctx = = 5\n')

    problems = problems_of(main_file)

    assert len(problems) == 5, problems
    assert any(p.startswith(f"{main_file}:4: proxy.lissen: unknown key; did you mean 'listen'") for p in problems)
    assert any(p.startswith(f"{main_file}:9: models.alpha.ctx: ") and "integer" in p for p in problems)
    assert f"{main_file}:12: models.beta.file: file not found: {model_dir / 'missing.gguf'}" in problems
    assert any(p.startswith(f"{main_file}:13: models.beta.aliases.0: alias 'first'") for p in problems)
    assert any(p.startswith(f"{model_dir / 'more' / 'extra.toml'}:3: TOML syntax error") for p in problems)


def test_validate_command_exits_nonzero_without_traceback(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(model_dir / "c.toml", '[models.m]\nfile = "nope.gguf"\nctx = -1\n')
    assert main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:2: models.m.file: file not found" in err
    assert f"{path}:3: models.m.ctx: " in err


def test_validate_command_accepts_a_valid_file(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(model_dir / "c.toml", '[models.m]\nfile = "a.gguf"\n')
    assert main(["validate", "--config", str(path)]) == 0
    assert "valid, 1 model" in capsys.readouterr().out


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "absent.toml") == [f"{tmp_path / 'absent.toml'}: file not found"]


def test_an_empty_config_or_include_file_is_refused_not_read_as_no_models(model_dir: Path) -> None:
    # an editor truncates a file before it writes it: read then, it would stop every model
    empty = write(model_dir / "c.toml", "  \n")
    assert problems_of(empty) == [f"{empty}: the file is empty (a comment makes an empty file deliberate)"]
    write(model_dir / "more.toml", "")
    main = write(model_dir / "main.toml", 'include = ["more.toml"]\n[models.m]\nfile = "a.gguf"\n')
    assert problems_of(main) == [f"{model_dir / 'more.toml'}: the file is empty (a comment makes an empty file deliberate)"]
    write(model_dir / "more.toml", "# no models here yet\n")
    assert list(load_config(main).config.models) == ["m"]


def test_alias_equal_to_another_models_name_is_rejected(model_dir: Path) -> None:
    path = write(
        model_dir / "c.toml",
        '[models.a]\nfile = "a.gguf"\naliases = ["b"]\n[models.b]\nfile = "a.gguf"\n',
    )
    assert problems_of(path) == [f"{path}:3: models.a.aliases.0: alias 'b' is already a name of models.b"]


def test_model_defined_in_two_files_is_rejected(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", 'include = ["x.toml"]\n[models.a]\nfile = "a.gguf"\n')
    write(model_dir / "x.toml", '[models.a]\nfile = "a.gguf"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{model_dir / 'x.toml'}:1: models.a: model defined twice; first at {path}:2")


def test_included_file_may_hold_only_models(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", 'include = ["x.toml"]\n')
    write(model_dir / "x.toml", '[proxy]\nlisten = "0.0.0.0:1"\n')
    assert problems_of(path) == [f"{model_dir / 'x.toml'}:1: proxy: an included file may hold only [models.*] tables"]


def test_included_literal_file_that_is_missing_is_reported(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", 'include = ["gone.toml"]\n')
    assert problems_of(path) == [f"{path}:1: include.0: file not found: {model_dir / 'gone.toml'}"]


def test_port_range_containing_listen_port_is_rejected(model_dir: Path) -> None:
    path = write(
        model_dir / "c.toml",
        '[proxy]\nlisten = "127.0.0.1:41005"\n[llama_server]\nport_range = [41000, 41010]\n',
    )
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:4: llama_server.port_range: contains the proxy's own port 41005")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('listen = "nohost"', "expected host:port"),
        ('listen = "127.0.0.1:99999"', "port must be 1-65535"),
        ('max_body_size = "lots"', "expected a size such as 512MiB"),
        ('header_timeout = "soon"', "expected a duration such as 250ms"),
        ("header_timeout = -1", "a duration cannot be negative"),
    ],
)
def test_bad_values_say_what_was_expected(model_dir: Path, line: str, expected: str) -> None:
    path = write(model_dir / "c.toml", f"[proxy]\n{line}\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:2: proxy.") and expected in problem


def test_environment_overrides_toml_and_command_line_overrides_environment(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(model_dir / "c.toml", '[proxy]\nlisten = "127.0.0.1:9000"\nlog_level = "info"\n')
    monkeypatch.setenv("LLAMA_SMART_PROXY_LISTEN", "127.0.0.1:9001")
    monkeypatch.setenv("LLAMA_SMART_PROXY_API_KEYS", "k1, k2")
    monkeypatch.setenv("LLAMA_SMART_PROXY_LOG_LEVEL", "debug")
    config = load_config(path).config
    assert config.proxy.listen == "127.0.0.1:9001"
    assert [k.get_secret_value() for k in config.proxy.api_keys] == ["k1", "k2"]
    assert config.proxy.log_level == "debug"
    assert load_config(path, {"proxy.listen": "127.0.0.1:9002"}).config.proxy.listen == "127.0.0.1:9002"


def test_bad_environment_value_names_the_variable(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(model_dir / "c.toml", "# everything from the environment\n")
    monkeypatch.setenv("LLAMA_SMART_PROXY_LOG_LEVEL", "loud")
    [problem] = problems_of(path)
    assert problem.startswith("LLAMA_SMART_PROXY_LOG_LEVEL: proxy.log_level: ")


def test_api_keys_never_appear_in_repr(model_dir: Path) -> None:
    config = Config.model_validate({"proxy": {"api_keys": ["sekrit"]}})
    assert "sekrit" not in repr(config) and "sekrit" not in config.model_dump_json()


def test_locate_keys_skips_multiline_values_and_finds_dotted_keys() -> None:
    text = (
        "[a]\n"
        "x = [\n"
        "  1,\n"
        "  2,\n"
        "]\n"
        's = """\n'
        "y = 3\n"
        '"""\n'
        "b.c = { d = 1 }\n"
        '[models."q.w"]\n'
        "e = 1\n"
    )
    lines = locate_keys(text)
    assert lines[("a", "x")] == 2
    assert ("a", "y") not in lines
    assert lines[("a", "b", "c")] == 9 and lines[("a", "b", "c", "d")] == 9
    assert lines[("models", "q.w", "e")] == 11


def test_key_files_are_relative_to_the_config_and_a_missing_one_is_named(model_dir: Path) -> None:
    write(model_dir / "admin.txt", "admin-key\n")
    path = write(
        model_dir / "c.toml",
        '[proxy]\nadmin_api_keys_file = "admin.txt"\n\n[models.m]\nfile = "a.gguf"\n',
    )
    assert load_config(path).config.proxy.admin_api_keys_file == model_dir / "admin.txt"
    path = write(model_dir / "c.toml", '[proxy]\nadmin_api_keys_file = "gone.txt"\n\n[models.m]\nfile = "a.gguf"\n')
    assert problems_of(path) == [f"{path}:2: proxy.admin_api_keys_file: file not found: {model_dir / 'gone.txt'}"]


# ---- one source of truth: what the JSON Schema rejects, the loader rejects


def schema_leaves(schema: dict, root: dict, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """(key path, schema) of every value the config schema describes that is not a table; a
    table of any keys (models, env) is entered with one made-up key, an array at its item."""
    if "$ref" in schema:
        yield from schema_leaves(root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root, path)
        return
    options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1 and "type" not in schema:
        yield from schema_leaves(options[0], root, path)
        return
    if "properties" in schema:
        for key, sub in schema["properties"].items():
            yield from schema_leaves(sub, root, (*path, key))
        return
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_leaves(schema["additionalProperties"], root, (*path, "m" if path == ("models",) else "K"))
        return
    if schema.get("type") == "array":
        items = schema.get("prefixItems") or [schema["items"]]
        yield path, schema  # the array itself: a scalar where an array belongs
        yield (*path, 0), items[0]
        return
    yield path, schema


def json_kinds(schema: dict) -> set[str]:
    """The JSON types a schema accepts at the top ("number" includes "integer")."""
    if "anyOf" in schema:
        return set().union(*(json_kinds(o) for o in schema["anyOf"]))
    if "enum" in schema:
        return {{bool: "boolean", int: "integer", str: "string"}[type(v)] for v in schema["enum"]}
    kind = schema.get("type")
    return {"integer", "number"} if kind == "number" else {kind} if kind else {"boolean", "integer", "number", "string"}


KIND_SAMPLES = {"boolean": True, "integer": 7, "number": 7.5, "string": "seven"}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def schema_rejected_values() -> list[tuple[tuple, object]]:
    schema = Config.model_json_schema()
    cases = []
    for path, leaf in schema_leaves(schema, schema):
        accepted = json_kinds(leaf)
        for kind, sample in KIND_SAMPLES.items():
            if kind not in accepted:
                cases.append((path, sample))
    return cases


def test_the_walk_covers_every_kind_of_config_value() -> None:
    paths = {".".join(map(str, p)) for p, _ in schema_rejected_values()}
    for expected in ("proxy.listen", "proxy.max_connections", "llama_server.port_range.0", "gpus.allow.0",
                     "defaults.allow_cpu", "models.m.allow_cpu", "models.m.args.0", "models.m.env.K", "include"):
        assert expected in paths  # fmt: skip


@pytest.mark.parametrize(("path", "value"), schema_rejected_values(), ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else repr(v))
def test_a_value_of_a_type_the_schema_rejects_is_rejected_by_the_loader(model_dir: Path, path: tuple, value: object) -> None:
    *keys, last = path
    if isinstance(last, int):  # an array item: the array holds the value
        *keys, last = keys
        value = [value, value] if keys[-1:] == ["llama_server"] else [value]
    dotted = ".".join(keys + [last])
    lines = [f"{dotted} = {toml_value(value)}"]
    if keys[:2] == ["models", "m"] and last != "file":
        lines.append('models.m.file = "a.gguf"')
    path_file = write(model_dir / "c.toml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path_file)
    keys_reported = [p.key for p in caught.value.problems]
    wanted = ".".join(map(str, path))
    assert wanted in keys_reported, (keys_reported, caught.value)
    assert all(p.line == 1 for p in caught.value.problems if p.key == wanted)


def test_a_boolean_written_as_yes_is_refused_as_the_schema_refuses_it(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", '[models.m]\nfile = "a.gguf"\nallow_cpu = "yes"\n')
    assert problems_of(path) == [f"{path}:3: models.m.allow_cpu: Input should be a valid boolean (got 'yes')"]


def test_a_union_value_of_neither_type_is_one_problem_at_its_own_key(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", "[gpus]\nallow = [0, true]\n")
    assert problems_of(path) == [f"{path}:2: gpus.allow.1: Input should be a valid integer or a valid string (got True)"]


def test_a_toml_date_is_the_string_taplo_sees(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", "[proxy]\nlisten = 1979-05-27\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:2: proxy.listen: expected host:port") and "1979-05-27" in problem


# ---- model files are checked as far as their header shows


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "not a GGUF file (0 bytes)"),
        (b"# my notes\n", "not a GGUF file (starts with b'# my'"),
        (None, "truncated: "),  # the tiny model, cut in half
    ],
    ids=["empty", "text", "truncated"],
)
def test_a_model_file_that_is_no_sound_gguf_is_a_problem_naming_file_and_key(
    model_dir: Path, content: bytes | None, problem: str
) -> None:
    model = model_dir / "broken.gguf"
    whole = (model_dir / "a.gguf").read_bytes()
    model.write_bytes(whole[: len(whole) // 2] if content is None else content)
    path = write(model_dir / "c.toml", '[models.m]\nfile = "broken.gguf"\n[models.n]\nfile = "a.gguf"\nmmproj = "broken.gguf"\n')
    found = problems_of(path)
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}:2: models.m.file: {model}: {problem}")
    assert found[1].startswith(f"{path}:5: models.n.mmproj: {model}: {problem}")


def test_validate_names_a_wrong_typed_header_field(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = model_dir / "typed.gguf"
    writer = gguf.GGUFWriter(model, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_key_value("llama.context_length", "long", gguf.GGUFValueType.STRING)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = write(model_dir / "c.toml", '[models.m]\nfile = "typed.gguf"\n')
    for command in (["validate", "--config", str(path)], ["plan", "--config", str(path)], ["estimate", str(model)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{model}: llama.context_length is a string 'long', expected an integer" in err, err
        assert "Traceback" not in err


def test_an_unreadable_api_keys_file_is_a_problem(model_dir: Path) -> None:
    (model_dir / "keys.txt").write_bytes(b"\xff\xfe not text")
    path = write(model_dir / "c.toml", '[proxy]\napi_keys_file = "keys.txt"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:2: proxy.api_keys_file: cannot read {model_dir / 'keys.txt'}")


# ---- args and env may not set what the plan owns


def owned_spellings() -> list[tuple[str, str]]:
    cases = []
    for option in OWNED_OPTIONS:
        for flag in option.flags:
            cases.append((flag, option.instead))
            cases.append((f"{flag}=1", option.instead))
        long = next((f for f in option.flags if f.startswith("--")), None)
        if long and "-" in long[2:]:
            cases.append((long.replace("-", "_").replace("__", "--", 1), option.instead))  # --ctx_size
    return cases


@pytest.mark.parametrize(("arg", "instead"), owned_spellings())
def test_args_that_set_what_the_plan_owns_are_refused_naming_the_key_to_use(model_dir: Path, arg: str, instead: str) -> None:
    path = write(
        model_dir / "c.toml",
        f'[llama_server]\nargs = ["--threads", "4", "{arg}"]\n[defaults]\nargs = ["{arg}"]\n'
        f'[models.m]\nfile = "a.gguf"\nargs = ["--verbose", "{arg}"]\n',
    )
    message = f"'{arg}' is set by llama-smart-proxy; use {instead} instead"
    assert problems_of(path) == [
        f"{path}:2: llama_server.args.2: {message}",
        f"{path}:4: defaults.args.0: {message}",
        f"{path}:7: models.m.args.1: {message}",
    ]


@pytest.mark.parametrize("option", [o for o in OWNED_OPTIONS if o.env], ids=lambda o: o.env)
def test_env_that_sets_what_the_plan_owns_is_refused_naming_the_key_to_use(model_dir: Path, option: OwnedOption) -> None:
    assert option.env is not None
    negated = option.env.replace("LLAMA_ARG_", "LLAMA_ARG_NO_")
    path = write(model_dir / "c.toml", f'[models.m]\nfile = "a.gguf"\nenv = {{ {option.env} = "1", {negated} = "1", LLAMA_ARG_THREADS = "4" }}\n')
    assert problems_of(path) == [
        f"{path}:3: models.m.env.{name}: {name} is set by llama-smart-proxy; use {option.instead} instead"
        for name in (option.env, negated)
    ]


def test_args_the_plan_does_not_own_pass(model_dir: Path) -> None:
    path = write(model_dir / "c.toml", '[models.m]\nfile = "a.gguf"\nargs = ["--threads", "4", "--temp", "0.5", "-cb", "--spec-type", "draft-mtp"]\n')
    assert load_config(path).config.model_spec("m").args[-1] == "draft-mtp"
