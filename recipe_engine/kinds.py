"""Base classes of the sub-component kinds that several plugins share.

A plugin subclasses one of these to add a component of that kind; a stage annotates a
parameter with the base (``filters: list[DocumentFilter]``, ``model: ModelConfig``) to take
any registered component of it. Importable from ``recipe_engine``; nothing here imports an
ML framework (implementations import theirs inside methods).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .component import Component


@dataclass(kw_only=True)
class DocumentFilter(Component, kind="document_filter"):
    """Keep or drop one document. Subclasses implement ``reason`` and nothing else; the
    bookkeeping is here, as in datatrove's ``BaseFilter``."""

    def reason(self, doc: dict[str, Any]) -> str | None:
        """``None`` to keep ``doc``; otherwise a short drop reason (``"too_short"``)."""
        raise NotImplementedError

    def apply(self, docs: Iterable[dict[str, Any]], counts: Counter[str], label: str = ""
              ) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Yield ``(doc, None)`` for kept documents and ``(doc, reason)`` for dropped ones,
        counting ``<label>.kept``, ``<label>.dropped`` and ``<label>.dropped.<reason>``."""
        label = label or self.name
        for doc in docs:
            why = self.reason(doc)
            if why is None:
                counts[f"{label}.kept"] += 1
            else:
                counts[f"{label}.dropped"] += 1
                counts[f"{label}.dropped.{why}"] += 1
            yield doc, why


@dataclass(kw_only=True)
class ModelConfig(Component, kind="model"):
    """An architecture: its fields are the recipe's ``model:`` group. The vocabulary size is
    never written in a recipe: it flows from the tokenizer artifact."""

    def build(self, vocab_size: int, max_seq_len: int) -> Any:
        """The ``torch.nn.Module`` (imports torch inside)."""
        raise NotImplementedError

    def num_params(self, vocab_size: int, embeddings: bool = True) -> int:
        """Exact parameter count (for the planner, Chinchilla ratios and MFU)."""
        raise NotImplementedError

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward)."""
        raise NotImplementedError

    def to_hf(self, module: Any, vocab_size: int, max_seq_len: int, *, bos_id: int = -1,
              eos_id: int = -1, pad_id: int = -1, dtype: str = "float32",
              device: Any = None) -> Any:
        """``module`` (built by ``build``) as a Hugging Face ``transformers`` model in eval
        mode, its weights copied (the module may go on training), in ``dtype`` on ``device``
        (``None``: the module's). The special ids (``-1``: none) go to its config. This is the
        one conversion: ``hf_export`` saves its result and ``lm_eval`` scores it with
        lm-eval's ``HFLM``. Raises ``ValueError`` saying why when the transformers class
        cannot hold this configuration."""
        raise NotImplementedError(
            f"the {self.name!r} architecture has no Hugging Face form (its model component "
            "does not implement to_hf)")

    def from_hf(self, state: dict[str, Any], vocab_size: int, max_seq_len: int) -> Any:
        """Inverse of ``to_hf``: the module (fp32, eval mode) from the state dict of the
        transformers model (``model.safetensors`` of an export)."""
        raise NotImplementedError(
            f"the {self.name!r} architecture has no Hugging Face form (its model component "
            "does not implement from_hf)")


@dataclass(kw_only=True)
class Evaluator(Component, kind="evaluator"):
    """A benchmark scored on a model held in memory, e.g. every N batches during training
    (``composer_train``'s ``in_loop_eval``), so its curve is in the training logs."""

    def evaluate(self, module: Any, model_spec: dict[str, Any], tokenizer: Any) -> dict[str, float]:
        """Score ``module`` (the architecture's ``torch.nn.Module``, in eval mode; its
        ``model.json``-style ``model_spec``: name, params, vocab_size, max_seq_len) with the
        runtime ``tokenizer``; return flat metrics such as ``{"python_basics/acc": 0.69}``."""
        raise NotImplementedError

    def fingerprint_extra(self) -> str | None:
        """What the scores depend on besides the parameters (task files, a library's
        version); a stage that runs the evaluator folds it into its own fingerprint."""
        return None
