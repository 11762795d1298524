"""``minhash_dedup`` (near-duplicate documents) and ``line_dedup`` (repeated lines or paragraphs).

``minhash_dedup`` runs four passes, named by stage as datatrove does:

1. ``minhash_signature`` (executor, one task per part): shingles each document (word or
   character n-grams of the normalised text), computes its datasketch MinHash signature
   (``num_perm`` uint32 values; datasketch's default ``affine32`` permutations for ``seed``,
   applied with numpy) and the hash of each of its ``bands`` bands; writes
   ``minhash_signature/<key>.npy`` (n x num_perm uint32) and ``<key>.bands.npy``
   (bands x n uint64).
2. ``minhash_buckets`` (executor, one task per band): sorts every document's hash for that
   band; documents sharing a bucket become candidate pairs (each member paired with the
   bucket's first document); with ``verify`` a pair is kept only when the Jaccard similarity
   estimated from the two signatures reaches ``threshold``. Writes the pairs as
   ``minhash_buckets/<key>.npy``.
3. ``minhash_cluster`` (the stage's process): union-find over the pairs of all bands; every
   cluster keeps its first document in document order (part by part, line by line) and drops
   the rest, so the result does not depend on the executor or the number of workers.
4. ``minhash_filter`` (executor, one task per part): writes each part without its dropped
   documents.

Every task's result is saved by ``run_tasks``, so a rerun after a crash redoes only the
tasks that had not finished.

Memory: a signature task holds one part's signatures (``num_perm`` x 4 bytes per document)
and, while it hashes a document, about 50 bytes per character of it (a 2 MB document: about
100 MB). A bucket task holds one band's hash of every document of the corpus: about 40 bytes
per document at its peak (the uint64 hash, the document's index, the sort order, the bucket
starts) plus its candidate pairs, so 1e8 documents need about 4 GB in each worker running a
bucket task. The stage's process holds the verified pairs (16 bytes each, at most ``bands``
per near-duplicate document, usually about one) and a few int64 per document that is in a
pair; never a row per document of the corpus. Scratch on disk: ``num_perm`` x 4 +
``bands`` x 8 bytes per document.

``line_dedup`` runs three passes: ``line_hash`` (executor, per part: the distinct units of
each document, hashed, sorted), ``line_shard`` (executor, one task per range of hash values:
units found in at least ``min_documents`` documents, with the first such document) and
``line_write`` (executor, per part: documents without their repeated units). Memory: a shard
task holds 16 bytes per (document, distinct unit) pair whose hash falls in its range (the
ranges are cut for about ``UNITS_PER_SHARD`` pairs each, up to 256 ranges: about 200 MB with
the sort); a write task holds the repeated units (24 bytes each).

numpy and datasketch are imported inside the functions that use them: ``recipe plugins`` and
``recipe validate`` import this module, and datasketch takes a second or two to import.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recipe_engine import Problems, Stage, StageContext
from recipe_engine.artifacts import list_parts, read_documents, write_documents
from recipe_engine.fsutil import atomic_writer

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key
from .dedup import write_kept

MAX_EXAMPLES = 5  # clusters (and members per cluster) recorded in meta
SIMILARITIES = (0.5, 0.7, 0.8, 0.9, 0.95)  # where meta reports the candidate probability
MAX_NUM_PERM = 1024
EDGE_CHUNK = 1 << 16  # candidate pairs verified at a time
MIN_CHUNK = 1 << 20  # signature values computed at a time (shingles x num_perm)
UNITS_PER_SHARD = 4_000_000  # line_dedup: (document, unit) pairs per shard task

# Constants of the shingle hash (fixed, so signatures are the same on every machine)
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_BAND_MULTIPLIERS_SEED = 0x5EED


# -- the S-curve: what bands x rows imply ----------------------------------------------------


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Probability that two documents of Jaccard similarity ``s`` share at least one band:
    ``1 - (1 - s**rows)**bands``."""
    return 1.0 - (1.0 - s ** rows) ** bands


