"""The prompt cache's decisions, pure: which launch a saved slot belongs to, which slots to save,
how big they will be, and what to drop to stay inside the disk budget. No I/O, no awaits;
supervisor/service/prompt_cache.py does the saving and restoring and feeds these functions what it read.

Rules kept here:
- a saved slot is restored only into a child whose `CacheIdentity` equals the one it was saved
  with; otherwise it is discarded, and `identity_differences` says why in words for the log;
- a slot is saved when it is idle and holds tokens; a busy slot is never waited for (a save request
  for a busy slot waits in llama-server's queue until the slot is done, measured on build 11434);
- the budget is two limits, per model and in all, plus the room the disk has beyond its reserve;
  the oldest saved slots go first: other saves by their time, a model's own slots by how recently
  they were used; a slot that cannot fit even then is not saved, so the directory never grows past
  the limits by more than an estimate's error, which the check after the save takes back;
- the save of a model that is starting goes last: its restore is moments away (when a start
  evicts a model, the evicted one's save must not push out the cache the start is about to use).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama_smart_proxy.schemas.estimate import Estimate
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.schemas.prompt_cache import CacheIdentity, FileIdentity

SLOT_FILE_OVERHEAD_BYTES = 64 * 1024
"""Added to a slot file's predicted size: llama.cpp writes a header, per-layer metadata and the
token ids (4 bytes each) beside the KV cells (a 952-token slot of the tiny model: 259 048 bytes
for 243 712 of KV)."""
TOKEN_ID_BYTES = 4


def slot_file_name(slot: int) -> str:
    return f"slot-{slot}.bin"


# ---- identity


def cache_identity(
    launch: LaunchSpec, *, model_file: FileIdentity, mmproj_file: FileIdentity | None, build: Sequence[FileIdentity]
) -> CacheIdentity:
    """The identity of the caches a child of `launch` makes, given what its files are now."""
    return CacheIdentity(
        model_file=model_file,
        mmproj_file=mmproj_file,
        ctx=launch.ctx,
        parallel=launch.parallel,
        kv_unified=launch.kv_unified,
        cache_type_k=launch.cache_type_k,
        cache_type_v=launch.cache_type_v,
        flash_attn=launch.flash_attn,
        args=list(launch.args),
        env=dict(launch.env),
        build=list(build),
    )


def identity_differences(saved: CacheIdentity, now: CacheIdentity) -> list[str]:
    """What differs between the launch a cache was saved by and the one now, in words; [] if none."""
    lines: list[str] = []
    for name, label in (("model_file", "the model file"), ("mmproj_file", "the projector file")):
        before, after = getattr(saved, name), getattr(now, name)
        if before != after:
            lines.append(f"{label} {_describe_file(before)} is now {_describe_file(after)}")
    for name in ("ctx", "parallel", "kv_unified", "cache_type_k", "cache_type_v", "flash_attn", "args", "env"):
        before, after = getattr(saved, name), getattr(now, name)
        if before != after:
            lines.append(f"{name} {before} -> {after}")
    if saved.build != now.build:
        lines.append("the llama-server build changed")
    return lines


def _describe_file(identity: FileIdentity | None) -> str:
    if identity is None:
        return "(none)"
    return f"{identity.path} ({identity.size_bytes} bytes, mtime {identity.mtime_ns})"


# ---- what to save


@dataclass(frozen=True)
class SlotToSave:
    slot: int
    tokens: int
    """Tokens it holds, as far as /slots (or our own restore) tells; the size prediction uses it."""
    order: int
    """How recently it was used: higher is more recent."""


@dataclass(frozen=True)
class SlotChoice:
    save: tuple[SlotToSave, ...]
    """Idle slots that hold tokens, most recently used first."""
    busy: tuple[int, ...]
    """Slots processing a request now: not saved, never waited for."""


def choose_slots(slots: Any, restored: Mapping[int, int]) -> SlotChoice:
    """From llama-server's `GET /slots` answer, the slots worth saving.

    `restored` is {slot: tokens} restored into this child at its start: /slots shows nothing of a
    restored slot until it takes a task, but its tokens are there and worth saving again. A slot
    whose last task /slots reports holds its prompt and what it generated (`n_prompt_tokens`,
    `next_token[0].n_decoded`); with a unified KV cache llama-server may since have moved it to its
    RAM prompt cache, in which case the save writes no tokens and is dropped then."""
    save: list[SlotToSave] = []
    busy: list[int] = []
    for entry in slots if isinstance(slots, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            continue
        slot = entry["id"]
        if entry.get("is_processing"):
            busy.append(slot)
            continue
        tokens = _int(entry.get("n_prompt_tokens"))
        next_token = entry.get("next_token")
        if isinstance(next_token, list) and next_token and isinstance(next_token[0], dict):
            tokens += _int(next_token[0].get("n_decoded"))
        task = entry.get("id_task")
        if tokens > 0 and isinstance(task, int):
            save.append(SlotToSave(slot, tokens, order=task))
        elif restored.get(slot, 0) > 0:
            save.append(SlotToSave(slot, restored[slot], order=-1))  # restored, unused since: oldest
    save.sort(key=lambda s: (-s.order, s.slot))
    return SlotChoice(tuple(save), tuple(sorted(busy)))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def predict_slot_bytes(tokens: int, estimate: Estimate | None) -> int:
    """A slot file's size before it is written: its tokens' share of the model's KV cache (by the
    cells llama.cpp allocates), a sequence's recurrent state, the token ids, and a margin for
    llama.cpp's header. Without an estimate, 0 (the check after the save then decides alone).
    Sliding-window layers hold less than their share: the check after the save corrects that."""
    if estimate is None:
        return 0
    devices = [*estimate.gpus, estimate.host]
    kv = sum(d.kv_bytes for d in devices)
    recurrent = sum(d.recurrent_bytes for d in devices)
    cells = max(estimate.settings.n_ctx, 1)
    per_token = -(-kv // cells)  # ceil
    return tokens * (per_token + TOKEN_ID_BYTES) + recurrent // estimate.settings.parallel + SLOT_FILE_OVERHEAD_BYTES


# ---- the budget


@dataclass(frozen=True)
class HeldSlot:
    """A slot file on disk, as the cache root's index knows it."""

    model: str
    slot: int
    size_bytes: int
    saved_at: float
    order: int

    @property
    def age_key(self) -> tuple[float, int]:
        """Sorts oldest first: earlier saves, then less recently used slots of one save."""
        return (self.saved_at, self.order)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    """The whole cache root."""
    max_bytes_per_model: int
    disk_room_bytes: int
    """What the file system may still take: free space minus the reserve (negative: over it)."""


