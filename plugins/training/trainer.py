"""The ``composer_train`` stage's body: Composer's ``Trainer`` over mosaicml-streaming shards.

Runs in the stage's process (one device), or in each process that ``worker.py`` launched.
Reads top to bottom: data, model wrapper, callbacks, then ``train``.

Resume. Every Composer checkpoint holds the model, optimizer, scheduler, RNG, this module's
callbacks' state and the ``StreamingDataset``'s position (``dataset_state``: epoch, sample
in epoch, ``num_canonical_nodes``, shuffle seed; Composer's ``State`` asks the dataset for
it when it saves and gives it back when it loads). A resumed run therefore continues inside
the epoch at the next sample, in the same global order, and, since the order depends only on
the seed, ``num_canonical_nodes`` and the global batch size, also on another number of
processes or nodes. ``DataFingerprint`` stores a digest of the training data in every
checkpoint and refuses to resume one made from other data.

Post-training (``sft``, ``dpo``; ``posttrain.py``): ``train`` hands those stages to
``train_posttrain`` at the end of this module (so launched workers run them too): the same
``Trainer`` set-up over in-memory tokenized rows, with their own ``ComposerModel``s.

Tracing (a test aid): with ``RECIPE_TRACE_SAMPLES=PATH`` in the environment, every process
appends one JSON line per device batch to ``PATH`` (``SampleTrace``), naming the samples it
trains on by their index in the train split.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from composer import Callback, ComposerModel, Event, State, Trainer
from composer.core import DataSpec, Evaluator
from composer.loggers import Logger
from composer.metrics import LanguageCrossEntropy, LanguagePerplexity
from composer.utils import dist, reproducibility

from recipe_engine import StageContext, StageError, warn
from recipe_engine.artifacts import BOUNDARIES_BOS
from recipe_engine.fsutil import atomic_writer

from . import mixing
from .stability import StabilityGuard

if TYPE_CHECKING:
    from . import ComposerTrain

RUN_NAME = "train"  # fixed, so that autoresume finds the checkpoints of an earlier attempt
IGNORE_INDEX = -100
TRACE_ENV = "RECIPE_TRACE_SAMPLES"
CURVES_FILE = "metrics.jsonl"  # per-step curves: in the stage's scratch, then the artifact
REQUIRED_META = ("seq_len", "vocab_size", "bos_id", "eos_id", "pad_id", "num_train_samples")


# -- data ------------------------------------------------------------------------------------


def collate_tokens(samples: list[dict[str, Any]]) -> torch.Tensor:
    """MDS samples ``{"tokens": uint16/int32 array}`` -> one int64 ``(batch, seq_len)`` tensor."""
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def num_tokens(batch: torch.Tensor) -> int:
    return int(batch.numel())


def stream_dirs(split_dir: Path, cache_dir: Path) -> tuple[str, str | None]:
    """``(local, remote)`` for ``StreamingDataset``. Uncompressed shards are read in place
    (``remote=None``). Compressed ones would be decompressed next to themselves, inside the
    committed shards artifact, so they are read as a "remote" and decompressed into a
    cache directory of our own (unique per attempt: streaming refuses a local directory
    that another live dataset with a remote registered)."""
    index = json.loads((split_dir / "index.json").read_text())
    if all(not s.get("compression") for s in index.get("shards", [])):
        return str(split_dir), None
    return str(cache_dir), str(split_dir)


def make_loader(split_dir: Path | Sequence[Path], cache_dir: Path, batch_size: int,
                shuffle: bool, seed: int, num_workers: int,
                num_canonical_nodes: int | None = None,
                proportions: Sequence[float] | None = None) -> torch.utils.data.DataLoader:
    """``batch_size`` is per device. The global sample order depends on ``seed``,
    ``num_canonical_nodes`` and the global batch size only (streaming's elastic determinism);
    a checkpoint's ``num_canonical_nodes`` replaces the one given here when it is loaded.

    Several split directories are mixed as streaming ``Stream``s (one per data stream), with
    ``proportions`` (normalised) or, without them, each sample once per epoch."""
    from streaming import Stream, StreamingDataset

    dirs = [Path(split_dir)] if isinstance(split_dir, (str, Path)) else [Path(d) for d in split_dir]
    common = dict(shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                  num_canonical_nodes=num_canonical_nodes)
    if len(dirs) == 1 and not proportions:
        local, remote = stream_dirs(dirs[0], cache_dir)
        dataset = StreamingDataset(local=local, remote=remote, **common)
    else:
        streams = []
        for i, d in enumerate(dirs):
            local, remote = stream_dirs(d, cache_dir / f"stream{i}")
            streams.append(Stream(local=local, remote=remote,
                                  proportion=proportions[i] if proportions else None))
        dataset = StreamingDataset(streams=streams, **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_tokens,
                                       num_workers=num_workers, drop_last=shuffle,
                                       persistent_workers=num_workers > 0)


def data_fingerprint(shards_dir: Path, manifest: dict[str, Any]) -> str:
    """A digest of the training stream's data: the sha256 of ``train/index.json`` and of every
    shard file it lists, as stored (compressed or not). Each file's sha256 comes from the
    artifact manifest's ``files`` map when listed there (no reading), else from the file.
    Names are relative to the artifact, so a moved or copied store keeps its fingerprints."""
    split = Path(shards_dir) / "train"
    index = json.loads((split / "index.json").read_text())
    names = ["index.json"] + [(s.get("zip_data") or s["raw_data"])["basename"]
                              for s in index.get("shards", [])]
    listed = manifest.get("files") or {}
    entries = []
    for name in names:
        sha = (listed.get(f"train/{name}") or {}).get("sha256")
        if not isinstance(sha, str):
            h = hashlib.sha256()
            with open(split / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            sha = h.hexdigest()
        entries.append([name, sha])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def mixed_data_fingerprint(shards: Sequence[Any], proportions: Sequence[float] | None) -> str:
    """One stream: its ``data_fingerprint``. Several: a digest of each stream's and of the
    proportions, so a checkpoint resumes only onto the same mixture."""
    fps = [data_fingerprint(Path(a.path), a.manifest) for a in shards]
    if len(fps) == 1 and not proportions:
        return fps[0]
    material = {"streams": fps, "proportions": list(proportions or [])}
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


def _sample_key(tokens: Any) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<i8").tobytes(),
                           digest_size=16).digest()


# -- model -----------------------------------------------------------------------------------


class CausalLM(ComposerModel):
    """Next-token prediction on packed sequences: the model reads ``tokens[:, :-1]`` and is
    scored on ``tokens[:, 1:]`` (cross-entropy, nats per token)."""

    def __init__(self, model: torch.nn.Module, pad_id: int | None = None):
        super().__init__()
        self.model = model
        self.pad_id = pad_id  # targets equal to it are not scored (packing makes none, normally)

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


# -- progress --------------------------------------------------------------------------------


class StageProgress(Callback):
    """Reports batches done through ``ctx.progress``, logs every ``log_interval`` batches,
    keeps a smoothed train loss (saved in Composer checkpoints, so it survives a resume) and
    times this attempt's batches (data loading + step; checkpointing and eval excluded)."""

    def __init__(self, ctx: StageContext | None, total_batches: int, log_interval: int,
                 tokens_per_batch: int, flops_per_token: float):
        self.ctx = ctx  # None on ranks other than 0
        self.total = total_batches
        self.log_interval = log_interval
        self.tokens_per_batch = tokens_per_batch
        self.flops_per_token = flops_per_token
        self.ema_num = self.ema_den = 0.0  # debiased EMA of the train loss, beta 0.9
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.batches = 0  # in this attempt
        self.seconds = 0.0
        self._t0: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"ema_num": self.ema_num, "ema_den": self.ema_den, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_num, self.ema_den = state["ema_num"], state["ema_den"]
        self.last_loss = state.get("last_loss")

    @property
    def train_loss(self) -> float | None:
        return self.ema_num / self.ema_den if self.ema_den else None

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._t0 = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
        self.batches += 1
        loss = (state.total_loss_dict or {}).get("loss/train/total")
        if loss is not None and math.isfinite(loss):
            self.last_loss = loss
            self.ema_num = 0.9 * self.ema_num + 0.1 * loss
            self.ema_den = 0.9 * self.ema_den + 0.1
        step = int(state.timestamp.batch)
        if self.ctx is None:
            return
        self.ctx.progress(step, self.total, "batches")
        if step % self.log_interval == 0 or step == self.total:
            lr = state.optimizers[0].param_groups[0]["lr"]
            self.record({"step": step, "tokens": int(state.timestamp.token),
                         "loss": self.last_loss, "loss_smoothed": self.train_loss, "lr": lr})
            tps = self.batches * self.tokens_per_batch / self.seconds if self.seconds else 0.0
            smoothed = f"{self.train_loss:.4f}" if self.train_loss is not None else "?"
            self.ctx.log(f"batch {step}/{self.total} loss {smoothed} lr {lr:.3g} "
                         f"{tps:,.0f} tok/s {tps * self.flops_per_token / 1e9:,.1f} GFLOP/s")

    def record(self, row: dict[str, Any]) -> None:
        """Append one line to the stage's curves (scratch: survives a crash; rank 0 only).
        Only values a rerun reproduces exactly go there: the committed file is the same for
        a resumed run as for an uninterrupted one (``write_curves`` keeps a step's last line)."""
        if self.ctx is None:
            return
        line = json.dumps({k: v for k, v in row.items() if v is not None}) + "\n"
        with open(Path(self.ctx.work) / CURVES_FILE, "a") as f:
            f.write(line)

    def eval_end(self, state: State, logger: Logger) -> None:
        value = state.eval_metric_values.get("LanguageCrossEntropy")
        if value is not None:
            self.record({"step": int(state.timestamp.batch), "tokens": int(state.timestamp.token),
                         "val_loss": float(value)})
            self.val_loss = float(value)
            if self.ctx is not None:
                self.ctx.log(f"batch {int(state.timestamp.batch)}: val loss {self.val_loss:.4f}")


class DataFingerprint(Callback):
    """Keeps the training data's fingerprint (``data_fingerprint``) in every Composer
    checkpoint and, when a checkpoint is loaded, raises a ``StageError`` naming both
    fingerprints if it was made from other data: its data position would be meaningless."""

    def __init__(self, fingerprint: str, shards_dir: Path, ckpt_dir: Path, stage: str):
        self.fingerprint = fingerprint
        self.shards_dir = shards_dir
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
                f"(data fingerprint {str(theirs)[:16]}) than the shards at {self.shards_dir} "
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

    def __init__(self, path: Path, shards_dirs: Sequence[Path]):
        from recipe_engine.artifacts import iter_token_sequences

        self.path = path
        self.index: dict[bytes, int] = {}
        i = 0  # several streams: indices continue from one stream's split to the next's
        for shards_dir in shards_dirs:
            for tokens in iter_token_sequences(shards_dir, "train"):
                self.index.setdefault(_sample_key(tokens), i)
                i += 1

    def after_dataloader(self, state: State, logger: Logger) -> None:
        rows = state.batch.detach().cpu().numpy()
        line = json.dumps({"batch": int(state.timestamp.batch), "epoch": int(state.timestamp.epoch),
                           "rank": dist.get_global_rank(), "world_size": dist.get_world_size(),
                           "samples": [self.index.get(_sample_key(r), -1) for r in rows]})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


# -- final weights ---------------------------------------------------------------------------


def full_state_dict(module: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The unsharded fp32 weights (complete on rank 0 only when ``sharded``)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    else:
        sd = module.state_dict()
    strip = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.")
    clean = {}
    for key, value in sd.items():
        for s in strip:
            key = key.replace(s, "")
        clean[key] = value.detach().to("cpu", torch.float32)
    return clean


def write_curves(log: Path, out: Path) -> None:
    """The curves of the run into the artifact: one line per step (training values and the
    validation loss merged), in step order; of a step logged twice (an attempt that died after
    logging it, then the resumed one), the later line wins."""
    if not log.is_file():
        return
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        kind = "eval" if "val_loss" in row else "train"
        rows[(int(row.get("step", 0)), kind)] = row
    merged: dict[int, dict[str, Any]] = {}
    for (step, _), row in sorted(rows.items()):
        merged.setdefault(step, {}).update(row)
    with atomic_writer(out, "w") as f:
        for step in sorted(merged):
            f.write(json.dumps(merged[step]) + "\n")


def save_checkpoint_artifact(state_dict: dict[str, torch.Tensor], model_cfg: Any, vocab_size: int,
                             seq_len: int, output: Path) -> None:
    """Write the checkpoint artifact: the weights, loaded into a fresh module of
    ``model_cfg`` (so that every name fits), as ``model.safetensors``, and ``model.json``."""
    from safetensors.torch import save_model as save_weights

    from recipe_engine.artifacts import WEIGHTS_FILE, write_model_spec

    fresh = model_cfg.build(vocab_size, seq_len)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    # a tied weight may be gathered under one of its names only; the fresh module ties it
    first_name: dict[int, str] = {}
    tied = set()
    for name, p in fresh.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            tied.update({name, first_name[id(p)]})
        first_name.setdefault(id(p), name)
    if unexpected or set(missing) - tied:
        raise StageError(f"the trained weights do not fit a fresh {model_cfg.name}: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    save_weights(fresh, str(output / WEIGHTS_FILE))  # the checkpoint artifact
    write_model_spec(output, model_cfg.name, model_cfg.params(), vocab_size, seq_len)


# -- checkpoints left by an earlier attempt --------------------------------------------------


def _checkpoint_batch(path: Path) -> int:
    """The batch count in a Composer checkpoint's name (``ep2-ba12-rank0.pt`` -> 12)."""
    for part in path.name.split("-"):
        if part.startswith("ba") and part[2:].isdigit():
            return int(part[2:])
    return -1


def checkpoint_damage(path: Path) -> str:
    """Why the checkpoint file at ``path`` cannot be whole ('' when it looks whole). A
    ``torch.save`` file is a zip archive: it must end with the archive's directory, and every
    member must match its CRC. Nothing is unpickled. A directory (a sharded checkpoint) is
    not checked here."""
    import zipfile

    if path.is_dir():
        return ""
    if not path.is_file():
        return "missing"
    try:
        if not zipfile.is_zipfile(path):
            return "not a complete zip archive (truncated?)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"member {bad} does not match its checksum" if bad else ""
    except Exception as e:  # noqa: BLE001 (a damaged archive fails in many ways)
        return f"unreadable ({type(e).__name__}: {e})"


def repair_checkpoints(ckpt_dir: Path, rank: int = 0) -> str:
    """Before autoresume: when ``latest-rank{rank}.pt`` names a damaged or missing checkpoint,
    remove it and point ``latest`` at the newest whole checkpoint kept
    (``num_checkpoints_to_keep``), or remove them all, so that the stage starts afresh
    (Composer would fail on every retry). Returns what was done, for the log ('' if nothing)."""
    latest = ckpt_dir / f"latest-rank{rank}.pt"
    if not latest.is_symlink() and not latest.exists():
        return ""
    target = ckpt_dir / os.readlink(latest) if latest.is_symlink() else latest
    why = checkpoint_damage(target)
    if not why:
        return ""
    damaged = f"the latest checkpoint {target.name} is damaged ({why})"
    kept = sorted((p for p in ckpt_dir.glob(f"ep*-ba*-rank{rank}.pt")
                   if p.name != target.name and not p.is_symlink()),
                  key=_checkpoint_batch, reverse=True)
    if target.is_file() and not target.is_symlink():
        target.unlink()
    for candidate in kept:
        if checkpoint_damage(candidate):
            candidate.unlink()
            continue
        tmp = ckpt_dir / f".latest-rank{rank}.pt.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(candidate.name)
        os.replace(tmp, latest)  # one rename: latest always names something
        return f"{damaged}; removed it and resuming from {candidate.name} instead"
    latest.unlink(missing_ok=True)
    return f"{damaged}, and no earlier whole checkpoint was kept; training this stage afresh"


# -- the stage -------------------------------------------------------------------------------


def _resolve_device(device: str, nproc: int) -> str:
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise StageError("device: 'gpu' was asked for but torch sees no CUDA device")
        if nproc > torch.cuda.device_count():
            raise StageError(f"parallelism: {nproc} processes per node but only "
                              f"{torch.cuda.device_count()} GPUs")
    return device


def train(stage: "ComposerTrain", ctx: StageContext, cache_tag: str | None = None) -> dict[str, Any]:
    """Train, write the checkpoint artifact into ``ctx.output`` (rank 0), fill ``ctx.meta``
    and ``ctx.metrics``. ``cache_tag`` names this attempt's stream cache (the launcher gives
    every rank the same one). Returns ``{"meta": ..., "metrics": ...}``."""
    if stage.name in ("sft", "dpo"):  # the post-training stages (also in launched workers)
        return train_posttrain(stage, ctx, cache_tag)  # type: ignore[arg-type]
    started = time.perf_counter()
    shards = ctx.inputs["shards"]  # the first stream: validation sequences come from it
    streams = ctx.input_lists.get("shards") or [shards]
    meta = shards.meta
    for art in streams:
        missing = [k for k in REQUIRED_META if k not in art.meta]
        if missing:
            raise StageError(f"the shards artifact at {art.path} lacks meta {missing}")
    proportions = mixing.weights(len(streams), stage.proportions)
    if len(streams) > 1:
        mixing.check_streams(streams)
    vocab_size, seq_len = int(meta["vocab_size"]), int(meta["seq_len"])

    model_cfg, optim_cfg = stage.model, stage.optimizer
    sched_cfg, parallel = stage.scheduler, stage.parallelism

    world_size, rank = dist.get_world_size(), dist.get_global_rank()
    device = _resolve_device(stage.device, dist.get_local_world_size())
    if world_size > 1 and not dist.is_initialized():
        dist.initialize_dist(device)
    if stage.global_batch_size % world_size:
        raise StageError(f"global_batch_size={stage.global_batch_size} is not divisible by "
                          f"the {world_size} processes")
    device_batch = stage.global_batch_size // world_size
    micro = stage.device_microbatch_size or device_batch
    if device_batch % micro:
        raise StageError(f"device_microbatch_size={micro} does not divide the per-device batch "
                         f"of {device_batch} sequences")
    if device == "cpu" and stage.precision != "fp32":
        raise StageError(f"precision={stage.precision} needs a GPU (Composer trains on CPU in "
                         f"fp32 only); set precision: fp32 for CPU runs")

    # data: this attempt's cache (only used for compressed shards); earlier attempts' are stale
    cache_root = Path(ctx.work) / "stream_cache"
    tag = cache_tag or uuid.uuid4().hex[:12]
    if cache_tag is None:  # in-process, one rank: earlier attempts' caches are stale
        shutil.rmtree(cache_root, ignore_errors=True)
    # fixed for the whole run: streaming's default (the number of nodes) unless the recipe
    # sets it; a checkpoint's value wins on resume, whatever the nodes are now
    num_nodes = max(1, world_size // max(1, dist.get_local_world_size()))
    train_loader = make_loader([Path(a.path) / "train" for a in streams], cache_root / tag / "train",
                               device_batch, True, stage.seed, stage.num_workers,
                               stage.num_canonical_nodes or num_nodes, proportions)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise StageError(f"the {sum(int(a.meta['num_train_samples']) for a in streams)} training "
                         f"sequences do not fill one "
                         f"global batch of {stage.global_batch_size}")
    evaluator = None
    if int(meta.get("num_val_samples", 0)) > 0:
        eval_loader = make_loader(Path(shards.path) / "val", cache_root / tag / "val",
                                  device_batch, False, stage.seed, 0)
        interval: Any = stage.eval_interval.strip()
        if interval == "0":  # only once, when training ends
            interval = lambda state, event: event == Event.FIT_END  # noqa: E731
        evaluator = Evaluator(label="eval", dataloader=DataSpec(eval_loader, get_num_tokens_in_batch=num_tokens),
                              metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
                              eval_interval=interval, subset_num_batches=stage.eval_batches or -1)
    elif rank == 0:
        ctx.log("the shards have no validation sequences: no val_loss")

    # model, optimizer, schedule
    num_params = model_cfg.num_params(vocab_size, embeddings=True)
    flops_per_token = model_cfg.flops_per_token(vocab_size, seq_len)
    batches = stage.total_batches(num_params, seq_len, batches_per_epoch)
    tokens_per_batch = stage.global_batch_size * seq_len
    reproducibility.seed_all(stage.seed)
    build_kwargs: dict[str, Any] = {}
    if getattr(model_cfg, "document_masking", False):
        if meta.get("document_boundaries") != BOUNDARIES_BOS or not isinstance(meta.get("bos_id"), int):
            raise StageError("model.document_masking needs shards whose documents start with "
                             "bos_id (meta document_boundaries: 'bos', mds_shards version 2)")
        build_kwargs["bos_id"] = int(meta["bos_id"])
    module = model_cfg.build(vocab_size, seq_len, **build_kwargs)
    parallel.prepare(module)
    no_decay = [f"{mname}.{pname}".lstrip(".") for mname, m in module.named_modules()
                if isinstance(m, torch.nn.Embedding) for pname, _ in m.named_parameters(recurse=False)]
    optimizer = optim_cfg.build(module.named_parameters(), no_decay)
    scheduler = sched_cfg.build()
    pad_id = meta.get("pad_id")
    if not (isinstance(pad_id, int) and 0 <= pad_id < vocab_size
            and pad_id not in (meta.get("bos_id"), meta.get("eos_id"))):
        if pad_id not in (None, -1):
            warn(f"the shards' pad_id={pad_id!r} is not a usable id distinct from bos/eos "
                 f"(vocab_size={vocab_size}); every target is scored")
        pad_id = None
    composer_model = CausalLM(module, pad_id)

    progress = StageProgress(ctx if rank == 0 else None, batches, stage.log_interval,
                             tokens_per_batch, flops_per_token)
    algorithms = []
    if stage.grad_clip_norm > 0:
        from composer.algorithms import GradientClipping

        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=stage.grad_clip_norm))
    ckpt_dir = Path(ctx.work) / "checkpoints"
    fingerprint = DataFingerprint(mixed_data_fingerprint(streams, proportions),
                                  Path(shards.path), ckpt_dir, ctx.stage)
    guard = StabilityGuard(skip_nonfinite=stage.skip_nonfinite,
                           spike_threshold=stage.spike_threshold, spike_warmup=stage.spike_warmup,
                           max_skipped=stage.max_skipped_batches)
    callbacks: list[Callback] = [progress, fingerprint, guard]
    trace_path = os.environ.get(TRACE_ENV)
    if trace_path:
        callbacks.append(SampleTrace(Path(trace_path), [Path(a.path) for a in streams]))
    if rank == 0 and ckpt_dir.is_dir():  # a damaged checkpoint would fail every retry
        repaired = repair_checkpoints(ckpt_dir)
        if repaired:
            ctx.log(repaired)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        epochs = batches / batches_per_epoch
        ctx.log(f"{model_cfg.name}: {num_params / 1e6:.2f}M params, {batches} batches of "
                f"{stage.global_batch_size}x{seq_len} tokens ({batches * tokens_per_batch:,} tokens, "
                f"{epochs:.2f} epochs), {world_size} process(es) on {device}, {stage.precision}")
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
    trainer = Trainer(
        model=composer_model,
        train_dataloader=DataSpec(train_loader, get_num_tokens_in_batch=num_tokens),
        max_duration=f"{batches}ba",
        eval_dataloader=evaluator,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=[],
        run_name=RUN_NAME,
        progress_bar=False,
        log_to_console=False,
        save_folder=str(ckpt_dir),
        save_interval=stage.save_interval.strip(),
        save_num_checkpoints_to_keep=stage.num_checkpoints_to_keep,
        # a killed attempt can leave a half-written later checkpoint; it is ours to replace
        save_overwrite=True,
        autoresume=True,
        device=device,
        precision=stage.precision,
        device_train_microbatch_size=micro,
        seed=stage.seed,
        compile_config={} if stage.compile else None,
        **parallel.trainer_kwargs(),
    )
    resumed_from = int(trainer.state.timestamp.batch)
    if resumed_from >= batches:  # killed after the last checkpoint: nothing left to train
        if rank == 0:
            ctx.log(f"the checkpoint at batch {resumed_from} ends the run; not training further")
        if evaluator is not None:
            trainer.eval()
    else:
        if rank == 0 and resumed_from:
            ts = trainer.state.timestamp
            checked = "data fingerprint checked" if fingerprint.checked else \
                "no data fingerprint in it (an older checkpoint): data not checked"
            ctx.log(f"resumed from the checkpoint at batch {resumed_from}: epoch {int(ts.epoch)}, "
                    f"sample {int(ts.sample_in_epoch)} of the epoch; {checked}")
        trainer.fit()
    steps = int(trainer.state.timestamp.batch)
    tokens_trained = int(trainer.state.timestamp.token) or steps * tokens_per_batch

    # final weights: unsharded, fp32, into a fresh module (plain nn.Module for load_model)
    sharded = trainer.state.fsdp_enabled
    state_dict = full_state_dict(composer_model.model, sharded)
    if rank == 0:
        save_checkpoint_artifact(state_dict, model_cfg, vocab_size, seq_len, Path(ctx.output))
        write_curves(Path(ctx.work) / CURVES_FILE, Path(ctx.output) / CURVES_FILE)
    trainer.close()
    if dist.get_local_rank() == 0:
        shutil.rmtree(cache_root / tag, ignore_errors=True)

    seconds = time.perf_counter() - started
    # this attempt's speed (none when an earlier attempt had already trained every batch)
    tps = progress.batches * tokens_per_batch / progress.seconds if progress.seconds else None
    metrics: dict[str, Any] = {
        "train_loss": progress.train_loss,
        "val_loss": progress.val_loss,
        "tokens_per_second": round(tps, 1) if tps else None,
        "seconds": round(seconds, 3),
        "flops_per_token": flops_per_token,
        "model_flops": flops_per_token * tokens_trained,
    }
    if device == "gpu" and stage.peak_tflops > 0 and tps:
        metrics["mfu"] = tps * flops_per_token / (stage.peak_tflops * 1e12 * world_size)
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
    if rank == 0:
        done = f"done: {steps} batches, {tokens_trained:,} tokens"
        if progress.train_loss is not None:
            done += f", train loss {progress.train_loss:.4f}"
        if progress.val_loss is not None:
            done += f", val loss {progress.val_loss:.4f}"
        ctx.log(done + (f", {tps:,.0f} tok/s" if tps else ""))
    return {"meta": out_meta, "metrics": ctx.metrics}


# -- post-training: sft and dpo --------------------------------------------------------------
#
# The data are small (tens of thousands of examples at most), tokenized in memory, and read
# through a plain DataLoader with Composer's DistributedSampler (shuffled per epoch by
# ``seed``; Composer sets the epoch and, on resume, skips the batches already trained in it).


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _pad(seqs: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


class CollateRows:
    """SFT rows ``{"ids", "labels"}`` -> ``{"tokens", "labels"}``, right-padded to the
    longest row of the batch (pad id, label ``IGNORE_INDEX``)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["ids"]) for r in rows)
        return {"tokens": _pad([r["ids"] for r in rows], width, self.pad_id),
                "labels": _pad([r["labels"] for r in rows], width, IGNORE_INDEX)}


class CollatePairs:
    """DPO pairs -> chosen and rejected tokens/labels padded to one width, and the
    reference log-probabilities (when the rows hold them)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
        batch = {f"{side}_{part}": _pad([r[f"{side}_{key}"] for r in rows], width,
                                        self.pad_id if key == "ids" else IGNORE_INDEX)
                 for side in ("chosen", "rejected") for part, key in (("tokens", "ids"),
                                                                     ("labels", "labels"))}
        if "ref_chosen" in rows[0]:
            batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows], dtype=torch.float32)
            batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows],
                                                 dtype=torch.float32)
        return batch


