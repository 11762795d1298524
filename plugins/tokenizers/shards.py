"""``mds_shards``: tokenize documents, pack them into fixed-length sequences, write MDS shards.

Output layout::

    train/            mosaicml-streaming MDS, column "tokens" (ndarray:uint16 or int32); the
                      index lists sha1 and xxh64 digests of every shard file
    val/              the same, packed from the validation documents (for validation loss)
    val_documents/    the validation documents themselves, as a ``documents`` artifact

Split by document. A document marked held out upstream (``split: "heldout"``, the
``heldout_split`` stage) is always a validation document. Among the others, a document is
validation iff ``split_value(split_seed, id) < val_fraction`` and it is among the
``max_val_documents`` such documents with the smallest value (the cap counts only these); the
rest are training documents. Nothing depends on part order or worker count.

Packing: each document becomes ``[bos] + tokens + [eos]``; documents are concatenated in
document order (part by part, line by line) and cut into ``seq_len`` chunks; the incomplete
tail is dropped and counted (``dropped_tail_tokens.train`` / ``.val``). Document boundaries
are recorded by bos itself: a document whose tokens contain the bos or eos id (a tokenizer
that turned text into a special token) is skipped and counted (``special_token_in_text``),
so bos marks exactly the document starts (meta ``document_boundaries: "bos"``; the reader is
``recipe_engine.artifacts.document_starts``) and the shards need no extra column.

Tokenizing runs through ``ctx.executor`` one input part per task; each task leaves its tokens
in the stage's scratch directory, so a crashed run resumes part by part. Packing and writing
run in the stage's process, in document order, so the files are byte-identical whatever the
executor and its worker count. With ``remote``, streaming's own uploader copies every shard
file and index to ``<remote>/train`` and ``<remote>/val`` as the writer closes them.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import (BOUNDARIES_BOS, data_digest, is_heldout, list_parts,
                                     part_name, read_documents, write_documents)
from recipe_engine.fsutil import atomic_write_json, atomic_writer

VAL_DOCUMENTS_PER_PART = 10_000
TOKENS_COLUMN = "tokens"
ENCODE_BATCH_BYTES = 8 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.I)
SHARD_HASHES = ["sha1", "xxh64"]  # digests MDSWriter records per shard file (sorted)
# URL schemes streaming 0.13's uploaders know (streaming.base.storage.upload.UPLOADERS)
REMOTE_SCHEMES = ("s3", "gs", "oci", "hf", "azure", "azure-dl", "dbfs", "alipan")


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


def _encode_threads() -> int:
    """SentencePiece threads for one task: 1 in a pool worker (the pool parallelizes), else
    every core this process may use (its affinity mask, which ``taskset`` narrows)."""
    if multiprocessing.parent_process() is not None:
        return 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return -1


def _tokenize_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: tokenize one part into ``<work>/part-NNNNN.npz`` (tokens with bos/eos, per-doc
    lengths, bytes); write its validation documents (held-out ones and the part's best
    fraction candidates) aside; return a small summary."""
    import numpy as np

    work = Path(task["work"])
    stem = f"part-{task['index']:05d}"
    summary_file = work / f"{stem}.json"
    if summary_file.exists():  # done by an earlier, interrupted run of this stage
        return json.loads(summary_file.read_text())

    tok = _tokenizer(task["tokenizer"])
    threads = _encode_threads()
    seed, fraction, dtype = task["split_seed"], task["val_fraction"], task["dtype"]
    bos, eos = tok.bos_id, tok.eos_id
    skipped: dict[str, int] = {}
    chunks: list[Any] = []
    lengths: list[int] = []
    nbytes: list[int] = []
    candidates: list[tuple[float, str, int]] = []  # (split value, id, position in part)
    heldout: list[tuple[str, int]] = []  # (id, position in part)
    records: dict[int, dict[str, Any]] = {}  # position -> record, every possible val document
    batch: list[tuple[dict[str, Any], str, int]] = []  # (record, id, UTF-8 bytes)
    batch_bytes = 0
    seen = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        encoded = tok.encode_batch([doc["text"] for doc, _, _ in batch], num_threads=threads)
        arrays = []
        for ids in encoded:
            arr = np.empty(len(ids) + 2, dtype=dtype)
            arr[0], arr[1:-1], arr[-1] = bos, ids, eos
            arrays.append(arr)
        # bos / eos only at the ends of each document: checked on the whole batch at once
        joined = np.concatenate(arrays)
        clean = (np.count_nonzero(joined == bos) == len(arrays)
                 and np.count_nonzero(joined == eos) == len(arrays))
        for (doc, doc_id, size), arr in zip(batch, arrays):
            if not clean and (np.any(arr[1:-1] == bos) or np.any(arr[1:-1] == eos)):
                skipped["special_token_in_text"] = skipped.get("special_token_in_text", 0) + 1
                continue
            pos = len(lengths)
            if is_heldout(doc):
                heldout.append((doc_id, pos))
                records[pos] = doc
            else:
                u = split_value(seed, doc_id)
                if u < fraction:
                    candidates.append((u, doc_id, pos))
                    records[pos] = doc
            chunks.append(arr)
            lengths.append(arr.size)
            nbytes.append(size)
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
        size = len(text.encode("utf-8"))
        batch.append((doc, str(doc_id), size))
        batch_bytes += size
        if batch_bytes >= ENCODE_BATCH_BYTES:
            flush()
    if batch:
        flush()

    # only the part's max_val_documents smallest candidates can make the global cut
    keep = sorted(range(len(candidates)), key=lambda i: candidates[i][:2])
    keep = sorted(keep[: task["max_val_documents"]])
    candidates = [candidates[i] for i in keep]
    val_positions = sorted([pos for _, _, pos in candidates] + [pos for _, pos in heldout])
    cand_file = work / f"{stem}.candidates.jsonl.zst"
    write_documents(cand_file, [records[pos] for pos in val_positions])

    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)
    npz = work / f"{stem}.npz"
    with atomic_writer(npz, "wb") as f:
        np.savez(f, tokens=tokens, lengths=np.asarray(lengths, dtype=np.int64),
                 nbytes=np.asarray(nbytes, dtype=np.int64))
    summary = {"index": task["index"], "seen": seen, "skipped": skipped,
               "documents": len(nbytes), "tokens": int(tokens.size),
               "bytes": int(sum(nbytes)),
               "candidates": [(u, i, pos, lengths[pos]) for u, i, pos in candidates],
               "heldout": [(i, pos, lengths[pos]) for i, pos in heldout],
               "val_positions": val_positions,  # the records in candidates_file, in order
               "npz": str(npz), "candidates_file": str(cand_file)}
    atomic_write_json(summary_file, summary)
    return summary


