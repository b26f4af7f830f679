"""The config contract and its loader: defaults, sources, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.supervisor.cli import main
from llama_smart_proxy.supervisor.config import load_config, locate_keys
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
    path = write(model_dir / "c.toml", "")
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
