"""Built-in export stages (output kind ``export``).

* ``hf_export``: a Hugging Face directory (``LlamaForCausalLM`` + a fast tokenizer) that
  ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``lm_eval --model hf`` load offline, with
  our own ``model.json`` and tokenizer files beside it (``recipe_engine/``). The stage loads
  what it wrote with transformers and checks its logits against the trained model's on a
  fixed batch (``verified`` in the meta), and stores greedy samples (``samples.json``).

torch and transformers are imported inside ``run``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from recipe_engine import Problems, Stage, StageContext, hookimpl

DTYPES = ("float32", "bfloat16", "float16")
# code prompts: the export's samples.json holds the model's greedy continuation of each
SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef list_python_files(root):\n",
                  "class Stack:\n    def __init__(self):\n")


@dataclass(kw_only=True)
class HFExport(Stage,
               name="hf_export",
               version="2",
               description="Hugging Face directory: LlamaForCausalLM + fast tokenizer",
               inputs={"checkpoint": "checkpoint", "tokenizer": "tokenizer"},
               output="export"):
    """Checkpoint + tokenizer -> a Hugging Face model directory (LlamaForCausalLM)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as saved
    verify: bool = True  # transformers' logits must equal ours on a fixed batch
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    sample_max_new_tokens: int = 48

    def check(self, problems: Problems) -> None:
        problems.require(self.dtype in DTYPES, "dtype",  # also for direct construction
                         f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        problems.require(1 <= self.sample_max_new_tokens <= 4096, "sample_max_new_tokens",
                         f"must be from 1 to 4096, got {self.sample_max_new_tokens}")
        for i, prompt in enumerate(self.sample_prompts):
            problems.require(isinstance(prompt, str) and prompt != "", "sample_prompts",
                             f"[{i}] must be a non-empty string, got {prompt!r}")

    def run(self, ctx: StageContext) -> None:
        from .hf import export_hf

        export_hf(ctx, dtype=self.dtype, verify=self.verify, sample_prompts=self.sample_prompts,
                  sample_max_new_tokens=self.sample_max_new_tokens)


@hookimpl
def recipe_components():
    return [HFExport]
