"""``mds_shards``: tokenize documents, pack them into fixed-length sequences, write MDS shards.

Output layout::

    train/            mosaicml-streaming MDS, column "tokens" (ndarray:uint16 or int32)
    val/              the same, packed from the validation documents (for validation loss)
    val_documents/    the validation documents themselves, as a ``documents`` artifact

Split by document: a document is validation iff ``split_value(split_seed, id) < val_fraction``
and it is among the ``max_val_documents`` such documents with the smallest value; the rest
are training documents. Nothing depends on part order or worker count.

Packing: each document becomes ``[bos] + tokens + [eos]``; documents are concatenated in
document order (part by part, line by line) and cut into ``seq_len`` chunks; the incomplete
tail is dropped and counted (``dropped_tail_tokens.train`` / ``.val``).

Tokenizing runs through ``ctx.executor`` one input part per task; each task leaves its tokens
in the stage's scratch directory, so a crashed run resumes part by part.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import list_parts, part_name, read_documents, write_documents
from recipe_engine.fsutil import atomic_write_json, atomic_writer

VAL_DOCUMENTS_PER_PART = 10_000
ENCODE_BATCH_BYTES = 8 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.I)


def _size_bytes(text: str) -> float:
    """Bytes in a size string as Streaming reads it (``kb`` is 1024 bytes)."""
    m = _SIZE.match(text)
    assert m, text
    unit = (m.group(2) or "").lower()
    return float(m.group(1)) * 1024 ** (" kmgt".index(unit[:1]) if unit else 0)


def split_value(seed: int, doc_id: str) -> float:
    """Uniform float in [0, 1) from ``blake2b(seed, id)``: the document's place in the split."""
    digest = hashlib.blake2b(f"split:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str) -> Any:
    if path not in _TOKENIZERS:
        from recipe_engine.artifacts import load_tokenizer

        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def _tokenize_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: tokenize one part into ``<work>/part-NNNNN.npz`` (tokens with bos/eos, per-doc
    lengths, bytes); write its validation candidates aside; return a small summary."""
    import numpy as np

    work = Path(task["work"])
    stem = f"part-{task['index']:05d}"
    summary_file = work / f"{stem}.json"
    if summary_file.exists():  # done by an earlier, interrupted run of this stage
        return json.loads(summary_file.read_text())

    tok = _tokenizer(task["tokenizer"])
    threads = -1 if multiprocessing.parent_process() is None else 1  # pools parallelize already
    seed, fraction = task["split_seed"], task["val_fraction"]
    skipped: dict[str, int] = {}
    chunks: list[Any] = []
    lengths: list[int] = []
    nbytes: list[int] = []
    candidates: list[tuple[float, str, int]] = []  # (split value, id, position in part)
    records: list[dict[str, Any]] = []
    batch: list[str] = []
    batch_bytes = 0
    seen = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        for ids in tok.encode_batch(batch, num_threads=threads):
            arr = np.empty(len(ids) + 2, dtype=task["dtype"])
            arr[0], arr[1:-1], arr[-1] = tok.bos_id, ids, tok.eos_id
            chunks.append(arr)
            lengths.append(len(arr))
        batch, batch_bytes = [], 0

    for doc in read_documents(Path(task["part"])):
        seen += 1
        text, doc_id = doc.get("text"), doc.get("id")
        if not isinstance(text, str) or not text:
            skipped["empty_text"] = skipped.get("empty_text", 0) + 1
            continue
        if doc_id is None or doc_id == "":
            skipped["missing_id"] = skipped.get("missing_id", 0) + 1
            continue
        doc_id = str(doc_id)
        u = split_value(seed, doc_id)
        if u < fraction:
            candidates.append((u, doc_id, len(nbytes)))
            records.append(doc)
        size = len(text.encode("utf-8"))
        nbytes.append(size)
        batch.append(text)
        batch_bytes += size
        if batch_bytes >= ENCODE_BATCH_BYTES:
            flush()
    if batch:
        flush()

    # only the part's max_val_documents smallest candidates can make the global cut
    keep = sorted(range(len(candidates)), key=lambda i: candidates[i][:2])
    keep = sorted(keep[: task["max_val_documents"]])
    candidates = [(*candidates[i], lengths[candidates[i][2]]) for i in keep]
    cand_file = work / f"{stem}.candidates.jsonl.zst"
    write_documents(cand_file, [records[i] for i in keep])

    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=task["dtype"])
    npz = work / f"{stem}.npz"
    with atomic_writer(npz, "wb") as f:
        np.savez(f, tokens=tokens, lengths=np.asarray(lengths, dtype=np.int64),
                 nbytes=np.asarray(nbytes, dtype=np.int64))
    summary = {"index": task["index"], "seen": seen, "skipped": skipped,
               "documents": len(nbytes), "tokens": int(tokens.size),
               "bytes": int(sum(nbytes)), "candidates": candidates,
               "npz": str(npz), "candidates_file": str(cand_file)}
    atomic_write_json(summary_file, summary)
    return summary


class _Packer:
    """Concatenates token arrays and writes every full ``seq_len`` chunk as one MDS sample."""

    def __init__(self, writer: Any, seq_len: int, dtype: str):
        import numpy as np

        self.writer, self.seq_len = writer, seq_len
        self.carry = np.empty(0, dtype=dtype)
        self.samples = 0

    def add(self, tokens: Any) -> None:
        import numpy as np

        if self.carry.size:
            tokens = np.concatenate([self.carry, tokens])
        n = tokens.size // self.seq_len
        for i in range(n):
            self.writer.write({"tokens": tokens[i * self.seq_len : (i + 1) * self.seq_len]})
        self.carry = tokens[n * self.seq_len :].copy()
        self.samples += n


@dataclass(kw_only=True)
class MDSShards(Stage,
                name="mds_shards",
                version="1",
                description="tokenize documents, pack [bos]+doc+[eos] into seq_len sequences, write MDS shards "
        "(train/, val/) and the held-out documents (val_documents/)",
                inputs={"documents": "documents", "tokenizer": "tokenizer"},
                output="shards"):
    """Tokenized, packed, document-split MDS shards for streaming training."""

    seq_len: int = 512
    val_fraction: float = 0.05
    split_seed: int = 0
    max_val_documents: int = 2000
    size_limit: str | int = "64mb"

    def check(self, problems: Problems) -> None:
        problems.require(self.seq_len >= 2, "seq_len", f"must be at least 2, got {self.seq_len}")
        problems.require(0 <= self.val_fraction < 1, "val_fraction",
                         f"must be in [0, 1), got {self.val_fraction}")
        problems.require(self.max_val_documents >= 0, "max_val_documents", "must be >= 0")
        if isinstance(self.size_limit, int):
            problems.require(0 < self.size_limit < 2**32, "size_limit",
                             "must be between 1 byte and 4 GB (MDS offsets are uint32)")
        elif _SIZE.match(str(self.size_limit)):
            problems.require(_size_bytes(str(self.size_limit)) < 2**32, "size_limit",
                             f"{self.size_limit!r} is 4 GB or more (MDS offsets are uint32)")
        else:
            problems.add("size_limit", f"{self.size_limit!r} is not a size like '64mb' or "
                             "67108864")

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        meta = {"seq_len": self.seq_len}
        if "vocab_size" in inputs_meta.get("tokenizer", {}):
            meta["vocab_size"] = inputs_meta["tokenizer"]["vocab_size"]
        return {"meta": meta}

    def run(self, ctx: StageContext) -> None:
        start = time.perf_counter()
        import numpy as np
        from streaming import MDSWriter

        docs_art, tok_art = ctx.inputs["documents"], ctx.inputs["tokenizer"]
        parts = list_parts(docs_art.path)
        if not parts:
            raise StageError(f"no document parts in {docs_art.path}")
        meta = dict(tok_art.meta)
        if not all(k in meta for k in ("vocab_size", "bos_id", "eos_id", "pad_id")):
            tok = _tokenizer(str(tok_art.path))
            meta = {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                    "pad_id": tok.pad_id, **meta}
        vocab_size = int(meta["vocab_size"])
        dtype = "uint16" if vocab_size <= 65536 else "int32"

        # 1. tokenize every part (in parallel), tokens to scratch
        work = Path(ctx.work) / "tokens"
        work.mkdir(parents=True, exist_ok=True)
        tasks = [{"part": str(p), "index": i, "tokenizer": str(tok_art.path), "work": str(work),
                  "split_seed": self.split_seed, "val_fraction": self.val_fraction,
                  "max_val_documents": self.max_val_documents, "dtype": dtype}
                 for i, p in enumerate(parts)]
        summaries: list[dict[str, Any]] = []
        for done, summary in enumerate(ctx.executor.map(_tokenize_part, tasks), 1):
            summaries.append(summary)
            ctx.progress(done, len(parts), "parts tokenized")
        seen = sum(s["seen"] for s in summaries)
        ctx.count("documents", seen)
        for s in summaries:
            for reason, n in s["skipped"].items():
                ctx.skip(reason, n)
        ctx.check_skips(seen)

        # 2. the validation documents: the smallest split values under val_fraction
        cands = sorted((u, doc_id, s["index"], pos, n)
                       for s in summaries for u, doc_id, pos, n in s["candidates"])
        cands = cands[: self.max_val_documents]
        val_pos: dict[int, list[int]] = {}
        for _, _, part, pos, _ in cands:
            val_pos.setdefault(part, []).append(pos)
        total_tokens = sum(s["tokens"] for s in summaries)
        train_tokens_total = total_tokens - sum(c[4] for c in cands)
        if train_tokens_total < self.seq_len:
            raise StageError(
                f"not enough data for one training sequence: the training documents give "
                f"{train_tokens_total} tokens (with bos/eos), seq_len is {self.seq_len}; "
                f"add documents or lower seq_len / val_fraction")

        # 3. pack and write, part by part in document order
        out = Path(ctx.output)
        for sub in ("train", "val", "val_documents"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "val_documents").mkdir(parents=True)
        columns = {"tokens": f"ndarray:{dtype}"}
        num_train_docs = num_val_docs = train_bytes = val_bytes = 0
        val_records: list[dict[str, Any]] = []
        val_parts = 0

        def flush_val_records(final: bool = False) -> None:
            nonlocal val_records, val_parts
            while len(val_records) >= VAL_DOCUMENTS_PER_PART or (final and val_records):
                chunk = val_records[:VAL_DOCUMENTS_PER_PART]
                write_documents(out / "val_documents" / part_name(val_parts), chunk)
                val_parts += 1
                val_records = val_records[VAL_DOCUMENTS_PER_PART:]

        try:
            with MDSWriter(out=str(out / "train"), columns=columns, compression="zstd",
                           size_limit=self.size_limit) as train_w, \
                 MDSWriter(out=str(out / "val"), columns=columns, compression="zstd",
                           size_limit=self.size_limit) as val_w:
                train_p, val_p = (_Packer(w, self.seq_len, dtype) for w in (train_w, val_w))
                for done, s in enumerate(summaries, 1):
                    with np.load(s["npz"]) as z:
                        tokens, lengths, nbytes = z["tokens"], z["lengths"], z["nbytes"]
                    is_val = np.zeros(lengths.size, dtype=bool)
                    positions = sorted(val_pos.get(s["index"], []))
                    is_val[positions] = True
                    token_is_val = np.repeat(is_val, lengths)
                    train_p.add(tokens[~token_is_val])
                    val_p.add(tokens[token_is_val])
                    num_val_docs += len(positions)
                    num_train_docs += int(lengths.size) - len(positions)
                    val_bytes += int(nbytes[is_val].sum())
                    train_bytes += int(nbytes[~is_val].sum())
                    if positions:
                        wanted = set(positions)
                        for (_, _, pos, _), rec in zip(s["candidates"],
                                                       read_documents(Path(s["candidates_file"]))):
                            if pos in wanted:
                                val_records.append(rec)
                        flush_val_records()
                    ctx.progress(done, len(summaries), "parts packed")
        except ValueError as e:  # MDSWriter's own checks (size_limit, ...)
            raise StageError(f"writing MDS shards failed: {e}") from e
        flush_val_records(final=True)

        dropped_train, dropped_val = int(train_p.carry.size), int(val_p.carry.size)
        ctx.count("dropped_tail_tokens.train", dropped_train)
        ctx.count("dropped_tail_tokens.val", dropped_val)
        ctx.count("train_documents", num_train_docs)
        ctx.count("val_documents", num_val_docs)
        if self.val_fraction > 0 and val_p.samples == 0:
            ctx.log(f"the {num_val_docs} validation documents fill no sequence of "
                    f"{self.seq_len} tokens: val/ is empty")

        special_tokens = 2 * num_train_docs
        ctx.meta.update({
            "seq_len": self.seq_len,
            "vocab_size": vocab_size,
            "bos_id": int(meta["bos_id"]),
            "eos_id": int(meta["eos_id"]),
            "pad_id": int(meta["pad_id"]),
            "dtype": dtype,
            "num_train_samples": train_p.samples,
            "num_train_tokens": train_p.samples * self.seq_len,
            "num_val_samples": val_p.samples,
            "num_val_tokens": val_p.samples * self.seq_len,
            "num_train_documents": num_train_docs,
            "num_val_documents": num_val_docs,
            "train_bytes": train_bytes,
            "val_bytes": val_bytes,
        })
        ctx.metrics.update({
            "seconds": round(time.perf_counter() - start, 3),
            "train_bytes_per_token": round(
                train_bytes / max(train_tokens_total - special_tokens, 1), 4),
            "num_train_samples": train_p.samples,
            "num_val_samples": val_p.samples,
        })
        ctx.log(f"{train_p.samples} train and {val_p.samples} val sequences of {self.seq_len} "
                f"({num_train_docs} / {num_val_docs} documents, dtype {dtype})")
