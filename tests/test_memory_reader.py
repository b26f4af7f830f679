"""read_header: metadata and tensor infos of real GGUF files, split models, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from benchmarks.accuracy.shapes import llama_like, write_sparse_gguf
from llama_smart_proxy.supervisor.errors import ModelFileError
from llama_smart_proxy.supervisor.memory import reader
from llama_smart_proxy.supervisor.memory.architectures import hyperparameters
from llama_smart_proxy.supervisor.memory.reader import read_header, split_parts

SMALL = llama_like(
    "small", "llama", n_vocab=1000, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=2048
)


def test_tiny_model_header_has_its_metadata_and_every_tensor(tiny_model: Path) -> None:
    header = read_header(tiny_model)
    assert header.architecture == "llama"
    assert header.metadata["llama.block_count"] == 2
    assert header.metadata["llama.embedding_length"] == 64
    assert header.array_lengths["tokenizer.ggml.tokens"] == 259
    assert "tokenizer.ggml.tokens" not in header.metadata  # strings kept as a length only
    assert "tokenizer.ggml.scores" not in header.metadata  # and the tokenizer's numeric arrays
    names = {t.name for t in header.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert header.file_size == tiny_model.stat().st_size
    assert header.parts == 1


def test_tensor_sizes_agree_with_the_gguf_package(tiny_model: Path) -> None:
    ours = {t.name: (t.type, t.shape, t.n_bytes) for t in read_header(tiny_model).tensors}
    theirs = {
        t.name: (t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes))
        for t in gguf.GGUFReader(tiny_model).tensors
    }
    assert ours == theirs


def test_sparse_model_reads_quantized_sizes_exactly(tmp_path: Path) -> None:
    path = SMALL.write(tmp_path)
    header = read_header(path)
    assert sum(t.n_bytes for t in header.tensors) == SMALL.file_bytes
    q6 = next(t for t in header.tensors if t.name == "output.weight")
    assert (q6.type, q6.shape) == ("Q6_K", [256, 1000])
    assert q6.n_bytes == 256 * 1000 // 256 * 210


def test_split_model_sums_every_part(tmp_path: Path) -> None:
    files = write_sparse_gguf(tmp_path / "split.gguf", SMALL.arch, SMALL.metadata, SMALL.tensors, SMALL.n_vocab, split_max_tensors=12)
    assert len(files) >= 3 and files[0].name.endswith("-00001-of-%05d.gguf" % len(files))
    header = read_header(files[0])
    assert header.parts == len(files)
    assert header.file_size == sum(f.stat().st_size for f in files)
    assert len(header.tensors) == len(SMALL.tensors)
    assert split_parts(files[1]) == files


def test_missing_split_part_names_that_part(tmp_path: Path) -> None:
    files = write_sparse_gguf(tmp_path / "split.gguf", SMALL.arch, SMALL.metadata, SMALL.tensors, SMALL.n_vocab, split_max_tensors=12)
    files[1].unlink()
    with pytest.raises(ModelFileError) as error:
        read_header(files[0])
    message = str(error.value)
    assert str(files[0]) in message and files[1].name in message and "missing" in message
    assert "\n" not in message


def test_truncated_file_is_reported_as_truncated(tmp_path: Path) -> None:
    path = SMALL.write(tmp_path)
    os.truncate(path, path.stat().st_size - 4096)
    with pytest.raises(ModelFileError, match="truncated: tensor .* ends at byte"):
        read_header(path)


def test_file_cut_inside_the_header_is_reported_as_truncated(tiny_model: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"cut\.gguf: truncated: the header runs past the end"):
        read_header(cut)


def test_a_file_that_is_not_gguf_says_so(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match=r"model\.gguf: not a GGUF file \(starts with b'PK"):
        read_header(path)


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nothere\.gguf: no such file"):
        read_header(tmp_path / "nothere.gguf")


def test_missing_required_key_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "nokeys.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError) as error:
        read_header(path)
    assert str(error.value) == f"{path}: missing required key llama.block_count"


def test_unknown_architecture_needs_only_general_architecture(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "someday-arch")
    writer.add_tensor("blk.0.mix.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_header(path).architecture == "someday-arch"


def test_an_unchanged_header_is_read_once_and_a_changed_one_again(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_model.read_bytes())
    assert read_header(path) is not read_header(path)  # just written: file times may not have ticked yet
    monkeypatch.setattr(reader, "SETTLED_NS", 0)
    first = read_header(path)
    assert read_header(path) is first  # validate, then the planner: one read
    with path.open("ab") as handle:
        handle.write(bytes(64))  # a new size, a new ctime
    again = read_header(path)
    assert again is not first and again.file_size == first.file_size + 64


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (b"tokenizer.ggml.model", b"llama.context_length", "metadata key llama.context_length appears twice"),
        (b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight", "tensor blk.0.ffn_up.weight appears twice"),
    ],
)
def test_a_name_used_twice_is_a_corrupt_header(tiny_model: Path, tmp_path: Path, old: bytes, new: bytes, problem: str) -> None:
    raw = tiny_model.read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    path = tmp_path / "twice.gguf"
    path.write_bytes(raw.replace(old, new))
    with pytest.raises(ModelFileError) as error:
        read_header(path)
    assert str(error.value) == f"{path}: corrupt header: {problem}"


def write_llama(path: Path, **uint32_keys: int) -> Path:
    """A one-tensor llama GGUF whose header holds these UINT32 keys (dots written as __)."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in uint32_keys.items():
        writer.add_key_value(key.replace("__", "."), value, gguf.GGUFValueType.UINT32)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_alignment_that_is_not_a_power_of_two_is_named(tmp_path: Path) -> None:
    path = write_llama(tmp_path / "aligned.gguf", llama__block_count=1, llama__embedding_length=64, general__alignment=48)
    with pytest.raises(ModelFileError, match=r"aligned\.gguf: general\.alignment is an integer 48, expected a power of 2"):
        read_header(path)


def test_block_count_beyond_llama_cpps_layer_limit_is_named(tmp_path: Path) -> None:
    path = write_llama(tmp_path / "deep.gguf", llama__block_count=100_000, llama__embedding_length=64)
    with pytest.raises(ModelFileError, match=r"deep\.gguf: llama\.block_count is 100000, more than llama\.cpp's 512 layers"):
        hyperparameters(read_header(path))
