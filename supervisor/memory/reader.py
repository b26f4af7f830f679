"""Read a GGUF file's header (metadata and tensor infos) into a `ModelHeader`; never its weights.

Rules kept here:
- only the header is read: a small hand-written parser walks the key-values and tensor infos
  through a memory map, so the cost depends on the header (mostly the tokenizer's string arrays,
  which are skipped, not decoded), never on the size of the weights; gguf.GGUFReader decodes
  every token string into numpy objects and is hundreds of times slower on a real vocabulary;
- a split model (`name-00001-of-00003.gguf`) is read part by part: metadata from the first part,
  sizes and tensors summed over all parts; a missing part is an error naming that part;
- every problem with the file is a `ModelFileError`: one line naming the file and the problem
  (missing, truncated, not GGUF, unsupported version, required keys missing, split part missing);
  the header is checked as ggml/src/gguf.cpp (build 11434) checks it before loading anything:
  no duplicate key or tensor name, at most 4 dimensions, rows a whole number of blocks, tensors
  packed in order at their aligned offsets, every tensor inside the file;
- counts are checked against the bytes that remain before anything is walked, so a corrupt count
  costs nothing (never a loop over 2^64 entries);
- a file whose identity (device, inode, size, mtime, ctime) has not changed since it was read,
  and that was not changed in the last SETTLED_NS, is not read again: `validate` and then the
  planner, and every reload, ask for the same headers;
- string arrays (the vocabulary, merges) are kept as their length only; numeric arrays under
  `tokenizer.` likewise (scores, token types); other numeric arrays (per-layer head counts,
  sliding-window patterns) whole.
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from llama_smart_proxy.schemas.header import MetadataValue, ModelHeader, TensorInfo
from llama_smart_proxy.supervisor.errors import ModelFileError
from llama_smart_proxy.supervisor.memory.architectures import describe_value, is_known_architecture

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 used 32-bit lengths; llama.cpp itself no longer reads it
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT in ggml/include/gguf.h
MAX_DIMS = 4  # GGML_MAX_DIMS in ggml/include/ggml.h
# The fewest bytes one entry can take, to check a count against the bytes left: a key-value is a
# key length (8), its type (4) and at least one byte; a tensor info a name length (8), n_dims (4),
# its type (4) and its offset (8).
_MIN_KV_BYTES = 13
_MIN_TENSOR_INFO_BYTES = 24
SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Keys every file of a given architecture must carry for the estimator; clip (mmproj) files and
# architectures the estimator does not know need only general.architecture.
_ARCH_REQUIRED = ("block_count", "embedding_length")

_SCALAR = {
    gguf.GGUFValueType.UINT8: struct.Struct("<B"),
    gguf.GGUFValueType.INT8: struct.Struct("<b"),
    gguf.GGUFValueType.UINT16: struct.Struct("<H"),
    gguf.GGUFValueType.INT16: struct.Struct("<h"),
    gguf.GGUFValueType.UINT32: struct.Struct("<I"),
    gguf.GGUFValueType.INT32: struct.Struct("<i"),
    gguf.GGUFValueType.FLOAT32: struct.Struct("<f"),
    gguf.GGUFValueType.BOOL: struct.Struct("<?"),
    gguf.GGUFValueType.UINT64: struct.Struct("<Q"),
    gguf.GGUFValueType.INT64: struct.Struct("<q"),
    gguf.GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TYPES = {int(t): t for t in gguf.GGMLQuantizationType}


class _Truncated(Exception):
    """The header runs past the end of the file."""


@dataclass
class _Part:
    """One file's parsed header."""

    path: Path
    size: int
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)


def split_parts(path: Path) -> list[Path]:
    """The files of a model: [path] for a single file, every part for `name-0000k-of-0000n.gguf`."""
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    count = int(match.group("count"))
    stem = match.group("stem")
    return [path.with_name(f"{stem}-{no:05d}-of-{count:05d}.gguf") for no in range(1, count + 1)]


