"""Everything that decides how a model's llama-server child is started.

Two equal `LaunchSpec`s start identical children: a reload keeps a child whose spec is unchanged
and restarts one whose spec changed (supervisor/service/reload_diff.py). The port is not part of it: the
supervisor picks one per start.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llama_smart_proxy.schemas.config import CacheType, Contract


class LaunchSpec(Contract):
    model: str = Field(description="The model's name in the config.")
    file: str = Field(description="The GGUF file, absolute.")
    mmproj: str | None = Field(None, description="Vision projector, absolute.")
    ctx: int = Field(ge=0)
    parallel: int = Field(ge=1)
    kv_unified: bool
    cache_type_k: CacheType
    cache_type_v: CacheType
    flash_attn: Literal["on", "off", "auto"]
    batch: int = Field(ge=1)
    ubatch: int = Field(ge=1)
    gpu_layers: int = Field(ge=0, description="-ngl; 0 for a CPU model.")
    devices: list[str] = Field(
        default_factory=list,
        description="GPU UUIDs the child sees, in order (CUDA_VISIBLE_DEVICES); empty: none.",
    )
    tensor_split: list[float] = Field(
        default_factory=list,
        description="-ts proportions, one per device (llama.cpp normalises them; the planner "
        "writes layer counts, which round exactly); empty for one device.",
    )
    split_mode: Literal["none", "layer"] = Field("layer", description="-sm.")
    main_gpu: int = Field(0, ge=0, description="-mg, an index into devices.")
    args: list[str] = Field(default_factory=list, description="Extra arguments, global then model.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    slot_save_path: str | None = Field(
        None,
        description="--slot-save-path: the directory where this model's slots are saved and "
        "restored (keep_cache); None: the child saves nothing.",
    )


def served_model_name(model: str) -> str:
    """The name a child reports as its responses' `"model"`: it is started with `--alias` and this
    name (supervisor/children/launch.py). llama-server splits `--alias` at commas and strips each part
    (common/arg.cpp, build 11434), so a comma becomes `_` and surrounding whitespace goes; the proxy
    renames it back to the name the client asked for (supervisor/proxy/http.py `ModelRename`)."""
    return model.replace(",", "_").strip() or "model"