def _simpson(f: Any, a: float, b: float, n: int = 1000) -> Any:
    """Composite Simpson's rule of ``f`` (vectorised over its argument) on ``[a, b]``; ``f``
    may return an array whose last axis runs over the points."""
    import numpy as np

    if b <= a:
        return np.zeros(np.shape(f(np.array([a])))[:-1])
    x = np.linspace(a, b, n + 1)
    w = np.ones(n + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return (f(x) * w).sum(axis=-1) * (b - a) / (3 * n)


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """The area under the S-curve below ``threshold`` (datasketch's false-positive weight):
    the integral of ``candidate_probability`` over ``[0, threshold]``."""
    return float(_simpson(lambda s: 1.0 - (1.0 - s ** rows) ** bands, 0.0, threshold))


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """The area above the S-curve from ``threshold`` up (datasketch's false-negative weight):
    the integral of ``1 - candidate_probability`` over ``[threshold, 1]``."""
    return float(_simpson(lambda s: (1.0 - s ** rows) ** bands, threshold, 1.0))


def optimal_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """The ``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the sum of the
    false-positive and false-negative areas, as datasketch's ``MinHashLSH(threshold=...)``
    chooses them (equal weights; ties go to fewer bands, then fewer rows)."""
    import numpy as np

    best, best_err = (1, 1), math.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=float)[:, None]
        fp = _simpson(lambda s: 1.0 - (1.0 - s ** r) ** b, 0.0, threshold)
        fn = _simpson(lambda s: (1.0 - s ** r) ** b, threshold, 1.0)
        err = fp + fn
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), float(err[i])
    return best


def lsh_tradeoff(threshold: float, bands: int, rows: int) -> dict[str, Any]:
    """What the meta records about the banding: the S-curve at a few similarities and the
    two error areas."""
    return {
        "bands": bands,
        "rows": rows,
        "threshold": threshold,
        "candidate_probability": {f"{s:g}": round(candidate_probability(s, bands, rows), 6)
                                  for s in SIMILARITIES},
        "false_positive_area": round(false_positive_area(threshold, bands, rows), 6),
        "false_negative_area": round(false_negative_area(threshold, bands, rows), 6),
    }


# -- shingles and signatures (numpy) ----------------------------------------------------------


def normalize_text(text: str, mode: str, shingle: str) -> str:
    """Word shingles always see whitespace-separated words (one space between them);
    ``whitespace`` collapses runs of whitespace for character shingles too, ``_lower``
    lowercases."""
    if mode == "whitespace_lower":
        text = text.lower()
    if shingle == "word" or mode != "none":
        text = " ".join(text.split())
    return text


_POWERS: dict[str, Any] = {}


def _powers(n: int) -> tuple[Any, Any]:
    """``_BASE**j`` and ``_BASE_INV**j`` modulo 2**64 for j < n (cached, grown by doubling)."""
    import numpy as np

    have = _POWERS.get("base")
    if have is None or len(have) < n:
        size = max(n, 2 * len(have) if have is not None else 4096)
        for key, value in (("base", _BASE), ("inv", _BASE_INV)):
            p = np.full(size, value, dtype=np.uint64)
            p[0] = 1
            _POWERS[key] = np.cumprod(p, dtype=np.uint64)  # wraps modulo 2**64
    return _POWERS["base"], _POWERS["inv"]


