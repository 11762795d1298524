"""Built-in training components: the ``composer_train`` stage and what it is built from.

* ``optimizer``: ``adamw``.
* ``scheduler``: ``cosine_warmup``.
* ``parallelism`` (``parallel.py``): ``single`` (CPU or one GPU), ``ddp``, ``fsdp``. Each says
  how many processes per node it needs, which Composer ``Trainer`` arguments configure it and
  how it spreads the training state (``sharding()``, read by the memory planner,
  ``planner.py``).
* stage ``composer_train`` (``shards`` -> ``checkpoint``): Composer's trainer over the
  mosaicml-streaming shards, checkpointing into the stage's work directory so that a killed
  run resumes from its last checkpoint and data position.
* stages ``sft`` and ``dpo`` (``checkpoint`` + ``tokenizer`` + ``documents`` ->
  ``checkpoint``): post-training with the same trainer and sub-components (``posttrain.py``).

This module stays light: torch, Composer and streaming are imported inside functions
(``trainer.py`` and ``worker.py`` hold the heavy code).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from recipe_engine import (Component, Evaluator, ModelConfig, Problem, Problems, RecipeError, Stage,
                           StageContext, StageError, hookimpl)

from . import mixing, planner
from .loggers import MetricsLogger
# the parallelism components live in parallel.py; re-exported for ``from ...training import FSDP``
from .parallel import COMPONENTS as PARALLEL_COMPONENTS
from .parallel import DDP, FSDP, Parallelism, SingleDevice

# Composer time strings (composer.core.Time.from_timestring), checked here without Composer
_TIME = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(ep|ba|sp|tok|dur)\s*$", re.I)
_EXAMPLES = {"ep": "1ep", "ba": "1000ba", "sp": "64000sp", "tok": "2000000tok", "dur": "0.02dur"}


def _check_time(problems: Problems, key: str, value: str, units: tuple[str, ...],
                whole: bool = True, positive: bool = False) -> None:
    """Report ``value`` unless it is a time string in ``units`` (``whole``: Composer wants a
    whole number of everything but ``dur``; ``positive``: zero is not a duration)."""
    m = _TIME.match(str(value))
    if not m or m.group(2).lower() not in units:
        shown = ", ".join(_EXAMPLES[u] for u in units)
        problems.add(key, f"{value!r} is not a Composer time string; "
                          f"use a number and one of {'/'.join(units)} ({shown})")
        return
    number = float(m.group(1))
    if whole and m.group(2).lower() != "dur" and number != int(number):
        problems.add(key, f"{value!r}: Composer counts {m.group(2)} in whole numbers")
    elif positive and number <= 0:
        problems.add(key, f"{value!r} is zero: give a positive duration")


# -- optimizer ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Optimizer(Component, kind="optimizer"):
    """Builds a torch optimizer over a model's named parameters."""

    def build(self, named_parameters: Iterable[tuple[str, Any]], no_decay: Iterable[str] = ()) -> Any:
        raise NotImplementedError

    def state_bytes_per_param(self) -> int:
        """Bytes of optimizer state per parameter, for the memory planner (Adam-like: two
        fp32 moments, 8; override for others)."""
        return 8


def check_lr_betas_decay(problems: Problems, lr: float, betas: list[float],
                         weight_decay: float) -> None:
    """The checks the Adam-like optimizers share (``adamw`` here, ``decoupled_adamw`` and
    ``lion`` in optim.py): ``lr`` > 0, two ``betas`` in [0, 1), ``weight_decay`` >= 0."""
    problems.require(lr > 0, "lr", f"must be > 0, got {lr}")
    problems.require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas",
                     f"must be two numbers in [0, 1), got {betas}")
    problems.require(weight_decay >= 0, "weight_decay", f"must be >= 0, got {weight_decay}")


