"""How sound a GGUF file is, as far as can be known without loading its weights.

What `validate` (and so every command that loads a config) checks for each model and projector
file: it exists and is readable; it is GGUF (magic, version); its header parses; every tensor lies
inside the file (supervisor/memory/reader.py); and each metadata key the estimator reads has the
type and range llama.cpp requires (supervisor/memory/architectures.py, compute.py). Every problem
is a ModelFileError naming the file.
"""

from __future__ import annotations

from pathlib import Path

from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.supervisor.memory.architectures import hyperparameters
from llama_smart_proxy.supervisor.memory.compute import mmproj_compute_bytes
from llama_smart_proxy.supervisor.memory.reader import read_header


def check_model_file(path: Path, *, projector: bool = False) -> ModelHeader:
    """The file's header, once it passed every check; raises ModelFileError."""
    header = read_header(path)
    if projector:
        mmproj_compute_bytes(header, flash_attn=False)
    else:
        hyperparameters(header)
    return header
