"""`llama-smart-proxy estimate -- <llama-server args>`: a llama-server command line read as
llama-server reads it (supervisor/memory/server_args.py), against the real binary's `--help`
and against the config path for the same settings."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.accuracy.shapes import SHAPES
from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.supervisor.cli import main
from llama_smart_proxy.supervisor.memory.profile import DEVICE_OVERHEAD_BYTES
from llama_smart_proxy.supervisor.memory.server_args import AUTO_PARALLEL, FLAGS, parse_server_args
from llama_smart_proxy.supervisor.planning.headers import build_profiles
from llama_smart_proxy.supervisor.planning.planner import plan
from tests.planning import GIB, make_config, make_inventory

_ENTRY = re.compile(r"^-")  # an option's first line starts at column 0; its description is indented
DESCRIPTION_COLUMN = 40  # common/arg.cpp prints descriptions from this column


def help_entries(text: str) -> dict[str, str]:
    """Each option's names (as printed) -> its whole description, joined into one line."""
    entries: dict[str, str] = {}
    names: list[str] = []
    body: list[str] = []
    for line in text.splitlines():
        if _ENTRY.match(line):
            if names:
                entries[" ".join(names)] = " ".join(body)
            long_head = len(line) <= DESCRIPTION_COLUMN or line[DESCRIPTION_COLUMN - 1] != " "
            head, rest = (line, "") if long_head else (line[:DESCRIPTION_COLUMN], line[DESCRIPTION_COLUMN:])
            names = re.findall(r"(?:^|,\s*|\s)(--?[\w-]+)", head)
            body = [rest.strip()]
        elif names and line.startswith(" "):
            body.append(line.strip())
        elif names:
            entries[" ".join(names)] = " ".join(body)
            names = []
    if names:
        entries[" ".join(names)] = " ".join(body)
    return entries


