"""Broken GGUF headers through `validate`, `estimate` and `plan` as a user runs them: never a
traceback, and a header that cannot be right is exit 2 with a message naming the file.

The base file is written by the gguf package's writer (a small llama model, every field typed
explicitly); Hypothesis then changes what a damaged or hostile file changes: a metadata field's
type and value (huge, negative, arrays of the wrong kind or length), a count or a length in the
header's bytes, a tensor's dimensions, type or offset, and the file's length, cut at every region.
The commands run in-process through `cli.main`, so a traceback is an exception that fails the test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_smart_proxy.supervisor.cli import main
from llama_smart_proxy.supervisor.memory.reader import read_header

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SNAPSHOT = EXAMPLES / "inventory-2x24gb.json"  # plan against two GPUs: placement and splits run too
T = gguf.GGUFValueType
N_VOCAB = 32
N_EMBD = 64
N_LAYER = 2
N_FF = 128

Field = tuple[Any, T, "T | None"]  # value, type, array item type
BASE_FIELDS: dict[str, Field] = {
    "general.architecture": ("llama", T.STRING, None),
    "general.name": ("fuzz base", T.STRING, None),
    "llama.context_length": (2048, T.UINT32, None),
    "llama.embedding_length": (N_EMBD, T.UINT32, None),
    "llama.block_count": (N_LAYER, T.UINT32, None),
    "llama.feed_forward_length": (N_FF, T.UINT32, None),
    "llama.attention.head_count": (4, T.UINT32, None),
    "llama.attention.head_count_kv": (2, T.UINT32, None),
    "llama.rope.dimension_count": (16, T.UINT32, None),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32, None),
    "llama.vocab_size": (N_VOCAB, T.UINT32, None),
    "tokenizer.ggml.model": ("llama", T.STRING, None),
    "tokenizer.ggml.tokens": ([f"t{i}" for i in range(N_VOCAB)], T.ARRAY, T.STRING),
    "tokenizer.ggml.scores": ([0.0] * N_VOCAB, T.ARRAY, T.FLOAT32),
}
# Keys the estimator reads as integers (scalars, or one value per layer): a value of another kind
# is never right, and the error must name the key.
INTEGER_KEYS = [
    "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.vocab_size",
    "llama.attention.key_length", "llama.attention.value_length", "llama.expert_count",
    "llama.expert_used_count", "llama.attention.sliding_window", "llama.pooling_type",
]  # fmt: skip
BOOLEAN_KEYS = ["llama.attention.causal"]
TEXT_KEYS = ["general.architecture"]


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("token_embd.weight", (N_VOCAB, N_EMBD)), ("output_norm.weight", (N_EMBD,)), ("output.weight", (N_VOCAB, N_EMBD))]
    for i in range(N_LAYER):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (N_EMBD,)), (f"blk.{i}.attn_q.weight", (N_EMBD, N_EMBD)),
            (f"blk.{i}.attn_k.weight", (32, N_EMBD)), (f"blk.{i}.attn_v.weight", (32, N_EMBD)),
            (f"blk.{i}.attn_output.weight", (N_EMBD, N_EMBD)), (f"blk.{i}.ffn_norm.weight", (N_EMBD,)),
            (f"blk.{i}.ffn_gate.weight", (N_FF, N_EMBD)), (f"blk.{i}.ffn_up.weight", (N_FF, N_EMBD)),
            (f"blk.{i}.ffn_down.weight", (N_EMBD, N_FF)),
        ]  # fmt: skip
    return shapes


@dataclass(frozen=True)
class TypedArray:
    """An array field's items with their declared type (gguf < 0.17 infers it from the first item)."""

    items: list[Any]
    item_type: T


