"""Built-in export components (kind ``export``).

* ``hf_export``: a Hugging Face directory (``LlamaForCausalLM`` + a fast tokenizer) that
  ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``lm_eval --model hf`` load offline, with
  our own ``model.json`` and tokenizer files beside it (``recipe_engine/``).

torch and transformers are imported inside ``run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from recipe_engine import RecipeError, Stage, StageContext, hookimpl

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class HFExport(Stage):
    """Checkpoint + tokenizer -> a Hugging Face model directory (LlamaForCausalLM)."""

    kind: ClassVar[str] = "export"
    name: ClassVar[str] = "hf_export"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "Hugging Face directory: LlamaForCausalLM + fast tokenizer"
    inputs: ClassVar[dict[str, str]] = {"checkpoint": "checkpoint", "tokenizer": "tokenizer"}
    output: ClassVar[str] = "export"

    dtype: str = "float32"  # weights as saved: float32, bfloat16 or float16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise RecipeError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")

    def run(self, ctx: StageContext) -> None:
        from .hf import export_hf

        export_hf(ctx, dtype=self.dtype)


@hookimpl
def recipe_components():
    return [HFExport]