def _fmix64(h: Any) -> Any:
    import numpy as np

    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: Any) -> Any:
    import numpy as np

    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(text: str, shingle: str, ngram: int) -> Any:
    """The distinct 32-bit hashes of a normalised text's shingles (uint32, sorted). A text
    shorter than one shingle is one shingle; an empty text is the empty shingle.

    A shingle is a substring (``ngram`` words with single spaces between them, or ``ngram``
    characters), hashed as a polynomial of its code points modulo 2**64 (prefix sums, all
    shingles at once) and then mixed; the top 32 bits are kept."""
    import numpy as np

    x = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    n = len(x)
    if shingle == "word":
        spaces = np.flatnonzero(x == 32)
        starts = np.concatenate(([0], spaces + 1))
        ends = np.concatenate((spaces, [n]))
        if len(starts) >= ngram:
            starts, ends = starts[:len(starts) - ngram + 1], ends[ngram - 1:]
        else:
            starts, ends = np.array([0]), np.array([n])
    elif n >= ngram:
        starts = np.arange(n - ngram + 1)
        ends = starts + ngram
    else:
        starts, ends = np.array([0]), np.array([n])
    pw, inv = _powers(n + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((x.astype(np.uint64) + np.uint64(1)) * pw[:n], out=prefix[1:])
        h = (prefix[ends] - prefix[starts]) * inv[starts]  # position-independent
        h = _fmix64(h + (ends - starts).astype(np.uint64))
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def signature(hashes: Any, a: Any, b: Any) -> Any:
    """The MinHash signature of a set of 32-bit hashes: what datasketch's
    ``MinHash(num_perm, seed, hashfunc=<identity>).update_batch(hashes)`` computes with its
    default ``affine32`` scheme (``a``, ``b``: its ``permutations``), vectorised."""
    import numpy as np

    out = np.full(len(a), 0xFFFFFFFF, dtype=np.uint32)
    step = max(1, MIN_CHUNK // len(a))
    b = b[:, None]
    with np.errstate(over="ignore"):
        mixed = _fmix32(np.asarray(hashes, dtype=np.uint32))
        for i in range(0, len(mixed), step):  # num_perm x shingles: each row's min is one pass
            values = np.multiply.outer(a, mixed[i:i + step])
            np.add(values, b, out=values)
            np.minimum(out, values.min(axis=1), out=out)
    return out


def band_multipliers(rows: int) -> Any:
    """Fixed odd 64-bit multipliers combining a band's ``rows`` values into one hash."""
    import numpy as np

    rng = np.random.default_rng(_BAND_MULTIPLIERS_SEED)
    return rng.integers(0, 1 << 63, rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def band_hashes(sigs: Any, bands: int, rows: int) -> Any:
    """bands x n uint64: one hash per band of every signature row."""
    import numpy as np

    mult = band_multipliers(rows)
    out = np.zeros((bands, len(sigs)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            cols = sigs[:, band * rows:(band + 1) * rows].astype(np.uint64)
            acc = (cols * mult).sum(axis=1, dtype=np.uint64) if len(sigs) else out[band]
            out[band] = _fmix64(acc + np.uint64(band))
    return out


def _save_npy(path: Path, array: Any) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, "wb") as f:  # a unique temporary name: an orphan can't share it
        np.save(f, array)


# -- minhash_dedup ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class MinhashDedup(Stage,
                   name="minhash_dedup",
                   description="drop near-duplicate documents (MinHash + LSH, datasketch)",
                   inputs={"documents": "documents"},
                   output="documents"):
    """Keep the first document of every cluster of near-duplicates (MinHash LSH)."""

    shingle: Literal["word", "char"] = "word"
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    bands: int = 0  # 0 with rows 0: derived from threshold, as datasketch's MinHashLSH does
    rows: int = 0
    seed: int = 1
    normalize: Literal["none", "whitespace", "whitespace_lower"] = "whitespace_lower"
    verify: bool = True

    def check(self, problems: Problems) -> None:
        problems.require(1 <= self.ngram <= 64, "ngram", f"must be 1 to 64, got {self.ngram}")
        problems.require(2 <= self.num_perm <= MAX_NUM_PERM, "num_perm",
                         f"must be 2 to {MAX_NUM_PERM}, got {self.num_perm}")
        problems.require(0.0 < self.threshold <= 1.0, "threshold",
                         f"a Jaccard similarity in (0, 1], got {self.threshold}")
        problems.require(0 <= self.seed < 2 ** 32, "seed",
                         f"must be 0 to 2**32 - 1 (numpy's RandomState), got {self.seed}")
        if (self.bands == 0) != (self.rows == 0):
            problems.add("bands" if self.bands == 0 else "rows",
                         "give both bands and rows, or neither (0: derived from threshold)")
        elif self.bands < 0 or self.rows < 0:
            problems.add("bands" if self.bands < 0 else "rows", "must be positive (or 0)")
        elif self.bands and self.bands * self.rows != self.num_perm:
            problems.add("bands", f"bands x rows = {self.bands} x {self.rows} = "
                         f"{self.bands * self.rows} must equal num_perm ({self.num_perm})")

    def bands_rows(self) -> tuple[int, int]:
        if self.bands:
            return self.bands, self.rows
        return optimal_bands_rows(self.threshold, self.num_perm)

    def run(self, ctx: StageContext) -> None:
        import datasketch
        import numpy as np

        bands, rows = self.bands_rows()
        perm_a, perm_b = datasketch.MinHash(num_perm=self.num_perm, seed=self.seed).permutations
        parts = list_parts(ctx.inputs["documents"].path)
        stamps = [file_stamp(p) for p in parts]
        settings = [self.shingle, self.ngram, self.normalize, self.num_perm, self.seed, bands,
                    rows, datasketch.__version__]

        # 1. signatures and band hashes, per part
        sig_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], settings)
            sig_tasks.append((key, {
                "part": str(part), "work": str(ctx.work), "key": key, "shingle": self.shingle,
                "ngram": self.ngram, "normalize": self.normalize, "bands": bands, "rows": rows,
                "perm_a": perm_a.tolist(), "perm_b": perm_b.tolist()}))
        signed = run_tasks(ctx, minhash_signature, sig_tasks, "minhash_signature")
        sizes = [r["documents"] for r in signed]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        sig_files = [str(ctx.work / r["files"][0]) for r in signed]
        band_files = [str(ctx.work / r["files"][1]) for r in signed]
        missing = [r["missing"] for r in signed]

        # 2. buckets, one task per band
        verify = self.threshold if self.verify else None
        bucket_tasks = []
        for band in range(bands):
            key = task_key(band, [k for k, _ in sig_tasks], verify)
            bucket_tasks.append((key, {
                "work": str(ctx.work), "key": key, "band": band, "band_files": band_files,
                "sig_files": sig_files, "offsets": offsets, "missing": missing,
                "verify": verify}))
        bucketed = run_tasks(ctx, minhash_buckets, bucket_tasks, "minhash_buckets", unit="bands")

        # 3. clusters: union-find over the pairs; the first document of each cluster stays
        pairs = np.concatenate([np.load(ctx.work / r["files"][0]) for r in bucketed])
        drops, clusters = minhash_cluster(pairs, offsets, missing)
        examples = []  # (kept, [members]) of the first clusters in document order
        want: list[list[int]] = [[] for _ in parts]
        for root, members in clusters["examples"]:
            examples.append((locate(offsets, root), [locate(offsets, g) for g in members]))
            for p, idx in [examples[-1][0], *examples[-1][1]]:
                want[p].append(idx)

        # 4. write the kept documents, per part
        write_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], sig_tasks[i][0], drops[i], want[i])
            write_tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                      "drop": drops[i], "want_ids": want[i]}))
        written = run_tasks(ctx, write_kept, write_tasks, "minhash_filter")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in written if r["documents_out"]], ctx.output)
        docs_in = sum(sizes)
        docs_out = sum(r["documents_out"] for r in written)
        for r in signed:
            merge_counts(ctx, r["counts"])
        removed = clusters["removed"]
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.count("dropped.near_duplicate", removed)
        ctx.check_skips(docs_in)

        ids = [{int(k): v for k, v in r["ids"].items()} for r in written]
        sigs = [np.load(f, mmap_mode="r") for f in sig_files]
        sample = []
        for (kp, ki), members in examples:
            kept = np.asarray(sigs[kp][ki])
            sample.append({"kept": ids[kp][ki], "members": [
                {"id": ids[p][i], "jaccard": round(float((sigs[p][i] == kept).mean()), 4)}
                for p, i in members]})
        tradeoff = lsh_tradeoff(self.threshold, bands, rows)
        candidates = sum(r["candidates"] for r in bucketed)
        ctx.meta.update({
            "num_documents": docs_out,
            "num_bytes": sum(r["bytes"] for r in written),
            "near_duplicate_clusters": {
                "num_clusters": clusters["num_clusters"],
                "size_histogram": clusters["size_histogram"],
                "examples": sample,
            },
            "lsh": tradeoff,
        })
        ctx.metrics.update({
            "documents_in": docs_in, "documents_out": docs_out,
            "near_duplicates_removed": removed, "clusters": clusters["num_clusters"],
            "bands": bands, "rows": rows, "candidate_pairs": candidates,
            "verified_pairs": sum(r["pairs"] for r in bucketed),
            "false_positive_area": tradeoff["false_positive_area"],
            "false_negative_area": tradeoff["false_negative_area"],
        })


