"""The Composer callbacks of the training stages, and where their metrics go.

* Composer's own ``SpeedMonitor`` (throughput, FLOP/s from the objective's
  ``flops_per_batch``, MFU against the stage's ``peak_tflops``) and ``LRMonitor``
  (``monitors``).
* ``StageLog``, a ``LoggerDestination``: everything logged through Composer's ``Logger``
  reaches the stage: the progress bar, a log line every ``log_interval`` batches (loss,
  learning rate, tokens/s, ETA) and the metrics log ``metrics.jsonl`` in the stage's
  scratch, which ``write_curves`` turns into the artifact's curves at the end.
* ``DataFingerprint``: refuses to resume from a checkpoint made from other data.
* ``SampleTrace``: a test aid naming the samples of every batch.

**metrics.jsonl.** One JSON object a line with ``step`` (batches done) and ``tokens``. Per-
batch figures (``PER_BATCH`` prefixes: the train loss, learning rates, throughput, times)
are sampled every ``log_interval`` batches and at the last one, as a line with ``loss``
(the batch's), ``loss_smoothed`` (a debiased moving average), ``lr`` (the first parameter
group's) and everything else logged since the previous line, under Composer's names. Any
other metric (an evaluation: ``metrics/eval/...`` from the validation split, which also
gives ``val_loss``; ``eval/<task>/<metric>`` from in-loop evaluation) is written at the
batch it was logged at. Lines are appended when made, at most a few every
``log_interval`` batches. A step may appear in several lines (a training line and an
evaluation's, or again after a resume); readers merge them, later values winning.

The artifact's copy (``write_curves``) has one line per step, merged, without the values of
this machine and attempt (``NOT_CURVES``: throughput, times, memory) and without Composer's
names of values it carries under its own (``loss``, ``lr``, ``val_loss``): a resumed run
commits the same file as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from composer import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from recipe_engine import StageContext, StageError
from recipe_engine.fsutil import atomic_writer

from .data import sample_key

CURVES_FILE = "metrics.jsonl"
TRAIN_LOSS = "loss/train/total"
VAL_LOSS = "metrics/eval/LanguageCrossEntropy"
# logged every batch by Composer's trainer and monitors: sampled every log_interval batches
PER_BATCH = ("loss/train/", "lr-", "throughput/", "time/", "trainer/", "memory/",
             "l2_norm/", "cosine/")
# left out of the artifact's curves: this attempt's measurements, and names given again
NOT_CURVES = ("throughput/", "time/", "memory/", "trainer/", "lr-", TRAIN_LOSS, "metrics/eval/")
PROGRESS_EVERY = 0.5  # seconds between progress reports (and always the last batch)


def monitors(log_interval: int, peak_tflops: float) -> list[Callback]:
    """Composer's ``SpeedMonitor`` (its window: the batches between two log lines, at most
    100; MFU only with a ``peak_tflops``) and ``LRMonitor``."""
    from composer.callbacks import LRMonitor, SpeedMonitor

    window = max(1, min(log_interval, 100) - 1)
    return [SpeedMonitor(window_size=window, gpu_flops_available=peak_tflops * 1e12,
                         time_unit="seconds"),
            LRMonitor()]


def _value(v: Any) -> Any:
    """A logged value as JSON: numbers (a one-element tensor's too), strings; else None."""
    if isinstance(v, bool) or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return _value(v.item())
    return None


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StageLog(LoggerDestination):
    """Forwards Composer's logged metrics to the stage (see the module docstring). Keeps a
    smoothed train loss (saved in Composer checkpoints, so it survives a resume) and this
    attempt's span of batches and wall time (Composer's ``timestamp``: data loading and
    steps; Composer's evaluation excluded, and in-loop evaluation too, which its callback
    takes back out of the clock: ``inloop.InLoopEval.batch_start``) for its speed."""

    def __init__(self, ctx: StageContext | None, total_batches: int, log_interval: int):
        super().__init__()
        self.ctx = ctx  # None on ranks other than 0: nothing written, nothing reported
        self.total = total_batches
        self.log_interval = log_interval
        self.ema_num = self.ema_den = 0.0  # debiased EMA of the train loss, beta 0.9
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.sampled: dict[str, Any] = {}  # per-batch figures since the last training line
        self.results: dict[int, dict[str, Any]] = {}  # step -> other metrics, not yet written
        self.start: tuple[int, int, float] | None = None  # this attempt: batch, token, seconds
        self.end: tuple[int, int, float] | None = None
        self._reported = 0.0

    # -- Composer checkpoints -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"ema_num": self.ema_num, "ema_den": self.ema_den, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_num, self.ema_den = state["ema_num"], state["ema_den"]
        self.last_loss = state.get("last_loss")

    # -- what is logged ---------------------------------------------------------------------

    @property
    def train_loss(self) -> float | None:
        return self.ema_num / self.ema_den if self.ema_den else None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        loss = metrics.get(TRAIN_LOSS)
        if loss is not None and math.isfinite(loss):
            self.last_loss = loss
            self.ema_num = 0.9 * self.ema_num + 0.1 * loss
            self.ema_den = 0.9 * self.ema_den + 0.1
        for key, value in metrics.items():
            if key.startswith(PER_BATCH):
                self.sampled[key] = value
            else:
                self.results.setdefault(int(step or 0), {})[key] = value
        if VAL_LOSS in metrics:
            self.val_loss = float(metrics[VAL_LOSS])

    # -- events -----------------------------------------------------------------------------

    @staticmethod
    def _now(state: State) -> tuple[int, int, float]:
        ts = state.timestamp
        return int(ts.batch), int(ts.token), ts.total_wct.total_seconds()

    def fit_start(self, state: State, logger: Logger) -> None:
        self.start = self.end = self._now(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        # loggers run after the other callbacks: the monitors have logged this batch
        self.end = self._now(state)
        step = self.end[0]
        if self.ctx is None:
            self.sampled.clear()
            self.results.clear()
            return
        now = time.monotonic()
        if step >= self.total or now - self._reported >= PROGRESS_EVERY:
            self.ctx.progress(step, self.total, "batches")
            self._reported = now
        if step % self.log_interval == 0 or step == self.total:
            self._log_line(step)
            self.write({"step": step, "tokens": self.end[1], "loss": self.last_loss,
                        "loss_smoothed": self.train_loss, "lr": self._lr(), **self.sampled})
            self.sampled = {}
        self.flush(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        if self.val_loss is not None and self.ctx is not None:
            self.ctx.log(f"batch {int(state.timestamp.batch)}: val loss {self.val_loss:.4f}")
        self.flush(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.flush(state)

    def flush(self, state: State | None = None) -> None:
        """Write the evaluations and other results logged so far, at their steps."""
        if not self.results:
            return
        tokens = {int(state.timestamp.batch): int(state.timestamp.token)} if state else {}
        results, self.results = self.results, {}
        for step, row in sorted(results.items()):
            if VAL_LOSS in row:
                row = {**row, "val_loss": row[VAL_LOSS]}
            self.write({"step": step, **({"tokens": tokens[step]} if step in tokens else {}), **row})

    def write(self, row: dict[str, Any]) -> None:
        """Append one line to the stage's ``metrics.jsonl`` (scratch: survives a crash;
        rank 0 only)."""
        if self.ctx is None:
            return
        clean = {k: _value(v) for k, v in row.items()}
        line = json.dumps({k: v for k, v in clean.items() if v is not None}) + "\n"
        with open(Path(self.ctx.work) / CURVES_FILE, "a") as f:
            f.write(line)

    # -- this attempt's speed ----------------------------------------------------------------

    def attempt(self) -> tuple[int, float]:
        """Batches trained in this attempt and the wall seconds they took."""
        if self.start is None or self.end is None:
            return 0, 0.0
        return self.end[0] - self.start[0], self.end[2] - self.start[2]

    def tokens_per_second(self, tokens_per_batch: int) -> float | None:
        batches, seconds = self.attempt()
        return batches * tokens_per_batch / seconds if batches and seconds > 0 else None

    # -- the log line ------------------------------------------------------------------------

    def _lr(self) -> float | None:
        for key, value in self.sampled.items():  # LRMonitor: lr-<Optimizer>/group<i>
            if key.startswith("lr-") and key.endswith("/group0"):
                return float(value)
        return None

    def _log_line(self, step: int) -> None:
        assert self.ctx is not None
        batches, seconds = self.attempt()
        s = self.sampled
        smoothed = f"{self.train_loss:.4f}" if self.train_loss is not None else "?"
        lr = self._lr()
        parts = [f"batch {step}/{self.total}", f"loss {smoothed}"]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        tps = s.get("throughput/tokens_per_sec")  # SpeedMonitor's window, once it is full
        if tps is None and batches and seconds > 0:
            tps = (self.end[1] - self.start[1]) / seconds  # type: ignore[index]
        if tps:
            parts.append(f"{tps:,.0f} tok/s")
        if "throughput/device/mfu" in s:
            parts.append(f"MFU {s['throughput/device/mfu']:.1%}")
        elif "throughput/flops_per_sec" in s:
            parts.append(f"{s['throughput/flops_per_sec'] / 1e9:,.1f} GFLOP/s")
        rate = s.get("throughput/batches_per_sec") or (batches / seconds if seconds > 0 else 0)
        if rate and step < self.total:
            parts.append(f"ETA {_fmt_eta((self.total - step) / rate)}")
        self.ctx.log(" ".join(parts))


def write_curves(log: Path, out: Path) -> None:
    """The curves of the run into the artifact (see the module docstring): one line per step
    (every line of the step merged in file order, so a resumed attempt's values replace a
    dead one's), in step order, without ``NOT_CURVES``."""
    if not log.is_file():
        return
    merged: dict[int, dict[str, Any]] = {}
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(row, dict):
            merged.setdefault(int(row.get("step", 0)), {}).update(row)
    with atomic_writer(out, "w") as f:
        for step in sorted(merged):
            row = {k: v for k, v in merged[step].items() if not k.startswith(NOT_CURVES)}
            f.write(json.dumps(row) + "\n")


class DataFingerprint(Callback):
    """Keeps the training data's fingerprint (``data.data_fingerprint``) in every Composer
    checkpoint and, when a checkpoint is loaded, raises a ``StageError`` naming both
    fingerprints if it was made from other data: its data position would be meaningless."""

    def __init__(self, fingerprint: str, data_dir: Path, ckpt_dir: Path, stage: str):
        self.fingerprint = fingerprint
        self.data_dir = data_dir
        self.ckpt_dir = ckpt_dir
        self.stage = stage
        self.checked = False  # a loaded checkpoint's fingerprint was compared with ours

    def state_dict(self) -> dict[str, Any]:
        return {"data_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = state.get("data_fingerprint")
        if theirs != self.fingerprint:
            raise StageError(
                f"the checkpoints in {self.ckpt_dir} were made from other training data "
                f"(data fingerprint {str(theirs)[:16]}) than the shards at {self.data_dir} "
                f"(data fingerprint {self.fingerprint[:16]}); resuming would not continue the "
                f"same samples. To train afresh on these shards, discard the stage's scratch "
                f"(recipe run ... --fresh {self.stage}) or remove {self.ckpt_dir}")
        self.checked = True


class SampleTrace(Callback):
    """Test aid (``RECIPE_TRACE_SAMPLES=PATH``): appends to ``PATH``, for every device batch as
    it comes out of the dataloader, one JSON line ``{"batch", "epoch", "rank", "world_size",
    "samples"}``: the batch's index in the run (0-based, counted over the whole run), the
    epoch, and each sequence's index in the train split (several streams: the splits one after
    the other, in the inputs' order), found by its tokens (identical
    sequences share the lowest index; -1: not in the split). One ``write`` per line, in
    append mode, so several processes can share the file."""

    ENV = "RECIPE_TRACE_SAMPLES"

    def __init__(self, path: Path, shards_dirs: Sequence[Path]):
        from recipe_engine.artifacts import iter_token_sequences

        self.path = path
        self.index: dict[bytes, int] = {}
        i = 0  # several streams: indices continue from one stream's split to the next's
        for shards_dir in shards_dirs:
            for tokens in iter_token_sequences(shards_dir, "train"):
                self.index.setdefault(sample_key(tokens), i)
                i += 1

    @classmethod
    def from_env(cls, shards_dirs: Sequence[Path]) -> list[Callback]:
        path = os.environ.get(cls.ENV)
        return [cls(Path(path), shards_dirs)] if path else []

    def after_dataloader(self, state: State, logger: Logger) -> None:
        rows = state.batch.detach().cpu().numpy()
        line = json.dumps({"batch": int(state.timestamp.batch), "epoch": int(state.timestamp.epoch),
                           "rank": dist.get_global_rank(), "world_size": dist.get_world_size(),
                           "samples": [self.index.get(sample_key(r), -1) for r in rows]})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
