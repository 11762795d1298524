"""Loading what an evaluation needs: the trained module, its tokenizer, a device.

Imported only inside ``run`` (it imports torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from recipe_engine import ModelConfig, StageError
from recipe_engine.artifacts import checkpoint_weights_path, load_tokenizer, read_model_spec

__all__ = ["check_vocab", "load_checkpoint", "load_tokenizer", "pick_device"]


def load_checkpoint(directory: Path, build: Callable[[Any, Any], Any] | None = None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module a checkpoint artifact holds (eval mode, fp32, CPU) and its ``model.json``.

    ``build`` is the stage's ``ctx.build`` (the registry of the run); by default the installed
    plugins' registry."""
    from safetensors.torch import load_model as load_weights

    spec = read_model_spec(directory)
    if build is None:
        from recipe_engine import PluginManager

        build = PluginManager().registry.build
    config = build(ModelConfig, {"name": spec["name"], **spec["params"]})
    module = config.build(spec["vocab_size"], spec["max_seq_len"])
    load_weights(module, str(checkpoint_weights_path(directory)))
    return module.eval(), spec


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
