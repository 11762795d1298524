"""What the training stages read: batches, and the fingerprints of what they train on.

* Pretraining (``composer_train``): mosaicml-streaming shards, one ``StreamingDataset`` over
  one or several streams (``make_loader``), collated into int64 ``(batch, seq_len)``
  tensors. ``data_fingerprint`` / ``mixed_data_fingerprint`` digest the training data, so
  that a checkpoint resumes only onto the data it was made from.
* Post-training (``sft``, ``dpo``): small data, tokenized in memory into rows
  (``sft_rows``, ``dpo_rows``) and read through a plain ``DataLoader`` with Composer's
  ``DistributedSampler`` (shuffled per epoch by ``seed``; Composer sets the epoch and, on
  resume, skips the batches already trained in it). ``rows_digest`` is their fingerprint.

Imported inside the training run only (torch, numpy, streaming).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from recipe_engine import StageContext, StageError

from . import mixing

IGNORE_INDEX = -100  # a label that is not scored
REQUIRED_META = ("seq_len", "vocab_size", "bos_id", "eos_id", "pad_id", "num_train_samples")


# -- pretraining: streaming shards -------------------------------------------------------------


def collate_tokens(samples: list[dict[str, Any]]) -> torch.Tensor:
    """MDS samples ``{"tokens": uint16/int32 array}`` -> one int64 ``(batch, seq_len)`` tensor."""
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def num_tokens(batch: torch.Tensor) -> int:
    return int(batch.numel())


def counted(loader: torch.utils.data.DataLoader, replication: int = 1) -> Any:
    """``loader`` as Composer's ``DataSpec``, counting tokens. With ``replication`` ranks
    reading each batch (a tensor-parallel group), each rank counts its share, so that
    Composer's sum over every rank is the samples and tokens trained — the count that
    streaming resumes from."""
    from composer.core import DataSpec

    if replication == 1:
        return DataSpec(loader, get_num_tokens_in_batch=num_tokens)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: num_tokens(b) // replication,
                    get_num_samples_in_batch=lambda b: int(b.shape[0]) // replication)


def shard_streams(ctx: StageContext, proportions: Sequence[float]) -> tuple[list[Any], list[float] | None]:
    """The ``shards`` inputs (one per stream, the first one's validation split is used),
    each checked for the meta training needs, and the streams' normalised proportions."""
    streams = ctx.input_lists.get("shards") or [ctx.inputs["shards"]]
    for art in streams:
        missing = [k for k in REQUIRED_META if k not in art.meta]
        if missing:
            raise StageError(f"the shards artifact at {art.path} lacks meta {missing}")
    if len(streams) > 1:
        mixing.check_streams(streams)
    return streams, mixing.weights(len(streams), proportions)


def stream_cache(ctx: StageContext, cache_tag: str | None) -> Path:
    """This attempt's cache for compressed shards. ``cache_tag`` names it (the launcher gives
    every rank the same one); without one (in-process, one rank) earlier attempts' caches
    are stale and removed first."""
    root = Path(ctx.work) / "stream_cache"
    if cache_tag is None:
        shutil.rmtree(root, ignore_errors=True)
    return root / (cache_tag or uuid.uuid4().hex[:12])


def pretrain_loaders(stage: Any, streams: Sequence[Any], proportions: Sequence[float] | None,
                     cache: Path, device_batch: int, replication: int = 1
                     ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """The training loader over every stream, and the first stream's validation loader
    (``None`` when it has no validation sequences); ``replication`` consecutive ranks read
    the same batches."""
    from composer.utils import dist

    # fixed for the whole run: streaming's default (the number of nodes) unless the recipe
    # sets it; a checkpoint's value wins on resume, whatever the nodes are now
    num_nodes = max(1, dist.get_world_size() // max(1, dist.get_local_world_size()))
    train = make_loader([Path(a.path) / "train" for a in streams], cache / "train", device_batch,
                        True, stage.seed, stage.num_workers,
                        stage.num_canonical_nodes or num_nodes, proportions, replication)
    if len(train) == 0:
        raise StageError(f"the {sum(int(a.meta['num_train_samples']) for a in streams)} training "
                         f"sequences do not fill one global batch of {stage.global_batch_size}")
    if int(streams[0].meta.get("num_val_samples", 0)) <= 0:
        return train, None
    return train, make_loader(Path(streams[0].path) / "val", cache / "val", device_batch, False,
                              stage.seed, 0, replication=replication)


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
                proportions: Sequence[float] | None = None,
                replication: int = 1) -> torch.utils.data.DataLoader:
    """``batch_size`` is per device. The global sample order depends on ``seed``,
    ``num_canonical_nodes`` and the global batch size only (streaming's elastic determinism);
    a checkpoint's ``num_canonical_nodes`` replaces the one given here when it is loaded.

    Several split directories are mixed as streaming ``Stream``s (one per data stream), with
    ``proportions`` (normalised) or, without them, each sample once per epoch.
    ``replication``: that many consecutive ranks get the same samples (streaming's own
    option, for tensor parallelism)."""
    from streaming import Stream, StreamingDataset

    dirs = [Path(split_dir)] if isinstance(split_dir, (str, Path)) else [Path(d) for d in split_dir]
    common = dict(shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                  num_canonical_nodes=num_canonical_nodes,
                  replication=replication if replication > 1 else None)
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


def sample_key(tokens: Any) -> bytes:
    """A sequence's identity by its tokens (``SampleTrace``)."""
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<i8").tobytes(),
                           digest_size=16).digest()


# -- post-training: rows in memory -------------------------------------------------------------


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


def batch_samples(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The labelled (scored) tokens of a post-training batch."""
    return int(sum(int((v != IGNORE_INDEX).sum()) for k, v in batch.items() if k.endswith("labels")))


def rows_loader(rows: list[dict[str, Any]], collate: Any, device_batch: int, seed: int
                ) -> torch.utils.data.DataLoader:
    """Rows in a seeded, per-epoch shuffled order, split over the processes."""
    from composer.utils import dist

    dataset = RowDataset(rows)
    return torch.utils.data.DataLoader(
        dataset, batch_size=device_batch, collate_fn=collate, drop_last=True,
        sampler=dist.get_sampler(dataset, shuffle=True, drop_last=True, seed=seed))


def rows_digest(rows: list[dict[str, Any]], extra: Any) -> str:
    """The training rows' fingerprint (``DataFingerprint``): every row's ids and labels."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for r in rows:
        for key in sorted(k for k in r if k.endswith(("ids", "labels"))):
            h.update(np.asarray(r[key], dtype="<i8").tobytes())
            h.update(b"|")
    return h.hexdigest()


def read_records(ctx: StageContext, problem: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
