"""GGUF headers that travel in an inventory snapshot, and the choice between a file and its record.

On the production machine `inventory --config FILE --json` records the header of every model
(and vision projector) the config names, keyed by absolute path, with the file's size and
modification time. `plan` then uses, per model:
- the file, when it is there (a record that no longer matches it, by size or mtime, is reported
  and not used);
- else the record for that path; else the one record with the same file name (a CI checkout
  lives at another path than production), saying so;
- else nothing: the model is reported as impossible to plan, never guessed.
This module reads files; the planner it feeds does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llama_smart_proxy.schemas.config import Config, ModelSpec
from llama_smart_proxy.schemas.estimate import MemoryProfile
from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.supervisor.errors import UserError

HeaderSource = Literal["file", "snapshot", "missing"]


@dataclass(frozen=True)
class HeaderInfo:
    """Where a model's GGUF header came from, as the shell found it."""

    source: HeaderSource = "file"
    note: str = ""  # how the record was matched, or why there is none


Reader = Callable[[Path], ModelHeader]
Profiler = Callable[[ModelHeader, ModelSpec, "ModelHeader | None"], MemoryProfile]


def read_file_header(path: Path) -> ModelHeader:
    """A GGUF file's header; gguf and numpy are imported only when a file is read (planning from
    a snapshot needs neither)."""
    from llama_smart_proxy.supervisor.memory.reader import read_header

    return read_header(path)


def _default_profiler(header: ModelHeader, spec: ModelSpec, mmproj: ModelHeader | None) -> MemoryProfile:
    from llama_smart_proxy.supervisor.memory.profile import memory_profile

    return memory_profile(header, spec, mmproj)


def record_headers(config: Config, read: Reader = read_file_header) -> tuple[dict[str, ModelHeader], list[str]]:
    """Every readable model and projector header the config names, by absolute path; a warning
    for each that cannot be read (it is then not in the snapshot)."""
    recorded: dict[str, ModelHeader] = {}
    warnings: list[str] = []
    for spec in config.model_specs():
        for key, path in (("file", spec.file), ("mmproj", spec.mmproj)):
            if path is None or str(Path(path).absolute()) in recorded:
                continue
            try:
                header = read(Path(path).absolute())
            except UserError as exc:
                warnings.append(f"models.{spec.name}.{key}: header not recorded: {exc}")
                continue
            recorded[header.path] = header
    return dict(sorted(recorded.items())), warnings


@dataclass(frozen=True)
class _Found:
    header: ModelHeader | None
    source: str  # "file", "snapshot" or "missing"
    note: str = ""
    warnings: tuple[str, ...] = ()


def _find(
    what: str, path: Path, recorded: Mapping[str, ModelHeader], read: Reader, have_snapshot: bool
) -> _Found:
    path = Path(path).absolute()
    record = recorded.get(str(path))
    matched_by_name = False
    if record is None:
        same_name = [h for p, h in recorded.items() if Path(p).name == path.name]
        if len(same_name) == 1:
            record, matched_by_name = same_name[0], True
    if path.exists():
        try:
            header = read(path)
        except UserError as exc:
            return _Found(None, "missing", f"{what} cannot be read: {exc}")
        warnings: tuple[str, ...] = ()
        if record is not None and (record.file_size, record.mtime_ns) != (header.file_size, header.mtime_ns):
            warnings = (
                f"{what}: the snapshot's recorded header of {record.path} does not match the file "
                f"here (recorded {record.file_size} bytes, mtime_ns {record.mtime_ns}; the file: "
                f"{header.file_size} bytes, mtime_ns {header.mtime_ns}); planned from the file",
            )
        return _Found(header, "file", f"read from {path}", warnings)
    if record is not None:
        how = f" as {record.path}, matched by file name" if matched_by_name else ""
        return _Found(record, "snapshot", f"recorded in the snapshot{how}")
    if have_snapshot:
        return _Found(None, "missing", f"{what} {path} is not here and the snapshot records no header for it")
    return _Found(None, "missing", f"{what} {path} is not here (give --inventory a snapshot that records it)")


@dataclass
class Profiles:
    """What the planner needs from the models' headers, and what was found on the way."""

    profiles: dict[str, MemoryProfile] = field(default_factory=dict)
    headers: dict[str, HeaderInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_profiles(
    config: Config,
    recorded: Mapping[str, ModelHeader],
    *,
    have_snapshot: bool,
    read: Reader = read_file_header,
    profile: Profiler = _default_profiler,
) -> Profiles:
    """A memory profile per model from its file or its recorded header, saying which."""
    out = Profiles()
    for spec in config.model_specs():
        model = _find(f"models.{spec.name}.file", spec.file, recorded, read, have_snapshot)
        out.notes += model.warnings
        projector = None
        if spec.mmproj is not None:
            projector = _find(f"models.{spec.name}.mmproj", spec.mmproj, recorded, read, have_snapshot)
            out.notes += projector.warnings
        if model.header is None or (projector is not None and projector.header is None):
            missing = model if model.header is None else projector
            assert missing is not None
            out.headers[spec.name] = HeaderInfo("missing", missing.note)
            continue
        # the estimate sees the child's whole command line ([llama_server] args too): some change
        # what llama-server loads
        args, env = config.child_extras(spec)
        seen = spec.model_copy(update={"args": args, "env": env})
        try:
            out.profiles[spec.name] = profile(model.header, seen, projector.header if projector else None)
        except UserError as exc:
            out.headers[spec.name] = HeaderInfo("missing", f"its header cannot be estimated: {exc}")
            continue
        source = "snapshot" if "snapshot" in (model.source, projector.source if projector else "") else "file"
        note = model.note if model.source == source else projector.note if projector else model.note
        out.headers[spec.name] = HeaderInfo(source, note)  # type: ignore[arg-type]
    return out
