"""The ``documents`` kind: ``part-NNNNN.jsonl.zst`` files of JSON records. Stdlib + zstandard.

Every line of a part is one JSON object with at least ``id`` (unique, str), ``text`` (str),
``source`` (str) and ``path`` (str or null); other keys are carried along. Parts are
independent units of parallel work and of resume; their order is the artifact's order.

Chat records: a conversation carries ``messages`` (a list of ``{role, content}`` with roles
``system`` (first only), ``user``, ``assistant``); a preference triple carries ``prompt`` (such
a list, ending with a user turn), ``chosen`` and ``rejected`` (the two assistant replies).
``chat_record_problem`` is the one check of that shape, shared by the data stages that make
or filter such records and the post-training stages that train on them.

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


CHAT_ROLES = ("system", "user", "assistant")


def chat_kind(doc: dict[str, Any]) -> str | None:
    """``"conversation"`` (has ``messages``), ``"preference"`` (has ``prompt``), ``"both"``,
    or None for a plain document."""
    conv, pref = "messages" in doc, "prompt" in doc
    return "both" if conv and pref else "conversation" if conv else \
        "preference" if pref else None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "missing_messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or not isinstance(m.get("role"), str):
            return "bad_message"
        if m["role"] not in CHAT_ROLES:
            return "bad_role"
        if m["role"] == "system" and i:
            return "system_not_first"
        if not m["content"].strip():
            return "empty_content"
    if not any(m["role"] == "user" for m in messages):
        return "no_user_turn"
    return None


def chat_record_problem(doc: dict[str, Any], expect: str = "any") -> str | None:
    """Why ``doc`` is no well-formed chat record of kind ``expect`` (``any``,
    ``conversation``, ``preference``), as a short reason; None when it is one. Checks the
    shape only (not ``text``, which a data stage renders from it)."""
    found = chat_kind(doc)
    if found is None:
        return "missing_messages"
    if found == "both":
        return "ambiguous_kind"
    if expect != "any" and found != expect:
        return "wrong_kind"
    if found == "conversation":
        why = _messages_problem(doc["messages"])
        if why:
            return why
        return "last_not_assistant" if doc["messages"][-1]["role"] != "assistant" else None
    why = _messages_problem(doc["prompt"])
    if why:
        return why
    if doc["prompt"][-1]["role"] != "user":
        return "prompt_not_ending_with_user"
    chosen, rejected = doc.get("chosen"), doc.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "missing_response"
    if not chosen.strip() or not rejected.strip():
        return "empty_content"
    if chosen == rejected:
        return "chosen_equals_rejected"
    return None


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
