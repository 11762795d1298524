"""The labelled near-duplicate set of ``bench/curation.py`` and its pair-level scoring.

Kept free of the benchmark's peer (datatrove) and of the engine, so a fast test can run it:
only the standard library, numpy and scipy (``scipy.sparse`` for the all-pairs Jaccard).

The set: real documents (Python standard library modules), copies of some of them with a
controlled fraction of word-level edits (insert, delete or substitute a word, chosen at
random, seeded), and unrelated modules. Every document gets a label: ``original``,
``copy`` (with its original and edit rate) or ``unrelated``.

The truth for a pair of documents is the exact Jaccard similarity of their shingle sets: the
``ngram``-word shingles of the text lower-cased with its whitespace collapsed (what
``minhash_dedup`` shingles with ``shingle: word, normalize: whitespace_lower``), compared as
strings, so no hash collision can blur it. A pair is a true near-duplicate iff its Jaccard
is at least the threshold.

A tool's prediction for a pair: both documents fall in the same cluster of the graph whose
edges are the tool's (verified) duplicate pairs, i.e. the tool treats them as copies of each
other (one cluster keeps one document). Precision, recall and F1 are over all unordered
pairs of distinct documents of the set.
"""
from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_TOKENS = re.compile(r"(\s+)")


def stdlib_files(min_words: int = 100, max_bytes: int = 60_000) -> list[tuple[str, str]]:
    """``(path relative to the stdlib, text)`` of the standard library's ``.py`` files outside
    test directories, with at least ``min_words`` words and at most ``max_bytes`` bytes,
    sorted by path (the same list on every run of one Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) > max_bytes:
            continue
        text = data.decode("utf-8", "replace")
        if len(text.split()) >= min_words:
            out.append((str(rel), text))
    return out


def edit_words(text: str, rate: float, rng: random.Random, vocabulary: Sequence[str]) -> str:
    """``text`` with ``round(rate * words)`` word edits, each an insertion, a deletion or a
    substitution (equally likely) at a random word; inserted and substituted words are drawn
    from ``vocabulary``. Whitespace between the remaining words is kept."""
    pieces = _TOKENS.split(text)  # word, space, word, space, ...; words at even indices
    words = [pieces[i] for i in range(0, len(pieces), 2)]
    spaces = [pieces[i] for i in range(1, len(pieces), 2)] + [""]
    real = [i for i, w in enumerate(words) if w]
    edits = round(rate * len(real))
    for _ in range(edits):
        if not words:
            break
        i = rng.randrange(len(words))
        op = rng.randrange(3)
        if op == 0:  # insert before word i
            words.insert(i, rng.choice(vocabulary))
            spaces.insert(i, " ")
        elif op == 1 and len(words) > 1:  # delete
            del words[i]
            del spaces[i]
        else:  # substitute (also a delete that would empty the text)
            words[i] = rng.choice(vocabulary)
    return "".join(w + s for w, s in zip(words, spaces))


@dataclass
class Doc:
    id: str
    text: str
    label: str  # original, copy, unrelated
    original: str | None = None  # for a copy: the id of its original
    rate: float = 0.0  # for a copy: the edit rate


def build_set(files: list[tuple[str, str]], num_originals: int, num_unrelated: int,
              rates: Sequence[float], seed: int = 0) -> list[Doc]:
    """Originals, one copy of each per edit rate, and unrelated files (disjoint from the
    originals), in a seeded random order of files; copies follow their original."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(files)), min(len(files), num_originals + num_unrelated))
    originals, unrelated = chosen[:num_originals], chosen[num_originals:]
    vocabulary = sorted({w for i in originals for w in files[i][1].split()[:2000]})
    docs: list[Doc] = []
    for i in originals:
        path, text = files[i]
        docs.append(Doc(id=path, text=text, label="original"))
        for rate in rates:
            docs.append(Doc(id=f"{path}@{rate:g}", label="copy", original=path, rate=rate,
                            text=edit_words(text, rate, rng, vocabulary)))
    for i in unrelated:
        path, text = files[i]
        docs.append(Doc(id=path, text=text, label="unrelated"))
    return docs