@pytest.fixture(scope="module")
def server_help(llama_server: Path) -> dict[str, str]:
    done = subprocess.run([str(llama_server), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return help_entries(done.stdout)


@pytest.mark.llama_server
@pytest.mark.parametrize("flag", FLAGS, ids=lambda flag: flag.names[-1])
def test_every_flag_read_and_its_default_are_llama_servers_own(flag, server_help: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    entry = next(
        (body for names, body in server_help.items() if set(flag.names) | set(flag.negations) <= set(names.split())),
        None,
    )
    assert entry is not None, f"{'/'.join(flag.names)} is not in llama-server --help"
    assert f"(env: {flag.env})" in entry
    stated = re.search(r"default: ([^,)]+)", entry) or re.search(r"- (\w+) \(default\)", entry)
    if flag.default is None:
        assert stated is None, f"{flag.names[-1]}: --help states a default ({stated and stated.group(1)})"
    else:
        assert stated is not None and stated.group(1).strip() == flag.default


def test_a_bare_command_line_gets_llama_servers_defaults() -> None:
    command = parse_server_args(["-m", "/models/x.gguf"])
    assert command.ctx == 0  # -c 0: the model's own context
    assert (command.parallel, command.kv_unified) == (AUTO_PARALLEL, True)  # -np auto
    assert (command.cache_type_k, command.cache_type_v, command.flash_attn) == ("f16", "f16", "auto")
    assert (command.batch, command.ubatch) == (2048, 512)
    assert command.gpu_layers is None  # -ngl auto: every layer, before --fit
    assert command.devices == ("cuda",) and any("--fit is on" in n for n in command.notes)


def test_explicit_slots_mean_a_kv_stream_each_unless_unified_is_asked() -> None:
    assert parse_server_args(["-m", "x", "-np", "2"]).kv_unified is False
    assert parse_server_args(["-m", "x", "-np", "2", "-kvu"]).kv_unified is True
    # -np auto wins over --no-kv-unified, as tools/server/server.cpp does
    assert parse_server_args(["-m", "x", "--no-kv-unified"]).kv_unified is True


def test_devices_come_from_device_names_rpc_servers_and_the_split() -> None:
    assert parse_server_args(["-m", "x", "-ngl", "0"]).devices == ()
    assert parse_server_args(["-m", "x", "--device", "none"]).devices == ()
    assert parse_server_args(["-m", "x", "--rpc", "h:1,h:2"]).devices == ("rpc", "rpc")
    assert parse_server_args(["-m", "x", "--rpc", "h:1", "-ts", "1,1,2"]).devices == ("rpc", "cuda", "cuda")
    assert parse_server_args(["-m", "x", "-dev", "CUDA0,RPC0"]).devices == ("cuda", "rpc")
    assert parse_server_args(["-m", "x", "-ts", "3,1", "-sm", "none", "-mg", "1"]).devices == ("cuda",)


def test_the_command_line_wins_over_the_environment_and_other_flags_are_skipped() -> None:
    command = parse_server_args(
        ["llama-server", "-m", "x", "-c", "8192", "--port", "8080", "--seed", "-1", "--verbose", "--temp", "0.7"],
        {"LLAMA_ARG_CTX_SIZE": "4096", "LLAMA_ARG_UBATCH": "256"},
    )
    assert command.ctx == 8192 and command.ubatch == 256
    assert any("LLAMA_ARG_UBATCH" in n for n in command.notes)
    assert any("--port --seed --verbose --temp" in n for n in command.notes)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-c", "8192"], "names no model"),
        (["-m", "x", "-c", "lots"], "-c expects a whole number"),
        (["-m", "x", "-fa", "maybe"], "-fa expects one of on, off, auto"),
        (["-m", "x", "-ts", "1,1", "--rpc", "h:1,h:2,h:3"], "-ts gives 2 proportions for 3 RPC servers"),
        (["-m", "x", "model.gguf"], "unexpected word 'model.gguf'"),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err and "Traceback" not in err


def estimate(capsys: pytest.CaptureFixture[str], *argv: str) -> Estimate:
    assert main(["estimate", "--json", "--", *argv]) == 0
    data = json.loads(capsys.readouterr().out)
    data.pop("total_bytes")
    for device in [data["host"], *data["gpus"]]:
        device.pop("total_bytes")
    return Estimate.model_validate(data)


@pytest.mark.parametrize("flash_attn", ["on", "off", "auto"])
def test_the_same_settings_estimate_alike_from_a_command_line_and_from_a_config(
    flash_attn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = SHAPES["qwen2.5-7b"].write(tmp_path)
    settings = {"ctx": 8192, "parallel": 2, "kv_unified": False, "cache_type_k": "q8_0", "cache_type_v": "q8_0",
                "flash_attn": flash_attn, "batch": 1024, "ubatch": 256}  # fmt: skip
    config = make_config({"m": {**settings, "file": str(model)}})
    profiles = build_profiles(config, {}, have_snapshot=False).profiles
    planned = plan(config, make_inventory([80 * GIB]), profiles).model("m")
    assert planned.placement == "gpu" and planned.estimate is not None
    from_command = estimate(
        capsys, "-m", str(model), "-c", "8192", "-np", "2", "--no-kv-unified", "-ctk", "q8_0", "-ctv", "q8_0",
        "-fa", flash_attn, "-b", "1024", "-ub", "256", "-ngl", "99", "--device", "CUDA0", "--fit", "off",
    )  # fmt: skip
    assert from_command == planned.estimate


def test_rpc_and_cpu_devices_are_not_charged_cudas_overhead(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = str(SHAPES["llama-3.2-1b"].write(tmp_path))
    rpc = estimate(capsys, "-m", model, "--rpc", "127.0.0.1:50052,127.0.0.1:50053", "-ngl", "99")
    assert [g.overhead_bytes for g in rpc.gpus] == [0, 0]
    mixed = estimate(capsys, "-m", model, "-dev", "CUDA0,RPC0", "-ngl", "99", "-ts", "1,1")
    assert [g.overhead_bytes > 0 for g in mixed.gpus] == [True, False]
    assert mixed.gpus[0].overhead_bytes >= DEVICE_OVERHEAD_BYTES
    cpu = estimate(capsys, "-m", model, "-ngl", "0")
    assert cpu.gpus == [] and cpu.host.weights_bytes > 0


def test_the_table_names_each_device_by_its_kind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = str(SHAPES["llama-3.2-1b"].write(tmp_path))
    assert main(["estimate", "--", "-m", model, "--rpc", "h:1,h:2", "-ngl", "12", "--fit", "off"]) == 0
    out = capsys.readouterr().out
    assert "on 2 devices (RPC, RPC)" in out and "\n  RPC0 " in out and "\n  RPC1 " in out
    assert "4 slots, unified KV cache" in out and "flash attention on" in out
    assert "CUDA GPU's overhead" not in out
