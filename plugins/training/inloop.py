"""In-loop evaluation: ``composer_train``'s ``in_loop_eval`` evaluators scored on the model
while it trains, every ``in_loop_eval_interval`` batches and at the last batch (interval 0:
at the last batch only), as a Composer callback (``InLoopEval``).

* Where: on rank 0 only. Under DDP (or one process) rank 0 scores its own replica of the
  model and the other ranks go on to the next batch (they wait for rank 0 in its gradient
  all-reduce). Under FSDP every rank first takes part in gathering the full weights
  (torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), which rank 0
  loads into a fresh module of the model component, on its training device.
* What it leaves alone: the model is scored in eval mode without gradients and put back in
  the mode it was in; Python's, NumPy's, torch's and CUDA's random states are saved before
  and restored after (lm-eval seeds all of them), so a run with in-loop evaluation trains
  the same weights, bit for bit, as a run without.
* What it records: ``logger.log_metrics({"eval/<task>/<metric>": value, ...})`` at the
  batch (the stage's loggers write them into ``metrics.jsonl``), a log line, and the latest
  values in the stage's metrics (``eval/...``).
* Resume: the last evaluated batch and its metrics are in every Composer checkpoint
  (``state_dict``), so a resumed run neither repeats an evaluation nor loses the latest
  values, and a run killed and resumed records the same rows as an uninterrupted one.
* Time: not training time. Composer pauses its batch clock around its own evaluators
  (``state.timestamp``'s wall-clock times, which ``SpeedMonitor``'s throughput and MFU
  and ``StageLog``'s tokens/s and ETA are computed from, leave evaluation out), but this
  callback runs in ``BATCH_END``, before that pause, so the trainer counts its seconds
  into the next batch's duration. The callback takes them back out: at the next batch's
  ``BATCH_START`` it moves the timestamp's clocks back by the evaluation's wall time
  (rank 0's, sent to every rank: the trainer times every rank's batch by rank 0's), so
  when the trainer adds that batch's duration the clocks read as if the evaluation had
  not run. An evaluation at the last batch is never counted.
* The tokenizer's Hugging Face form (what lm-eval scores through) is made once per run,
  at the first evaluation, not at each (``cache_hf_tokenizer``).

Imported inside the training run only (it imports torch and Composer).
"""
from __future__ import annotations

import copy
import datetime
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer import Callback, State
from composer.core import TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from recipe_engine import StageContext, StageError, warn
from recipe_engine.artifacts import load_tokenizer

PREFIX = "eval/"


# -- the tokenizer -------------------------------------------------------------------------


def find_tokenizer_dir(shards: Any) -> Path:
    """The tokenizer artifact a shards artifact was made from: the store keeps committed
    artifacts side by side under their fingerprints (``artifacts/<fingerprint>/``) and the
    shards' manifest names its ``tokenizer`` input's fingerprint."""
    manifest = getattr(shards, "manifest", None) or {}
    recorded = (manifest.get("inputs") or {}).get("tokenizer")
    if isinstance(recorded, dict) and isinstance(recorded.get("fingerprint"), str):
        candidate = Path(shards.path).parent / recorded["fingerprint"]
        if (candidate / "tokenizer.json").is_file():
            return candidate
        where = f"its tokenizer artifact ({candidate}) is not in the store"
    else:
        where = "its manifest names no tokenizer input"
    raise StageError(
        f"in_loop_eval needs the tokenizer the shards at {shards.path} were made with, and "
        f"{where}; run the tokenizer stage again (or `recipe run` the recipe that made the "
        "shards), or remove in_loop_eval")


def load_checked_tokenizer(tokenizer_dir: Path, shards_meta: dict[str, Any],
                           vocab_size: int) -> Any:
    """The runtime tokenizer, checked against the shards' special ids and the model's
    vocabulary (a ``StageError`` naming the mismatch)."""
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    for key in ("bos_id", "eos_id"):
        if key in shards_meta and shards_meta[key] != getattr(tokenizer, key):
            raise StageError(
                f"in_loop_eval: the shards were made with {key}={shards_meta[key]} but the "
                f"tokenizer at {tokenizer_dir} has {key}={getattr(tokenizer, key)}")
    if vocab_size < tokenizer.vocab_size:
        raise StageError(f"in_loop_eval: the model's vocab_size={vocab_size} is smaller than "
                         f"the tokenizer's vocab_size={tokenizer.vocab_size} ({tokenizer_dir})")
    return tokenizer