def locate(offsets: list[int], g: int) -> tuple[int, int]:
    """(part, index in part) of the document with global index ``g``."""
    p = bisect.bisect_right(offsets, g) - 1
    return p, g - offsets[p]


def minhash_cluster(pairs: Any, offsets: list[int],
                    missing: list[list[int]]) -> tuple[list[list[int]], dict[str, Any]]:
    """Pass 3 (``MinhashDedupCluster``): connect the verified pairs of all bands; every
    cluster keeps its smallest global index, the first in document order. Returns the
    indices to drop per part (documents without text included) and the cluster summary."""
    import numpy as np

    nodes, roots = connected_components(np.unique(pairs, axis=0))
    drops: list[list[int]] = [list(m) for m in missing]
    dropped = nodes[roots != nodes]
    for g in dropped.tolist():
        p, idx = locate(offsets, g)
        drops[p].append(idx)
    cluster_roots, sizes = np.unique(roots, return_counts=True)
    examples = []
    for root in cluster_roots[:MAX_EXAMPLES].tolist():
        members = nodes[roots == root]
        examples.append((root, members[members != root][:MAX_EXAMPLES - 1].tolist()))
    return [sorted(d) for d in drops], {
        "removed": len(dropped), "num_clusters": len(cluster_roots),
        "size_histogram": size_histogram(sizes.tolist()), "examples": examples}


