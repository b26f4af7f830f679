"""What a saved prompt cache is, on disk: the manifest beside a model's saved slot files.

A `keep_cache` model's directory under the cache root holds `manifest.json` (a `CacheManifest`)
and one `slot-<id>.bin` per saved slot, written by llama-server's `POST /slots/{id}?action=save`.
The manifest is written last, atomically: slot files without one are leftovers of a save that did
not finish, never restored.

A saved slot is the KV cache of the tokens it holds, valid only for the launch that computed it
(`CacheIdentity`): llama-server restores a slot saved at another context size without a word
(DESIGN.md), so whoever restores compares identities first.
"""

from __future__ import annotations

import re
from hashlib import sha256
from typing import Literal

from pydantic import Field

from llama_smart_proxy.schemas.config import CacheType, Contract

MANIFEST_FORMAT = 1


def model_dir_name(model: str) -> str:
    """The model's directory under the cache root: its name made safe for a path, plus a short
    hash, so that two names that read alike ("a/b", "a_b") never share a directory."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model).strip(".") or "model"
    return f"{safe[:64]}-{sha256(model.encode()).hexdigest()[:8]}"


class FileIdentity(Contract):
    """A file as `stat` sees it: a changed size or modification time means another file."""

    path: str = Field(description="The file, absolute.")
    size_bytes: int = Field(ge=0)
    mtime_ns: int = Field(description="Modification time, nanoseconds since the epoch.")


class CacheIdentity(Contract):
    """Everything a saved slot's meaning depends on. Two equal identities: the slot may be restored.

    Placement (GPUs, layers, split) and batch sizes are left out: llama.cpp writes a slot's state
    the same from any device, and they do not change what the cached tokens mean."""

    model_file: FileIdentity = Field(description="The GGUF file the KV cache was computed with.")
    mmproj_file: FileIdentity | None = Field(
        None, description="The vision projector, whose image embeddings a cached prompt may hold."
    )
    ctx: int
    parallel: int
    kv_unified: bool
    cache_type_k: CacheType
    cache_type_v: CacheType
    flash_attn: Literal["on", "off", "auto"] = Field(
        description="With flash attention off llama.cpp stores V transposed, a different layout."
    )
    args: list[str] = Field(
        description="The config's extra arguments: a LoRA adapter or RoPE scaling among them "
        "changes what the cached tokens mean."
    )
    env: dict[str, str] = Field(description="The config's extra environment, for the same reason.")
    build: list[FileIdentity] = Field(
        description="The llama-server program and the llama.cpp libraries beside it: another "
        "build may write or read a slot differently."
    )


class SavedSlot(Contract):
    slot: int = Field(ge=0, description="The slot id it was saved from and is restored to.")
    file: str = Field(description="Its file name in the model's directory.")
    tokens: int = Field(ge=0, description="Tokens it holds (llama-server's n_saved).")
    size_bytes: int = Field(ge=0, description="The file's size (llama-server's n_written).")
    order: int = Field(
        description="How recently the slot was used, against the other slots of the same save: "
        "higher is more recent. The budget drops the oldest first."
    )


class CacheManifest(Contract):
    format: Literal[1] = Field(MANIFEST_FORMAT, description="Bumped when this contract changes.")
    model: str = Field(description="The model's name in the config.")
    identity: CacheIdentity
    saved_at: float = Field(description="Unix time of the save.")
    slots: list[SavedSlot]