def _batch_samples(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(sum(int((v != IGNORE_INDEX).sum()) for k, v in batch.items() if k.endswith("labels")))


def sequence_logps(module: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of ``log p(token)`` over the labelled positions."""
    logits = module(tokens[:, :-1]).float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


class ChatLM(ComposerModel):
    """SFT: next-token cross-entropy on the labelled positions only (the assistant turns),
    averaged over those tokens."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["tokens"][:, :-1])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any,
             **kwargs: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)


class PreferenceLM(ComposerModel):
    """DPO / IPO on pairs; the reference log-probabilities come with the batch."""

    def __init__(self, model: torch.nn.Module, beta: float, kind: str):
        super().__init__()
        self.model = model
        self.beta, self.kind = beta, kind

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


def _rows_digest(rows: list[dict[str, Any]], extra: Any) -> str:
    """The training data's fingerprint (``DataFingerprint``): every row's ids and labels."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for r in rows:
        for key in sorted(k for k in r if k.endswith(("ids", "labels"))):
            h.update(np.asarray(r[key], dtype="<i8").tobytes())
            h.update(b"|")
    return h.hexdigest()


def _load_start(stage: Any, ctx: StageContext) -> dict[str, Any]:
    """The tokenizer (checked for the chat tokens), the starting checkpoint's module and spec,
    and the row length."""
    from safetensors.torch import load_model as load_weights

    from recipe_engine import ModelConfig
    from recipe_engine.artifacts import checkpoint_weights_path, load_tokenizer, read_model_spec

    from .posttrain import chat_token_ids

    tokenizer = load_tokenizer(ctx.inputs["tokenizer"].path)
    chat_token_ids(tokenizer, stage.name)
    ckpt = ctx.inputs["checkpoint"]
    spec = read_model_spec(ckpt.path)
    if spec["vocab_size"] < tokenizer.vocab_size:
        raise StageError(f"{stage.name}: the checkpoint's vocab_size={spec['vocab_size']} is "
                         f"smaller than the tokenizer's {tokenizer.vocab_size}; was it "
                         "pretrained with this tokenizer?")
    context = int(spec["max_seq_len"])
    max_len = stage.max_seq_len or context
    if max_len > context:
        raise StageError(f"{stage.name}: max_seq_len={max_len} is longer than the checkpoint's "
                         f"context of {context} tokens; use at most {context} (or 0)")
    model_cfg = ctx.build(ModelConfig, {"name": spec["name"], **spec["params"]})
    reproducibility.seed_all(stage.seed)
    module = model_cfg.build(spec["vocab_size"], context)
    load_weights(module, str(checkpoint_weights_path(ckpt.path)))
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    return {"tokenizer": tokenizer, "spec": spec, "model_cfg": model_cfg, "module": module,
            "max_len": max_len, "pad_id": pad_id}


def _read_records(ctx: StageContext, problem: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) records of the documents input that pass ``problem``; the others
    are skipped and counted."""
    from recipe_engine.artifacts import is_heldout, iter_documents

    train_docs, heldout_docs, seen = [], [], 0
    for doc in iter_documents(ctx.inputs["documents"].path):
        seen += 1
        why = problem(doc)
        if why:
            ctx.skip(why)
            continue
        (heldout_docs if is_heldout(doc) else train_docs).append(doc)
    ctx.count("records_in", seen)
    ctx.check_skips(seen)
    return train_docs, heldout_docs


def sft_rows(docs: list[dict[str, Any]], tokenizer: Any, max_len: int, packing: bool,
             seed: int, count: Any) -> list[dict[str, Any]]:
    """Conversations -> training rows ``{"ids", "labels"}`` (packed or one per row), in a
    seeded order; truncations and examples left without a target are counted."""
    import random

    from .posttrain import labels_of, pack, render_chat, truncate

    examples = []
    for doc in docs:
        ids, target = render_chat(tokenizer, doc["messages"])
        ids, target, cut = truncate(ids, target, max_len)
        if cut:
            count("truncated")
        if not any(target[1:]):
            count("dropped.no_target_left")
            continue
        examples.append((ids, labels_of(ids, target)))
    random.Random(seed).shuffle(examples)
    rows = pack(examples, max_len) if packing else examples
    count("examples", len(examples))
    return [{"ids": ids, "labels": labels} for ids, labels in rows]


def dpo_rows(docs: list[dict[str, Any]], tokenizer: Any, max_len: int, count: Any
             ) -> list[dict[str, Any]]:
    """Preference triples -> ``{"chosen_ids", "chosen_labels", "rejected_ids",
    "rejected_labels"}``: the prompt with each reply as the assistant's turn."""
    from .posttrain import labels_of, render_chat, truncate

    rows = []
    for doc in docs:
        row, usable = {}, True
        for side in ("chosen", "rejected"):
            messages = [*doc["prompt"], {"role": "assistant", "content": doc[side]}]
            ids, target = render_chat(tokenizer, messages)
            ids, target, cut = truncate(ids, target, max_len)
            if cut:
                count(f"truncated_{side}")
            usable = usable and any(target[1:])
            row[f"{side}_ids"], row[f"{side}_labels"] = ids, labels_of(ids, target)
        if not usable:
            count("dropped.no_target_left")
            continue
        rows.append(row)
    count("pairs", len(rows))
    return rows


def train_posttrain(stage: Any, ctx: StageContext, cache_tag: str | None = None) -> dict[str, Any]:
    """The ``sft`` / ``dpo`` stage body (one process, or each launched process)."""
    from .posttrain import (chat_meta, conversation_problem, num_batches, preference_problem,
                            reward_stats)

    started = time.perf_counter()
    is_dpo = stage.name == "dpo"
    world_size, rank = dist.get_world_size(), dist.get_global_rank()
    device = _resolve_device(stage.device, dist.get_local_world_size())
    if world_size > 1 and not dist.is_initialized():
        dist.initialize_dist(device)
    if stage.global_batch_size % world_size:
        raise StageError(f"global_batch_size={stage.global_batch_size} is not divisible by "
                         f"the {world_size} processes")
    device_batch = stage.global_batch_size // world_size
    micro = stage.device_microbatch_size or device_batch
    if device_batch % micro:
        raise StageError(f"device_microbatch_size={micro} does not divide the per-device batch "
                         f"of {device_batch}")
    start = _load_start(stage, ctx)
    tokenizer, module, max_len, pad_id = (start["tokenizer"], start["module"], start["max_len"],
                                          start["pad_id"])
    spec, model_cfg = start["spec"], start["model_cfg"]
    count = ctx.count if rank == 0 else (lambda *a, **k: None)
    train_docs, heldout_docs = _read_records(ctx, preference_problem if is_dpo
                                             else conversation_problem)
    torch_device = torch.device("cuda", dist.get_local_rank()) if device == "gpu" else \
        torch.device("cpu")
    metrics: dict[str, Any] = {}

    if is_dpo:
        rows = dpo_rows(train_docs, tokenizer, max_len, count)
        heldout = dpo_rows(heldout_docs, tokenizer, max_len, lambda *a, **k: None)
        # the reference model is the starting checkpoint: its log-probabilities are computed
        # once, here, before any step, and travel with the rows
        module.to(torch_device)
        for group in (rows, heldout):
            ref_c, ref_r = pair_logps(module, group, pad_id, stage.eval_batch_size, torch_device)
            for r, c, j in zip(group, ref_c, ref_r):
                r["ref_chosen"], r["ref_rejected"] = c, j
        module.to("cpu")
        collate: Any = CollatePairs(pad_id)
        composer_model: ComposerModel = PreferenceLM(module, stage.beta, stage.loss)
        unit = "pairs"
    else:
        rows = sft_rows(train_docs, tokenizer, max_len, stage.packing, stage.seed, count)
        heldout = sft_rows(heldout_docs, tokenizer, max_len, False, stage.seed,
                           lambda *a, **k: None)
        if heldout:
            module.to(torch_device)
            metrics["val_loss_before"] = masked_loss(module, heldout, pad_id,
                                                     stage.eval_batch_size, torch_device)
            module.to("cpu")
        collate = CollateRows(pad_id)
        composer_model = ChatLM(module)
        unit = "rows"
    if len(rows) < stage.global_batch_size:
        raise StageError(f"{stage.name}: {len(rows)} training {unit} do not fill one global "
                         f"batch of {stage.global_batch_size}; lower global_batch_size")
    dataset = RowDataset(rows)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=device_batch, collate_fn=collate, drop_last=True,
        sampler=dist.get_sampler(dataset, shuffle=True, drop_last=True, seed=stage.seed))
    batches_per_epoch = len(loader)
    batches = num_batches(stage.max_duration, stage.global_batch_size, batches_per_epoch)

    vocab_size, context = int(spec["vocab_size"]), int(spec["max_seq_len"])
    num_params = model_cfg.num_params(vocab_size, embeddings=True)
    flops_per_token = model_cfg.flops_per_token(vocab_size, context)
    stage.parallelism.prepare(module)
    no_decay = [f"{mname}.{pname}".lstrip(".") for mname, m in module.named_modules()
                if isinstance(m, torch.nn.Embedding) for pname, _ in m.named_parameters(recurse=False)]
    optimizer = stage.optimizer.build(module.named_parameters(), no_decay)
    scheduler = stage.scheduler.build()
    tokens_per_batch = stage.global_batch_size * max_len * (2 if is_dpo else 1)
    progress = StageProgress(ctx if rank == 0 else None, batches, stage.log_interval,
                             tokens_per_batch, flops_per_token)
    algorithms = []
    if stage.grad_clip_norm > 0:
        from composer.algorithms import GradientClipping

        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=stage.grad_clip_norm))
    ckpt_dir = Path(ctx.work) / "checkpoints"
    fingerprint = DataFingerprint(_rows_digest(rows, {"max_len": max_len, "seed": stage.seed}),
                                  Path(ctx.inputs["documents"].path), ckpt_dir, ctx.stage)
    if rank == 0 and ckpt_dir.is_dir():
        repaired = repair_checkpoints(ckpt_dir)
        if repaired:
            ctx.log(repaired)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        ctx.log(f"{stage.name}: {len(rows)} training {unit}, {len(heldout)} held out; "
                f"{batches} batches of {stage.global_batch_size} ({batches / batches_per_epoch:.2f} "
                f"epochs), rows of at most {max_len} tokens, {world_size} process(es) on {device}")
    trainer = Trainer(
        model=composer_model,
        train_dataloader=DataSpec(loader, get_num_tokens_in_batch=_batch_tokens,
                                  get_num_samples_in_batch=_batch_samples),
        max_duration=f"{batches}ba",
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=algorithms,
        callbacks=[progress, fingerprint],
        loggers=[],
        run_name=RUN_NAME,
        progress_bar=False,
        log_to_console=False,
        save_folder=str(ckpt_dir),
        save_interval=stage.save_interval.strip(),
        save_num_checkpoints_to_keep=stage.num_checkpoints_to_keep,
        save_overwrite=True,
        autoresume=True,
        device=device,
        precision=stage.precision,
        device_train_microbatch_size=micro,
        seed=stage.seed,
        **stage.parallelism.trainer_kwargs(),
    )
    resumed_from = int(trainer.state.timestamp.batch)
    if resumed_from >= batches:
        if rank == 0:
            ctx.log(f"the checkpoint at batch {resumed_from} ends the run; not training further")
    else:
        if rank == 0 and resumed_from:
            ctx.log(f"resumed from the checkpoint at batch {resumed_from}")
        trainer.fit()
    steps = int(trainer.state.timestamp.batch)
    tokens_trained = int(trainer.state.timestamp.token)

    state_dict = full_state_dict(composer_model.model, trainer.state.fsdp_enabled)
    trainer.close()
    if rank == 0:
        save_checkpoint_artifact(state_dict, model_cfg, vocab_size, context, Path(ctx.output))
        # measure on a fresh copy of the trained weights, outside any wrapper
        final = model_cfg.build(vocab_size, context)
        final.load_state_dict(state_dict, strict=False)
        final.to(torch_device)
        if is_dpo:
            for split, group in (("train", rows), ("heldout", heldout)):
                if not group:
                    continue
                pol_c, pol_r = pair_logps(final, group, pad_id, stage.eval_batch_size, torch_device)
                ch = [stage.beta * (p - r["ref_chosen"]) for p, r in zip(pol_c, group)]
                rj = [stage.beta * (p - r["ref_rejected"]) for p, r in zip(pol_r, group)]
                for key, value in reward_stats(ch, rj).items():
                    metrics[f"{split}/{key}"] = value
        elif heldout:
            metrics["val_loss"] = masked_loss(final, heldout, pad_id, stage.eval_batch_size,
                                              torch_device)
    metrics.update({"train_loss": progress.train_loss, "seconds": round(time.perf_counter() - started, 3)})
    tps = progress.batches * tokens_per_batch / progress.seconds if progress.seconds else None
    if tps:
        metrics["tokens_per_second_max"] = round(tps, 1)  # rows counted at max_seq_len
    out_meta = {"vocab_size": vocab_size, "seq_len": context, "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "num_params": num_params,
                "tokens_trained": tokens_trained, "steps": steps,
                "resumed_from_step": resumed_from, "base_model": spec["name"],
                "posttraining": stage.name, **chat_meta(tokenizer)}
    if not heldout and rank == 0:
        ctx.log(f"no held-out {unit} (documents marked split: heldout): no validation figures")
    ctx.meta.update(out_meta)
    ctx.metrics.update({k: v for k, v in metrics.items() if v is not None})
    if rank == 0:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and k != "seconds")
        ctx.log(f"done: {steps} batches; {shown}")
    return {"meta": out_meta, "metrics": ctx.metrics}
