"""``exact_dedup``: drop documents whose normalised text was seen before.

Three passes, named by stage as datatrove does, all in the executor's workers:

1. ``exact_hash`` (one task per part): the 16-byte BLAKE2b digest of every document's
   normalised text, written with the document's index as a table sorted by digest
   (``exact_hash/<key>.npy``: n x 3 uint64, the digest's two halves and the index). A
   document without text gets the all-zero digest: it is dropped, never a duplicate.
2. ``exact_shard`` (one task per range of digest values): the rows of every part whose digest
   falls in the range (a binary search in each part's table, read through a memory map); in
   each group of equal digests the first document in document order (part by part, line by
   line) is kept and the others are dropped. Writes the dropped documents' global indices,
   sorted (``exact_shard/<key>.npy``), and the shard's first duplicate clusters for meta.
3. ``exact_write`` (one task per part): the part without the documents that any shard drops
   (a binary search in each shard's list, through a memory map).

The result does not depend on the number of workers or shards. Memory: a hash task holds
one part's table (about 50 bytes per document of the part, with the sort); a shard task holds
its range's rows, about 60 bytes each with the sort, and the ranges are cut for about
``DIGESTS_PER_SHARD`` documents (1 million: about 60 MB) up to ``MAX_SHARDS`` ranges (beyond
1 billion documents the shards grow); a write task holds one part's dropped indices. The
stage's own process holds a few numbers per part and never a row per document. Scratch on
disk: 24 bytes per document, plus 8 per dropped document.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recipe_engine import Stage, StageContext
from recipe_engine.artifacts import list_parts, read_documents, write_documents
from recipe_engine.fsutil import atomic_writer

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key

DIGEST_SIZE = 16
MALFORMED = bytes(DIGEST_SIZE)  # stands for a document without text; never a duplicate
MAX_EXAMPLES = 5  # duplicate clusters recorded in meta, and ids per cluster
DIGESTS_PER_SHARD = 1_000_000  # documents per exact_shard task (about 60 MB at its peak)
MAX_SHARDS = 1024


def normalize(text: str, mode: str) -> str:
    if mode == "none":
        return text
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    text = "\n".join(line.rstrip() for line in lines).strip("\n")
    return text.lower() if mode == "whitespace_lower" else text


def digest(text: str, mode: str) -> bytes:
    data = normalize(text, mode).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@dataclass(kw_only=True)
class ExactDedup(Stage,
                 name="exact_dedup",
                 description="drop exact duplicates (after whitespace/case normalisation)",
                 inputs={"documents": "documents"},
                 output="documents"):
    """Keep the first of every group of documents with the same normalised text."""

    # whitespace: \r\n -> \n, no trailing spaces, no leading/trailing blank lines; _lower: + case
    normalize: Literal["none", "whitespace", "whitespace_lower"] = "whitespace"

    def run(self, ctx: StageContext) -> None:
        parts = list_parts(ctx.inputs["documents"].path)
        stamps = [file_stamp(p) for p in parts]
        hash_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], self.normalize)
            hash_tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                     "normalize": self.normalize}))
        hashed = run_tasks(ctx, hash_part, hash_tasks, "exact_hash")
        sizes = [r["documents"] for r in hashed]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        hash_files = [str(ctx.work / r["files"][0]) for r in hashed]

        # 2. first occurrence wins, in document order, per range of digests
        num_shards = min(MAX_SHARDS, max(1, math.ceil(offsets[-1] / DIGESTS_PER_SHARD)))
        shard_tasks = []
        for s in range(num_shards):
            key = task_key(s, num_shards, [k for k, _ in hash_tasks])
            shard_tasks.append((key, {"work": str(ctx.work), "key": key, "shard": s,
                                      "num_shards": num_shards, "hash_files": hash_files,
                                      "offsets": offsets}))
        sharded = run_tasks(ctx, dedup_shard, shard_tasks, "exact_shard", unit="shards")
        # the clusters whose second document comes first, as one pass in document order
        # would meet them; each with its first MAX_EXAMPLES members
        clusters = sorted((c for r in sharded for c in r["examples"]),
                          key=lambda c: c[1][1])[:MAX_EXAMPLES]
        want: list[list[int]] = [[] for _ in parts]
        located = []
        for _, members in clusters:
            located.append([locate(offsets, g) for g in members])
            for pi, idx in located[-1]:
                want[pi].append(idx)

        # 3. write each part without its dropped documents
        shard_files = [str(ctx.work / r["files"][0]) for r in sharded]
        write_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], self.normalize, [k for k, _ in shard_tasks], want[i])
            write_tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                      "shard_files": shard_files, "start": offsets[i],
                                      "stop": offsets[i + 1], "want_ids": want[i],
                                      "state": "exact_write"}))
        written = run_tasks(ctx, write_unique, write_tasks, "exact_write")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in written if r["documents_out"]], ctx.output)
        docs_in = offsets[-1]
        docs_out = sum(r["documents_out"] for r in written)
        for r in hashed:
            merge_counts(ctx, r["counts"])
        malformed = sum(r["counts"].get("skipped.missing_text", 0) for r in hashed)
        removed = docs_in - docs_out - malformed
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.count("duplicates_removed", removed)
        ctx.check_skips(docs_in)
        ids = [{int(k): v for k, v in r["ids"].items()} for r in written]
        ctx.meta.update({
            "num_documents": docs_out,
            "num_bytes": sum(r["bytes"] for r in written),
            "duplicate_examples": [[ids[pi][idx] for pi, idx in m] for m in located],
        })
        ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                            "duplicates_removed": removed,
                            "distinct": sum(r["distinct"] for r in sharded),
                            "shards": num_shards})


def locate(offsets: list[int], g: int) -> tuple[int, int]:
    """(part, index in the part) of the document with global index ``g``."""
    pi = bisect.bisect_right(offsets, g) - 1
    return pi, g - offsets[pi]


def _save_npy(path: Path, array: Any) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, "wb") as f:
        np.save(f, array)


def _shard_bounds(shard: int, num_shards: int) -> tuple[int, int | None]:
    """The range of the digests' first 8 bytes (big-endian) that ``shard`` holds."""
    lo = (shard << 64) // num_shards
    return lo, (None if shard == num_shards - 1 else ((shard + 1) << 64) // num_shards)


def hash_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 1: one part's digests with their indices, sorted by digest."""
    import numpy as np

    counts: dict[str, int] = {}
    out = bytearray()
    n = 0
    for doc in read_documents(Path(task["part"])):
        n += 1
        text = doc.get("text")
        if isinstance(text, str):
            out += digest(text, task["normalize"])
        else:
            counts["skipped.missing_text"] = counts.get("skipped.missing_text", 0) + 1
            out += MALFORMED
    table = np.empty((n, 3), dtype=np.uint64)
    table[:, :2] = np.frombuffer(bytes(out), dtype=">u8").reshape(n, 2)
    table[:, 2] = np.arange(n, dtype=np.uint64)
    table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]
    rel = f"exact_hash/{task['key']}.npy"
    _save_npy(Path(task["work"]) / rel, table)
    return {"files": [rel], "documents": n, "counts": counts}