@dataclass(frozen=True)
class Room:
    drop: tuple[HeldSlot, ...]
    """Held slots to delete, oldest first."""
    keep: tuple[SlotToSave, ...]
    """Incoming slots that fit, most recent first."""
    left_out: tuple[SlotToSave, ...]
    """Incoming slots that do not fit even with everything older dropped."""


def make_room(
    held: Iterable[HeldSlot],
    incoming: Sequence[tuple[SlotToSave, int]],
    *,
    model: str,
    limits: Limits,
    starting: frozenset[str] = frozenset(),
) -> Room:
    """Decide what to drop so that `incoming` ((slot, predicted bytes), most recent first) fits
    beside what is held, for `model`'s save.

    A model's earlier save is replaced by the new one, so its held slots are dropped whatever
    comes in. With nothing incoming this is the check after a save: it drops the oldest until every
    limit holds. Saves of `starting` models are dropped only when nothing else is left."""
    held = sorted(held, key=lambda h: (h.model in starting, h.age_key))
    drop = [h for h in held if h.model == model and incoming]
    others = [h for h in held if not (h.model == model and incoming)]
    held_total = sum(h.size_bytes for h in held)
    # the file system: what it may take is what we hold now plus its room beyond the reserve
    cap = min(limits.max_bytes, held_total + limits.disk_room_bytes)

    keep: list[tuple[SlotToSave, int]] = []
    left_out: list[SlotToSave] = []
    per_model = 0
    for slot, size in incoming:  # most recent first: the budget keeps those
        if per_model + size <= limits.max_bytes_per_model and size <= cap:
            keep.append((slot, size))
            per_model += size
        else:
            left_out.append(slot)

    # with nothing incoming, the model's own slots must also fit its budget: drop its oldest
    by_model: dict[str, int] = {}
    for h in others:
        by_model[h.model] = by_model.get(h.model, 0) + h.size_bytes
    for h in list(others):
        if by_model[h.model] > limits.max_bytes_per_model:
            by_model[h.model] -= h.size_bytes
            others.remove(h)
            drop.append(h)

    kept_for_starts = sum(h.size_bytes for h in others if h.model in starting)
    while per_model > cap - kept_for_starts and keep:  # cannot fit even with every other save gone
        slot, size = keep.pop()  # the least recently used first
        left_out.append(slot)
        per_model -= size
    total = sum(h.size_bytes for h in others) + per_model
    for h in [h for h in others if h.model not in starting]:  # oldest first, any model
        if total <= cap:
            break
        drop.append(h)
        total -= h.size_bytes
    for h in [h for h in others if h.model in starting]:  # still over them alone: theirs too
        if total <= cap:
            break
        drop.append(h)
        total -= h.size_bytes
    return Room(tuple(sorted(drop, key=lambda h: (h.model in starting, h.age_key))), tuple(s for s, _ in keep), tuple(left_out))
