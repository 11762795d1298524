"""The training stages' bodies: ``train`` (``composer_train``) and ``train_posttrain``
(``sft``, ``dpo``). Each runs in the stage's process (one device) or in every process that
``worker.py`` launched (``train`` hands the post-training stages on, so workers run them too).

They read as a list of steps; the rooms they call on:

* ``data.py``: loaders over streaming shards or in-memory rows, and data fingerprints;
* ``objectives.py``: the ``ComposerModel`` of each objective (causal LM, chat SFT, DPO);
* ``assembly.py``: processes, optimizer and Composer ``Trainer`` assembly, fit, weights;
* ``callbacks.py``: Composer callbacks and ``StageLog``, where logged metrics go
  (progress, log lines, ``metrics.jsonl``);
* ``checkpoints.py``: checkpoint artifacts in and out, repair of a damaged Composer one.

Resume. Every Composer checkpoint holds the model, optimizer, scheduler, RNG, the
callbacks' state and the ``StreamingDataset``'s position (``dataset_state``: epoch, sample
in epoch, ``num_canonical_nodes``, shuffle seed; Composer's ``State`` asks the dataset for
it when it saves and gives it back when it loads). A resumed run therefore continues inside
the epoch at the next sample, in the same global order, and, since the order depends only on
the seed, ``num_canonical_nodes`` and the global batch size, also on another number of
processes or nodes. ``DataFingerprint`` stores a digest of the training data in every
checkpoint and refuses to resume one made from other data.

Tracing (a test aid): with ``RECIPE_TRACE_SAMPLES=PATH`` in the environment, every process
appends one JSON line per device batch to ``PATH`` (``callbacks.SampleTrace``), naming the
samples it trains on by their index in the train split.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.core import DataSpec
from composer.utils import dist, reproducibility

from recipe_engine import StageContext, StageError

from . import mixing
from .assembly import (Processes, build_module, finish, fit, make_trainer, processes,
                       validation_evaluator)
from .callbacks import CURVES_FILE, DataFingerprint, SampleTrace, write_curves
from .checkpoints import checkpoint_dir, load_start
from .data import (CollatePairs, CollateRows, batch_samples, batch_tokens, dpo_rows,
                   counted, mixed_data_fingerprint, pretrain_loaders, read_records,
                   rows_digest, rows_loader, sft_rows, shard_streams, stream_cache)
from .objectives import CausalLM, ChatLM, PreferenceLM, masked_loss, pair_logps, scored_pad_id
from .safe_load import guard_checkpoint_loads
from .stability import StabilityGuard

if TYPE_CHECKING:
    from . import ComposerTrain


def train(stage: "ComposerTrain", ctx: StageContext, cache_tag: str | None = None) -> dict[str, Any]:
    """Train, write the checkpoint artifact into ``ctx.output`` (rank 0), fill ``ctx.meta``
    and ``ctx.metrics``. ``cache_tag`` names this attempt's stream cache (the launcher gives
    every rank the same one). Returns ``{"meta": ..., "metrics": ...}``."""
    from .posttrain import PostTrainStage

    if isinstance(stage, PostTrainStage):  # sft, dpo, subclasses (also in launched workers)
        return train_posttrain(stage, ctx, cache_tag)
    guard_checkpoint_loads()
    started = time.perf_counter()
    procs = processes(stage, "sequences")
    streams, proportions = shard_streams(ctx, stage.proportions)
    meta = streams[0].meta
    vocab_size, seq_len = int(meta["vocab_size"]), int(meta["seq_len"])

    # data: this attempt's cache (only used for compressed shards)
    cache = stream_cache(ctx, cache_tag)
    train_loader, eval_loader = pretrain_loaders(stage, streams, proportions, cache,
                                                 procs.device_batch, procs.replication)
    batches_per_epoch = len(train_loader)
    if eval_loader is None and procs.main:
        ctx.log("the shards have no validation sequences: no val_loss")

    # model and what watches it
    model_cfg = stage.model
    num_params = model_cfg.num_params(vocab_size, embeddings=True)
    batches = stage.total_batches(num_params, seq_len, batches_per_epoch)
    tokens_per_batch = stage.global_batch_size * seq_len
    reproducibility.seed_all(stage.seed)
    objective = CausalLM(build_module(model_cfg, meta, vocab_size, seq_len),
                         scored_pad_id(meta, vocab_size))
    fingerprint = DataFingerprint(mixed_data_fingerprint(streams, proportions),
                                  Path(streams[0].path), checkpoint_dir(ctx), ctx.stage)
    guard = StabilityGuard(skip_nonfinite=stage.skip_nonfinite,
                           spike_threshold=stage.spike_threshold, spike_warmup=stage.spike_warmup,
                           max_skipped=stage.max_skipped_batches, replication=procs.replication)
    if procs.main:
        _describe(stage, ctx, procs, streams, proportions, num_params, batches, batches_per_epoch,
                  seq_len)

    run = make_trainer(stage, ctx, procs, objective, model_cfg, vocab_size, seq_len,
                       counted(train_loader, procs.replication), batches,
                       [fingerprint, guard, *SampleTrace.from_env([Path(a.path) for a in streams])],
                       validation_evaluator(eval_loader, stage, procs.replication)
                       if eval_loader else None)
    resumed_from = fit(run, ctx, procs, fingerprint.checked)
    steps = int(run.trainer.state.timestamp.batch)
    tokens_trained = int(run.trainer.state.timestamp.token) or steps * tokens_per_batch
    finish(run, stage, ctx, procs)
    if procs.main:
        write_curves(Path(ctx.work) / CURVES_FILE, Path(ctx.output) / CURVES_FILE)
    if dist.get_local_rank() == 0:
        shutil.rmtree(cache, ignore_errors=True)

    # this attempt's speed (none when an earlier attempt had already trained every batch)
    flops_per_token = objective.flops_per_token
    tps = run.log.tokens_per_second(tokens_per_batch)
    metrics: dict[str, Any] = {
        "train_loss": run.log.train_loss,
        "val_loss": run.log.val_loss,
        "tokens_per_second": round(tps, 1) if tps else None,
        "seconds": round(time.perf_counter() - started, 3),
        "flops_per_token": flops_per_token,
        "model_flops": flops_per_token * tokens_trained,
    }
    if procs.device == "gpu" and stage.peak_tflops > 0 and tps:
        metrics["mfu"] = tps * flops_per_token / (stage.peak_tflops * 1e12 * procs.world_size)
        metrics["peak_tflops"] = stage.peak_tflops
    out_meta = {k: meta[k] for k in ("vocab_size", "seq_len", "bos_id", "eos_id", "pad_id")}
    out_meta.update(num_params=num_params, tokens_trained=tokens_trained, steps=steps,
                    resumed_from_step=resumed_from)
    if guard.skipped:
        out_meta["skipped_batches"] = guard.skipped
        metrics["skipped_batches"] = len(guard.skipped)
    ctx.meta.update(out_meta)
    out_meta = dict(ctx.meta)  # with the streams of a mixture
    ctx.metrics.update({k: v for k, v in metrics.items() if v is not None})
    if procs.main:
        done = f"done: {steps} batches, {tokens_trained:,} tokens"
        if run.log.train_loss is not None:
            done += f", train loss {run.log.train_loss:.4f}"
        if run.log.val_loss is not None:
            done += f", val loss {run.log.val_loss:.4f}"
        ctx.log(done + (f", {tps:,.0f} tok/s" if tps else ""))
    return {"meta": out_meta, "metrics": ctx.metrics}


def _describe(stage: "ComposerTrain", ctx: StageContext, procs: Processes, streams: list[Any],
              proportions: Any, num_params: int, batches: int, batches_per_epoch: int,
              seq_len: int) -> None:
    """The run's size in the log; a mixture's streams also in ``ctx.meta``."""
    epochs = batches / batches_per_epoch
    ctx.log(f"{stage.model.name}: {num_params / 1e6:.2f}M params, {batches} batches of "
            f"{stage.global_batch_size}x{seq_len} tokens "
            f"({batches * stage.global_batch_size * seq_len:,} tokens, {epochs:.2f} epochs), "
            f"{procs.world_size} process(es) on {procs.device}, {stage.precision}")
    if epochs > 1:
        ctx.log(f"the run repeats the training data ({epochs:.2f} epochs)")
    if len(streams) > 1 or proportions:
        plan = mixing.plan_streams([a.meta for a in streams], stage.proportions,
                                   batches * stage.global_batch_size)
        ctx.meta["streams"] = [{**row, "stage": (a.manifest.get("stage") or str(a.path))}
                               for row, a in zip(plan, streams)]
        for row in ctx.meta["streams"]:
            ctx.log(f"stream {row['stage']}: {row['share']:.0%} of the samples, "
                    f"{row['samples_drawn']:,} of its {row['train_samples']:,} "
                    f"({row.get('epochs', 0):.2f} epochs)")


# -- post-training: sft and dpo --------------------------------------------------------------


def train_posttrain(stage: Any, ctx: StageContext, cache_tag: str | None = None) -> dict[str, Any]:
    """The ``sft`` / ``dpo`` stage body (one process, or each launched process): the
    pretraining run's assembly over in-memory tokenized rows, with their own objectives."""
    from .posttrain import (chat_meta, conversation_problem, num_batches, preference_problem,
                            reward_stats)

    guard_checkpoint_loads()
    started = time.perf_counter()
    is_dpo = stage.name == "dpo"
    unit = "pairs" if is_dpo else "rows"
    procs = processes(stage, unit)
    start = load_start(stage, ctx)
    tokenizer, module, max_len, pad_id = (start["tokenizer"], start["module"], start["max_len"],
                                          start["pad_id"])
    spec, model_cfg = start["spec"], start["model_cfg"]
    count = ctx.count if procs.main else (lambda *a, **k: None)
    train_docs, heldout_docs = read_records(ctx, preference_problem if is_dpo
                                            else conversation_problem)
    device = procs.torch_device
    metrics: dict[str, Any] = {}

    if is_dpo:
        rows = dpo_rows(train_docs, tokenizer, max_len, count)
        heldout = dpo_rows(heldout_docs, tokenizer, max_len, lambda *a, **k: None)
        # the reference model is the starting checkpoint: its log-probabilities are computed
        # once, here, before any step, and travel with the rows
        module.to(device)
        for group in (rows, heldout):
            ref_c, ref_r = pair_logps(module, group, pad_id, stage.eval_batch_size, device)
            for r, c, j in zip(group, ref_c, ref_r):
                r["ref_chosen"], r["ref_rejected"] = c, j
        module.to("cpu")
        collate: Any = CollatePairs(pad_id)
        objective: Any = PreferenceLM(module, stage.beta, stage.loss)
    else:
        rows = sft_rows(train_docs, tokenizer, max_len, stage.packing, stage.seed, count)
        heldout = sft_rows(heldout_docs, tokenizer, max_len, False, stage.seed,
                           lambda *a, **k: None)
        if heldout:
            module.to(device)
            metrics["val_loss_before"] = masked_loss(module, heldout, pad_id,
                                                     stage.eval_batch_size, device)
            module.to("cpu")
        collate = CollateRows(pad_id)
        objective = ChatLM(module)
    if len(rows) < stage.global_batch_size:
        raise StageError(f"{stage.name}: {len(rows)} training {unit} do not fill one global "
                         f"batch of {stage.global_batch_size}; lower global_batch_size")
    loader = rows_loader(rows, collate, procs.device_batch, stage.seed)
    batches_per_epoch = len(loader)
    batches = num_batches(stage.max_duration, stage.global_batch_size, batches_per_epoch)
    vocab_size, context = int(spec["vocab_size"]), int(spec["max_seq_len"])
    tokens_per_batch = stage.global_batch_size * max_len * (2 if is_dpo else 1)
    fingerprint = DataFingerprint(rows_digest(rows, {"max_len": max_len, "seed": stage.seed}),
                                  Path(ctx.inputs["documents"].path), checkpoint_dir(ctx),
                                  ctx.stage)
    if procs.main:
        ctx.log(f"{stage.name}: {len(rows)} training {unit}, {len(heldout)} held out; "
                f"{batches} batches of {stage.global_batch_size} ({batches / batches_per_epoch:.2f} "
                f"epochs), rows of at most {max_len} tokens, {procs.world_size} process(es) on "
                f"{procs.device}")

    run = make_trainer(stage, ctx, procs, objective, model_cfg, vocab_size, context,
                       DataSpec(loader, get_num_tokens_in_batch=batch_tokens,
                                get_num_samples_in_batch=batch_samples), batches, [fingerprint])
    resumed_from = fit(run, ctx, procs, fingerprint.checked)
    steps = int(run.trainer.state.timestamp.batch)
    tokens_trained = int(run.trainer.state.timestamp.token)
    weights = finish(run, stage, ctx, procs)

    if procs.main:  # measured on a fresh copy of the trained weights, outside any wrapper
        final = model_cfg.build(vocab_size, context)
        final.load_state_dict(weights, strict=False)
        final.to(device)
        if is_dpo:
            for split, group in (("train", rows), ("heldout", heldout)):
                if not group:
                    continue
                pol_c, pol_r = pair_logps(final, group, pad_id, stage.eval_batch_size, device)
                ch = [stage.beta * (p - r["ref_chosen"]) for p, r in zip(pol_c, group)]
                rj = [stage.beta * (p - r["ref_rejected"]) for p, r in zip(pol_r, group)]
                for key, value in reward_stats(ch, rj).items():
                    metrics[f"{split}/{key}"] = value
        elif heldout:
            metrics["val_loss"] = masked_loss(final, heldout, pad_id, stage.eval_batch_size,
                                              device)
    metrics.update({"train_loss": run.log.train_loss,
                    "seconds": round(time.perf_counter() - started, 3)})
    tps = run.log.tokens_per_second(tokens_per_batch)
    if tps:
        metrics["tokens_per_second_max"] = round(tps, 1)  # rows counted at max_seq_len
    out_meta = {"vocab_size": vocab_size, "seq_len": context, "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                "num_params": model_cfg.num_params(vocab_size, embeddings=True),
                "tokens_trained": tokens_trained, "steps": steps,
                "resumed_from_step": resumed_from, "base_model": spec["name"],
                "posttraining": stage.name, **chat_meta(tokenizer)}
    if not heldout and procs.main:
        ctx.log(f"no held-out {unit} (documents marked split: heldout): no validation figures")
    ctx.meta.update(out_meta)
    ctx.metrics.update({k: v for k, v in metrics.items() if v is not None})
    if procs.main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and k != "seconds")
        ctx.log(f"done: {steps} batches; {shown}")
    return {"meta": out_meta, "metrics": ctx.metrics}
