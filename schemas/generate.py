"""Generate the JSON Schema files in this directory from the models."""

from __future__ import annotations

import json
from pathlib import Path

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.inventory import Inventory
from llama_smart_proxy.schemas.plan import FleetPlan, Plan

HERE = Path(__file__).parent
SCHEMAS = {"config": Config, "plan": Plan, "inventory": Inventory, "fleet-plan": FleetPlan}


def schema_texts() -> dict[str, str]:
    """File name stem -> the JSON text that belongs in <stem>.schema.json."""
    texts = {}
    for name, model in SCHEMAS.items():
        mode = "validation" if name == "config" else "serialization"
        schema = model.model_json_schema(mode=mode)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        # No `$id`: a relative one makes taplo (Even Better TOML's engine) reject the whole schema
        # ("invalid schema"), and there is no published address to make it absolute; editors and
        # `#:schema` lines name the file itself.
        texts[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return texts


def write_all() -> list[Path]:
    written = []
    for name, text in schema_texts().items():
        path = HERE / f"{name}.schema.json"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written