class TypedWriter(gguf.GGUFWriter):
    """gguf's writer, writing a `TypedArray` with its own item type, on every gguf the project allows."""

    def _pack_val(self, val: Any, vtype: T, add_vtype: bool, sub_type: T | None = None) -> bytes:
        if not isinstance(val, TypedArray):
            return super()._pack_val(val, vtype, add_vtype)
        packed = bytearray(self._pack("I", T.ARRAY) if add_vtype else b"")
        packed += self._pack("I", val.item_type) + self._pack("Q", len(val.items))
        for item in val.items:
            packed += super()._pack_val(item, val.item_type, add_vtype=False)
        return bytes(packed)


def write_gguf(path: Path, fields: dict[str, Field]) -> Path:
    """A GGUF file with exactly these metadata fields (typed as given) and the base tensors."""
    writer = TypedWriter(path, "llama")
    writer.kv_data[0].clear()  # the constructor's general.architecture: written from `fields`
    for key, (value, vtype, item_type) in fields.items():
        writer.add_key_value(key, TypedArray(value, item_type) if item_type is not None else value, vtype)
    for name, shape in tensors():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class Region:
    """A number in the header's bytes: where it is, its width, and what it counts."""

    kind: str
    offset: int
    width: int  # 4 or 8 bytes, little-endian unsigned
    value: int


@functools.cache
def header_regions(path: Path) -> list[Region]:
    """Every count, length, type id, dimension and offset in the header, located with the gguf
    package's own reader (independent of the reader under test)."""
    reader = gguf.GGUFReader(path)
    regions = []
    for name, field in reader.fields.items():
        if name in ("GGUF.tensor_count", "GGUF.kv_count"):
            regions.append(Region(name, field.offset, 8, int(field.parts[0][0])))
            continue
        if name.startswith("GGUF."):
            continue
        kinds = {0: "key length", 2: "value type"}
        if field.types[:1] == [T.STRING]:
            kinds[3] = "string length"
        elif field.types[:1] == [T.ARRAY]:
            kinds |= {3: "item type", 4: "array count"}
        regions += _part_regions(field, kinds)
    for tensor in reader.tensors:
        regions += _part_regions(tensor.field, {0: "name length", 2: "n_dims", 3: "dimension", 4: "tensor type", 5: "tensor offset"})
    return regions


def _part_regions(field: Any, kinds: dict[int, str]) -> list[Region]:
    regions, at = [], field.offset
    for index, part in enumerate(field.parts):
        if index in kinds and part.nbytes in (4, 8):
            regions.append(Region(kinds[index], at, part.nbytes, int(part[0])))
        at += part.nbytes
    return regions


@functools.cache
def data_end(path: Path) -> int:
    """Where the last tensor's bytes end: any shorter file is truncated."""
    reader = gguf.GGUFReader(path)
    return max(t.data_offset + t.n_bytes for t in reader.tensors)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_gguf(tmp_path_factory.mktemp("fuzz-base") / "base.gguf", BASE_FIELDS)
    read_header(path)  # the base itself is sound
    return path


@dataclass(frozen=True)
class Outcome:
    command: str
    code: int
    out: str
    err: str


def run_commands(model: Path) -> list[Outcome]:
    """validate, estimate and plan on `model`, in-process; an exception escaping is a traceback."""
    config = model.with_suffix(".toml")
    config.write_text(f'[models.m]\nfile = "{model.name}"\n')
    commands = {
        "validate": ["validate", "--config", str(config)],
        "estimate": ["estimate", str(model)],
        "plan": ["plan", "--config", str(config), "--inventory", str(SNAPSHOT)],
    }
    outcomes = []
    for name, argv in commands.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        outcomes.append(Outcome(name, code, out.getvalue(), err.getvalue()))
    return outcomes


def assert_refused(outcomes: list[Outcome], model: Path, *also_named: str) -> None:
    for o in outcomes:
        assert o.code == 2, f"{o.command} exited {o.code}, expected 2:\n{o.out}{o.err}"
        assert str(model) in o.err, f"{o.command} does not name {model}:\n{o.err}"
        assert "Traceback" not in o.err
        for word in also_named:
            assert word in o.err, f"{o.command} does not name {word}:\n{o.err}"


