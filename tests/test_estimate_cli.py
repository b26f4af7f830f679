"""`llama-smart-proxy estimate FILE`: the table, the JSON, and one clear line for every bad file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from benchmarks.accuracy.shapes import SHAPES, write_sparse_gguf
from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.supervisor.cli import main

GIB = 1024**3


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_shows_each_device_and_the_host_by_component(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = SHAPES["llama-3.1-8b"].write(tmp_path)
    code, out, err = run(capsys, str(model), "--ctx", "8192", "--gpu-layers", "20", "--tensor-split", "3,1")
    assert code == 0, err
    assert "llama, 32 layers" in out
    assert "context 8192 (8192 cells)" in out
    assert "-ngl 20: the output and the last 19 of 32 layers on 2 GPUs split 3:1" in out
    header = next(line for line in out.splitlines() if "weights" in line)
    assert header.split() == ["weights", "KV", "cache", "recurrent", "compute", "output", "CUDA", "own", "total"]
    rows = {line.split()[0] for line in out.splitlines()[4:] if line.startswith("  ") and line != header}
    assert rows == {"GPU0", "GPU1", "host", "total"}
    assert "GiB" in out and "MiB" in out


def test_json_is_the_estimate_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = SHAPES["qwen2.5-0.5b"].write(tmp_path)
    code, out, _ = run(capsys, str(model), "--json", "--parallel", "2", "--cache-type-k", "q8_0", "--flash-attn", "off")
    assert code == 0
    data = json.loads(out)
    total = data.pop("total_bytes")
    for device in [data["host"], *data["gpus"]]:
        device.pop("total_bytes")  # computed fields: in the output, not accepted as input
    estimate = Estimate.model_validate(data)
    assert estimate.total_bytes == total
    assert estimate.settings.parallel == 2 and estimate.settings.cache_type_k == "q8_0"
    assert estimate.settings.flash_attn is False
    assert estimate.gpu_layers == estimate.n_layers + 1 == 25  # every layer by default
    assert len(estimate.gpus) == 1 and estimate.gpus[0].kv_bytes > 0


def test_gpu_layers_zero_is_cpu_only(capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    code, out, _ = run(capsys, str(tiny_model), "--gpu-layers", "0")
    assert code == 0
    assert "CPU only" in out and "GPU0" not in out


def test_more_slots_cost_more_only_per_slot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = SHAPES["mamba-2.8b"].write(tmp_path)
    one = json.loads(run(capsys, str(model), "--json", "--parallel", "1")[1])
    four = json.loads(run(capsys, str(model), "--json", "--parallel", "4")[1])
    assert four["gpus"][0]["recurrent_bytes"] == 4 * one["gpus"][0]["recurrent_bytes"]


def _one_line_error(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    code, out, err = run(capsys, str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err
    return err


def test_truncated_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = SHAPES["qwen2.5-0.5b"].write(tmp_path)
    os.truncate(model, model.stat().st_size // 2)
    assert "truncated" in _one_line_error(capsys, model)


def test_not_gguf_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model\n")
    assert "not a GGUF file" in _one_line_error(capsys, path)


def test_missing_required_key_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "keyless.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "missing required key qwen2.embedding_length" in _one_line_error(capsys, path)


def test_missing_split_part_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    shape = SHAPES["qwen2.5-0.5b"]
    files = write_sparse_gguf(tmp_path / "q.gguf", shape.arch, shape.metadata, shape.tensors, shape.n_vocab, split_max_tensors=100)
    files[-1].unlink()
    err = _one_line_error(capsys, files[0])
    assert files[-1].name in err and "missing" in err


def test_split_model_estimates_all_parts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    shape = SHAPES["qwen2.5-0.5b"]
    files = write_sparse_gguf(tmp_path / "q.gguf", shape.arch, shape.metadata, shape.tensors, shape.n_vocab, split_max_tensors=100)
    code, out, _ = run(capsys, str(files[0]), "--json")
    assert code == 0
    estimate = json.loads(out)
    weights = estimate["gpus"][0]["weights_bytes"] + estimate["host"]["weights_bytes"]
    assert weights >= shape.file_bytes


def test_bad_tensor_split_is_refused(capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", str(tiny_model), "--tensor-split", "1,x"])
    assert exit_.value.code == 2
    assert "expected numbers such as 3,1" in capsys.readouterr().err