def size_histogram(sizes: list[int]) -> dict[str, int]:
    """Cluster sizes in power-of-two bins: ``{"2": n, "3-4": n, "5-8": n, ...}``."""
    out: dict[str, int] = {}
    for size in sorted(sizes):
        hi = 2
        while hi < size:
            hi *= 2
        label = "2" if hi == 2 else f"{hi // 2 + 1}-{hi}"
        out[label] = out.get(label, 0) + 1
    return out


def connected_components(pairs: Any) -> tuple[Any, Any]:
    """Union-find over pairs of global document indices: the nodes that are in a pair
    (sorted) and the smallest index of each one's component (label propagation with
    pointer jumping, all in numpy)."""
    import numpy as np

    nodes = np.unique(pairs)
    if not len(nodes):
        return nodes, nodes
    u, v = np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1])
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, low)
        np.minimum.at(new, v, low)
        while True:  # pointer jumping: point every node at its label's label
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def minhash_signature(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 1 (``MinhashDedupSignature``): the signatures and band hashes of one part."""
    import numpy as np

    a = np.asarray(task["perm_a"], dtype=np.uint32)
    b = np.asarray(task["perm_b"], dtype=np.uint32)
    counts: dict[str, int] = {}
    rows_out, missing = [], []
    for idx, doc in enumerate(read_documents(Path(task["part"]))):
        text = doc.get("text")
        if not isinstance(text, str):
            counts["skipped.missing_text"] = counts.get("skipped.missing_text", 0) + 1
            missing.append(idx)
            text = ""
        text = normalize_text(text, task["normalize"], task["shingle"])
        rows_out.append(signature(shingle_hashes(text, task["shingle"], task["ngram"]), a, b))
    sigs = np.stack(rows_out) if rows_out else np.zeros((0, len(a)), dtype=np.uint32)
    work = Path(task["work"])
    sig_rel = f"minhash_signature/{task['key']}.npy"
    band_rel = f"minhash_signature/{task['key']}.bands.npy"
    _save_npy(work / sig_rel, sigs)
    _save_npy(work / band_rel, band_hashes(sigs, task["bands"], task["rows"]))
    return {"files": [sig_rel, band_rel], "documents": len(rows_out), "missing": missing,
            "counts": counts}


def minhash_buckets(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 2 (``MinhashDedupBuckets``): the candidate pairs of one band, each
    ``(first document of the bucket, other member)`` in global document indices, verified
    by estimated Jaccard when ``verify`` is a threshold."""
    import numpy as np

    band, offsets = task["band"], task["offsets"]
    hashes, index = [], []
    for p, path in enumerate(task["band_files"]):
        h = np.load(path, mmap_mode="r")[band]
        g = np.arange(offsets[p], offsets[p + 1], dtype=np.int64)
        if task["missing"][p]:
            keep = np.ones(len(g), dtype=bool)
            keep[task["missing"][p]] = False
            h, g = h[keep], g[keep]
        hashes.append(np.asarray(h))
        index.append(g)
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    g = np.concatenate(index) if index else np.zeros(0, np.int64)
    del hashes, index
    order = np.argsort(h, kind="stable")  # equal hashes stay in document order
    h, g = h[order], g[order]
    del order
    start = np.ones(len(h), dtype=bool)
    start[1:] = h[1:] != h[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(len(h)), 0))
    pairs = np.stack([g[first[~start]], g[~start]], axis=1)  # (bucket's first, member)
    candidates = len(pairs)
    if task["verify"] is not None and candidates:
        pairs = pairs[estimated_jaccard(pairs, task["sig_files"], offsets) >= task["verify"]]
    rel = f"minhash_buckets/{task['key']}.npy"
    _save_npy(Path(task["work"]) / rel, pairs.astype(np.int64))
    return {"files": [rel], "candidates": candidates, "pairs": len(pairs)}