def read_header(path: Path) -> ModelHeader:
    """The header of a GGUF model, every split part included; raises ModelFileError."""
    path = Path(path).absolute()
    files = split_parts(path)
    for part in files:
        if not part.exists():
            if part == path:
                raise ModelFileError(path, "no such file")
            raise ModelFileError(path, f"split part {part.name} is missing ({len(files)} parts expected)")
    try:
        identity = tuple(_identity(part) for part in files)
    except OSError:
        identity = None  # _read_part says what is wrong
    if identity is None or any(time.time_ns() - ctime < SETTLED_NS for *_, ctime in identity):
        return _read_parts(path, files)
    return _read_unchanged(path, identity)


SETTLED_NS = 2 * 10**9
"""A file changed this recently is read afresh every time: file times tick coarsely (a jiffy), so
a second write within the same tick could keep the same identity."""


def _identity(part: Path) -> tuple[int, ...]:
    """What changes whenever a file's bytes may have changed: ctime moves on every write and
    rename, and no one can set it."""
    st = part.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _read_unchanged(path: Path, identity: tuple[tuple[int, ...], ...]) -> ModelHeader:
    """`validate` and then the planner (and every reload) read the same headers: a file that has
    not changed since is not read again. Errors are not remembered."""
    return _read_parts(path, split_parts(path))


def _read_parts(path: Path, files: list[Path]) -> ModelHeader:
    first = files[0]
    parts = [_read_part(part, index) for index, part in enumerate(files)]
    head = parts[0]
    architecture = head.metadata.get("general.architecture")
    if architecture is None or architecture == "":
        raise ModelFileError(first, "missing required key general.architecture")
    if not isinstance(architecture, str):
        raise ModelFileError(first, f"general.architecture is {describe_value(architecture)}, expected a string")
    _check_required(first, architecture, head.metadata)
    declared = head.metadata.get("split.count")
    if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool)):
        raise ModelFileError(first, f"split.count is {describe_value(declared)}, expected an integer")
    if isinstance(declared, int) and declared > 1 and declared != len(files):
        raise ModelFileError(
            first,
            f"split.count says {declared} parts but the file name says {len(files)}; "
            "name the first part as written by llama-gguf-split",
        )
    tensors = [t for part in parts for t in part.tensors]
    return ModelHeader(
        path=str(first),
        file_size=sum(part.size for part in parts),
        mtime_ns=first.stat().st_mtime_ns,
        parts=len(parts),
        architecture=architecture,
        metadata=head.metadata,
        array_lengths=head.array_lengths,
        tensors=tensors,
    )


