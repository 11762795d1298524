"""``files_source``: documents from the files under a directory.

Every matched file is one document, except JSONL files (``format: jsonl``, or ``auto`` and a
name ending in ``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz`` or ``.ndjson``), where every line is
one. Patterns are globs relative to ``root`` with ``**`` for any number of directories:
``*.py`` matches only at the top, ``**/*.py`` everywhere. ``root`` may also be an fsspec URL
(``s3://bucket/dir``) when the matching fsspec backend is installed.

Files are read in sorted path order, in chunks through the stage's executor; each chunk
becomes one or more parts. Malformed input (undecodable UTF-8, unreadable files, binary
files, bad JSON, a missing or non-string text field, a truncated or corrupt .gz/.zst) is
skipped and counted as ``skipped.<reason>``; empty and oversized documents are dropped and
counted as ``dropped.<reason>``.

Memory is bounded per worker: a text file larger than ``max_file_bytes`` is dropped from its
size, unread; a JSONL line longer than ``max_line_bytes(max_file_bytes)`` is dropped as it
streams past, never held whole; a compressed JSONL file stops at ``max_decompressed_bytes``
of decompressed data (a zip bomb), counted as ``skipped.decompressed_too_large``.

Symbolic links are followed only within ``root``: a file whose real path lies outside the real
root (``x.py -> ~/.aws/credentials``) is skipped and counted as
``skipped.symlink_outside_root``, unless ``follow_symlinks_outside_root`` is set.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import zstandard

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import write_documents

from ._parts import clear_parts, merge_counts, place_parts, run_tasks, task_key

PART_BYTES = 64 << 20  # a chunk of text files (one part) holds at most this much, in memory
BINARY_SNIFF_BYTES = 1024  # a NUL byte among a file's first bytes marks it binary
MAX_DECOMPRESSED_BYTES = 10_000_000_000  # default cap on one compressed file's decompressed size
ZSTD_FEED = 1024  # compressed bytes per decompression step (zstd inflates 1 KB to ~40 MB at most)


def max_line_bytes(max_document_bytes: int) -> int:
    """The longest JSONL line read: room for a document of ``max_document_bytes`` with every
    character JSON-escaped (``\\u00XX``: 6 bytes) and 1 MiB of other fields; longer lines
    are dropped (``dropped.too_large``) without being held in memory."""
    return 6 * max_document_bytes + (1 << 20)
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".ndjson")


class Entry(NamedTuple):
    rel: str  # path relative to root, with "/"
    size: int  # -1 when the file could not be stat'ed
    stamp: str  # modification time (or the remote store's version tag)


@dataclass(kw_only=True)
class FilesSource(Stage,
                  name="files_source",
                  description="documents from the files under a directory (text or JSONL)",
                  output="documents"):
    """Documents from local (or fsspec) files: one per file, or one per line of JSONL."""

    root: str
    include: list[str] = field(default_factory=lambda: ["**/*.py"])
    exclude: list[str] = field(default_factory=list)
    format: Literal["auto", "text", "jsonl"] = "auto"
    text_key: str = "text"  # JSONL: the field holding the text
    source_name: str = ""  # default: the root directory's name
    max_file_bytes: int = 2_000_000  # text files (JSONL: each record's text) above are dropped
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES  # a .gz/.zst file stops there
    docs_per_part: int = 500
    follow_symlinks_outside_root: bool = False  # read files linked from outside the root
    # what tells the fingerprint a file changed: its bytes ("content"), its size and mtime or
    # ETag ("stamp"), or content for local roots up to 1 GB of matched files ("auto")
    change_detection: Literal["auto", "content", "stamp"] = "auto"

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.include), "include", "must name at least one glob pattern")
        problems.require(self.docs_per_part >= 1, "docs_per_part", "must be positive")
        problems.require(self.max_file_bytes >= 1, "max_file_bytes", "must be positive")
        problems.require(self.max_decompressed_bytes >= 1, "max_decompressed_bytes",
                         "must be positive")

    @property
    def source(self) -> str:
        return self.source_name or os.path.basename(self.root.rstrip("/")) or "files"

    def is_jsonl(self, rel: str) -> bool:
        return self.format == "jsonl" or (self.format == "auto" and rel.endswith(JSONL_SUFFIXES))

    def list_files(self) -> list[Entry]:
        """The matched files, sorted by relative path. StageError when root is no directory."""
        return list_files(self.root, self.include, self.exclude)

    def fingerprint_extra(self) -> str:
        """A digest of the matched files: their paths and contents (so a file only touched,
        or copied with a new mtime, changes nothing downstream), or their sizes and stamps
        where reading everything is not cheap (``change_detection``)."""
        try:
            entries = self.list_files()
        except Exception as e:  # plan must work where the data is not (yet) reachable
            return f"unlisted: {type(e).__name__}: {e}"
        return files_digest(self.root, entries, self.change_detection,
                            self.follow_symlinks_outside_root)

    def check_unchanged(self, before: list[Entry]) -> None:
        """StageError when the listing (paths, sizes, stamps) differs from ``before``, the
        one the stage read by: a file written meanwhile may have been read half old, half
        new, and the fingerprint was made from what was there before."""
        after = {e.rel: e for e in self.list_files()}
        old = {e.rel: e for e in before}
        changed = sorted(rel for rel in old.keys() | after.keys() if old.get(rel) != after.get(rel))
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more"
                                              if len(changed) > 5 else "")
            raise StageError(f"files_source: files changed while being read: {shown}; rerun "
                             "once they stay put (the parts of unchanged files are kept)")

    def run(self, ctx: StageContext) -> None:
        entries = self.list_files()
        if not entries:
            raise StageError(f"files_source: no file under {self.root!r} matches "
                             f"include={self.include} exclude={self.exclude}")
        config = {"root": self.root, "source": self.source, "text_key": self.text_key,
                  "max_bytes": self.max_file_bytes, "per_part": self.docs_per_part,
                  "max_decompressed": self.max_decompressed_bytes,
                  "follow_outside": self.follow_symlinks_outside_root, "work": str(ctx.work)}
        chunks: list[list[tuple[str, int, bool]]] = []
        chunk: list[tuple[str, int, bool]] = []
        chunk_bytes = 0
        for e in entries:  # text files in chunks of docs_per_part; every JSONL file alone
            jsonl = self.is_jsonl(e.rel)
            if chunk and (jsonl or chunk[-1][2] or len(chunk) >= self.docs_per_part
                          or chunk_bytes + e.size > PART_BYTES):
                chunks.append(chunk)
                chunk, chunk_bytes = [], 0
            chunk.append((e.rel, e.size, jsonl))
            chunk_bytes += max(e.size, 0)
        if chunk:
            chunks.append(chunk)
        stamps = {e.rel: e for e in entries}
        tasks = []
        for i, files in enumerate(chunks):
            key = task_key(i, config["source"], self.text_key, self.max_file_bytes,
                           self.docs_per_part, [(*f, stamps[f[0]].stamp) for f in files])
            tasks.append((key, {**config, "key": key, "files": files}))
        ctx.log(f"{len(entries)} files under {self.root} in {len(tasks)} tasks")
        results = run_tasks(ctx, read_files, tasks, "source", "files",
                            weights=[len(files) for files in chunks])
        self.check_unchanged(entries)

        clear_parts(ctx.output)
        files = [f for r in results for f in r["files"]]
        place_parts(ctx.work, files, ctx.output)
        num_docs = sum(r["documents"] for r in results)
        num_bytes = sum(r["bytes"] for r in results)
        seen = 0
        for r in results:
            merge_counts(ctx, r["counts"])
            seen += r["counts"].get("records_in", 0)
        ctx.count("documents_out", 0)
        ctx.check_skips(seen)
        ctx.meta.update({"num_documents": num_docs, "num_bytes": num_bytes, "source": self.source})
        skipped = sum(v for k, v in ctx.counts.items() if k.startswith("skipped."))
        ctx.metrics.update({"documents": num_docs, "mbytes": round(num_bytes / 1e6, 3),
                            "files": len(entries), "skipped": skipped, "parts": len(files)})
        if num_docs == 0:
            raise StageError(f"files_source: none of the {len(entries)} files under "
                             f"{self.root!r} gave a document ({dict(ctx.counts)})")


# -- listing ------------------------------------------------------------------------------------


def list_files(root: str, include: list[str], exclude: list[str]) -> list[Entry]:
    """The files under ``root`` (a directory or an fsspec URL) that ``include`` matches and
    ``exclude`` does not, sorted by relative path. One walk through fsspec for local and
    remote roots alike; directories no include pattern can reach, or that an ``x/**``
    exclude removes, are not entered."""
    inc = [_glob_regex(p) for p in include]
    exc = [_glob_regex(p) for p in exclude]
    fs, base = _fsspec(root if "://" in root else os.path.expanduser(root))
    entries = _walk(fs, base, root, include, exclude)
    return sorted(
        (e for e in entries
         if any(r.match(e.rel) for r in inc) and not any(r.match(e.rel) for r in exc)),
        key=lambda e: e.rel,
    )


def files_digest(root: str, entries: list[Entry], change_detection: str,
                 follow_outside: bool) -> str:
    """A digest of listed files for a source's fingerprint: paths and contents, or sizes and
    stamps where reading everything is not cheap (see ``FilesSource.change_detection``)."""
    mode = change_detection
    if mode == "auto":
        local = "://" not in root or root.startswith("file://")
        total = sum(max(e.size, 0) for e in entries)
        mode = "content" if local and total <= CONTENT_DIGEST_LIMIT else "stamp"
    h = hashlib.sha256(mode.encode())
    readable = (lambda rel: True) if follow_outside or "://" in root \
        else _inside(root)  # never read what the stage itself would not
    for e in entries:
        h.update(f"{e.rel}\0{e.size}\0".encode("utf-8", "surrogateescape"))
        content = mode == "content" and e.size >= 0 and readable(e.rel)
        h.update(_file_digest(root, e.rel) if content else e.stamp.encode())
        h.update(b"\n")
    return h.hexdigest()


_STAMP_KEYS = ("mtime", "LastModified", "ETag", "etag", "created")
CONTENT_DIGEST_LIMIT = 1 << 30  # change_detection "auto": hash local files up to 1 GB in all


def _file_digest(root: str, rel: str) -> bytes:
    """sha256 of one matched file (b"unreadable" when it cannot be read: the reader
    counts it)."""
    h = hashlib.sha256()
    try:
        with _open(root, rel) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return b"unreadable"
    return h.digest()


def _walk(fs: Any, base: str, root: str, include: list[str], exclude: list[str]
          ) -> Iterator[Entry]:
    if not fs.isdir(base):
        raise StageError(f"files_source: root {root!r} is not a directory")
    base = base.rstrip("/")
    inc_segments = [[_segment_regex(s) for s in p.split("/")] for p in include]
    exc_dirs = [_glob_regex(p[:-3]) for p in exclude if p.endswith("/**")]
    for dirpath, dirs, files in fs.walk(base, detail=True):
        rel_dir = dirpath.rstrip("/")[len(base):].strip("/")
        rel_dir = rel_dir + "/" if rel_dir else ""
        for d in sorted(dirs):  # prune in place, as os.walk allows
            rel = rel_dir + d
            if any(r.match(rel) for r in exc_dirs) or not any(
                    _dir_may_match(rel.split("/"), segs) for segs in inc_segments):
                del dirs[d]
        for name, info in files.items():
            if info.get("islink") and info.get("type") == "other":  # what does it point to?
                try:
                    info = fs.info(info.get("name") or f"{dirpath.rstrip('/')}/{name}")
                except (OSError, ValueError):  # dangling
                    info = {"type": "other"}
                if info.get("type") == "directory":  # linked directories are not entered
                    continue
            if info.get("type") == "file":
                stamp = next((str(info[k]) for k in _STAMP_KEYS if info.get(k) is not None), "")
                yield Entry(rel_dir + name, int(info.get("size") or 0), stamp)
            elif info.get("type") != "directory":  # a dangling link, fifo or device: the
                yield Entry(rel_dir + name, -1, "")  # reader counts it, never opens it


def _fsspec(root: str) -> tuple[Any, str]:
    try:
        import fsspec

        return fsspec.core.url_to_fs(root)
    except ImportError as e:
        raise StageError(f"files_source: reading {root!r} needs fsspec and its backend for "
                         f"this protocol (e.g. `pip install s3fs`): {e}") from e


def _segment_regex(segment: str) -> re.Pattern[str] | None:
    """A regex for one path segment of a glob; None for ``**``."""
    return None if segment == "**" else re.compile(_translate(segment) + r"\Z", re.S)


def _dir_may_match(parts: list[str], segments: list[re.Pattern[str] | None]) -> bool:
    """Can a file below the directory ``parts`` match the glob cut into ``segments``?"""
    for i, part in enumerate(parts):
        if i >= len(segments) - 1:  # the last segment names the file itself
            return False
        seg = segments[i]
        if seg is None:
            return True
        if not seg.match(part):
            return False
    return True


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    segments = pattern.strip("/").split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append(".*" if last else "(?:.*/)?")
        else:
            out.append(_translate(seg) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z", re.S)


def _translate(segment: str) -> str:
    """Glob to regex within one segment: ``*``, ``?`` and ``[...]`` never cross a ``/``."""
    out, i, n = [], 0, len(segment)
    while i < n:
        c = segment[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and segment.find("]", i + 1) != -1:  # a class; "]" first is literal
            j = segment.find("]", i + 1)
            body = segment[i:j].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


# -- reading (in the executor's workers) --------------------------------------------------------


def read_files(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: read one chunk of files, write its documents as parts into the scratch dir."""
    counts: dict[str, int] = {"records_in": 0, "documents_out": 0}
    totals = {"bytes": 0}
    docs = _documents(task, counts, totals)
    (Path(task["work"]) / "source").mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    while True:
        batch = list(islice(docs, task["per_part"]))
        if not batch:
            break
        rel = f"source/{task['key']}-{len(files):04d}.jsonl.zst"
        write_documents(Path(task["work"]) / rel, batch)
        files.append(rel)
    return {"files": files, "documents": counts["documents_out"], "bytes": totals["bytes"],
            "counts": counts}


def _documents(task: dict[str, Any], counts: dict[str, int],
               totals: dict[str, int]) -> Iterator[dict[str, Any]]:
    def bump(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    root, source, max_bytes = task["root"], task["source"], task["max_bytes"]
    inside = None if task.get("follow_outside") or "://" in root else _inside(root)
    for rel, size, jsonl in task["files"]:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8
            bump("records_in")
            bump("skipped.bad_filename")
            continue
        if inside is not None and not inside(rel):
            bump("records_in")
            bump("skipped.symlink_outside_root")
            continue
        if jsonl:
            for doc in _jsonl_documents(root, rel, task["text_key"], counts, bump, max_bytes,
                                        task.get("max_decompressed", MAX_DECOMPRESSED_BYTES)):
                n = len(doc["text"].encode("utf-8"))
                if n > max_bytes:
                    bump("dropped.too_large")
                    continue
                doc.update(id=f"{source}/{rel}#{doc['id']}", source=source, path=rel)
                totals["bytes"] += n
                bump("documents_out")
                yield doc
            continue
        bump("records_in")
        if size < 0:
            bump("skipped.unreadable")
            continue
        if size > max_bytes:
            bump("dropped.too_large")
            continue
        try:
            with _open(root, rel) as fh:
                raw = fh.read(max_bytes + 1)
        except OSError:
            bump("skipped.unreadable")
            continue
        if len(raw) > max_bytes:
            bump("dropped.too_large")
            continue
        if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
            bump("skipped.binary")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bump("skipped.bad_utf8")
            continue
        text = text.removeprefix("\ufeff")
        if "\x00" in text:
            bump("skipped.binary")
            continue
        if not text.strip():
            bump("dropped.empty")
            continue
        totals["bytes"] += len(text.encode("utf-8"))
        bump("documents_out")
        yield {"id": f"{source}/{rel}", "text": text, "source": source, "path": rel}


def _inside(root: str) -> Any:
    """A test: does ``rel`` under ``root``, links resolved, stay within the resolved root?"""
    real_root = os.path.realpath(os.path.expanduser(root))

    def inside(rel: str) -> bool:
        real = os.path.realpath(os.path.join(real_root, rel))
        return os.path.commonpath([real, real_root]) == real_root

    return inside


RESERVED = ("id", "text", "source", "path")


def _jsonl_documents(root: str, rel: str, text_key: str, counts: dict[str, int],
                     bump: Any, max_bytes: int = 2_000_000,
                     max_decompressed: int = MAX_DECOMPRESSED_BYTES
                     ) -> Iterator[dict[str, Any]]:
    """Records of one JSONL file as ``{"id": <line number>, "text": ..., <other fields>}``."""
    try:
        fh = _open(root, rel)
    except OSError:
        bump("records_in")
        bump("skipped.unreadable")
        return
    try:
        with fh:
            lines = split_lines(decompressed_chunks(fh, rel, max_decompressed),
                                max_line_bytes(max_bytes))
            for lineno, line in enumerate(lines, 1):
                if line is None:  # longer than any record we keep: never held whole
                    bump("records_in")
                    bump("dropped.too_large")
                    continue
                if not line.strip():
                    continue
                bump("records_in")
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    bump("skipped.bad_utf8")
                    continue
                except ValueError:
                    bump("skipped.bad_json")
                    continue
                if not isinstance(record, dict):
                    bump("skipped.bad_json")
                    continue
                text = record.get(text_key)
                if text is None:
                    bump("skipped.missing_text")
                    continue
                if not isinstance(text, str):
                    bump("skipped.text_not_string")
                    continue
                if not text.strip():
                    bump("dropped.empty")
                    continue
                doc = {k: v for k, v in record.items() if k != text_key and k not in RESERVED}
                doc.update(id=str(lineno), text=text)
                if b"\\u" in line.lower() and not _encodable(doc):  # lone surrogate escapes
                    bump("skipped.bad_unicode")
                    continue
                yield doc
    except DecompressedTooLarge:  # a zip bomb, or a file larger than the cap
        bump("records_in")
        bump("skipped.decompressed_too_large")
    except (OSError, EOFError, zlib.error, zstandard.ZstdError):  # truncated or corrupt
        bump("records_in")
        bump("skipped.corrupt_file")


def _encodable(doc: dict[str, Any]) -> bool:
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _open(root: str, rel: str) -> Any:
    if "://" in root:
        import fsspec

        return fsspec.open(root.rstrip("/") + "/" + rel, "rb").open()
    return open(os.path.join(os.path.expanduser(root), rel), "rb")


class DecompressedTooLarge(Exception):
    """A compressed file decompressed to more than its cap."""


def decompressed_chunks(fh: Any, rel: str, limit: int = MAX_DECOMPRESSED_BYTES,
                        size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of an open file in chunks, decompressed by its suffix (``.zst``/``.zstd``,
    ``.gz``); EOFError when a compressed stream is cut short, DecompressedTooLarge past
    ``limit`` decompressed bytes (uncompressed files are not capped)."""
    if rel.endswith((".zst", ".zstd")):
        chunks = _zstd_chunks(fh, size)
    elif rel.endswith(".gz"):
        gz = gzip.GzipFile(fileobj=fh)
        chunks = iter(lambda: gz.read(size), b"")
    else:
        yield from iter(lambda: fh.read(size), b"")
        return
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise DecompressedTooLarge(f"{rel}: more than {limit} bytes decompressed")
        yield chunk


def split_lines(chunks: Iterator[bytes], max_line: int) -> Iterator[bytes | None]:
    """The ``\\n``-separated lines of a stream of chunks, without their newline; None in place
    of a line longer than ``max_line`` bytes, whose bytes are dropped as they stream past."""
    buf: list[bytes] = []
    held = 0
    skipping = False
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:  # no line ends in this chunk
            if not skipping:
                buf.append(chunk)
                held += len(chunk)
                if held > max_line:
                    skipping, buf, held = True, [], 0
            continue
        if skipping:
            yield None
            skipping = False
        else:
            line = b"".join(buf) + pieces[0] if buf else pieces[0]
            yield line if len(line) <= max_line else None
        for line in pieces[1:-1]:
            yield line if len(line) <= max_line else None
        tail = pieces[-1]
        if len(tail) > max_line:
            skipping, buf, held = True, [], 0
        else:
            buf, held = ([tail] if tail else []), len(tail)
    if skipping:
        yield None
    elif buf:
        yield b"".join(buf)


def _zstd_chunks(fh: Any, size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed chunks of a file of one or more zstd frames; EOFError when the last frame
    is cut short (zstandard's stream reader ends quietly there). The decompressor is fed
    ``ZSTD_FEED`` bytes at a time, so one step inflates to tens of MB at most, bomb or not."""
    dctx = zstandard.ZstdDecompressor()
    frame, in_frame = dctx.decompressobj(), False
    while block := fh.read(size):
        pos, carry = 0, b""
        while carry or pos < len(block):
            if carry:
                piece, carry = carry, b""
            else:
                piece, pos = block[pos:pos + ZSTD_FEED], pos + ZSTD_FEED
            in_frame = True
            out = frame.decompress(piece)
            if out:
                yield out
            if frame.eof:
                carry, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise EOFError("zstd frame cut short")
