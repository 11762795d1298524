"""Putting a training run together, the same way for every training stage: the processes
and devices, the module and its optimizer, Composer's ``Trainer`` with the stage's
callbacks and loggers, the fit (or resume), and the trained weights at the end.

``composer_train`` and the post-training stages differ in their data and objective only
(``trainer.py``); what they share is here, in the order it runs:

1. ``processes``: world size, rank, device, per-device batch and microbatch (and the
   process group, in a launched worker);
2. ``make_trainer``: the parallelism component marks the plain module for wrapping, the
   optimizer and scheduler components are built over it, a damaged checkpoint from an
   earlier attempt is repaired, and the ``Trainer`` gets the stage's callbacks, Composer's
   ``SpeedMonitor`` / ``LRMonitor``, in-loop evaluation (``in_loop_eval``), the ``StageLog``
   destination and the stage's ``loggers``; Composer wraps the module (DDP, FSDP) itself;
3. ``fit``: resumes from the stage's checkpoints (``autoresume``) and trains what is left;
4. ``finish``: gathers the unsharded weights and writes the ``checkpoint`` artifact (with
   the loggers' offline files).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from composer import Callback, Event, Trainer
from composer.core import DataSpec, Evaluator
from composer.utils import dist

from recipe_engine import StageContext, StageError
from recipe_engine.artifacts import BOUNDARIES_BOS

from .callbacks import StageLog, monitors
from .checkpoints import checkpoint_dir, gather_weights, repair_checkpoints, save_checkpoint_artifact
from .data import counted
from .objectives import Objective

RUN_NAME = "train"  # fixed, so that autoresume finds the checkpoints of an earlier attempt


# -- processes and devices -----------------------------------------------------------------------


def resolve_device(device: str, nproc: int) -> str:
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise StageError("device: 'gpu' was asked for but torch sees no CUDA device")
        if nproc > torch.cuda.device_count():
            raise StageError(f"parallelism: {nproc} processes per node but only "
                             f"{torch.cuda.device_count()} GPUs")
    return device


@dataclass(frozen=True)
class Processes:
    """This process's place in the run."""

    world_size: int
    rank: int
    device: str  # "cpu" or "gpu" (Composer's names)
    device_batch: int  # sequences (rows, pairs) per process and optimizer step
    microbatch: int  # of those, per forward/backward
    replication: int = 1  # ranks reading the same batch (a tensor-parallel group)

    @property
    def main(self) -> bool:
        """Rank 0: it logs, reports and writes the artifact."""
        return self.rank == 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", dist.get_local_rank()) if self.device == "gpu" else \
            torch.device("cpu")


def processes(stage: Any, unit: str) -> Processes:
    """The processes of the run (joining their group in a launched worker), and the stage's
    ``global_batch_size`` split over them (``unit``: what a batch holds, for errors)."""
    world_size, rank = dist.get_world_size(), dist.get_global_rank()
    device = resolve_device(stage.device, dist.get_local_world_size())
    if world_size > 1 and not dist.is_initialized():
        dist.initialize_dist(device)
    replication = stage.parallelism.data_replication()
    if replication > 1 and unit != "sequences":
        raise StageError(f"{stage.name} reads {unit} through a sampler that splits them over "
                         "every rank; tensor parallelism (ranks sharing a batch) is for "
                         "composer_train: set parallelism.tensor_parallel_degree: 1")
    if world_size % replication:
        raise StageError(f"the {world_size} processes do not split into tensor-parallel "
                         f"groups of {replication}")
    readers = world_size // replication  # ranks that read distinct batches
    if stage.global_batch_size % readers:
        raise StageError(f"global_batch_size={stage.global_batch_size} is not divisible by "
                         f"the {readers} data-parallel ranks")
    device_batch = stage.global_batch_size // readers
    micro = stage.device_microbatch_size or device_batch
    if device_batch % micro:
        raise StageError(f"device_microbatch_size={micro} does not divide the per-device batch "
                         f"of {device_batch} {unit}")
    if device == "cpu" and stage.precision != "fp32":
        raise StageError(f"precision={stage.precision} needs a GPU (Composer trains on CPU in "
                         f"fp32 only); set precision: fp32 for CPU runs")
    return Processes(world_size, rank, device, device_batch, micro, replication)


