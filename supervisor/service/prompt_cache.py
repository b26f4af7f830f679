"""Keep a model's prompt cache across planned stops: save its slots before, restore them after.

A `keep_cache` model's child runs with `--slot-save-path <cache root>/<model dir>`
(supervisor/launch.py). The child calls in at two moments (supervisor/process.py `ChildOwner`):
- `after_load`: it answers /health but takes no request yet; the saved slots are restored here
  when they were made by the same launch (`CacheIdentity`), else discarded with the reason logged.
  Restored or not, the saved files are then removed: the cache passes from one life to the next,
  so a crash, which saves nothing, loses it, and a cache that preceded a crash is not offered again;
- `before_stop`: a planned stop (idle TTL, eviction, unload, a reload's restart, service stop) of
  a ready child; its idle slots that hold tokens are saved, busy ones skipped, within
  `prompt_cache.save_timeout` in all.

Rules kept here:
- every decision is supervisor/service/prompt_cache_rules.py's; this module does the HTTP and the files;
- one `CacheRoot` per root directory is the only writer of its files and keeps their index in
  memory, so a decision about the budget needs no await between reading and acting (no lock);
  bytes claimed by saves in progress count against the budget of every other save;
- file-system work runs in worker threads; every wait is bounded by the save or restore timeout;
- nothing here raises into the child's supervision: a failed save or restore is logged and counted,
  and the model starts or stops as it would without a cache.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import anyio.to_thread
from pydantic import ValidationError

from llama_smart_proxy.schemas.config import PromptCacheSettings
from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.schemas.prompt_cache import CacheIdentity, CacheManifest, FileIdentity, SavedSlot
from llama_smart_proxy.supervisor.children.child_request import ChildRequestError, request_json
from llama_smart_proxy.supervisor.children.hold import describe_bytes
from llama_smart_proxy.supervisor.service.prompt_cache_rules import (
    HeldSlot,
    Limits,
    cache_identity,
    choose_slots,
    identity_differences,
    make_room,
    predict_slot_bytes,
    slot_file_name,
)
from llama_smart_proxy.supervisor.proxy.backends import PromptCacheStatus

log = logging.getLogger("llama-smart-proxy.prompt-cache")

MANIFEST = "manifest.json"
_SLOT_FILE = re.compile(r"^slot-\d+\.bin$")
_MODEL_DIR = re.compile(r"^.+-[0-9a-f]{8}$")
"""What schemas/prompt_cache.py `model_dir_name` makes: only such directories are scanned
and cleaned, in case the root is shared with other files."""
_BUILD_LIBRARIES = ("libllama", "libggml", "libmtmd")
"""The llama.cpp libraries a llama-server beside them loads (the `llama` extra's layout): part of
the build's identity, since the program itself may be a thin launcher."""


# ---- the files


def file_identity(path: Path) -> FileIdentity:
    """Blocking: stat `path`."""
    st = path.stat()
    return FileIdentity(path=str(path), size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)


def build_identity(binary: Path) -> list[FileIdentity]:
    """Blocking: the llama-server program and the llama.cpp libraries in its directory."""
    program = binary.resolve()
    found = [file_identity(program)]
    for entry in sorted(program.parent.iterdir()):
        if entry.name.startswith(_BUILD_LIBRARIES) and entry.is_file() and not entry.is_symlink():
            found.append(file_identity(entry))
    return found


def launch_identity(launch: LaunchSpec, binary: Path) -> CacheIdentity:
    """Blocking: the identity of the caches a child of `launch` makes now."""
    return cache_identity(
        launch,
        model_file=file_identity(Path(launch.file)),
        mmproj_file=file_identity(Path(launch.mmproj)) if launch.mmproj else None,
        build=build_identity(binary),
    )


@dataclass
class _Saved:
    """One model's save on disk: its directory and manifest."""

    directory: Path
    manifest: CacheManifest

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.manifest.slots)