def cache_hf_tokenizer(tokenizer: Any) -> Any:
    """A shallow copy of the runtime ``tokenizer`` (same class, same attributes) whose
    ``hf_tokenizer(max_length)`` converts once per ``max_length`` and then hands back the
    same transformers tokenizer (lm-eval only reads it, or sets its pad token and padding
    side, which it does the same way each time); ``None`` stays ``None``."""
    if tokenizer is None:
        return None
    cached = copy.copy(tokenizer)
    convert = tokenizer.hf_tokenizer
    made: dict[int | None, Any] = {}

    def hf_tokenizer(max_length: int | None = None) -> Any:
        if max_length not in made:
            made[max_length] = convert(max_length)
        return made[max_length]

    cached.hf_tokenizer = hf_tokenizer
    return cached


# -- random state ---------------------------------------------------------------------------


def get_rng() -> dict[str, Any]:
    """This process's random states (Python, NumPy, torch CPU, every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the callback ---------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The architecture's module inside Composer's (DDP-wrapped) ``ComposerModel``."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "model", model)


def gather_full_module(module: torch.nn.Module, model_cfg: Any, model_spec: dict[str, Any],
                       device: torch.device) -> torch.nn.Module | None:
    """FSDP: the full weights, gathered by every rank (a collective), in a fresh module of
    ``model_cfg`` on rank 0 (``None`` on the others)."""
    from .checkpoints import gather_weights

    clean = gather_weights(module)
    if dist.get_global_rank() != 0:
        return None
    fresh = model_cfg.build(int(model_spec["vocab_size"]), int(model_spec["max_seq_len"]))
    _missing, unexpected = fresh.load_state_dict(clean, strict=False)
    if unexpected:
        raise StageError(f"in_loop_eval: the gathered weights do not fit a fresh "
                         f"{model_cfg.name}: unexpected {sorted(unexpected)[:5]}")
    return fresh.to(device)


class InLoopEval(Callback):
    """Scores ``evaluators`` on the model every ``interval`` batches and at the last batch
    (interval 0: the last batch only); see the module docstring."""

    def __init__(self, evaluators: list[Any], interval: int, model_spec: dict[str, Any],
                 tokenizer: Any, model_cfg: Any, ctx: StageContext | None):
        self.evaluators = list(evaluators)
        self.interval = int(interval)
        self.model_spec = dict(model_spec)
        self.tokenizer = cache_hf_tokenizer(tokenizer)  # None on ranks other than 0
        self.model_cfg = model_cfg
        self.ctx = ctx  # None on ranks other than 0
        self.last_batch = 0  # the batch of the last evaluation (0: none yet)
        self.last_metrics: dict[str, float] = {}
        self.seconds = 0.0  # spent evaluating in this attempt
        # an evaluation's wall seconds (rank 0's) that the trainer will count into the next
        # batch; None: nothing to take back (not in the checkpoint: a resumed attempt's
        # first batch starts a fresh clock)
        self.untimed: float | None = None

    # resume: plain values only (checkpoints are loaded without unrestricted unpickling)
    def state_dict(self) -> dict[str, Any]:
        return {"last_batch": self.last_batch, "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch = int(state.get("last_batch", 0))
        self.last_metrics = {str(k): float(v) for k, v in (state.get("last_metrics") or {}).items()}
        if self.ctx is not None and self.last_metrics:
            self.ctx.metrics.update(self.last_metrics)

    def due(self, state: State) -> bool:
        step = int(state.timestamp.batch)
        if step <= self.last_batch:
            return False
        if self.interval and step % self.interval == 0:
            return True
        end = state.max_duration
        return end is not None and end.unit == TimeUnit.BATCH and step >= int(end.value)

    def fit_start(self, state: State, logger: Logger) -> None:
        self.untimed = None  # a new fit() starts a fresh batch clock

    def batch_start(self, state: State, logger: Logger) -> None:
        # the trainer's batch clock ran through the last evaluation: set the timestamp's
        # clocks back by it now, and adding this batch's duration (the evaluation included)
        # gives the time without it (see the module docstring)
        if self.untimed is None:
            return
        seconds = torch.tensor([self.untimed], dtype=torch.float64)
        if dist.get_world_size() > 1:  # every rank took part in run(): all come here
            seconds = state.device.tensor_to_device(seconds)
            dist.broadcast(seconds, src=0)
        self.untimed = None
        back = datetime.timedelta(seconds=float(seconds.item()))
        ts = state.timestamp  # (an epoch that ended since: its clock at 0 reads -back until
        # the trainer adds this batch's duration, which holds the evaluation)
        state.timestamp = ts.copy(total_wct=ts.total_wct - back,
                                  iteration_wct=ts.iteration_wct - back,
                                  epoch_wct=ts.epoch_wct - back)

    def batch_end(self, state: State, logger: Logger) -> None:
        # before the batch's checkpoint (BATCH_CHECKPOINT comes after BATCH_END), so the
        # checkpoint records this evaluation
        if self.due(state):
            started = time.perf_counter()
            self.run(state, logger)
            self.untimed = time.perf_counter() - started

    def fit_end(self, state: State, logger: Logger) -> None:
        # a run whose length is not in batches: its last batch was not recognised as such
        if int(state.timestamp.batch) > self.last_batch:
            self.run(state, logger)

    def run(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        inner = _unwrap(state.model)
        if state.fsdp_enabled:
            device = next(inner.parameters()).device
            module = gather_full_module(inner, self.model_cfg, self.model_spec, device)
        else:
            module = inner if dist.get_global_rank() == 0 else None
        if module is None:  # not rank 0: nothing to score
            self.last_batch = step
            return
        started = time.perf_counter()
        rng = get_rng()
        was_training = module.training
        module.eval()
        metrics: dict[str, float] = {}
        try:
            with torch.no_grad():
                for evaluator in self.evaluators:
                    for key, value in evaluator.evaluate(module, self.model_spec,
                                                         self.tokenizer).items():
                        name = PREFIX + key
                        if name in metrics:
                            warn(f"in_loop_eval: {evaluator.name} reports {key!r} again; "
                                 "keeping the first evaluator's value")
                            continue
                        metrics[name] = float(value)
        finally:
            module.train(was_training)
            set_rng(rng)
        self.last_batch, self.last_metrics = step, metrics
        self.seconds += time.perf_counter() - started
        logger.log_metrics(metrics)
        if self.ctx is not None:
            self.ctx.metrics.update(metrics)
            shown = ", ".join(f"{k[len(PREFIX):]} {v:.4f}" for k, v in metrics.items()
                              if not k.endswith("_stderr") and "/num_" not in k)
            self.ctx.log(f"batch {step}: in-loop eval {shown} "
                         f"({time.perf_counter() - started:.1f} s)")


def make_inloop_callback(stage: Any, ctx: StageContext, model_cfg: Any,
                         model_spec: dict[str, Any], tokenizer_dir: Path | str | None
                         ) -> InLoopEval:
    """The ``InLoopEval`` callback of a ``composer_train`` stage whose ``in_loop_eval`` is
    not empty. ``model_spec``: ``{name, params, vocab_size, max_seq_len}``;
    ``tokenizer_dir``: the tokenizer artifact, or ``None`` to take the one the ``shards``
    input was made from (``find_tokenizer_dir``). Every rank checks that the tokenizer is
    there (so all fail together, before training); rank 0 loads it."""
    if not stage.in_loop_eval:
        raise StageError("make_inloop_callback: the stage has no in_loop_eval evaluators")
    shards = ctx.inputs["shards"]
    directory = Path(tokenizer_dir) if tokenizer_dir is not None else find_tokenizer_dir(shards)
    if not (directory / "tokenizer.json").is_file():
        raise StageError(f"in_loop_eval: no tokenizer artifact at {directory} "
                         "(no tokenizer.json)")
    rank = dist.get_global_rank()
    tokenizer = (load_checked_tokenizer(directory, dict(shards.meta), int(model_spec["vocab_size"]))
                 if rank == 0 else None)
    if rank == 0:
        names = ", ".join(f"{e.name} {json.dumps(e.params(), sort_keys=True, default=str)}"
                          for e in stage.in_loop_eval)
        when = (f"every {stage.in_loop_eval_interval} batches and at the end"
                if stage.in_loop_eval_interval else "at the end")
        ctx.log(f"in-loop evaluation {when}: {names}; tokenizer {directory}")
    return InLoopEval(stage.in_loop_eval, stage.in_loop_eval_interval, model_spec, tokenizer,
                      model_cfg, ctx if rank == 0 else None)
