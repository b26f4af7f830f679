"""The committed JSON Schemas match the models, and every example loads through the schema."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest

from llama_smart_proxy.schemas.config import Config, GpuSettings, HostSettings, LlamaServerSettings, ModelSettings, PromptCacheSettings, ProxySettings
from llama_smart_proxy.schemas.generate import HERE, schema_texts
from llama_smart_proxy.supervisor.config.load import load_config
from llama_smart_proxy.supervisor.memory.reader import split_parts

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(schema_texts()))
def test_committed_schema_is_fresh(name: str) -> None:
    committed = (HERE / f"{name}.schema.json").read_text()
    assert committed == schema_texts()[name], f"run `python -m llama_smart_proxy.schemas` to regenerate {name}.schema.json"


def copy_examples_with_models(tmp_path: Path, tiny_model: Path) -> Path:
    """The examples, with every GGUF they name made as a tiny model."""
    target = tmp_path / "examples"
    shutil.copytree(EXAMPLES, target)
    for toml in target.glob("*.toml"):
        for model in tomllib.loads(toml.read_text()).get("models", {}).values():
            for key in ("file", "mmproj"):
                if key in model:
                    # validate reads every part of a split model, as llama-server does
                    for path in split_parts(toml.parent / model[key]):
                        path.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(tiny_model, path)
    return target


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_config_is_valid(example: str, tmp_path: Path, tiny_model: Path) -> None:
    examples = copy_examples_with_models(tmp_path, tiny_model)
    loaded = load_config(examples / example)
    assert loaded.config.models


def test_every_example_declares_the_schema_for_editors() -> None:
    for toml in EXAMPLES.glob("*.toml"):
        assert toml.read_text().startswith("#:schema ../schemas/config.schema.json\n"), toml


def test_reference_example_lists_every_key() -> None:
    text = (EXAMPLES / "reference.toml").read_text()
    sections = {
        "proxy": ProxySettings,
        "llama_server": LlamaServerSettings,
        "gpus": GpuSettings,
        "host": HostSettings,
        "prompt_cache": PromptCacheSettings,
        "defaults": ModelSettings,
    }
    for section, model in sections.items():
        body = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
        for key in model.model_fields:
            assert re.search(rf"^#? ?{key} = ", body, re.M), f"reference.toml [{section}] lacks {key}"
    for key in Config.model_fields:
        if key not in sections and key != "models":
            assert re.search(rf"^{key} = ", text, re.M), f"reference.toml lacks {key}"
    for key in ("file", "mmproj", "aliases"):
        assert re.search(rf"^#? ?{key} = ", text.split("[models.", 1)[1], re.M), key


def test_plan_json_reads_back_into_the_same_plan(tmp_path: Path, tiny_model: Path) -> None:
    """`plan --json` output is an input too (`plan --against`): it must validate as a Plan."""
    import subprocess
    import sys

    from llama_smart_proxy.schemas.plan import Plan

    result = subprocess.run(
        [sys.executable, "-m", "llama_smart_proxy.supervisor", "plan", "--config", str(EXAMPLES / "multi-gpu.toml"),
         "--inventory", str(EXAMPLES / "inventory-2x24gb.json"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    plan = Plan.model_validate_json(result.stdout)
    assert plan.model_dump_json() == Plan.model_validate_json(plan.model_dump_json()).model_dump_json()
    assert any(m.estimate is not None and m.estimate.gpus for m in plan.models)


def test_a_snapshots_tensor_infos_are_a_contract_like_the_others() -> None:
    """TensorInfo is a dataclass (a snapshot holds tens of thousands): still frozen, still strict."""
    import dataclasses

    import pydantic

    from llama_smart_proxy.schemas.header import ModelHeader, TensorInfo

    tensor = {"name": "blk.0.attn_q.weight", "type": "Q4_K", "shape": [4096, 4096], "n_bytes": 9437184, "offset": 0}
    header = ModelHeader.model_validate({"path": "/m.gguf", "file_size": 1, "mtime_ns": 1, "architecture": "llama", "tensors": [tensor]})
    assert header.tensors[0] == TensorInfo(**tensor)
    assert ModelHeader.model_validate_json(header.model_dump_json()) == header
    for bad in ({**tensor, "dtype": "f16"}, {**tensor, "n_bytes": -1}, {**tensor, "shape": "4096"}):
        with pytest.raises(pydantic.ValidationError):
            ModelHeader.model_validate({**header.model_dump(), "tensors": [bad]})
    with pytest.raises((dataclasses.FrozenInstanceError, pydantic.ValidationError)):
        header.tensors[0].name = "other"  # type: ignore[misc]
