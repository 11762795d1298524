"""The ``documents`` kind: ``part-NNNNN.jsonl.zst`` files of JSON records. Stdlib + zstandard.

Every line of a part is one JSON object with at least ``id`` (unique, str), ``text`` (str),
``source`` (str) and ``path`` (str or null); other keys are carried along. Parts are
independent units of parallel work and of resume; their order is the artifact's order.

Held-out documents: a record whose ``split`` field is ``"heldout"`` (``HELDOUT``) is an
evaluation document. Nothing may learn from it: a tokenizer trainer leaves it out of its
training text, a shards writer sends it to the validation split. ``is_heldout(doc)`` says so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import zstandard

from ..fsutil import atomic_writer

PART_GLOB = "part-*.jsonl.zst"
SPLIT_FIELD = "split"
HELDOUT = "heldout"


def is_heldout(doc: dict[str, Any]) -> bool:
    """True for an evaluation document (``split: heldout``), which no stage may learn from."""
    return doc.get(SPLIT_FIELD) == HELDOUT


def part_name(index: int) -> str:
    """The file name of part ``index`` (``part-00003.jsonl.zst``)."""
    return f"part-{index:05d}.jsonl.zst"


def list_parts(directory: str | Path) -> list[Path]:
    """The part files of a documents artifact, in order."""
    return sorted(Path(directory).glob(PART_GLOB))


def read_documents(path: str | Path) -> Iterator[dict[str, Any]]:
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


def iter_documents(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Yield every record of a documents artifact, part by part, in order."""
    for part in list_parts(directory):
        yield from read_documents(part)


def write_documents(path: str | Path, docs: Iterable[dict[str, Any]], level: int = 3) -> int:
    """Write records to the part file ``path`` atomically. Returns how many."""
    n = 0
    with atomic_writer(path, "wb") as raw:
        with zstandard.ZstdCompressor(level=level).stream_writer(raw, closefd=False) as writer:
            for doc in docs:
                try:
                    line = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates: keep them as JSON escapes
                    line = (json.dumps(doc) + "\n").encode("ascii")
                writer.write(line)
                n += 1
    return n