@dataclass(kw_only=True)
class AdamW(Optimizer,
            name="adamw",
            description="torch AdamW, no decay on norms/biases/embeddings"):
    """``torch.optim.AdamW``; no weight decay on 1-D parameters (norm gains, biases) nor on
    embeddings (a tied LM head shares the embedding's weight, so it is not decayed either).

    torch's AdamW, not Composer's ``DecoupledAdamW``: its decay is ``lr * weight_decay``
    per step, the convention the Llama / OLMo / GPT-3 papers' numbers are given in.
    """

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: Literal["auto", True, False] = "auto"  # one fused kernel per step; auto: on a GPU machine
    foreach: bool | None = None  # torch's multi-tensor path; None: torch's default

    def check(self, problems: Problems) -> None:
        check_lr_betas_decay(problems, self.lr, self.betas, self.weight_decay)
        if self.fused != "auto" and self.fused and self.foreach:
            problems.add("foreach", "torch takes fused or foreach, not both: set one of them")

    def kernel_kwargs(self) -> dict[str, Any]:
        """``fused`` / ``foreach`` for torch's AdamW. ``auto``: fused when torch sees a GPU and
        has a fused AdamW for it (a CPU-only machine keeps torch's default path, so CPU runs
        train bit for bit as before); an explicit ``foreach`` wins over ``auto``."""
        import torch

        fused: Any = self.fused
        if fused == "auto":
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

            fused = (self.foreach is None and torch.cuda.is_available()
                     and "cuda" in _get_fused_kernels_supported_devices())
        out: dict[str, Any] = {"foreach": self.foreach}
        if fused:
            out["fused"] = True
        return out

    def param_groups(self, named_parameters: Iterable[tuple[str, Any]],
                     no_decay: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Two groups: decayed (matrices) and not decayed (1-D, embeddings, ``no_decay``);
        one group, undecayed, when ``weight_decay`` is 0 (what tensor parallelism needs)."""
        if not self.weight_decay:
            return [{"params": [p for _, p in named_parameters if p.requires_grad],
                     "weight_decay": 0.0}]
        skip = set(no_decay)
        decay, rest = [], []
        for name, p in named_parameters:
            if not p.requires_grad:
                continue
            if p.ndim < 2 or name in skip or "embed" in name.lower():
                rest.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        return groups

    def build(self, named_parameters: Iterable[tuple[str, Any]], no_decay: Iterable[str] = ()) -> Any:
        """The optimizer over ``named_parameters`` (``model.named_parameters()``). ``no_decay``
        names more parameters to exempt (the trainer passes every ``nn.Embedding`` weight)."""
        import torch

        return torch.optim.AdamW(self.param_groups(named_parameters, no_decay), lr=self.lr,
                                 betas=(float(self.betas[0]), float(self.betas[1])), eps=self.eps,
                                 **self.kernel_kwargs())


# -- scheduler ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Scheduler(Component, kind="scheduler"):
    """Builds a Composer scheduler (its time strings resolve against the run's length)."""

    def build(self) -> Any:
        raise NotImplementedError


@dataclass(kw_only=True)
class CosineWarmup(Scheduler,
                   name="cosine_warmup",
                   description="linear warmup then cosine decay to alpha_f * lr"):
    """Linear warmup, then cosine decay to ``alpha_f * lr`` at the end of training
    (``composer.optim.CosineAnnealingWithWarmupScheduler``)."""

    warmup: str = "0.02dur"  # Composer time: "2000ba", "10000000tok", or a fraction "0.02dur"
    alpha_f: float = 0.1

    def check(self, problems: Problems) -> None:
        _check_time(problems, "warmup", self.warmup, ("ba", "sp", "tok", "ep", "dur"))
        problems.require(0 <= self.alpha_f <= 1, "alpha_f", f"must be in [0, 1], got {self.alpha_f}")

    def build(self) -> Any:
        from composer.optim import CosineAnnealingWithWarmupScheduler

        return CosineAnnealingWithWarmupScheduler(t_warmup=self.warmup.strip(), alpha_f=self.alpha_f)


# -- the stage ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ComposerTrain(Stage,
                    name="composer_train",
                    version="1",
                    description="pretrain a model on MDS shards with Composer (resumable)",
                    inputs={"shards": ["shards"]},
                    output="checkpoint",
                    distributed=True,
                    observational=("loggers", "device_memory_gb")):
    """Pretrain a model on ``shards`` with Composer's trainer; output a ``checkpoint``
    artifact (``model.safetensors`` + ``model.json``, fp32).

    Duration: exactly one of ``max_duration`` (Composer time string: ``"1ep"``, ``"1000ba"``,
    ``"2000000tok"``, ``"64000sp"``) and ``tokens_per_param`` (Chinchilla-style: that many
    training tokens per model parameter, counting all parameters, embeddings included — as
    Hoffmann et al. do — i.e. ``tokens_per_param * model.num_params(vocab, embeddings=True)``).
    Either is turned into a whole number of optimizer steps of ``global_batch_size`` sequences.

    Resume: Composer checkpoints (model, optimizer, scheduler, RNG, data position) go to the
    stage's work directory every ``save_interval`` under a fixed run name with
    ``autoresume``; a killed stage started again continues from its last checkpoint at the
    same sample, and ends with the weights an uninterrupted run would have. The global sample
    order depends on ``seed``, ``global_batch_size`` and ``num_canonical_nodes`` only, so a run
    resumed on another number of processes or nodes continues it too. Each checkpoint holds
    the training data's fingerprint; resuming from one made from other shards is an error.

    Mixing: ``inputs: {shards: [code_shards, docs_shards]}`` trains on several streams (made
    by one tokenizer), drawn in ``proportions`` (relative weights in the inputs' order; empty:
    by size) through streaming's ``Stream(proportion=...)``; validation uses the first
    stream. ``recipe plan`` shows each stream's share and epochs (``mixing.plan_streams``).
    """

    model: ModelConfig
    optimizer: Optimizer = field(default_factory=AdamW)
    scheduler: Scheduler = field(default_factory=CosineWarmup)
    parallelism: Parallelism = field(default_factory=SingleDevice)
    global_batch_size: int = 64  # sequences per optimizer step, over all processes
    proportions: list[float] = field(default_factory=list)  # per shards input; []: by size
    device_microbatch_size: int = 0  # sequences per forward/backward; 0 = the whole device batch
    max_duration: str = ""
    tokens_per_param: float = 0.0
    precision: Literal["fp32", "amp_bf16", "amp_fp16", "amp_fp8"] = "fp32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    grad_clip_norm: float = 1.0  # 0: no clipping
    save_interval: str = "200ba"
    num_checkpoints_to_keep: int = 2  # -1: keep all
    eval_interval: str = "0"  # "0": evaluate once, at the end
    eval_batches: int = 0  # 0: the whole validation split
    seed: int = 17
    num_workers: int = 0  # DataLoader workers per process
    num_canonical_nodes: int = 0  # streaming's shuffle partitions; 0 = the first attempt's nodes
    log_interval: int = 10  # batches between log lines
    compile: bool = False  # torch.compile the model
    peak_tflops: float = 0.0  # per-device peak for MFU (e.g. 989 for H100 bf16 dense); 0 = no MFU
    device_memory_gb: float = 0.0  # GiB per device the plan must fit (80: H100); 0: not checked
    skip_nonfinite: bool = True  # skip the optimizer step of a batch with a NaN/Inf loss or grad
    spike_threshold: float = 0.0  # skip a batch whose loss is this many std above the mean; 0: off
    spike_warmup: int = 20  # batches that only feed the loss statistics
    max_skipped_batches: int = 0  # fail past this many skipped batches; 0: no limit
    loggers: list[MetricsLogger] = field(default_factory=list)  # also log to these
    in_loop_eval: list[Evaluator] = field(default_factory=list)  # benchmarks scored in training
    in_loop_eval_interval: int = 0  # batches between in-loop evaluations; 0: at the end only

    def check(self, problems: Problems) -> None:
        if bool(self.max_duration.strip()) == (self.tokens_per_param > 0):
            problems.add(
                "max_duration", "set exactly one of max_duration (a Composer time string like "
                f"'1ep', '1000ba', '2000000tok') and tokens_per_param (> 0, e.g. 20); got "
                f"max_duration={self.max_duration!r}, tokens_per_param={self.tokens_per_param}")
        elif self.max_duration.strip():  # turned into whole batches by total_batches
            _check_time(problems, "max_duration", self.max_duration, ("ep", "ba", "sp", "tok"),
                        whole=False, positive=True)
        mixing.check_proportions(self.proportions, problems)
        problems.require(self.tokens_per_param >= 0, "tokens_per_param",
                         f"must be >= 0, got {self.tokens_per_param}")
        problems.require(self.global_batch_size >= 1, "global_batch_size",
                         f"must be >= 1, got {self.global_batch_size}")
        problems.require(self.device_microbatch_size >= 0, "device_microbatch_size",
                         f"must be >= 0 (0 = whole device batch), got {self.device_microbatch_size}")
        if self.device_microbatch_size and self.global_batch_size % self.device_microbatch_size:
            problems.add("device_microbatch_size", f"{self.device_microbatch_size} does not divide "
                         f"global_batch_size={self.global_batch_size}")
        _check_time(problems, "save_interval", self.save_interval, ("ep", "ba", "sp", "tok", "dur"),
                    positive=True)
        if str(self.eval_interval).strip() != "0":
            _check_time(problems, "eval_interval", self.eval_interval,
                        ("ep", "ba", "sp", "tok", "dur"), positive=True)
        problems.require(self.num_checkpoints_to_keep >= 1 or self.num_checkpoints_to_keep == -1,
                         "num_checkpoints_to_keep", "must be >= 1, or -1 to keep all (resume "
                         f"needs at least the last checkpoint), got {self.num_checkpoints_to_keep}")
        for key in ("eval_batches", "num_workers", "grad_clip_norm", "peak_tflops",
                    "in_loop_eval_interval",
                    "num_canonical_nodes", "spike_threshold", "spike_warmup",
                    "max_skipped_batches"):
            problems.require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        problems.require(self.log_interval >= 1, "log_interval",
                         f"must be >= 1, got {self.log_interval}")
        if self.device == "cpu" and self.precision != "fp32":
            problems.add("precision", f"{self.precision} needs a GPU (Composer trains on CPU in "
                         "fp32 only); set precision: fp32 for device: cpu")
        problems.require(self.device_memory_gb >= 0, "device_memory_gb",
                         f"must be >= 0 (0: not checked), got {self.device_memory_gb}")
        self.parallelism.check_with(self.model, self.optimizer, problems)
        self.parallelism.check_device(self.device, problems)
        if self.device_memory_gb > 0 and not problems:
            # the vocabulary and sequence length come from upstream stages: here, a lower
            # bound (no embeddings, no activations); describe_plan checks the whole plan
            try:
                mem = self.memory_plan(0, 0)
            except Exception:  # a third-party model that cannot count without a vocabulary
                mem = None
            if mem is not None and mem.total > self.device_memory_gb * planner.GIB:
                problems.add("device_memory_gb", self._too_big(mem, "at least ", " before "
                             "embeddings and activations are counted"))

    def fingerprint_extra(self) -> str | None:
        """The in-loop evaluators' own material (task files...): their curves are part of
        the stage's output."""
        extras = [e.fingerprint_extra() for e in self.in_loop_eval]
        return "\n".join(x or "" for x in extras) if any(extras) else None

    def total_batches(self, num_params: int, seq_len: int, batches_per_epoch: int) -> int:
        """The run's length in optimizer steps (``max_duration`` or ``tokens_per_param``);
        ``"Nep"`` needs the number of batches in an epoch, the others don't."""
        tokens_per_batch = self.global_batch_size * seq_len
        if self.tokens_per_param > 0:
            return max(1, math.ceil(self.tokens_per_param * num_params / tokens_per_batch))
        m = _TIME.match(self.max_duration)
        assert m, "checked in __post_init__"
        value, unit = float(m.group(1)), m.group(2).lower()
        per_unit = {"ba": 1, "sp": self.global_batch_size, "tok": tokens_per_batch}
        if unit == "ep":
            return max(1, math.ceil(value * batches_per_epoch))
        return max(1, math.ceil(value / per_unit[unit]))

    # -- memory ---------------------------------------------------------------------------

    def microbatch(self) -> int:
        """Sequences per forward/backward on one device, as planned."""
        world = max(1, self.parallelism.world_size())
        tp = max(1, self.parallelism.sharding().tensor_parallel)
        per_device = max(1, self.global_batch_size // max(1, world // tp))
        return min(self.device_microbatch_size or per_device, per_device)

    def memory_plan(self, vocab_size: int, seq_len: int) -> planner.MemoryPlan:
        """Memory per device under this stage's parallelism, precision and optimizer
        (``planner.memory_per_device``); 0 for an unknown vocabulary or length."""
        return planner.memory_per_device(
            model=self.model, vocab_size=vocab_size, seq_len=seq_len,
            microbatch=self.microbatch(), precision=self.precision,
            state_bytes_per_param=self.optimizer.state_bytes_per_param(),
            sharding=self.parallelism.sharding())

    def _too_big(self, mem: planner.MemoryPlan, qualifier: str = "", suffix: str = "") -> str:
        hint = planner.hints(self.parallelism.sharding(), self.microbatch(),
                             self.parallelism.shards_state())
        return (f"the plan needs {qualifier}{mem.describe()}{suffix}, more than "
                f"device_memory_gb={self.device_memory_gb:g} (parallelism "
                f"{self.parallelism.name!r} over {self.parallelism.world_size()} device(s), "
                f"{self.precision}, {self.optimizer.name}); try {hint}")

    def check_memory(self, inputs_meta: dict[str, Any]) -> None:
        """Raise ``StageError`` when the plan exceeds ``device_memory_gb`` (a no-op when it is
        0 or the inputs do not say their vocabulary and length). For the start of ``run``,
        before any process is launched."""
        given = inputs_meta.get("shards") or [{}]
        meta = (given if isinstance(given, list) else [given])[0]
        vocab, seq_len = int(meta.get("vocab_size") or 0), int(meta.get("seq_len") or 0)
        if self.device_memory_gb <= 0 or not vocab or not seq_len:
            return
        mem = self.memory_plan(vocab, seq_len)
        if mem.total > self.device_memory_gb * planner.GIB:
            raise StageError(f"device_memory_gb: {self._too_big(mem)}")

    def check_precision(self) -> None:
        """Raise ``StageError`` unless this machine can train in ``precision`` (``amp_fp8``:
        a CUDA GPU of compute capability 8.9 or newer and Transformer Engine), instead of an
        error from inside Composer. Imports torch."""
        if self.precision != "amp_fp8":
            return
        import importlib.util

        import torch

        if self.device == "cpu" or not torch.cuda.is_available():
            raise StageError("precision: amp_fp8 needs a CUDA GPU (compute capability >= 8.9, "
                             "e.g. H100) and torch sees none; use amp_bf16, or fp32 on the CPU")
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise StageError(f"precision: amp_fp8 needs compute capability >= 8.9 (H100, L40S, "
                             f"RTX 4090); this GPU has {capability[0]}.{capability[1]}: use amp_bf16")
        if importlib.util.find_spec("transformer_engine") is None:
            raise StageError("precision: amp_fp8 is Composer's Transformer Engine fp8 autocast "
                             "and transformer_engine is not installed (pip install "
                             "transformer-engine[pytorch]); or use amp_bf16")

    def preflight(self, ctx: StageContext) -> None:
        """What ``run`` checks before launching anything: the precision on this machine and
        the memory plan against ``device_memory_gb`` with the inputs' real sizes."""
        self.check_precision()
        nodes, declared = int(getattr(ctx, "num_nodes", 1) or 1), getattr(self.parallelism, "num_nodes", 1)
        if nodes != declared and self.device_memory_gb > 0:
            ctx.log(f"the run has {nodes} node(s) and parallelism.num_nodes says {declared}: the "
                    f"memory plan checked here assumes {declared}")
        arts = ctx.input_lists.get("shards") or [ctx.inputs["shards"]]
        self.check_memory({"shards": [a.meta for a in arts]})

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Size, budget and cost before any GPU is booked: parameters, tokens, steps, FLOPs,
        the Chinchilla ratio, memory per device (weights, gradients, optimizer state,
        activations: ``planner.py``) and device-hours at an assumed utilisation (a planning
        figure, not a measurement). A plan over ``device_memory_gb`` raises ``RecipeError``."""
        given = inputs_meta.get("shards") or [{}]
        streams = given if isinstance(given, list) else [given]
        shards = dict(streams[0])
        if len(streams) > 1 and all("num_train_samples" in m for m in streams):
            shards["num_train_samples"] = sum(m["num_train_samples"] for m in streams)
        vocab, seq_len = shards.get("vocab_size"), shards.get("seq_len")
        if not vocab or not seq_len:
            return {"note": "model size unknown until the tokenizer and shards are planned"}
        model, parallelism = self.model, self.parallelism
        n_params = model.num_params(vocab)
        batches_per_epoch = max(1, shards.get("num_train_samples", 0) // self.global_batch_size)
        if self.max_duration.endswith("ep") and "num_train_samples" not in shards:
            return {"params": n_params, "note": "epochs: the step count needs the shards first"}
        steps = self.total_batches(n_params, seq_len, batches_per_epoch)
        tokens = steps * self.global_batch_size * seq_len
        flops = model.flops_per_token(vocab, seq_len) * tokens
        devices = parallelism.num_processes_per_node()
        mem = self.memory_plan(int(vocab), int(seq_len))
        out: dict[str, Any] = {
            "params": n_params,
            "params_non_embedding": model.num_params(vocab, embeddings=False),
            "tokens": tokens,
            "steps": steps,
            "tokens_per_batch": self.global_batch_size * seq_len,
            "tokens_per_param": round(tokens / n_params, 2),
            "chinchilla": "ok (~20 tokens/param)" if 15 <= tokens / n_params <= 30 else
                          ("under-trained for its size" if tokens / n_params < 15 else "over-trained for its size"),
            "train_flops": f"{flops:.3e}",
            "devices_per_node": devices,
            "devices": parallelism.world_size(),
            "microbatch": self.microbatch(),
            "memory_gb_per_device": mem.as_dict(),
        }
        if self.device_memory_gb > 0:
            out["device_memory_gb"] = self.device_memory_gb
            out["memory_headroom_gb"] = round(self.device_memory_gb - mem.total / planner.GIB, 1)
            if mem.total > self.device_memory_gb * planner.GIB:
                raise RecipeError(Problem(key="device_memory_gb", message=self._too_big(mem)))
        if len(streams) > 1 or self.proportions:
            out["streams"] = mixing.plan_streams(streams, self.proportions,
                                                 steps * self.global_batch_size)
        if self.device != "cpu":
            peak = self.peak_tflops or 989.0  # H100 SXM dense bf16, if not given
            hours = flops / (0.4 * peak * 1e12) / 3600
            out["gpu_hours_at_40pct_mfu"] = round(hours, 1)
            out["days_on_8_gpus"] = round(hours / 8 / 24, 1)
        return out

    def run(self, ctx: StageContext) -> None:
        """One process here, or this node's share of ``ctx.num_nodes`` x the parallelism's
        processes per node, launched (``worker.py``)."""
        from .worker import run_share

        self.preflight(ctx)
        run_share(self, ctx)

    def run_follower(self, ctx: StageContext) -> None:
        """On a node other than node 0: launch this node's processes into node 0's run."""
        from .worker import run_share

        self.preflight(ctx)
        run_share(self, ctx)


from .posttrain import COMPONENTS as POSTTRAIN_COMPONENTS  # noqa: E402  (needs the bases above)


@hookimpl
def recipe_components():
    from .optim import COMPONENTS as OPTIM_COMPONENTS  # imports this module's bases

    from .loggers import COMPONENTS as LOGGER_COMPONENTS

    return [AdamW, CosineWarmup, *PARALLEL_COMPONENTS, ComposerTrain, *POSTTRAIN_COMPONENTS,
            *OPTIM_COMPONENTS, *LOGGER_COMPONENTS]
