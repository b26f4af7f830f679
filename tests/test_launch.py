"""argv and environment from a plan entry (pure), what a config may not override, the child's
environment, and the once-at-start check of the binary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_smart_proxy.schemas.config import LlamaServerSettings
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.supervisor.children.launch import (
    FLAGS_USED,
    Command,
    build_command,
    child_environment,
    ignored_llama_variables,
)
from llama_smart_proxy.supervisor.children.llama_binary import check_llama_server, help_flags
from llama_smart_proxy.supervisor.children.process_group import spawn_in_group
from llama_smart_proxy.supervisor.config.owned_options import OWNED_OPTIONS
from llama_smart_proxy.supervisor.errors import LlamaServerError
from tests.fakes.supervision import write_fake_llama_server

BINARY = Path("/opt/llama/llama-server")
SETTINGS = LlamaServerSettings()


def spec(**overrides: object) -> LaunchSpec:
    values: dict[str, object] = dict(
        model="qwen", file="/models/qwen.gguf", ctx=8192, parallel=2, kv_unified=False,
        cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on", batch=2048, ubatch=512,
        gpu_layers=0,
    )  # fmt: skip
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_cpu_model_sees_no_gpu_and_offloads_nothing() -> None:
    command = build_command(spec(gpu_layers=12), binary=BINARY, port=41007, settings=SETTINGS)
    argv = command.argv
    assert argv[:3] == [str(BINARY), "-m", "/models/qwen.gguf"]
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "41007"
    assert flag_value(argv, "-ngl") == "0"
    assert command.env["CUDA_VISIBLE_DEVICES"] == ""
    assert not {"-ts", "-sm", "-mg"} & set(argv)


def test_every_planned_setting_reaches_its_flag() -> None:
    argv = build_command(spec(), binary=BINARY, port=41000, settings=SETTINGS).argv
    assert flag_value(argv, "-c") == "8192"
    assert flag_value(argv, "-np") == "2"
    assert "--no-kv-unified" in argv and "--kv-unified" not in argv
    assert flag_value(argv, "-ctk") == "q8_0" and flag_value(argv, "-ctv") == "q8_0"
    assert flag_value(argv, "-fa") == "on"
    assert flag_value(argv, "-b") == "2048" and flag_value(argv, "-ub") == "512"
    assert flag_value(argv, "--fit") == "off"
    unified = build_command(spec(kv_unified=True), binary=BINARY, port=41000, settings=SETTINGS).argv
    assert "--kv-unified" in unified and "--no-kv-unified" not in unified


def test_one_gpu_is_pinned_by_uuid_in_pci_order_without_split_flags() -> None:
    command = build_command(
        spec(devices=["GPU-aaaa"], gpu_layers=99), binary=BINARY, port=41000, settings=SETTINGS
    )
    assert command.env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert command.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert flag_value(command.argv, "-ngl") == "99"
    assert not {"-ts", "-sm", "-mg"} & set(command.argv)


def test_a_split_names_its_devices_fractions_mode_and_main_gpu() -> None:
    command = build_command(
        spec(devices=["GPU-b", "GPU-a"], gpu_layers=33, tensor_split=[0.7, 0.3], main_gpu=1),
        binary=BINARY, port=41000, settings=SETTINGS,
    )  # fmt: skip
    assert command.env["CUDA_VISIBLE_DEVICES"] == "GPU-b,GPU-a"
    assert flag_value(command.argv, "-sm") == "layer"
    assert flag_value(command.argv, "-ts") == "0.7,0.3"
    assert flag_value(command.argv, "-mg") == "1"


def test_tensor_split_fractions_read_back_as_the_same_floats() -> None:
    fractions = [2 / 3, 1 / 3]
    argv = build_command(
        spec(devices=["a", "b"], gpu_layers=9, tensor_split=fractions), binary=BINARY, port=1, settings=SETTINGS
    ).argv
    assert [float(x) for x in flag_value(argv, "-ts").split(",")] == fractions  # type: ignore[union-attr]


def test_a_split_whose_fractions_do_not_match_its_devices_is_refused() -> None:
    with pytest.raises(ValueError, match="2 fractions for 3 devices"):
        build_command(spec(devices=["a", "b", "c"], tensor_split=[0.5, 0.5]), binary=BINARY, port=1, settings=SETTINGS)


def test_extra_args_come_last_and_mmproj_is_passed() -> None:
    argv = build_command(
        spec(mmproj="/models/mmproj.gguf", args=["--jinja", "-t", "8"]), binary=BINARY, port=1, settings=SETTINGS
    ).argv
    assert flag_value(argv, "--mmproj") == "/models/mmproj.gguf"
    assert argv[-3:] == ["--jinja", "-t", "8"]


def test_user_env_is_passed_but_cannot_unpin_the_planned_devices() -> None:
    settings = LlamaServerSettings(env={"GLOBAL": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    command = build_command(
        spec(devices=["GPU-a"], env={"MODEL": "2", "GLOBAL": "model wins"}), binary=BINARY, port=1, settings=settings
    )
    assert command.env["GLOBAL"] == "model wins" and command.env["MODEL"] == "2"
    assert command.env["CUDA_VISIBLE_DEVICES"] == "GPU-a"


def test_the_binary_check_covers_every_flag_the_builder_emits() -> None:
    shapes = [
        spec(),
        spec(kv_unified=True),
        spec(devices=["a"], gpu_layers=5),
        spec(devices=["a", "b"], gpu_layers=9, tensor_split=[0.5, 0.5], mmproj="/m.gguf"),
        spec(slot_save_path="/cache/m-0123abcd"),
    ]
    emitted = {
        word
        for shape in shapes
        for word in build_command(shape, binary=BINARY, port=1, settings=SETTINGS).argv[1:]
        if word.startswith("-") and not word.lstrip("-").replace(".", "").isdigit()
    }
    assert emitted == set(FLAGS_USED)


# ---- the binary check


HELP_EXCERPT = """\
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
                                        use single unified KV buffer shared across all sequences