_WRITER_CLASS: Any = None


def _tokens_writer_class() -> Any:
    """``MDSWriter`` with a fast ``encode_sample`` for our one column: a 1-D array of
    ``seq_len`` ids encodes to the same bytes every time but for the values, so the sample is
    a constant prefix plus ``tobytes()``, instead of streaming's generic per-sample encoding
    (which parses the column encoding and sizes the shape for each sample: a tenth of the
    stage's time). The first sample is encoded both ways; on any difference (another
    streaming version) the writer keeps streaming's own encoding."""
    global _WRITER_CLASS
    if _WRITER_CLASS is None:
        from streaming import MDSWriter

        class TokensWriter(MDSWriter):
            _prefix: bytes | None = None
            _fast: bool | None = None  # None: not checked yet

            def encode_sample(self, sample: dict[str, Any]) -> bytes:
                tokens = sample.get(TOKENS_COLUMN)
                if self._fast is False or len(sample) != 1 or tokens is None \
                        or tokens.ndim != 1:
                    return super().encode_sample(sample)
                if self._fast is None:
                    import numpy as np

                    reference = super().encode_sample(sample)
                    payload = tokens.tobytes()
                    width = next(i for i, bound in enumerate((1 << 8, 1 << 16, 1 << 32))
                                 if tokens.size < bound)  # the shape's uint code, as streaming
                    self._prefix = (np.asarray([len(reference) - 4], "<u4").tobytes()
                                    + bytes([1 << 2 | width])
                                    + np.asarray([tokens.size], f"<u{1 << width}").tobytes())
                    self._size = tokens.size
                    self._fast = self._prefix + payload == reference
                    return reference
                if tokens.size != self._size:
                    return super().encode_sample(sample)
                return self._prefix + tokens.tobytes()  # type: ignore[operator]

        _WRITER_CLASS = TokensWriter
    return _WRITER_CLASS


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
            self.writer.write({TOKENS_COLUMN: tokens[i * self.seq_len : (i + 1) * self.seq_len]})
        self.carry = tokens[n * self.seq_len :].copy()
        self.samples += n


def _remote_dir(remote: str, split: str) -> str:
    """``<remote>/<split>``: a URL or a local path."""
    return f"{remote.rstrip('/')}/{split}" if "://" in remote else os.path.join(remote, split)