class CacheRoot:
    """The cache root directory: what is saved there, by model, and the only writer of its files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: dict[str, _Saved] = {}
        self._claims: dict[int, int] = {}
        """Bytes claimed by saves in progress, by claim id."""
        self._next_claim = 0
        self._loaded = False
        self._loading = anyio.Lock()

    def __repr__(self) -> str:
        return f"<CacheRoot {self.path} models={len(self._saved)} bytes={self.size_bytes()}>"

    async def load(self) -> None:
        """Read every model's manifest once (and clear leftovers of unfinished saves)."""
        async with self._loading:
            if not self._loaded:
                self._saved = await anyio.to_thread.run_sync(_scan, self.path)
                self._loaded = True

    def saved(self, model: str) -> CacheManifest | None:
        found = self._saved.get(model)
        return found.manifest if found else None

    def size_bytes(self, model: str | None = None) -> int:
        return sum(s.size_bytes for name, s in self._saved.items() if model is None or name == model)

    def held_slots(self) -> list[HeldSlot]:
        return [
            HeldSlot(name, s.slot, s.size_bytes, saved.manifest.saved_at, s.order)
            for name, saved in self._saved.items()
            for s in saved.manifest.slots
        ]

    def claimed_bytes(self) -> int:
        return sum(self._claims.values())

    def claim(self, size: int) -> int:
        self._next_claim += 1
        self._claims[self._next_claim] = size
        return self._next_claim

    def release(self, claim: int) -> None:
        self._claims.pop(claim, None)

    async def disk_room(self, reserve: int) -> int:
        """Bytes the file system may still take beyond `reserve`, less what saves in progress claimed."""
        free = await anyio.to_thread.run_sync(lambda: shutil.disk_usage(_existing_parent(self.path)).free)
        return free - reserve - self.claimed_bytes()

    async def drop(self, slots: list[HeldSlot]) -> None:
        """Delete these slots' files; a model left with none loses its directory's manifest too."""
        by_model: dict[str, set[int]] = {}
        for held in slots:
            by_model.setdefault(held.model, set()).add(held.slot)
        for model, ids in by_model.items():
            saved = self._saved.get(model)
            if saved is None:
                continue
            keep = [s for s in saved.manifest.slots if s.slot not in ids]
            gone = [s for s in saved.manifest.slots if s.slot in ids]
            if keep:  # the index first: no decision may count what is being deleted
                self._saved[model] = _Saved(saved.directory, saved.manifest.model_copy(update={"slots": keep}))
            else:
                del self._saved[model]
            await anyio.to_thread.run_sync(_rewrite, saved.directory, gone, self._saved.get(model))

    async def discard(self, model: str, directory: Path) -> None:
        """Forget the model's save and empty its directory of our files (leftovers included)."""
        self._saved.pop(model, None)
        await anyio.to_thread.run_sync(_clear, directory)

    async def record(self, model: str, directory: Path, manifest: CacheManifest) -> None:
        """Write the manifest of a save whose slot files are in place (atomically, last)."""
        await anyio.to_thread.run_sync(_write_manifest, directory, manifest)
        self._saved[model] = _Saved(directory, manifest)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _scan(root: Path) -> dict[str, _Saved]:
    saved: dict[str, _Saved] = {}
    if not root.is_dir():
        return saved
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and _MODEL_DIR.match(p.name)):
        manifest = _read_manifest(directory)
        if manifest is not None:
            present = [s for s in manifest.slots if (directory / s.file).is_file()]
            manifest = manifest.model_copy(update={"slots": present})
        listed = {s.file for s in manifest.slots} if manifest else set()
        for leftover in (p for p in directory.iterdir() if _SLOT_FILE.match(p.name) and p.name not in listed):
            leftover.unlink(missing_ok=True)  # a save that did not finish: never restored
        if manifest is not None and manifest.slots:
            saved[manifest.model] = _Saved(directory, manifest)
    return saved


