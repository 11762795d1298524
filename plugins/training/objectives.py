"""What is trained: the ``ComposerModel``s around a plain architecture module, one per
objective, and the measurements the post-training stages take outside the trainer.

* ``CausalLM`` (``composer_train``): next-token cross-entropy on packed sequences.
* ``ChatLM`` (``sft``): cross-entropy on the labelled positions only (the assistant turns).
* ``PreferenceLM`` (``dpo``): the DPO / IPO loss on pairs.

Each knows its training FLOPs per batch (``flops_per_batch``, the architecture's FLOPs per
token times the tokens the batch runs through the model), which Composer's ``SpeedMonitor``
reads for FLOP/s and MFU. The module inside stays a plain ``nn.Module``: parallelism wraps
it from outside (``assembly.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from composer import ComposerModel
from composer.metrics import LanguageCrossEntropy, LanguagePerplexity

from recipe_engine import warn

from .data import IGNORE_INDEX, CollatePairs, CollateRows


class Objective(ComposerModel):
    """A ``ComposerModel`` over ``model`` (the architecture's module) that counts its FLOPs."""

    def __init__(self, model: torch.nn.Module, flops_per_token: float = 0.0):
        super().__init__()
        self.model = model
        self.flops_per_token = flops_per_token  # training FLOPs (forward + backward)

    def tokens_in(self, batch: Any) -> int:
        """Token positions the batch runs through the model."""
        raise NotImplementedError

    def flops_per_batch(self, batch: Any) -> float:
        """This device's training FLOPs for ``batch`` (Composer's ``SpeedMonitor`` hook)."""
        return self.flops_per_token * self.tokens_in(batch)


def scored_pad_id(meta: dict[str, Any], vocab_size: int) -> int | None:
    """The shards' pad id when it is one the loss may ignore: a real id distinct from bos
    and eos. Otherwise every target is scored (with a warning when one was given)."""
    pad_id = meta.get("pad_id")
    if (isinstance(pad_id, int) and 0 <= pad_id < vocab_size
            and pad_id not in (meta.get("bos_id"), meta.get("eos_id"))):
        return pad_id
    if pad_id not in (None, -1):
        warn(f"the shards' pad_id={pad_id!r} is not a usable id distinct from bos/eos "
             f"(vocab_size={vocab_size}); every target is scored")
    return None


class CausalLM(Objective):
    """Next-token prediction on packed sequences: the model reads ``tokens[:, :-1]`` and is
    scored on ``tokens[:, 1:]`` (cross-entropy, nats per token)."""

    def __init__(self, model: torch.nn.Module, pad_id: int | None = None,
                 flops_per_token: float = 0.0):
        super().__init__(model, flops_per_token)
        self.pad_id = pad_id  # targets equal to it are not scored (packing makes none, normally)

    def tokens_in(self, batch: torch.Tensor) -> int:
        return int(batch.numel())

    def targets(self, batch: torch.Tensor) -> torch.Tensor:
        targets = batch[:, 1:]
        if self.pad_id is not None:
            targets = targets.masked_fill(targets == self.pad_id, IGNORE_INDEX)
        return targets

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch[:, :-1])

    def loss(self, outputs: torch.Tensor, batch: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = F.cross_entropy(outputs.flatten(0, 1).float(), self.targets(batch).flatten(),
                               ignore_index=IGNORE_INDEX)
        aux = getattr(self.model, "aux_loss", None)  # mixture of experts: load balancing
        return loss if aux is None else loss + aux

    def eval_forward(self, batch: torch.Tensor, outputs: Any = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch: torch.Tensor, outputs: torch.Tensor, metric: Any) -> None:
        metric.update(outputs.float(), self.targets(batch))

    def get_metrics(self, is_train: bool) -> dict[str, Any]:
        if is_train:
            return {}
        return {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX)}


class ChatLM(Objective):
    """SFT: next-token cross-entropy on the labelled positions only (the assistant turns),
    averaged over those tokens."""

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["tokens"].numel())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["tokens"][:, :-1])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any,
             **kwargs: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)


def sequence_logps(module: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of ``log p(token)`` over the labelled positions."""
    logits = module(tokens[:, :-1]).float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


class PreferenceLM(Objective):
    """DPO / IPO on pairs; the reference log-probabilities come with the batch."""

    def __init__(self, model: torch.nn.Module, beta: float, kind: str, flops_per_token: float = 0.0):
        super().__init__(model, flops_per_token)
        self.beta, self.kind = beta, kind

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_tokens"].numel() + batch["rejected_tokens"].numel())

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch["chosen_tokens"].shape[0]
        tokens = torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logps = sequence_logps(self.model, tokens, labels)  # one forward for both sides
        return logps[:n], logps[n:]

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor],
             *args: Any, **kwargs: Any) -> torch.Tensor:
        from .posttrain import dpo_loss

        losses, _, _ = dpo_loss(outputs[0], outputs[1], batch["ref_chosen"], batch["ref_rejected"],
                                self.beta, self.kind)
        return losses.mean()


# -- measurements outside the trainer (post-training) -------------------------------------------


@torch.no_grad()
def masked_loss(module: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int,
                batch_size: int, device: Any) -> float | None:
    """Mean cross-entropy (nats per target token) of ``module`` on SFT rows."""
    collate = CollateRows(pad_id)
    total, count = 0.0, 0
    was_training = module.training
    module.eval()
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        logits = module(tokens[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    module.train(was_training)
    return total / count if count else None


@torch.no_grad()
def pair_logps(module: torch.nn.Module, pairs: list[dict[str, Any]], pad_id: int,
               batch_size: int, device: Any) -> tuple[list[float], list[float]]:
    """Sequence log-probabilities of every pair's chosen and rejected response."""
    collate = CollatePairs(pad_id)
    chosen: list[float] = []
    rejected: list[float] = []
    was_training = module.training
    module.eval()
    for start in range(0, len(pairs), batch_size):
        b = {k: v.to(device) for k, v in collate(pairs[start:start + batch_size]).items()}
        chosen += sequence_logps(module, b["chosen_tokens"], b["chosen_labels"]).cpu().tolist()
        rejected += sequence_logps(module, b["rejected_tokens"], b["rejected_labels"]).cpu().tolist()
    module.train(was_training)
    return chosen, rejected