@dataclass(kw_only=True)
class MDSShards(Stage,
                name="mds_shards",
                version="2",
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
    remote: str = ""

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
        if self.remote:
            scheme = self.remote.split("://", 1)[0] if "://" in self.remote else ""
            if scheme:
                problems.require(scheme in REMOTE_SCHEMES, "remote",
                                 f"{self.remote!r}: scheme {scheme!r} is not one streaming "
                                 f"uploads to ({', '.join(REMOTE_SCHEMES)}; or an absolute "
                                 "local path)")
            else:
                problems.require(os.path.isabs(self.remote), "remote",
                                 f"{self.remote!r}: a local remote must be an absolute path "
                                 "(or a URL such as s3://bucket/prefix)")

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        meta = {"seq_len": self.seq_len}
        if "vocab_size" in inputs_meta.get("tokenizer", {}):
            meta["vocab_size"] = inputs_meta["tokenizer"]["vocab_size"]
        return {"meta": meta}

    def run(self, ctx: StageContext) -> None:
        start = time.perf_counter()
        import numpy as np

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
        if int(meta["bos_id"]) < 0 or int(meta["eos_id"]) < 0:
            raise StageError(f"the tokenizer {tok_art.path} has no bos or eos token (bos_id "
                             f"{meta['bos_id']}, eos_id {meta['eos_id']}); mds_shards packs "
                             "[bos] + document + [eos]")
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

        # 2. the validation documents: every held-out one, plus the smallest split values
        #    under val_fraction among the others (at most max_val_documents of those)
        cands = sorted((u, doc_id, s["index"], pos, n)
                       for s in summaries for u, doc_id, pos, n in s["candidates"])
        cands = cands[: self.max_val_documents]
        val_pos: dict[int, set[int]] = {}
        for _, _, part, pos, _ in cands:
            val_pos.setdefault(part, set()).add(pos)
        num_marked = marked_tokens = 0
        for s in summaries:
            for _, pos, n in s["heldout"]:
                val_pos.setdefault(s["index"], set()).add(pos)
                num_marked += 1
                marked_tokens += n
        total_tokens = sum(s["tokens"] for s in summaries)
        train_tokens_total = total_tokens - sum(c[4] for c in cands) - marked_tokens
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
        columns = {TOKENS_COLUMN: f"ndarray:{dtype}"}
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

        def writer(split: str) -> Any:
            local = str(out / split)
            target = (local, _remote_dir(self.remote, split)) if self.remote else local
            return _tokens_writer_class()(out=target, columns=columns, compression="zstd",
                             size_limit=self.size_limit, hashes=list(SHARD_HASHES),
                             keep_local=True)

        try:
            with writer("train") as train_w, writer("val") as val_w:
                train_p, val_p = (_Packer(w, self.seq_len, dtype) for w in (train_w, val_w))
                for done, s in enumerate(summaries, 1):
                    with np.load(s["npz"]) as z:
                        tokens, lengths, nbytes = z["tokens"], z["lengths"], z["nbytes"]
                    positions = sorted(val_pos.get(s["index"], ()))
                    if positions:
                        is_val = np.zeros(lengths.size, dtype=bool)
                        is_val[positions] = True
                        token_is_val = np.repeat(is_val, lengths)
                        train_p.add(tokens[~token_is_val])
                        val_p.add(tokens[token_is_val])
                        val_bytes += int(nbytes[is_val].sum())
                        train_bytes += int(nbytes[~is_val].sum())
                        wanted = set(positions)
                        for pos, rec in zip(s["val_positions"],
                                            read_documents(Path(s["candidates_file"]))):
                            if pos in wanted:
                                val_records.append(rec)
                        flush_val_records()
                    else:
                        train_p.add(tokens)
                        train_bytes += int(nbytes.sum())
                    num_val_docs += len(positions)
                    num_train_docs += int(lengths.size) - len(positions)
                    ctx.progress(done, len(summaries), "parts packed")
        except ValueError as e:  # MDSWriter's own checks (size_limit, ...)
            raise StageError(f"writing MDS shards failed: {e}") from e
        except Exception as e:  # an upload: credentials, bucket, network
            if not self.remote:
                raise
            raise StageError(f"writing MDS shards to remote {self.remote!r} failed: "
                             f"{type(e).__name__}: {e} (streaming logs each failed upload; "
                             "check the URL and the object store's credentials)") from e
        flush_val_records(final=True)

        dropped_train, dropped_val = int(train_p.carry.size), int(val_p.carry.size)
        ctx.count("dropped_tail_tokens.train", dropped_train)
        ctx.count("dropped_tail_tokens.val", dropped_val)
        ctx.count("train_documents", num_train_docs)
        ctx.count("val_documents", num_val_docs)
        ctx.count("val_documents.marked_heldout", num_marked)
        if (self.val_fraction > 0 or num_marked) and val_p.samples == 0:
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
            "num_heldout_documents": num_marked,
            "train_bytes": train_bytes,
            "val_bytes": val_bytes,
            "document_boundaries": BOUNDARIES_BOS,
            "data_digest": data_digest(out),
        })
        if self.remote:
            ctx.meta["remote"] = self.remote
        ctx.metrics.update({
            "seconds": round(time.perf_counter() - start, 3),
            "train_bytes_per_token": round(
                train_bytes / max(train_tokens_total - special_tokens, 1), 4),
            "num_train_samples": train_p.samples,
            "num_val_samples": val_p.samples,
        })
        ctx.log(f"{train_p.samples} train and {val_p.samples} val sequences of {self.seq_len} "
                f"({num_train_docs} / {num_val_docs} documents, dtype {dtype})")