def _read_manifest(directory: Path) -> CacheManifest | None:
    try:
        return CacheManifest.model_validate_json((directory / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as exc:
        log.warning("prompt cache %s: unreadable manifest, its slots are not restored: %s", directory, exc)
        return None


def _write_manifest(directory: Path, manifest: CacheManifest) -> None:
    temporary = directory / (MANIFEST + ".tmp")
    temporary.write_text(manifest.model_dump_json(indent=1))
    os.replace(temporary, directory / MANIFEST)


def _rewrite(directory: Path, gone: list[SavedSlot], remaining: _Saved | None) -> None:
    if remaining is None:
        (directory / MANIFEST).unlink(missing_ok=True)
    else:
        _write_manifest(directory, remaining.manifest)
    for slot in gone:
        (directory / slot.file).unlink(missing_ok=True)


def _clear(directory: Path) -> None:
    (directory / MANIFEST).unlink(missing_ok=True)
    if directory.is_dir():
        for leftover in directory.iterdir():
            if _SLOT_FILE.match(leftover.name):
                leftover.unlink(missing_ok=True)


# ---- one model


@dataclass
class ModelCache:
    """One model's prompt cache across its children's lives, with the counters /status shows."""

    model: str
    status: PromptCacheStatus = field(default_factory=PromptCacheStatus)
    restored: dict[int, int] = field(default_factory=dict)
    """{slot: tokens} restored into the current child (saved again even if unused since)."""
    identity: CacheIdentity | None = None
    """The current child's identity, taken when it loaded: a model file replaced while it runs
    must not lend its name to caches computed with the old one."""

    def _count(self, **changes: object) -> None:
        self.status = replace(self.status, **changes)  # type: ignore[arg-type]

    async def restore(self, root: CacheRoot, launch: LaunchSpec, binary: Path, port: int, settings: PromptCacheSettings) -> None:
        """Restore the saved slots into the child on `port`, if they were made by the same launch."""
        self.restored, self.identity = {}, None
        if launch.slot_save_path is None:
            return
        directory = Path(launch.slot_save_path)
        started = time.monotonic()
        with anyio.move_on_after(settings.restore_timeout) as scope:
            await anyio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
            await root.load()
            self.identity = await anyio.to_thread.run_sync(launch_identity, launch, binary)
            manifest = root.saved(self.model)
            if manifest is None:
                return
            differences = identity_differences(manifest.identity, self.identity)
            if differences:
                note = f"discarded {len(manifest.slots)} saved slots made by another launch: " + "; ".join(differences)
                log.warning("model %s: %s", self.model, note)
                await root.discard(self.model, directory)
                self._count(saves_discarded=self.status.saves_discarded + 1, last_event=note)
                return
            try:
                await self._restore_slots(manifest, port, deadline=started + settings.restore_timeout)
            finally:
                # consumed whatever happened: the next life gets what this one saves
                with anyio.CancelScope(shield=True):
                    await root.discard(self.model, directory)
                    self._count(bytes_on_disk=root.size_bytes(self.model))
            seconds = time.monotonic() - started
            tokens = sum(self.restored.values())
            note = f"restored {len(self.restored)} of {len(manifest.slots)} saved slots ({tokens} tokens) in {seconds:.3f} s"
            log.info("model %s: %s", self.model, note)
            self._count(last_restore_s=round(seconds, 6), last_event=note)
        if scope.cancelled_caught:
            note = f"restoring took longer than prompt_cache.restore_timeout ({settings.restore_timeout:g} s); started with what was restored"
            log.warning("model %s: %s", self.model, note)
            self._count(last_restore_s=round(time.monotonic() - started, 6), last_event=note)

    async def _restore_slots(self, manifest: CacheManifest, port: int, *, deadline: float) -> None:
        for saved in manifest.slots:
            try:
                status, answer = await request_json(
                    port, "POST", f"/slots/{saved.slot}?action=restore", {"filename": saved.file},
                    timeout_s=max(deadline - time.monotonic(), 0.001),
                )  # fmt: skip
            except ChildRequestError as exc:
                log.warning("model %s: slot %d not restored: %s", self.model, saved.slot, exc)
                continue
            tokens = answer.get("n_restored") if isinstance(answer, dict) else None
            if status != 200 or not isinstance(tokens, int):
                log.warning("model %s: slot %d not restored: %s %s", self.model, saved.slot, status, _error_text(answer))
                continue
            self.restored[saved.slot] = tokens
            self._count(
                slots_restored=self.status.slots_restored + 1, tokens_restored=self.status.tokens_restored + tokens
            )

    async def save(
        self,
        root: CacheRoot,
        launch: LaunchSpec,
        binary: Path,
        port: int,
        settings: PromptCacheSettings,
        estimate: Estimate | None,
        starting: frozenset[str] = frozenset(),
        slots_timeout_s: float = 5.0,
    ) -> None:
        """Save the idle slots of the ready child on `port` that hold tokens, within save_timeout;
        the saves of `starting` models are the last the budget drops. A child that does not list
        its slots within `slots_timeout_s` (its liveness probe's timeout) is hung or stopped: nothing
        is saved, and its stop is not held up."""
        if launch.slot_save_path is None:
            return
        started = time.monotonic()
        save = _Save(Path(launch.slot_save_path), deadline=started + settings.save_timeout, slots_timeout_s=slots_timeout_s)
        try:
            with anyio.move_on_after(settings.save_timeout) as scope:
                await self._save_slots(save, root, launch, binary, port, settings, estimate, starting)
        finally:
            with anyio.CancelScope(shield=True):  # what was saved is kept, even past the deadline
                await self._record(save, root, settings, starting)
        seconds = time.monotonic() - started
        tokens = sum(s.tokens for s in save.saved)
        size = describe_bytes(sum(s.size_bytes for s in save.saved))
        note = save.failure or f"saved {len(save.saved)} slots ({tokens} tokens, {size}) in {seconds:.3f} s"
        if save.busy:
            note += f"; {len(save.busy)} busy slots not saved"
        if save.left_out:
            note += f"; {save.left_out} slots left out by the disk budget"
        if scope.cancelled_caught:
            note += f"; stopped at prompt_cache.save_timeout ({settings.save_timeout:g} s)"
        log.info("model %s: %s", self.model, note)
        self._count(
            slots_saved=self.status.slots_saved + len(save.saved),
            tokens_saved=self.status.tokens_saved + tokens,
            bytes_on_disk=root.size_bytes(self.model),
            last_save_s=round(seconds, 6),
            last_event=note,
        )

    async def _save_slots(
        self,
        save: _Save,
        root: CacheRoot,
        launch: LaunchSpec,
        binary: Path,
        port: int,
        settings: PromptCacheSettings,
        estimate: Estimate | None,
        starting: frozenset[str],
    ) -> None:
        await root.load()
        save.identity = self.identity or await anyio.to_thread.run_sync(launch_identity, launch, binary)
        try:
            # /slots is answered by llama-server's inference loop: a hung one never answers
            status, slots = await request_json(port, "GET", "/slots", timeout_s=min(save.remaining(), save.slots_timeout_s))
        except ChildRequestError as exc:
            save.failure = f"not saved: {exc}"
            return
        if status != 200:
            save.failure = f"not saved: GET /slots answered {status}"
            return
        choice = choose_slots(slots, self.restored)
        save.busy = choice.busy
        incoming = [(s, predict_slot_bytes(s.tokens, estimate)) for s in choice.save]
        limits = await self._limits(root, settings)
        room = make_room(root.held_slots(), incoming, model=self.model, limits=limits, starting=starting)
        save.left_out = len(room.left_out)
        await root.drop(list(room.drop))  # this model's earlier save among them
        await root.discard(self.model, save.directory)  # and anything of it the index did not know
        save.claim = root.claim(sum(size for s, size in incoming if s in room.keep))
        for slot in room.keep:
            answer = await self._save_slot(slot.slot, port, save.deadline)
            name = slot_file_name(slot.slot)
            if answer is not None and answer[0] > 0:
                save.saved.append(SavedSlot(slot=slot.slot, file=name, tokens=answer[0], size_bytes=answer[1], order=slot.order))
            elif answer is not None:  # nothing in it after all (moved to llama-server's RAM cache)
                await anyio.to_thread.run_sync(lambda: (save.directory / name).unlink(missing_ok=True))

    async def _record(self, save: _Save, root: CacheRoot, settings: PromptCacheSettings, starting: frozenset[str]) -> None:
        """Write the manifest of what was saved, give back the claim, and check the budget with the
        real sizes in place of the predictions."""
        if save.saved and save.identity is not None:
            manifest = CacheManifest(model=self.model, identity=save.identity, saved_at=time.time(), slots=save.saved)
            await root.record(self.model, save.directory, manifest)
        if save.claim is not None:
            root.release(save.claim)
            limits = await self._limits(root, settings)
            room = make_room(root.held_slots(), [], model=self.model, limits=limits, starting=starting)
            await root.drop(list(room.drop))

    async def _save_slot(self, slot: int, port: int, deadline: float) -> tuple[int, int] | None:
        """(tokens, bytes) llama-server wrote for `slot`, or None when it did not save it."""
        try:
            status, answer = await request_json(
                port, "POST", f"/slots/{slot}?action=save", {"filename": slot_file_name(slot)},
                timeout_s=max(deadline - time.monotonic(), 0.001),
            )  # fmt: skip
        except ChildRequestError as exc:
            log.warning("model %s: slot %d not saved: %s", self.model, slot, exc)
            return None
        tokens = answer.get("n_saved") if isinstance(answer, dict) else None
        written = answer.get("n_written") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(tokens, int) or not isinstance(written, int):
            log.warning("model %s: slot %d not saved: %s %s", self.model, slot, status, _error_text(answer))
            return None
        return tokens, written

    async def _limits(self, root: CacheRoot, settings: PromptCacheSettings) -> Limits:
        return Limits(
            max_bytes=settings.max_bytes - root.claimed_bytes(),
            max_bytes_per_model=settings.max_bytes_per_model,
            disk_room_bytes=await root.disk_room(settings.disk_reserve),
        )


@dataclass
class _Save:
    """One save in progress: what it found and wrote so far."""

    directory: Path
    deadline: float
    """time.monotonic() at which save_timeout ends."""
    slots_timeout_s: float
    identity: CacheIdentity | None = None
    saved: list[SavedSlot] = field(default_factory=list)
    busy: tuple[int, ...] = ()
    left_out: int = 0
    claim: int | None = None
    failure: str | None = None

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)


def _error_text(answer: object) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message", ""))
    return str(answer)[:200]


class PromptCaches:
    """Every keep_cache model's `ModelCache` and the cache roots they save under (the runtime's)."""

    def __init__(self) -> None:
        self._roots: dict[Path, CacheRoot] = {}
        self._models: dict[str, ModelCache] = {}
        self._starting: set[str] = set()
        """Models being started, from their memory reservation until they are ready (or not): the
        saves of the models they evict, and of any other model meanwhile, keep their caches."""

    def set_starting(self, model: str, starting: bool) -> None:
        if starting:
            self._starting.add(model)
        else:
            self._starting.discard(model)

    def root(self, launch: LaunchSpec) -> CacheRoot:
        assert launch.slot_save_path is not None
        path = Path(launch.slot_save_path).parent
        if path not in self._roots:
            self._roots[path] = CacheRoot(path)
        return self._roots[path]

    def model(self, name: str) -> ModelCache:
        if name not in self._models:
            self._models[name] = ModelCache(name)
        return self._models[name]

    def status(self, name: str, keep_cache: bool) -> PromptCacheStatus | None:
        """The model's counters, with what its directory holds now; None for a model that never
        kept a cache."""
        cache = self._models.get(name)
        if cache is None and not keep_cache:
            return None
        status = cache.status if cache else PromptCacheStatus()
        on_disk = sum(root.size_bytes(name) for root in self._roots.values())
        return replace(status, bytes_on_disk=on_disk)

    async def open(self, launches: list[LaunchSpec]) -> None:
        """Read the cache roots these launches save under, so /status shows what is on disk before
        any model starts."""
        for launch in launches:
            if launch.slot_save_path is not None:
                try:
                    await self.root(launch).load()
                except OSError as exc:
                    log.error("prompt cache %s: cannot be read: %s", self.root(launch).path, exc)

    async def restore(self, launch: LaunchSpec, binary: Path, port: int, settings: PromptCacheSettings) -> None:
        if launch.slot_save_path is None:
            return
        try:
            await self.model(launch.model).restore(self.root(launch), launch, binary, port, settings)
        except (OSError, ValidationError) as exc:  # a file problem must not fail the start
            log.error("model %s: prompt cache not restored: %s", launch.model, exc)

    async def save(
        self,
        launch: LaunchSpec,
        binary: Path,
        port: int,
        settings: PromptCacheSettings,
        estimate: Estimate | None,
        *,
        slots_timeout_s: float,
    ) -> None:
        if launch.slot_save_path is None:
            return
        try:
            starting = frozenset(self._starting)
            await self.model(launch.model).save(
                self.root(launch), launch, binary, port, settings, estimate, starting, slots_timeout_s
            )
        except (OSError, ValidationError) as exc:  # a full disk must not fail the stop
            log.error("model %s: prompt cache not saved: %s", launch.model, exc)