def estimated_jaccard(pairs: Any, sig_files: list[str], offsets: list[int]) -> Any:
    """The fraction of equal signature values of each pair (datasketch's ``jaccard``)."""
    import numpy as np

    sigs = [np.load(f, mmap_mode="r") for f in sig_files]
    bounds = np.asarray(offsets)
    out = np.empty(len(pairs))
    for lo in range(0, len(pairs), EDGE_CHUNK):
        chunk = pairs[lo:lo + EDGE_CHUNK]
        rows = []
        for col in (0, 1):
            g = chunk[:, col]
            part = np.searchsorted(bounds, g, side="right") - 1
            got = np.empty((len(g), sigs[0].shape[1]), dtype=np.uint32)
            for p in np.unique(part).tolist():
                sel = part == p
                got[sel] = sigs[p][g[sel] - offsets[p]]
            rows.append(got)
        out[lo:lo + len(chunk)] = (rows[0] == rows[1]).mean(axis=1)
    return out


# -- line_dedup ------------------------------------------------------------------------------


# a non-blank line with its newline; a run of them (a paragraph) and the blank lines after it
_LINE = re.compile(r"^[^\S\n]*\S[^\n]*(?:\n|\Z)", re.M)
_PARAGRAPH = re.compile(r"^((?:[^\S\n]*\S[^\n]*(?:\n|\Z))+)(?:[^\S\n]*\n)*", re.M)


def _unit_key(unit: str) -> str:
    """A unit without trailing whitespace on any line (nor its final newline)."""
    if "\n" not in unit.rstrip():
        return unit.rstrip()
    return "\n".join([line.rstrip() for line in unit.rstrip().split("\n")])


def split_units(text: str, unit: str) -> list[tuple[int, int, str]]:
    """A document's units as ``(start, end, key)``, character offsets into ``text``: each
    non-blank line (with its newline), or each run of non-blank lines (a paragraph, with the
    blank lines after it, so removing it leaves no double gap). The key is the unit's text
    with trailing whitespace stripped from each line."""
    out = []
    if unit == "line":
        for m in _LINE.finditer(text):
            out.append((m.start(), m.end(), _unit_key(m.group(0))))
        return out
    for m in _PARAGRAPH.finditer(text):
        out.append((m.start(), m.end(), _unit_key(m.group(1))))
    return out


def unit_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


