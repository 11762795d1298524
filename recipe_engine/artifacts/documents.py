"""On-disk formats shared between plugins. Stdlib + zstandard only.

``documents``: a directory of ``part-NNNNN.jsonl.zst`` files, one JSON object per line with at
least ``id`` (unique, str), ``text`` (str), ``source`` (str) and ``path`` (str or null); other
keys are carried along. Parts are independent units of parallel work and of resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import zstandard

ARTIFACT_KINDS: dict[str, str] = {
    "documents": "text documents as JSONL.zst parts (id, text, source, path)",
    "tokenizer": "a trained tokenizer model and its vocabulary size",
    "shards": "tokenized, packed sequences as mosaicml-streaming MDS shards (train/ and val/)",
    "checkpoint": "trained model weights with the model config that built them",
    "eval_report": "evaluation metrics, per task",
    "export": "a self-contained model directory a user can load",
}

PART_GLOB = "part-*.jsonl.zst"


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.zst"


def list_parts(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob(PART_GLOB))


def read_documents(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of one part file."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    pending = b""
    with open(path, "rb") as raw:
        for chunk in iter(lambda: raw.read(1 << 20), b""):
            lines = (pending + dobj.decompress(chunk)).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    yield json.loads(line)
    if not dobj.eof:  # a truncated part must not read as a short one
        raise ValueError(f"{path}: truncated zstd stream (the file is damaged)")
    if pending.strip():
        yield json.loads(pending)


def iter_documents(directory: Path) -> Iterator[dict[str, Any]]:
    """Yield every record of a documents artifact, part by part, in order."""
    for part in list_parts(directory):
        yield from read_documents(part)


def write_documents(path: Path, docs: Iterable[dict[str, Any]], level: int = 3) -> int:
    """Write records to ``path`` atomically (temp file + rename). Returns how many."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as raw:
        with zstandard.ZstdCompressor(level=level).stream_writer(raw, closefd=False) as writer:
            for doc in docs:
                try:
                    line = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates: keep them as JSON escapes
                    line = (json.dumps(doc) + "\n").encode("ascii")
                writer.write(line)
                n += 1
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return n
