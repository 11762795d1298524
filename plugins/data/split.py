"""``heldout_split``: mark the evaluation documents before anything learns from the corpus.

A document is held out iff ``split_value(seed, id) < fraction`` and it is among the
``max_documents`` such documents with the smallest value (``split_value`` is
``blake2b("split:<seed>:<id>")`` as a uniform float in [0, 1), the same value ``mds_shards``
uses for its own ``val_fraction``, so moving the split upstream with the same seed holds out
the same documents). The choice depends on ids only: not on part order, worker count or the
other documents' texts, and a document added to the corpus never moves another one across
the split except through the ``max_documents`` cap.

Held-out documents get ``split: "heldout"`` (``recipe_engine.artifacts.HELDOUT``); the others
are written unchanged. Downstream, the tokenizer trainer leaves them out of its training text
and ``mds_shards`` sends them to ``val/`` and ``val_documents/``, so no evaluation number
comes from text a stage learned from.

Two passes through the executor, each resumable per part: ``split_scan`` (per part: the
candidates under ``fraction``, at most ``max_documents`` of them, smallest first) and
``split_mark`` (per part: the documents, the chosen ones marked). Memory: the stage's process
holds at most ``max_documents`` candidates per part.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_engine import Problems, Stage, StageContext
from recipe_engine.artifacts import (HELDOUT, SPLIT_FIELD, is_heldout, list_parts,
                                     read_documents, write_documents)

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key


def split_value(seed: int, doc_id: str) -> float:
    """Uniform float in [0, 1) from ``blake2b("split:<seed>:<id>")``: the document's place."""
    digest = hashlib.blake2b(f"split:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(kw_only=True)
class HeldoutSplit(Stage,
                   name="heldout_split",
                   version="1",
                   description="mark a deterministic sample of documents as held out for "
                               "evaluation (split: heldout), before tokenizer and shards",
                   inputs={"documents": "documents"},
                   output="documents"):
    """Hold out evaluation documents upstream of every stage that learns."""

    fraction: float = 0.05  # share of documents that may be held out
    max_documents: int = 2000  # ... and at most this many
    seed: int = 0

    def check(self, problems: Problems) -> None:
        problems.require(0 < self.fraction < 1, "fraction",
                         f"must be in (0, 1), got {self.fraction}")
        problems.require(self.max_documents >= 1, "max_documents",
                         f"must be at least 1, got {self.max_documents}")

    def run(self, ctx: StageContext) -> None:
        parts = list_parts(ctx.inputs["documents"].path)
        scan = [(task_key(i, file_stamp(p), self.version, self.params()),
                 {"part": str(p), "seed": self.seed, "fraction": self.fraction,
                  "max_documents": self.max_documents})
                for i, p in enumerate(parts)]
        scanned = run_tasks(ctx, scan_part, scan, "split_scan")
        candidates = sorted((u, doc_id, i, pos) for i, r in enumerate(scanned)
                            for u, doc_id, pos in r["candidates"])
        chosen: dict[int, list[int]] = {}
        for _, _, i, pos in candidates[: self.max_documents]:
            chosen.setdefault(i, []).append(pos)

        mark = []
        for i, p in enumerate(parts):
            key = task_key(i, file_stamp(p), self.version, self.params(), sorted(chosen.get(i, [])))
            mark.append((key, {"part": str(p), "work": str(ctx.work), "key": key,
                               "positions": sorted(chosen.get(i, []))}))
        results = run_tasks(ctx, mark_part, mark, "split_mark")
        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in results if r["documents"]], ctx.output)

        for r in scanned:
            merge_counts(ctx, r["counts"])
        docs = sum(r["documents"] for r in results)
        heldout = sum(r["heldout"] for r in results)
        heldout_bytes = sum(r["heldout_bytes"] for r in results)
        ctx.count("documents_in", docs)
        ctx.count("documents_out", docs)
        ctx.count("heldout_documents", heldout)
        ctx.count("train_documents", docs - heldout)
        ctx.check_skips(docs)
        ctx.meta.update({
            "num_documents": docs,
            "num_bytes": sum(r["bytes"] for r in results),
            "heldout": {"fraction": self.fraction, "seed": self.seed,
                        "max_documents": self.max_documents, "num_documents": heldout,
                        "num_bytes": heldout_bytes},
        })
        ctx.metrics.update({"documents": docs, "heldout_documents": heldout,
                            "heldout_bytes": heldout_bytes})
        ctx.log(f"held out {heldout} of {docs} documents ({heldout_bytes:,} bytes)")


def scan_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: the part's smallest split values under ``fraction`` (at most ``max_documents``).
    A document an upstream stage already marked is held out whatever its value."""
    candidates: list[tuple[float, str, int]] = []
    counts = {"already_heldout": 0}
    for pos, doc in enumerate(read_documents(Path(task["part"]))):
        doc_id = doc.get("id")
        if is_heldout(doc):
            counts["already_heldout"] += 1
        elif isinstance(doc_id, str) and doc_id:
            u = split_value(task["seed"], doc_id)
            if u < task["fraction"]:
                candidates.append((u, doc_id, pos))
    candidates.sort()
    return {"candidates": candidates[: task["max_documents"]],
            "counts": {k: v for k, v in counts.items() if v}}


def mark_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: write the part with the chosen documents marked ``split: heldout``."""
    wanted = set(task["positions"])
    totals = {"documents": 0, "heldout": 0, "heldout_bytes": 0, "bytes": 0}

    def marked():
        for pos, doc in enumerate(read_documents(Path(task["part"]))):
            text = doc.get("text")
            size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0
            if pos in wanted:
                doc = {**doc, SPLIT_FIELD: HELDOUT}
            if is_heldout(doc):
                totals["heldout"] += 1
                totals["heldout_bytes"] += size
            totals["documents"] += 1
            totals["bytes"] += size
            yield doc

    rel = f"split_mark/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, marked())
    return {"files": [rel], **totals}


COMPONENTS: list[type] = [HeldoutSplit]
