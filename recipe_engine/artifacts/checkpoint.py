"""The ``checkpoint`` kind (and the model spec an ``export`` carries): which architecture, with
which parameters, and where the weights are. Stdlib only: reading the weights is torch's job.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_json

MODEL_SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_NATIVE_DIR = "recipe_engine"  # inside an export: model.json + the tokenizer files
_SPEC_KEYS = ("name", "params", "vocab_size", "max_seq_len")


def write_model_spec(directory: str | Path, name: str, params: dict[str, Any],
                     vocab_size: int, max_seq_len: int) -> Path:
    """Write ``model.json``: the registered model component ``name``, its full ``params``
    (every field, defaults included) and the two sizes its ``build`` takes."""
    path = Path(directory) / MODEL_SPEC_FILE
    spec = {"name": name, "params": dict(params), "vocab_size": int(vocab_size),
            "max_seq_len": int(max_seq_len)}
    atomic_write_json(path, spec, indent=2)
    return path


def read_model_spec(directory: str | Path) -> dict[str, Any]:
    """``model.json`` of a checkpoint artifact (or of an export's ``recipe_engine/``):
    ``{"name", "params", "vocab_size", "max_seq_len"}``. Rebuild the module with the
    registered component: ``build(ModelConfig, {"name": spec["name"], **spec["params"]})
    .build(spec["vocab_size"], spec["max_seq_len"])``."""
    path = Path(directory) / MODEL_SPEC_FILE
    spec = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise ValueError(f"{path}: not a model spec, missing {missing}")
    return spec


def checkpoint_weights_path(directory: str | Path) -> Path:
    """The safetensors file of a checkpoint artifact (fp32, unsharded, the module's own
    ``state_dict`` names; a tied weight is stored once)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint has no weights file")
    return path