@dataclass(kw_only=True)
class LineDedup(Stage,
                name="line_dedup",
                description="remove lines or paragraphs repeated across documents",
                inputs={"documents": "documents"},
                output="documents"):
    """Remove lines or paragraphs found in several documents (licence headers, boilerplate)
    from every document but the first that has them."""

    unit: Literal["line", "paragraph"] = "paragraph"
    min_documents: int = 2
    min_chars: int = 50
    keep_first: bool = True

    def check(self, problems: Problems) -> None:
        problems.require(self.min_documents >= 2, "min_documents",
                         f"a unit is repeated when at least 2 documents have it, got "
                         f"{self.min_documents}")
        problems.require(self.min_chars >= 1, "min_chars",
                         f"must be at least 1, got {self.min_chars}")

    def run(self, ctx: StageContext) -> None:
        parts = list_parts(ctx.inputs["documents"].path)
        stamps = [file_stamp(p) for p in parts]
        settings = [self.unit, self.min_chars]

        # 1. the distinct units of every document, hashed, per part
        hash_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], settings)
            hash_tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                     "unit": self.unit, "min_chars": self.min_chars}))
        hashed = run_tasks(ctx, line_hash, hash_tasks, "line_hash")
        offsets = [0]
        for r in hashed:
            offsets.append(offsets[-1] + r["documents"])
        hash_files = [str(ctx.work / r["files"][0]) for r in hashed]

        # 2. repeated units, one task per range of hash values
        num_pairs = sum(r["pairs"] for r in hashed)
        num_shards = min(256, max(1, math.ceil(num_pairs / UNITS_PER_SHARD)))
        shard_tasks = []
        for s in range(num_shards):
            key = task_key(s, num_shards, [k for k, _ in hash_tasks], self.min_documents)
            shard_tasks.append((key, {"work": str(ctx.work), "key": key, "shard": s,
                                      "num_shards": num_shards, "hash_files": hash_files,
                                      "offsets": offsets, "min_documents": self.min_documents}))
        sharded = run_tasks(ctx, line_shard, shard_tasks, "line_shard", unit="shards")
        top = sorted((t for r in sharded for t in r["top"]), key=lambda t: (-t[2], t[1]))
        top = top[:MAX_EXAMPLES]  # [hash (str), first document, documents]

        # 3. documents without their repeated units, per part
        shard_files = [str(ctx.work / r["files"][0]) for r in sharded]
        write_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], hash_tasks[i][0], [k for k, _ in shard_tasks],
                           self.keep_first)
            write_tasks.append((key, {
                "part": str(part), "work": str(ctx.work), "key": key, "unit": self.unit,
                "min_chars": self.min_chars, "offset": offsets[i], "shard_files": shard_files,
                "keep_first": self.keep_first, "want": [t[0] for t in top]}))
        written = run_tasks(ctx, line_write, write_tasks, "line_write")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in written if r["documents_out"]], ctx.output)
        docs_in = offsets[-1]
        docs_out = sum(r["documents_out"] for r in written)
        for r in hashed:
            merge_counts(ctx, r["counts"])
        totals = {k: sum(r[k] for r in written) for k in ("units_removed", "bytes_removed",
                                                          "emptied")}
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.count(f"{self.unit}s_removed", totals["units_removed"])
        ctx.count("bytes_removed", totals["bytes_removed"])
        ctx.count("dropped.empty_after_line_dedup", totals["emptied"])
        ctx.check_skips(docs_in)
        texts = {}
        for r in written:
            for h, text in r["examples"].items():
                texts.setdefault(h, text)
        ctx.meta.update({
            "num_documents": docs_out,
            "num_bytes": sum(r["bytes"] for r in written),
            "repeated_units": [{"text": texts.get(h, ""), "documents": n} for h, _, n in top],
        })
        ctx.metrics.update({
            "documents_in": docs_in, "documents_out": docs_out,
            f"{self.unit}s_removed": totals["units_removed"],
            "bytes_removed": totals["bytes_removed"],
            "repeated_units": sum(r["repeated"] for r in sharded),
            "documents_emptied": totals["emptied"],
        })