def _check_required(path: Path, architecture: str, metadata: dict[str, MetadataValue]) -> None:
    if not is_known_architecture(architecture):
        return
    missing = [
        f"{architecture}.{key}" for key in _ARCH_REQUIRED if f"{architecture}.{key}" not in metadata
    ]
    if missing:
        raise ModelFileError(path, f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def _read_part(path: Path, index: int = 0) -> _Part:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 4:
                raise ModelFileError(path, f"not a GGUF file ({size} bytes)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return _parse(path, view, size, index)
    except IsADirectoryError:
        raise ModelFileError(path, "is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFileError(path, "permission denied") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot be read: {exc.strerror or exc}") from None


def _parse(path: Path, buf: mmap.mmap, size: int, index: int = 0) -> _Part:
    if buf[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    part = _Part(path=path, size=size)
    try:
        version = _U32.unpack_from(buf, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(path, f"GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        offset = 24
        if n_kv > (size - offset) // _MIN_KV_BYTES:
            raise _Truncated
        for _ in range(n_kv):
            key, offset = _string(buf, offset)
            if key in part.metadata or key in part.array_lengths:
                raise ModelFileError(path, f"corrupt header: metadata key {key} appears twice")
            value_type = _U32.unpack_from(buf, offset)[0]
            offset += 4
            offset = _value(buf, offset, value_type, key, part)
        alignment = part.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFileError(path, f"general.alignment is {describe_value(alignment)}, expected a power of 2")
        if n_tensors > (size - offset) // _MIN_TENSOR_INFO_BYTES:
            raise _Truncated
        infos: list[tuple[str, int, list[int], int]] = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name, offset = _string(buf, offset)
            if name in names:
                raise ModelFileError(path, f"corrupt header: tensor {name} appears twice")
            names.add(name)
            n_dims = _U32.unpack_from(buf, offset)[0]
            offset += 4
            if n_dims > MAX_DIMS:
                raise ModelFileError(path, f"corrupt header: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
            shape = list(struct.unpack_from(f"<{n_dims}Q", buf, offset))
            offset += 8 * n_dims
            type_id, data_offset = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            infos.append((name, type_id, shape, data_offset))
        if offset > size:
            raise _Truncated
    except (struct.error, _Truncated, IndexError):
        raise ModelFileError(path, f"truncated: the header runs past the end of the file ({size} bytes)") from None
    data_start = -(-offset // alignment) * alignment
    expected_offset = 0  # gguf.cpp: tensors lie in order, each padded to the alignment
    for name, type_id, shape, data_offset in infos:
        quant = _TYPES.get(type_id)
        if quant is None or quant not in gguf.GGML_QUANT_SIZES:
            raise ModelFileError(path, f"tensor {name} has unknown type id {type_id} (newer than this gguf package?)")
        block, type_size = gguf.GGML_QUANT_SIZES[quant]
        if shape and shape[0] % block:
            raise ModelFileError(
                path, f"corrupt header: tensor {name} has rows of {shape[0]} values, not a multiple of {quant.name}'s block of {block}"
            )
        elements = 1
        for dim in shape:
            elements *= dim
        n_bytes = elements // block * type_size
        if data_offset != expected_offset:
            raise ModelFileError(
                path, f"corrupt header: tensor {name} is at data offset {data_offset}, expected {expected_offset}"
            )
        expected_offset += -(-n_bytes // alignment) * alignment
        end = data_start + data_offset + n_bytes
        if end > size:
            raise ModelFileError(
                path, f"truncated: tensor {name} ends at byte {end} but the file has {size} bytes"
            )
        part.tensors.append(
            TensorInfo(name=name, type=quant.name, shape=shape, n_bytes=n_bytes, offset=data_start + data_offset, part=index)
        )
    return part


def _string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    length = _U64.unpack_from(buf, offset)[0]
    start = offset + 8
    end = start + length
    if end > len(buf):
        raise _Truncated
    return buf[start:end].decode("utf-8", errors="replace"), end


def _value(buf: mmap.mmap, offset: int, value_type: int, key: str, part: _Part) -> int:
    """Store key's value in part; return the offset after it."""
    if value_type == gguf.GGUFValueType.STRING:
        text, offset = _string(buf, offset)
        part.metadata[key] = text
        return offset
    if value_type == gguf.GGUFValueType.ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        part.array_lengths[key] = count
        if count > len(buf) - offset:  # every item takes at least one byte
            raise _Truncated
        if item_type == gguf.GGUFValueType.STRING:
            # the vocabulary and merges: hundreds of thousands of strings, walked, never decoded
            unpack = _U64.unpack_from
            for _ in range(count):
                offset += 8 + unpack(buf, offset)[0]
            if offset > len(buf):
                raise _Truncated
            return offset
        item = _SCALAR.get(item_type)
        if item is None:
            raise ModelFileError(part.path, f"metadata key {key} is an array of unsupported type {item_type}")
        end = offset + item.size * count
        if end > len(buf):
            raise _Truncated
        if not key.startswith("tokenizer."):
            values = struct.unpack_from(f"<{count}{item.format[-1]}", buf, offset)
            part.metadata[key] = list(values)
        return end
    scalar = _SCALAR.get(value_type)
    if scalar is None:
        raise ModelFileError(part.path, f"metadata key {key} has unknown value type {value_type}")
    part.metadata[key] = scalar.unpack_from(buf, offset)[0]
    return offset + scalar.size