-fitt, --fit-target MiB0,MiB1,MiB2,...
                                        target margin per device for --fit, comma-separated list of
--rpc SERVERS                           comma-separated list of RPC servers (host:port)
"""


def test_help_flags_reads_the_flag_column_only() -> None:
    flags = help_flags(HELP_EXCERPT)
    assert flags == {"-c", "--ctx-size", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
                     "-fitt", "--fit-target", "--rpc"}  # fmt: skip
    assert "--fit" not in flags  # only named in a description


def test_the_real_llama_server_passes_the_check(llama_server: Path) -> None:
    info = check_llama_server(llama_server)
    assert info.path == llama_server
    assert info.version


def test_the_fake_llama_server_passes_the_check(tmp_path: Path) -> None:
    assert check_llama_server(write_fake_llama_server(tmp_path)).version == "0 (fake)"


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_a_missing_binary_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(LlamaServerError, match="cannot run .*nowhere"):
        check_llama_server(tmp_path / "nowhere")


def test_a_binary_that_fails_says_how(tmp_path: Path) -> None:
    broken = write_script(tmp_path / "llama-server", 'echo "error while loading shared libraries: libggml.so" >&2; exit 127\n')
    with pytest.raises(LlamaServerError, match="exited with code 127: error while loading shared libraries"):
        check_llama_server(broken)


def test_a_program_without_a_version_is_not_taken_for_llama_server(tmp_path: Path) -> None:
    other = write_script(tmp_path / "llama-server", "echo hello\n")
    with pytest.raises(LlamaServerError, match="does not look like llama-server"):
        check_llama_server(other)


def test_a_build_lacking_a_flag_we_use_is_refused_naming_the_flag(llama_server: Path, tmp_path: Path) -> None:
    real_help = subprocess.run([str(llama_server), "--help"], capture_output=True, text=True, check=True).stdout
    without_fit = "\n".join(line for line in real_help.splitlines() if not line.startswith("-fit,"))
    (tmp_path / "help.txt").write_text(without_fit)
    older = write_script(
        tmp_path / "llama-server",
        f'case "$1" in --version) echo "version: 1 (old)";; --help) cat {tmp_path / "help.txt"};; esac\n',
    )
    with pytest.raises(LlamaServerError, match=r"version 1 \(old\)\) does not accept --fit,"):
        check_llama_server(older)


def test_the_check_reads_help_once_per_binary(llama_server: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    counting = write_script(tmp_path / "llama-server", f'echo "$1" >> {runs}\nexec {llama_server} "$@"\n')
    check_llama_server(counting)
    assert sorted(runs.read_text().split()) == ["--help", "--version"]


# ---- what the launch owns, and the child's environment


def test_every_option_the_launch_owns_is_spelled_as_the_real_llama_server_spells_it(llama_server: Path) -> None:
    help_text = subprocess.run([str(llama_server), "--help"], capture_output=True, text=True, check=True).stdout
    accepted = help_flags(help_text)
    for option in OWNED_OPTIONS:
        assert set(option.flags) <= accepted, option
        assert option.env is None or f"(env: {option.env})" in help_text, option
    assert set(FLAGS_USED) <= {f for o in OWNED_OPTIONS for f in o.flags}  # what we emit, no user overrides


def test_a_child_never_inherits_the_services_secrets_or_llama_arg_variables() -> None:
    inherited = {
        "PATH": "/usr/bin", "HOME": "/var/lib/proxy", "LLAMA_SMART_PROXY_API_KEYS": "sekrit",
        "LLAMA_SMART_PROXY_API_KEY": "admin-sekrit", "LLAMA_SMART_PROXY_LISTEN": "0.0.0.0:80",
        "LLAMA_ARG_N_GPU_LAYERS": "0", "LLAMA_ARG_SWA_FULL": "1", "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "60000000", "HF_HOME": "/data/hf",
    }  # fmt: skip
    env = child_environment(inherited, {"LLAMA_ARG_THREADS": "8", "CUDA_VISIBLE_DEVICES": "GPU-1"})
    assert env == {"PATH": "/usr/bin", "HOME": "/var/lib/proxy", "HF_HOME": "/data/hf",
                   "LLAMA_ARG_THREADS": "8", "CUDA_VISIBLE_DEVICES": "GPU-1"}  # fmt: skip
    assert ignored_llama_variables(inherited) == ["LLAMA_ARG_N_GPU_LAYERS", "LLAMA_ARG_SWA_FULL"]


@pytest.mark.anyio
async def test_a_spawned_child_sees_the_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SMART_PROXY_API_KEYS", "sekrit")
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "999999")
    monkeypatch.setenv("KEPT_FOR_THE_CHILD", "yes")
    show = "import json, os; print(json.dumps(dict(os.environ)))"
    process = await spawn_in_group(Command(argv=[sys.executable, "-c", show], env={"FROM_CONFIG": "1"}))
    assert process.stdout is not None
    output = b""
    async for chunk in process.stdout:
        output += chunk
    assert await process.wait() == 0
    env = json.loads(output)
    assert env["KEPT_FOR_THE_CHILD"] == "yes" and env["FROM_CONFIG"] == "1"
    assert not [name for name in env if name.startswith(("LLAMA_SMART_PROXY_", "LLAMA_ARG_"))]