# -- the module ------------------------------------------------------------------------------------


def build_module(model_cfg: Any, meta: dict[str, Any], vocab_size: int, seq_len: int
                 ) -> torch.nn.Module:
    """A fresh module of the model component for shards with ``meta`` (document masking
    reads the documents' starts from ``bos_id``)."""
    kwargs: dict[str, Any] = {}
    if getattr(model_cfg, "document_masking", False):
        if meta.get("document_boundaries") != BOUNDARIES_BOS or not isinstance(meta.get("bos_id"), int):
            raise StageError("model.document_masking needs shards whose documents start with "
                             "bos_id (meta document_boundaries: 'bos', mds_shards version 2)")
        kwargs["bos_id"] = int(meta["bos_id"])
    return model_cfg.build(vocab_size, seq_len, **kwargs)


def model_spec(model_cfg: Any, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """The ``model.json`` the run's checkpoint artifact will carry."""
    return {"name": model_cfg.name, "params": model_cfg.params(), "vocab_size": vocab_size,
            "max_seq_len": seq_len}


def build_optimizer(stage: Any, module: torch.nn.Module) -> tuple[Any, Any]:
    """The parallelism component marks ``module`` for wrapping; then the optimizer (no decay
    on any ``nn.Embedding``'s weight) and the scheduler."""
    stage.parallelism.prepare(module)
    no_decay = [f"{mname}.{pname}".lstrip(".") for mname, m in module.named_modules()
                if isinstance(m, torch.nn.Embedding) for pname, _ in m.named_parameters(recurse=False)]
    optimizer = stage.optimizer.build(module.named_parameters(), no_decay)
    stage.parallelism.prepare_optimizer(optimizer)
    return optimizer, stage.scheduler.build()


# -- the trainer -----------------------------------------------------------------------------------


def validation_evaluator(loader: torch.utils.data.DataLoader, stage: Any,
                         replication: int = 1) -> Evaluator:
    """Validation cross-entropy every ``eval_interval`` (``"0"``: once, when training ends)."""
    interval: Any = stage.eval_interval.strip()
    if interval == "0":
        interval = lambda state, event: event == Event.FIT_END  # noqa: E731
    return Evaluator(label="eval", dataloader=counted(loader, replication),
                     metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
                     eval_interval=interval, subset_num_batches=stage.eval_batches or -1)


@dataclass
class Run:
    """A ``Trainer`` and what the stage reads back from it."""

    trainer: Trainer
    log: StageLog
    objective: Objective
    model_cfg: Any
    vocab_size: int
    seq_len: int
    batches: int


def make_trainer(stage: Any, ctx: StageContext, procs: Processes, objective: Objective,
                 model_cfg: Any, vocab_size: int, seq_len: int, train_data: DataSpec,
                 batches: int, callbacks: Sequence[Callback] = (),
                 evaluator: Evaluator | None = None) -> Run:
    """Composer's ``Trainer`` for ``batches`` optimizer steps of ``objective`` (its
    ``model``: the plain module of ``model_cfg``) over ``train_data``, checkpointing into the
    stage's scratch with autoresume (see the module docstring)."""
    optimizer, scheduler = build_optimizer(stage, objective.model)
    objective.flops_per_token = model_cfg.flops_per_token(vocab_size, seq_len)
    ckpt_dir = checkpoint_dir(ctx)
    if procs.main and ckpt_dir.is_dir():  # a damaged checkpoint would fail every retry
        repaired = repair_checkpoints(ckpt_dir)
        if repaired:
            ctx.log(repaired)
    if procs.world_size > 1:
        dist.barrier()
    multinode = dist.get_world_size() > dist.get_local_world_size()
    latest = ckpt_dir / "latest-rank0.pt"  # Composer's save_latest_filename for rank 0
    log = StageLog(ctx if procs.main else None, batches, stage.log_interval)
    # the loggers' run name: the stage's label and fingerprint, so two jobs of a sweep that
    # share a label (and a bucket or a dashboard) stay apart
    run_name = f"{ctx.stage}-{ctx.fingerprint[:8]}"
    loggers = [log, *(lg.build(Path(ctx.work), run_name) for lg in getattr(stage, "loggers", []))]
    everything = [*callbacks, *monitors(stage.log_interval, getattr(stage, "peak_tflops", 0.0))]
    if getattr(stage, "in_loop_eval", []):
        from .inloop import make_inloop_callback

        tokenizer = ctx.inputs.get("tokenizer")
        everything.append(make_inloop_callback(stage, ctx, model_cfg,
                                               model_spec(model_cfg, vocab_size, seq_len),
                                               tokenizer.path if tokenizer else None))
    algorithms = []
    if stage.grad_clip_norm > 0 and stage.parallelism.data_replication() > 1:
        from .clipping import MeshGradientClipping  # parameters on two device meshes

        algorithms.append(MeshGradientClipping(stage.grad_clip_norm))
    elif stage.grad_clip_norm > 0:
        from composer.algorithms import GradientClipping

        algorithms.append(GradientClipping(clipping_type="norm",
                                           clipping_threshold=stage.grad_clip_norm))
    trainer = Trainer(
        model=objective,
        train_dataloader=train_data,
        max_duration=f"{batches}ba",
        eval_dataloader=evaluator,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=algorithms,
        callbacks=everything,
        loggers=loggers,
        run_name=RUN_NAME,
        progress_bar=False,
        log_to_console=False,
        save_folder=str(ckpt_dir),
        save_interval=stage.save_interval.strip(),
        save_num_checkpoints_to_keep=stage.num_checkpoints_to_keep,
        # a killed attempt can leave a half-written later checkpoint; it is ours to replace
        save_overwrite=True,
        # several nodes share the checkpoint folder: Composer's autoresume would have every
        # node's local rank 0 create and delete the same signal file in it, so resume is
        # pointed at the latest checkpoint explicitly (Composer then downloads it into a
        # node-local temporary folder)
        autoresume=not multinode,
        load_path=str(latest) if multinode and latest.exists() else None,
        device=procs.device,
        precision=stage.precision,
        device_train_microbatch_size=procs.microbatch,
        seed=stage.seed,
        compile_config={} if getattr(stage, "compile", False) else None,
        **stage.parallelism.trainer_kwargs(),
    )
    return Run(trainer, log, objective, model_cfg, vocab_size, seq_len, batches)


def fit(run: Run, ctx: StageContext, procs: Processes, checked: bool) -> int:
    """Train the batches left after the checkpoint autoresume loaded (if any; ``checked``:
    its data fingerprint was compared). Returns the batch it resumed from (0: none)."""
    trainer = run.trainer
    ts = trainer.state.timestamp
    resumed_from = int(ts.batch)
    if resumed_from >= run.batches:  # killed after the last checkpoint: nothing left to train
        if procs.main:
            ctx.log(f"the checkpoint at batch {resumed_from} ends the run; not training further")
        if trainer.state.evaluators:
            trainer.eval()
        return resumed_from
    if procs.main and resumed_from:
        note = "data fingerprint checked" if checked else \
            "no data fingerprint in it (an older checkpoint): data not checked"
        ctx.log(f"resumed from the checkpoint at batch {resumed_from}: epoch {int(ts.epoch)}, "
                f"sample {int(ts.sample_in_epoch)} of the epoch; {note}")
    trainer.fit()
    return resumed_from


def finish(run: Run, stage: Any, ctx: StageContext, procs: Processes) -> dict[str, torch.Tensor]:
    """The trained weights (unsharded, fp32; complete on rank 0), written by rank 0 as the
    ``checkpoint`` artifact; the trainer closed (its loggers flushed), and the stage's
    loggers' offline files copied into the artifact."""
    weights = gather_weights(run.objective.model)  # Composer's FSDP wrapper, when sharded
    run.log.flush(run.trainer.state)
    if procs.main:
        save_checkpoint_artifact(weights, run.model_cfg, run.vocab_size, run.seq_len,
                                 Path(ctx.output))
    run.trainer.close()
    if procs.main and getattr(stage, "loggers", []):
        from .loggers import keep_logs

        kept = keep_logs(Path(ctx.work), Path(ctx.output))
        if kept:
            ctx.log(f"the loggers' files ({len(kept)}) are in the artifact under logs/")
    return weights