def assert_clean(outcomes: list[Outcome], model: Path) -> None:
    """Any verdict, but a user's verdict: 0, 2 (naming the file) or 3 (plan cannot place it)."""
    for o in outcomes:
        assert o.code in (0, 2, 3), f"{o.command} exited {o.code}:\n{o.out}{o.err}"
        assert "Traceback" not in o.err
        if o.code == 2:
            assert str(model) in o.err, f"{o.command} does not name {model}:\n{o.err}"
        if o.code == 3:
            assert o.command == "plan"


FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

INT_TYPES = [T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64]
_RANGES = {T.UINT8: (0, 2**8 - 1), T.INT8: (-(2**7), 2**7 - 1), T.UINT16: (0, 2**16 - 1), T.INT16: (-(2**15), 2**15 - 1),
           T.UINT32: (0, 2**32 - 1), T.INT32: (-(2**31), 2**31 - 1), T.UINT64: (0, 2**64 - 1), T.INT64: (-(2**63), 2**63 - 1)}  # fmt: skip


def typed_ints() -> st.SearchStrategy[Field]:
    def value(vtype: T) -> st.SearchStrategy[Field]:
        low, high = _RANGES[vtype]
        edges = st.sampled_from([v for v in (low, -1, 0, 1, 2, 511, 512, 513, 2**31, 2**32 - 1, 2**32, 2**63, high) if low <= v <= high])
        return st.one_of(edges, st.integers(low, high)).map(lambda v: (v, vtype, None))

    return st.sampled_from(INT_TYPES).flatmap(value)


def wrong_kinds() -> st.SearchStrategy[Field]:
    """Values that are never an integer, a boolean and a string all at once: a field expecting one
    of these gets one of the others."""
    texts = st.text(max_size=12).map(lambda v: (v, T.STRING, None))
    floats = st.floats(allow_nan=True, width=32).map(lambda v: (v, T.FLOAT32, None))
    doubles = st.floats(allow_nan=True).map(lambda v: (v, T.FLOAT64, None))
    bools = st.booleans().map(lambda v: (v, T.BOOL, None))
    string_arrays = st.lists(st.text(max_size=4), min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.STRING))
    float_arrays = st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.FLOAT32))
    return st.one_of(texts, floats, doubles, bools, string_arrays, float_arrays)


def int_arrays() -> st.SearchStrategy[Field]:
    return st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6).map(lambda v: (v, T.ARRAY, T.UINT32))


def _not(kind: type) -> Callable[[Field], bool]:
    def test(field: Field) -> bool:
        value = field[0]
        return not (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))

    return test


@FUZZ
@given(key=st.sampled_from(INTEGER_KEYS + BOOLEAN_KEYS + TEXT_KEYS), data=st.data())
def test_a_field_of_the_wrong_kind_is_exit_2_naming_the_file_and_the_key(tmp_path: Path, key: str, data: st.DataObject) -> None:
    if key in INTEGER_KEYS:
        field = data.draw(wrong_kinds().filter(lambda f: f[1] != T.ARRAY or f[2] != T.UINT32))
    elif key in BOOLEAN_KEYS:
        field = data.draw(st.one_of(typed_ints(), wrong_kinds().filter(lambda f: f[1] != T.BOOL)))
    else:
        field = data.draw(st.one_of(typed_ints(), wrong_kinds().filter(lambda f: f[1] != T.STRING)))
    model = write_gguf(tmp_path / "wrong-kind.gguf", {**BASE_FIELDS, key: field})
    assert_refused(run_commands(model), model, key)


@FUZZ
@given(key=st.sampled_from(INTEGER_KEYS), field=st.one_of(typed_ints(), int_arrays()))
def test_any_integer_in_an_integer_field_gets_an_answer_never_a_traceback(tmp_path: Path, key: str, field: Field) -> None:
    model = write_gguf(tmp_path / "integer.gguf", {**BASE_FIELDS, key: field})
    assert_clean(run_commands(model), model)


