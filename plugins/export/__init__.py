"""Built-in export stages (output kind ``export``).

* ``hf_export``: a Hugging Face directory (``LlamaForCausalLM`` + a fast tokenizer) that
  ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``lm_eval --model hf`` load offline, with
  our own ``model.json`` and tokenizer files beside it (``recipe_engine/``).

torch and transformers are imported inside ``run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


from recipe_engine import Problems, Stage, StageContext, hookimpl

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class HFExport(Stage,
               name="hf_export",
               version="1",
               description="Hugging Face directory: LlamaForCausalLM + fast tokenizer",
               inputs={"checkpoint": "checkpoint", "tokenizer": "tokenizer"},
               output="export"):
    """Checkpoint + tokenizer -> a Hugging Face model directory (LlamaForCausalLM)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as saved

    def check(self, problems: Problems) -> None:
        problems.require(self.dtype in DTYPES, "dtype",  # also for direct construction
                         f"{self.dtype!r} is not one of {', '.join(DTYPES)}")

    def run(self, ctx: StageContext) -> None:
        from .hf import export_hf

        export_hf(ctx, dtype=self.dtype)


@hookimpl
def recipe_components():
    return [HFExport]
