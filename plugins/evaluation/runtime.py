"""Loading what an evaluation needs: the trained module, its tokenizer, a device.

Imported only inside ``run`` (it imports torch).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from recipe_engine import StageError


def load_tokenizer(directory: Path) -> Any:
    """The runtime tokenizer of a tokenizer artifact (encode without bos/eos, decode, ids)."""
    from recipe_engine_plugins.tokenizers.spm import Tokenizer

    return Tokenizer.load(Path(directory))


def load_checkpoint(directory: Path, build: Callable[[str, Any], Any] | None = None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module a checkpoint artifact holds (eval mode, fp32, CPU) and its ``model.json``."""
    from recipe_engine_plugins.models import load_model

    directory = Path(directory)
    spec = json.loads((directory / "model.json").read_text())
    registry = SimpleNamespace(build=build) if build is not None else None
    return load_model(directory, registry=registry), spec


def check_vocab(spec: dict[str, Any], tokenizer: Any, where: str) -> None:
    """The model must have a row for every token id the tokenizer can produce."""
    if spec["vocab_size"] < tokenizer.vocab_size:
        raise StageError(
            f"{where}: the checkpoint's vocab_size={spec['vocab_size']} is smaller than the "
            f"tokenizer's vocab_size={tokenizer.vocab_size}; was the model trained with this "
            "tokenizer?"
        )


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