@FUZZ
@given(
    drop=st.sets(st.sampled_from(sorted(BASE_FIELDS)), max_size=3),
    extra=st.dictionaries(st.sampled_from(INTEGER_KEYS + ["llama.attention.sliding_window_pattern", "general.alignment", "split.count"]),
                          st.one_of(typed_ints(), int_arrays(), wrong_kinds()), max_size=3),
)  # fmt: skip
def test_missing_and_extra_fields_get_an_answer_never_a_traceback(tmp_path: Path, drop: set[str], extra: dict[str, Field]) -> None:
    fields = {k: v for k, v in BASE_FIELDS.items() if k not in drop} | extra
    model = write_gguf(tmp_path / "fields.gguf", fields)
    outcomes = run_commands(model)
    assert_clean(outcomes, model)
    if {"general.architecture", "llama.block_count", "llama.embedding_length"} & drop - set(extra):
        assert_refused(outcomes, model, *([] if extra else ["missing required key"]))


# Regions whose every change makes the header unreadable as written: a count or length that no
# longer matches the bytes, a tensor's offset (tensors lie packed, in order). A type id may change
# to another of the same width and stay readable (UINT32 to INT32), and so may the last tensor's
# shape: those need only an answer.
ALWAYS_FATAL = {"GGUF.kv_count", "key length", "string length", "array count", "tensor offset"}


@FUZZ
@given(data=st.data())
def test_a_changed_count_length_type_or_offset_gets_an_answer_never_a_traceback(base: Path, tmp_path: Path, data: st.DataObject) -> None:
    region = data.draw(st.sampled_from(header_regions(base)))
    top = 2 ** (8 * region.width) - 1
    edges = [0, 1, 4, 5, 13, 2**31, 2**32 - 1, top, region.value + 1, max(region.value - 1, 0), region.value * 2]
    value = data.draw(st.one_of(st.sampled_from([v for v in edges if v <= top]), st.integers(0, top)).filter(lambda v: v != region.value))
    raw = bytearray(base.read_bytes())
    raw[region.offset : region.offset + region.width] = value.to_bytes(region.width, "little")
    model = tmp_path / "patched.gguf"
    model.write_bytes(bytes(raw))
    outcomes = run_commands(model)
    assert_clean(outcomes, model)
    huge = value > len(raw)
    if region.kind in ALWAYS_FATAL or (huge and region.kind in ("GGUF.tensor_count", "name length", "n_dims", "dimension")):
        assert_refused(outcomes, model)


def test_every_region_kind_is_fuzzed(base: Path) -> None:
    kinds = {r.kind for r in header_regions(base)}
    assert kinds == ALWAYS_FATAL | {"GGUF.tensor_count", "value type", "item type", "name length", "n_dims", "dimension", "tensor type"}


@FUZZ
@given(data=st.data())
def test_a_file_cut_anywhere_before_its_last_tensor_ends_is_exit_2_naming_the_file(base: Path, tmp_path: Path, data: st.DataObject) -> None:
    end = data_end(base)
    boundaries = sorted({r.offset + d for r in header_regions(base) for d in (0, 1, r.width)} | {0, 1, 4, 8, 16, 24, end - 1})
    cut = data.draw(st.one_of(st.sampled_from([b for b in boundaries if b < end]), st.integers(0, end - 1)))
    model = tmp_path / "cut.gguf"
    model.write_bytes(base.read_bytes()[:cut])
    assert_refused(run_commands(model), model)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.gguf", b""), ("notes.gguf", b"these are my notes, not a model\n"), ("magic-only.gguf", b"GGUF"),
     ("version-9.gguf", b"GGUF" + struct.pack("<IQQ", 9, 0, 0)), ("version-1.gguf", b"GGUF" + struct.pack("<IQQ", 1, 0, 0))],
)  # fmt: skip
def test_files_that_are_no_gguf_at_all_are_exit_2_naming_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    model = tmp_path / name
    model.write_bytes(content)
    assert_refused(run_commands(model), model)