# -- truth: exact Jaccard of shingle sets -----------------------------------------------------


def normalize(text: str) -> str:
    """Lower-case, whitespace collapsed: ``minhash_dedup``'s ``whitespace_lower``."""
    return " ".join(text.lower().split())


def shingles(text: str, ngram: int = 5) -> set[str]:
    """The set of ``ngram``-word shingles of the normalised text (a text of fewer words is
    one shingle, as in ``minhash_dedup``)."""
    words = normalize(text).split(" ")
    if len(words) < ngram:
        return {" ".join(words)}
    return {" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def similar_pairs(sets: Sequence[set[str]], threshold: float) -> dict[tuple[int, int], float]:
    """Every pair ``(i, j)``, ``i < j``, whose exact Jaccard is at least ``threshold``, with
    that Jaccard: intersections of all pairs at once as a sparse product of the
    document x shingle incidence matrix with its transpose."""
    import numpy as np
    from scipy import sparse

    ids: dict[str, int] = {}
    rows, cols = [], []
    for d, s in enumerate(sets):
        for g in s:
            cols.append(ids.setdefault(g, len(ids)))
        rows.extend([d] * len(s))
    n = len(sets)
    m = sparse.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)),
                          shape=(n, max(len(ids), 1)))
    inter = sparse.triu(m @ m.T, k=1).tocoo()
    size = np.asarray([len(s) for s in sets], dtype=np.int64)
    union = size[inter.row] + size[inter.col] - inter.data
    jac = inter.data / np.maximum(union, 1)
    keep = jac >= threshold
    return {(int(i), int(j)): float(v)
            for i, j, v in zip(inter.row[keep], inter.col[keep], jac[keep])}


# -- predictions: clusters of a tool's duplicate pairs --------------------------------------


def clusters(n: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of size 2 or more) of the graph on ``n`` documents."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), []).append(x)
    return [g for g in groups.values() if len(g) > 1]


def cluster_pairs(groups: Iterable[list[int]]) -> set[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, of documents in the same cluster."""
    out = set()
    for g in groups:
        g = sorted(g)
        out.update((g[a], g[b]) for a in range(len(g)) for b in range(a + 1, len(g)))
    return out


def score(predicted: set[tuple[int, int]], true: set[tuple[int, int]]) -> dict[str, Any]:
    """Pair-level counts, precision, recall and F1 (1.0 where the denominator is empty)."""
    tp = len(predicted & true)
    fp, fn = len(predicted) - tp, len(true) - tp
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"true_positive": tp, "false_positive": fp, "false_negative": fn,
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def recall_by_rate(docs: Sequence[Doc], predicted: set[tuple[int, int]]) -> dict[str, float]:
    """For each edit rate: the fraction of (original, copy) pairs the tool put together."""
    index = {d.id: i for i, d in enumerate(docs)}
    hit: dict[float, list[int]] = {}
    for j, d in enumerate(docs):
        if d.label == "copy":
            i = index[d.original]
            hit.setdefault(d.rate, []).append((min(i, j), max(i, j)) in predicted)
    return {f"{rate:g}": round(sum(v) / len(v), 4) for rate, v in sorted(hit.items())}


def jaccard_by_rate(docs: Sequence[Doc], sets: Sequence[set[str]]) -> dict[str, float]:
    """For each edit rate: the mean exact Jaccard of (original, copy) pairs."""
    index = {d.id: i for i, d in enumerate(docs)}
    got: dict[float, list[float]] = {}
    for j, d in enumerate(docs):
        if d.label == "copy":
            got.setdefault(d.rate, []).append(jaccard(sets[index[d.original]], sets[j]))
    return {f"{rate:g}": round(sum(v) / len(v), 4) for rate, v in sorted(got.items())}
