"""A checkpoint artifact as an lm-evaluation-harness model, registered as ``recipe_engine``.

It is lm-eval's own ``HFLM`` (``BoundaryHFLM``) on the checkpoint's Hugging Face form (``lm_eval_runner.make_lm``:
the model component's ``to_hf`` and the tokenizer's ``hf_tokenizer``), so it scores what
``lm_eval --model hf`` scores on the ``hf_export`` of the same checkpoint, without exporting
first. Usable outside a recipe once this module is imported::

    lm_eval.simple_evaluate(model="recipe_engine",
                            model_args="checkpoint=CKPT_DIR,tokenizer=TOKENIZER_DIR", ...)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from recipe_engine import warn

from .lm_eval_runner import hf_pair, quiet_hflm
from .runtime import check_vocab, load_checkpoint, load_tokenizer, pick_device


class BoundaryHFLM(HFLM):
    """lm-eval's ``HFLM``, except for one case where it stops with an ``AssertionError``: a
    continuation whose tokens all merge into the context's last ones (``range(n)`` + ``:``
    is ``...(n`` ``):`` for a BPE trained on code), so that ``encode(context +
    continuation)`` has no tokens past ``encode(context)``. There the split moves back to
    where the two encodings part (token healing): the continuation is scored as the tokens
    that spell it and the context characters merged into them. Every other pair is scored
    exactly as ``HFLM`` (and ``lm_eval --model hf``) scores it; ``healed`` counts the
    others."""

    healed = 0

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if continuation_enc or not continuation:
            return context_enc, continuation_enc
        whole = self.tok_encode(context + continuation)
        split = 0
        while split < min(len(whole), len(context_enc)) and whole[split] == context_enc[split]:
            split += 1
        split = max(1, min(split, len(whole) - 1))
        self.healed += 1
        return whole[:split], whole[split:]


@register_model("recipe_engine")
class RecipeEngineLM(BoundaryHFLM):
    """``HFLM`` on a recipe-engine checkpoint + tokenizer artifact (fp32)."""

    def __init__(self, checkpoint: str | Path, tokenizer: str | Path, batch_size: int | str = 16,
                 device: str | None = None, build: Callable[[str, Any], Any] | None = None,
                 **ignored: Any) -> None:
        if ignored:
            warn(f"recipe_engine model: ignoring model_args {sorted(ignored)}; it takes "
                 "checkpoint, tokenizer, batch_size, device")
        runtime_tok = load_tokenizer(Path(tokenizer))
        module, spec = load_checkpoint(Path(checkpoint), build)
        check_vocab(spec, runtime_tok, "recipe_engine model")
        hf, tok = hf_pair(module, spec, runtime_tok, device or pick_device(), build)
        with quiet_hflm():
            super().__init__(pretrained=hf, tokenizer=tok, batch_size=batch_size,
                             max_length=int(spec["max_seq_len"]))
