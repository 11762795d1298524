"""``exact_dedup``: drop documents whose normalised text was seen before.

Two passes, named by stage as datatrove does: ``hash_part`` digests every document of a part
in the executor's workers; the stage then keeps the first occurrence of each digest in
document order (part by part, line by line, so the result does not depend on the number of
workers); ``write_kept`` writes each part's survivors. Digests of all documents are held in
memory in the stage's process (16 bytes each plus the dict's overhead, about 100 bytes per
distinct document): fine up to some tens of millions of documents.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recipe_engine import Stage, StageContext
from recipe_engine.artifacts import list_parts, read_documents, write_documents

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key

DIGEST_SIZE = 16
MALFORMED = bytes(DIGEST_SIZE)  # stands for a document without text; never a duplicate
MAX_EXAMPLES = 5  # duplicate clusters recorded in meta, and ids per cluster


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
        hashed = run_tasks(ctx, hash_part, hash_tasks, "dedup_hash")

        # first occurrence wins, in document order
        first: dict[bytes, tuple[int, int]] = {}
        drops: list[list[int]] = [[] for _ in parts]
        clusters: dict[bytes, list[tuple[int, int]]] = {}  # a few, for meta
        malformed = 0
        for pi, result in enumerate(hashed):
            data = (ctx.work / result["files"][0]).read_bytes()
            for idx in range(len(data) // DIGEST_SIZE):
                d = data[idx * DIGEST_SIZE:(idx + 1) * DIGEST_SIZE]
                if d == MALFORMED:
                    malformed += 1
                    drops[pi].append(idx)
                elif d in first:
                    drops[pi].append(idx)
                    if d in clusters:
                        if len(clusters[d]) < MAX_EXAMPLES:
                            clusters[d].append((pi, idx))
                    elif len(clusters) < MAX_EXAMPLES:
                        clusters[d] = [first[d], (pi, idx)]
                else:
                    first[d] = (pi, idx)
        want: list[list[int]] = [[] for _ in parts]
        for members in clusters.values():
            for pi, idx in members:
                want[pi].append(idx)

        write_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, stamps[i], self.normalize, drops[i])
            write_tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                      "drop": drops[i], "want_ids": want[i]}))
        written = run_tasks(ctx, write_kept, write_tasks, "dedup_write")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in written if r["documents_out"]], ctx.output)
        docs_in = sum(r["documents"] for r in hashed)
        docs_out = sum(r["documents_out"] for r in written)
        for r in hashed:
            merge_counts(ctx, r["counts"])
        removed = docs_in - docs_out - malformed
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.count("duplicates_removed", removed)
        ctx.check_skips(docs_in)
        ids = [{int(k): v for k, v in r["ids"].items()} for r in written]
        ctx.meta.update({
            "num_documents": docs_out,
            "num_bytes": sum(r["bytes"] for r in written),
            "duplicate_examples": [[ids[pi][idx] for pi, idx in m] for m in clusters.values()],
        })
        ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                            "duplicates_removed": removed, "distinct": len(first)})


def hash_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 1: the digests of one part's documents, in order, into a scratch file."""
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
    rel = f"dedup_hash/{task['key']}.bin"
    path = Path(task["work"]) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(out))
    os.replace(tmp, path)
    return {"files": [rel], "documents": n, "counts": counts}


def write_kept(task: dict[str, Any]) -> dict[str, Any]:
    """Worker, pass 2: write one part without the dropped documents."""
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

    rel = f"dedup_write/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, kept())
    return {"files": [rel], "documents_out": totals["out"], "bytes": totals["bytes"], "ids": ids}