def dedup_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 2: within one range of digests, the global indices of every document that
    is not the first of its digest (and of every document without text), sorted; and the
    range's first ``MAX_EXAMPLES`` clusters as ``[second member, [first members]]``."""
    import numpy as np

    lo, hi = _shard_bounds(task["shard"], task["num_shards"])
    pieces = []
    for path, offset in zip(task["hash_files"], task["offsets"]):
        table = np.load(path, mmap_mode="r")
        if not len(table):
            continue
        first = table[:, 0]
        a = int(np.searchsorted(first, np.uint64(lo), side="left"))
        b = len(table) if hi is None else int(np.searchsorted(first, np.uint64(hi), side="left"))
        if b > a:
            rows = np.array(table[a:b])
            rows[:, 2] += np.uint64(offset)
            pieces.append(rows)
    rows = np.concatenate(pieces) if pieces else np.empty((0, 3), dtype=np.uint64)
    del pieces
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    malformed = (rows[:, 0] == 0) & (rows[:, 1] == 0)
    new = np.ones(len(rows), dtype=bool)  # the first row of each group of equal digests
    new[1:] = (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])
    keep = new & ~malformed
    drops = np.sort(rows[~keep, 2])
    distinct = int(keep.sum())

    # clusters (groups of two or more, not malformed), by their second member's position
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(rows))
    multi = (ends - starts >= 2) & ~malformed[starts]
    starts, ends = starts[multi], ends[multi]
    seconds = rows[starts + 1, 2]
    order = np.argsort(seconds, kind="stable")[:MAX_EXAMPLES]
    examples = [[int(seconds[j]), [int(g) for g in rows[starts[j]:min(ends[j], starts[j]
                                                                         + MAX_EXAMPLES), 2]]]
                for j in order]
    rel = f"exact_shard/{task['key']}.npy"
    _save_npy(Path(task["work"]) / rel, drops.astype(np.uint64))
    return {"files": [rel], "distinct": distinct, "dropped": int(len(drops)),
            "examples": examples}


def write_unique(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 3: one part (global indices ``start`` to ``stop``) without the documents
    the shards drop."""
    import numpy as np

    start, stop = np.uint64(task["start"]), np.uint64(task["stop"])
    drop: list[int] = []
    for path in task["shard_files"]:
        drops = np.load(path, mmap_mode="r")
        a, b = np.searchsorted(drops, start), np.searchsorted(drops, stop)
        drop.extend(int(g) - task["start"] for g in drops[a:b])
    return write_kept({**task, "drop": sorted(drop)})


def write_kept(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: write one part without the documents ``drop`` lists (indices in the part),
    recording the ids of those ``want_ids`` lists; into ``<state>/<key>.jsonl.zst``."""
    drop, want = set(task["drop"]), set(task["want_ids"])
    ids: dict[str, str] = {}
    totals = {"out": 0, "bytes": 0}

    def kept():
        for idx, doc in enumerate(read_documents(Path(task["part"]))):
            if idx in want:
                ids[str(idx)] = str(doc.get("id"))
            if idx in drop:
                continue
            totals["out"] += 1
            totals["bytes"] += len(doc["text"].encode("utf-8", "surrogatepass"))
            yield doc

    rel = f"{task.get('state', 'dedup_write')}/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, kept())
    return {"files": [rel], "documents_out": totals["out"], "bytes": totals["bytes"], "ids": ids}
