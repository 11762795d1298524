"""Stability guards for the training stages: a non-finite guard and a loss-spike detector.

Both act at Composer's ``AFTER_TRAIN_BATCH`` event, after the backward pass and gradient
clipping and before the optimizer step. To skip a step they set every gradient to ``None``:
torch's optimizers leave a parameter without a gradient untouched (no update, no weight
decay, no change to its moments), so the weights are exactly what they were before the
batch. The learning-rate schedule still advances (a skipped batch counts as trained time).

* **Non-finite**: the batch's loss or any gradient is NaN or infinite.
* **Spike** (``spike_threshold`` > 0): the loss exceeds the running mean of recent losses by
  more than ``spike_threshold`` running standard deviations (an exponential moving
  average and variance with ``beta``; the first ``spike_warmup`` batches only feed the
  statistics). The deviation used is at least ``MIN_RELATIVE_STD`` of the mean, so a run
  whose loss barely moves does not call a 1% wobble a spike. A spiking loss does not enter
  the statistics.

Each skipped batch is recorded: optimizer step, epoch, the range of sample positions in the
epoch's global order (with the data's fixed order, these name the samples exactly: the
resume tests' sample ids), the loss and the reason. The record and the statistics are in
the callback's ``state_dict``, so they survive a resume through Composer's checkpoints. With
several processes, a step is skipped on every rank when any rank asks for it.
"""
from __future__ import annotations

import math
from typing import Any

from composer import Callback, State
from composer.loggers import Logger
from composer.utils import dist

MIN_RELATIVE_STD = 0.02  # the spike test's deviation is at least 2% of the running mean


class StabilityGuard(Callback):
    def __init__(self, skip_nonfinite: bool = True, spike_threshold: float = 0.0,
                 spike_warmup: int = 20, beta: float = 0.98, max_skipped: int = 0,
                 replication: int = 1):
        self.skip_nonfinite = skip_nonfinite
        self.spike_threshold = spike_threshold
        self.spike_warmup = spike_warmup
        self.beta = beta
        self.max_skipped = max_skipped  # 0: no limit; else fail past this many skips
        self.replication = replication  # ranks reading the same batch (tensor parallelism)
        self.mean = 0.0
        self.var = 0.0
        self.seen = 0
        self.skipped: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "seen": self.seen,
                "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.seen = int(state["seen"])
        self.skipped = list(state.get("skipped", []))

    def _reason(self, state: State) -> tuple[str, float]:
        import torch

        from .clipping import total_grad_norm

        loss_t = state.loss
        if isinstance(loss_t, dict):
            loss_t = loss_t.get("total", next(iter(loss_t.values())))
        loss = float(loss_t.detach().float().sum()) if isinstance(loss_t, torch.Tensor) else float("nan")
        if self.skip_nonfinite:
            if not math.isfinite(loss):
                return "nonfinite_loss", loss
            # one multi-tensor norm, one sync: NaN/Inf in any gradient makes it non-finite
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            if grads and not math.isfinite(float(total_grad_norm(grads))):
                return "nonfinite_grad", loss
        if self.spike_threshold > 0 and math.isfinite(loss) and self.seen >= self.spike_warmup:
            std = max(math.sqrt(max(self.var, 0.0)), MIN_RELATIVE_STD * abs(self.mean))
            if std > 0 and loss > self.mean + self.spike_threshold * std:
                return "loss_spike", loss
        return "", loss

    def after_train_batch(self, state: State, logger: Logger) -> None:
        import torch

        reason, loss = self._reason(state)
        device = next(iter(state.model.parameters())).device
        flag = torch.tensor([1 if reason else 0], dtype=torch.int32, device=device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item():
            for p in state.model.parameters():
                p.grad = None
            batch = int(state.timestamp.batch)
            readers = dist.get_world_size() // max(1, self.replication)
            size = int(state.batch.shape[0]) * readers if hasattr(state.batch, "shape") else 0
            start = int(state.timestamp.sample_in_epoch)
            self.skipped.append({"step": batch + 1, "epoch": int(state.timestamp.epoch),
                                 "samples_in_epoch": [start, start + size],
                                 "loss": loss if math.isfinite(loss) else str(loss),
                                 "reason": reason or "another_rank"})
            if self.max_skipped and len(self.skipped) > self.max_skipped:
                from recipe_engine import StageError

                raise StageError(f"{len(self.skipped)} batches skipped by the stability guard "
                                 f"(more than max_skipped_batches={self.max_skipped}); the last: "
                                 f"{self.skipped[-1]}")
            return
        if math.isfinite(loss):  # the running statistics of the loss (spikes left out)
            self.seen += 1
            if self.seen == 1:
                self.mean, self.var = loss, 0.0
            else:
                delta = loss - self.mean
                self.mean += (1 - self.beta) * delta
                self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