def line_hash(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 1: (unit hash, document index) for the distinct units of every document
    of a part, sorted, as an n x 2 uint64 array."""
    import numpy as np

    counts: dict[str, int] = {}
    hs: list[int] = []
    docs: list[int] = []
    n = 0
    for idx, doc in enumerate(read_documents(Path(task["part"]))):
        n += 1
        text = doc.get("text")
        if not isinstance(text, str):
            counts["skipped.missing_text"] = counts.get("skipped.missing_text", 0) + 1
            continue
        seen = {unit_hash(key) for _, _, key in split_units(text, task["unit"])
                if len(key) >= task["min_chars"]}
        hs.extend(seen)
        docs.extend([idx] * len(seen))
    pairs = np.zeros((len(hs), 2), dtype=np.uint64)
    if hs:
        pairs[:, 0] = np.asarray(hs, dtype=np.uint64)
        pairs[:, 1] = np.asarray(docs, dtype=np.uint64)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    rel = f"line_hash/{task['key']}.npy"
    _save_npy(Path(task["work"]) / rel, pairs)
    return {"files": [rel], "documents": n, "pairs": len(hs), "counts": counts}


def _shard_bounds(shard: int, num_shards: int) -> tuple[int, int | None]:
    lo = (shard << 64) // num_shards
    return lo, (None if shard == num_shards - 1 else ((shard + 1) << 64) // num_shards)


def line_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 2: the units whose hash falls in this shard's range and that at least
    ``min_documents`` documents have, as rows (hash, first document, documents), sorted by
    hash; the shard's most widespread units in ``top``."""
    import numpy as np

    lo, hi = _shard_bounds(task["shard"], task["num_shards"])
    hs, docs = [], []
    for p, path in enumerate(task["hash_files"]):
        pairs = np.load(path, mmap_mode="r")
        col = pairs[:, 0]
        a = int(np.searchsorted(col, np.uint64(lo), side="left"))
        b = len(col) if hi is None else int(np.searchsorted(col, np.uint64(hi), side="left"))
        hs.append(np.asarray(pairs[a:b, 0]))
        docs.append(np.asarray(pairs[a:b, 1]).astype(np.int64) + task["offsets"][p])
    h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    d = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    order = np.lexsort((d, h))  # by hash, then document
    h, d = h[order], d[order]
    uniq, first, num = np.unique(h, return_index=True, return_counts=True)
    keep = num >= task["min_documents"]
    out = np.stack([uniq[keep], d[first[keep]].astype(np.uint64), num[keep].astype(np.uint64)],
                   axis=1) if len(uniq) else np.zeros((0, 3), np.uint64)
    rel = f"line_shard/{task['key']}.npy"
    _save_npy(Path(task["work"]) / rel, out)
    best = np.lexsort((out[:, 1], -out[:, 2].astype(np.int64)))[:MAX_EXAMPLES] if len(out) else []
    top = [[str(int(out[i, 0])), int(out[i, 1]), int(out[i, 2])] for i in best]
    return {"files": [rel], "repeated": len(out), "top": top}


def line_write(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 3: one part with the repeated units removed (kept in the first document
    that has them, unless ``keep_first`` is off); documents left blank are dropped."""
    import numpy as np

    tables = [np.load(f) for f in task["shard_files"]]
    table = np.concatenate(tables) if tables else np.zeros((0, 3), np.uint64)
    repeated, first = table[:, 0], table[:, 1].astype(np.int64)
    want = set(task["want"])
    examples: dict[str, str] = {}
    totals = {"out": 0, "bytes": 0, "units_removed": 0, "bytes_removed": 0, "emptied": 0}

    def kept():
        for idx, doc in enumerate(read_documents(Path(task["part"]))):
            text = doc.get("text")
            if not isinstance(text, str):
                continue
            g = task["offset"] + idx
            units = [u for u in split_units(text, task["unit"]) if len(u[2]) >= task["min_chars"]]
            remove = []
            if units and len(repeated):
                h = np.asarray([unit_hash(key) for _, _, key in units], dtype=np.uint64)
                at = np.minimum(np.searchsorted(repeated, h), len(repeated) - 1)
                found = repeated[at] == h
                for (start, end, key), hit, i, hv in zip(units, found, at, h.tolist()):
                    if not hit:
                        continue
                    if str(hv) in want:
                        examples.setdefault(str(hv), key[:200])
                    if not task["keep_first"] or first[i] != g:
                        remove.append((start, end))
            if remove:
                pieces, at = [], 0
                for start, end in remove:  # in order, not overlapping
                    pieces.append(text[at:start])
                    at = end
                new = "".join(pieces) + text[at:]
                totals["units_removed"] += len(remove)
                size = len(text.encode("utf-8", "surrogatepass"))
                if not new.strip():
                    totals["emptied"] += 1
                    totals["bytes_removed"] += size
                    continue
                totals["bytes_removed"] += size - len(new.encode("utf-8", "surrogatepass"))
                doc = {**doc, "text": new}
                text = new
            totals["out"] += 1
            totals["bytes"] += len(text.encode("utf-8", "surrogatepass"))
            yield doc

    rel = f"line_write/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, kept())
    return {"files": [rel], "documents_out": totals["out"], "bytes": totals["bytes"],
            "units_removed": totals["units_removed"], "bytes_removed": totals["bytes_removed"],
            "emptied": totals["emptied"], "examples": examples}


COMPONENTS: list[type] = [MinhashDedup, LineDedup]
