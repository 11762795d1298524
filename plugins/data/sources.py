"""Sources besides ``files_source``: Parquet, HTML files, WARC archives, Hugging Face datasets.

Each stage writes a documents artifact and keeps every document's provenance:

* ``parquet_source``: one document per row; ``path`` (the file) and ``row`` (its index in the
  file), plus the ``keep_columns`` asked for. Row groups are read a batch of ``batch_size``
  rows at a time and only the columns needed, so a worker holds one batch and one part.
* ``html_source``: one document per ``.html``/``.htm`` file, its text extracted
  (``extractor``, see ``extract.py``); ``path``, and ``title``/``url`` when the page has them.
* ``warc_source``: one document per ``response`` record with an HTML payload (2xx status);
  ``path``, ``offset`` (of the record in the file, compressed bytes for ``.warc.gz``),
  ``warc_record_id`` and ``url`` (``WARC-Target-URI``), ``title`` when found.
* ``hf_source``: one document per row of a Hugging Face dataset, streamed
  (``datasets.load_dataset(..., streaming=True)``); ``path`` (``<dataset>[/<subset>]:<split>``)
  and ``row``. Needs network unless the dataset is local (a directory, or a packaged builder
  such as ``json`` with local ``data_files``); offline (``HF_DATASETS_OFFLINE=1``) a Hub
  dataset fails at once with a StageError saying so.

As in ``files_source``, files are listed under ``root`` with globs (``list_files``), read
through the stage's executor (Parquet and WARC files one per task, HTML files in chunks of
``docs_per_part``), written as parts, and resumed per task after a crash; the fingerprint
follows the matched files' contents or stamps (``change_detection``). Malformed input is
skipped and counted as ``skipped.<reason>`` (``unreadable``, ``corrupt_parquet``,
``bad_warc_record``, ``bad_utf8``/``bad_encoding``, ``binary``, ``missing_text``,
``text_not_string``, ``missing_id``, ``decompressed_too_large``, ``symlink_outside_root``,
``bad_filename``); empty, oversized and textless documents are dropped and counted as
``dropped.<reason>`` (``empty``, ``too_large``, ``no_text``). WARC records that are no
candidates are counted as ``ignored.<reason>`` (``not_response``, ``not_html``,
``http_status``). A corrupt Parquet file or a broken WARC record stops that file only
(documents read before it are kept); past ``max_skip_fraction`` the stage fails naming the
reasons and the first files that had them.

pyarrow, warcio, trafilatura and datasets are imported inside the workers only.
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import write_documents

from ._parts import clear_parts, merge_counts, place_parts, run_tasks, task_key
from .extract import Extractor, decode_failure, decode_html, extract_options, extract_text, has_bom
from .source import (BINARY_SNIFF_BYTES, MAX_DECOMPRESSED_BYTES, RESERVED, Entry, _inside, _open,
                     files_digest, list_files)

CURATION = "pip install 'recipe-engine[curation]'"
MAX_DOCUMENT_BYTES = 10_000_000
EXAMPLES_PER_REASON = 3  # files named per skip reason when a stage fails
PROVENANCE = (*RESERVED, "row")  # what parquet_source and hf_source write themselves
HTML_TYPES = ("text/html", "application/xhtml+xml")
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "xml")


@dataclass(kw_only=True)
class FileSource(Stage):
    """Base of the sources that read the files under a directory (no name: not registered)."""

    root: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    source_name: str = ""  # default: the root directory's name
    docs_per_part: int = 1000
    follow_symlinks_outside_root: bool = False
    change_detection: Literal["auto", "content", "stamp"] = "auto"

    reader = ""  # the worker's reader (READERS)
    files_per_task = 1  # HTML: docs_per_part

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.include), "include", "must name at least one glob pattern")
        problems.require(self.docs_per_part >= 1, "docs_per_part", "must be positive")

    @property
    def source(self) -> str:
        return self.source_name or os.path.basename(self.root.rstrip("/")) or self.reader

    def list_files(self) -> list[Entry]:
        return list_files(self.root, self.include, self.exclude)

    def fingerprint_extra(self) -> str:
        try:
            entries = self.list_files()
        except Exception as e:  # plan must work where the data is not (yet) reachable
            return f"unlisted: {type(e).__name__}: {e}"
        return files_digest(self.root, entries, self.change_detection,
                            self.follow_symlinks_outside_root)

    def options(self) -> dict[str, Any]:
        """What the reader needs besides the files (part of every task's key)."""
        return {}

    def run(self, ctx: StageContext) -> None:
        entries = self.list_files()
        if not entries:
            raise StageError(f"{self.name}: no file under {self.root!r} matches "
                             f"include={self.include} exclude={self.exclude}")
        step = max(1, self.files_per_task)
        groups = [entries[i:i + step] for i in range(0, len(entries), step)]
        options = self.options()
        config = {"reader": self.reader, "root": self.root, "source": self.source,
                  "per_part": self.docs_per_part, "work": str(ctx.work),
                  "follow_outside": self.follow_symlinks_outside_root, **options}
        tasks = []
        for i, group in enumerate(groups):
            key = task_key(i, self.reader, self.source, self.docs_per_part, options,
                           [(e.rel, e.size, e.stamp) for e in group])
            tasks.append((key, {**config, "key": key,
                                "files": [(e.rel, e.size) for e in group]}))
        ctx.log(f"{len(entries)} files under {self.root} in {len(tasks)} tasks")
        results = run_tasks(ctx, read_source_task, tasks, "source", "files",
                            weights=[len(g) for g in groups])
        finish(ctx, self.name, results, f"the {len(entries)} files under {self.root!r}",
               self.source)
        ctx.metrics["files"] = len(entries)


@dataclass(kw_only=True)
class ParquetSource(FileSource,
                    name="parquet_source",
                    description="documents from the rows of Parquet files (pyarrow)",
                    output="documents"):
    """Documents from Parquet files: one per row, read a batch of rows at a time."""

    include: list[str] = field(default_factory=lambda: ["**/*.parquet"])
    text_key: str = "text"
    id_key: str = ""  # a column of unique ids; empty: <source>/<path>#<row>
    keep_columns: list[str] = field(default_factory=list)  # columns carried into documents
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES  # per file, the needed columns
    batch_size: int = 1024  # rows read at a time

    reader = "parquet"

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.require(bool(self.text_key), "text_key", "must name the text column")
        _check_columns(problems, self.keep_columns, self.text_key, self.id_key)
        problems.require(self.max_document_bytes >= 1, "max_document_bytes", "must be positive")
        problems.require(self.max_decompressed_bytes >= 1, "max_decompressed_bytes",
                         "must be positive")
        problems.require(self.batch_size >= 1, "batch_size", "must be positive")

    def options(self) -> dict[str, Any]:
        return {"text_key": self.text_key, "id_key": self.id_key,
                "keep_columns": list(self.keep_columns), "max_bytes": self.max_document_bytes,
                "max_decompressed": self.max_decompressed_bytes, "batch_size": self.batch_size}


@dataclass(kw_only=True)
class HtmlSource(FileSource,
                 name="html_source",
                 description="documents from HTML files, their text extracted",
                 output="documents"):
    """Documents from HTML files: one per file, text extracted by trafilatura or lxml."""

    include: list[str] = field(default_factory=lambda: ["**/*.html", "**/*.htm"])
    extractor: Extractor = "trafilatura"
    include_tables: bool = True  # trafilatura: keep the text of tables
    favor_precision: bool = True  # trafilatura: drop borderline text (FineWeb's setting)
    max_file_bytes: int = MAX_DOCUMENT_BYTES  # larger files are dropped unread

    reader = "html"

    @property
    def files_per_task(self) -> int:  # type: ignore[override]
        return self.docs_per_part

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.require(self.max_file_bytes >= 1, "max_file_bytes", "must be positive")

    def options(self) -> dict[str, Any]:
        return {"extract": extract_options(self), "max_bytes": self.max_file_bytes}


@dataclass(kw_only=True)
class WarcSource(FileSource,
                 name="warc_source",
                 description="documents from the HTML responses in WARC archives (warcio)",
                 output="documents"):
    """Documents from WARC files: one per HTML ``response`` record, text extracted."""

    include: list[str] = field(default_factory=lambda: ["**/*.warc", "**/*.warc.gz"])
    extractor: Extractor = "trafilatura"
    include_tables: bool = True
    favor_precision: bool = True
    max_document_bytes: int = MAX_DOCUMENT_BYTES  # HTTP payloads above are dropped
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES  # record bytes per file

    reader = "warc"

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.require(self.max_document_bytes >= 1, "max_document_bytes", "must be positive")
        problems.require(self.max_decompressed_bytes >= 1, "max_decompressed_bytes",
                         "must be positive")

    def options(self) -> dict[str, Any]:
        return {"extract": extract_options(self), "max_bytes": self.max_document_bytes,
                "max_decompressed": self.max_decompressed_bytes}


@dataclass(kw_only=True)
class HfSource(Stage,
               name="hf_source",
               description="documents streamed from a Hugging Face dataset (needs network)",
               output="documents"):
    """Documents from a Hugging Face dataset, streamed: one per row."""

    path: str  # a Hub dataset (org/name), a local directory, or a builder (json, parquet, ...)
    subset: str = ""  # the dataset's configuration (load_dataset's ``name``)
    split: str = "train"
    revision: str = ""  # a Hub commit, tag or branch; pin it to make the stage reproducible
    data_files: list[str] = field(default_factory=list)  # for builders such as json
    text_key: str = "text"
    id_key: str = ""  # a column of unique ids; empty: <source>/[<subset>/]<split>#<row>
    keep_columns: list[str] = field(default_factory=list)
    max_documents: int = 0  # stop after this many documents; 0: the whole split
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    source_name: str = ""  # default: the dataset path's last component
    docs_per_part: int = 1000

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.path.strip()), "path", "must name a dataset")
        problems.require(bool(self.split), "split", "must name a split (e.g. train)")
        problems.require(bool(self.text_key), "text_key", "must name the text column")
        _check_columns(problems, self.keep_columns, self.text_key, self.id_key)
        problems.require(self.max_documents >= 0, "max_documents", "must be 0 (all) or more")
        problems.require(self.max_document_bytes >= 1, "max_document_bytes", "must be positive")
        problems.require(self.docs_per_part >= 1, "docs_per_part", "must be positive")

    @property
    def source(self) -> str:
        return self.source_name or self.path.rstrip("/").split("/")[-1] or "hf"

    def local_files(self) -> list[str] | None:
        """The local files the dataset reads, or None when it comes from the Hub (or any
        other URL)."""
        if any("://" in f for f in self.data_files):
            return None
        path = os.path.expanduser(self.path)
        if os.path.isdir(path):
            found = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        elif self.path in PACKAGED_BUILDERS and self.data_files:
            found = []
        else:
            return None
        for pattern in self.data_files:
            base = pattern if os.path.isabs(os.path.expanduser(pattern)) \
                else os.path.join(path if os.path.isdir(path) else ".", pattern)
            found += glob.glob(os.path.expanduser(base), recursive=True)
        return sorted(set(found))

    def fingerprint_extra(self) -> str | None:
        """Local data: the sizes and mtimes of its files. A Hub dataset: nothing (the
        parameters, ``revision`` among them, are the fingerprint; nothing is fetched)."""
        files = self.local_files()
        if files is None:
            return None
        h = hashlib.sha256()
        for f in files:
            try:
                st = os.stat(f)
                stamp = f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n"
                h.update(stamp.encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{f}\0missing\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def describe(self) -> str:
        return f"{self.path}" + (f"/{self.subset}" if self.subset else "") + f":{self.split}"

    def run(self, ctx: StageContext) -> None:
        local = self.local_files() is not None
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                   if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
        if offline and not local:
            raise StageError(
                f"hf_source: dataset {self.describe()!r} is streamed from the Hugging Face Hub, "
                f"but {offline[0]}=1 forbids network access; unset {offline[0]} where there is "
                f"network, or use a local copy (path: a directory, or path: json/parquet/... "
                f"with data_files)")
        data_files = [f if "://" in f else os.path.abspath(os.path.expanduser(f))
                      for f in self.data_files]
        if os.path.isdir(os.path.expanduser(self.path)) and self.data_files:
            data_files = list(self.data_files)  # relative to the dataset directory
        task_args = {"reader": "hf", "dataset": self.path, "subset": self.subset,
                     "split": self.split, "revision": self.revision, "data_files": data_files,
                     "text_key": self.text_key, "id_key": self.id_key,
                     "keep_columns": list(self.keep_columns),
                     "max_documents": self.max_documents, "max_bytes": self.max_document_bytes,
                     "source": self.source, "path": self.describe(),
                     "id_prefix": "/".join(x for x in (self.subset, self.split) if x),
                     "per_part": self.docs_per_part, "work": str(ctx.work)}
        key = task_key(0, task_args, self.fingerprint_extra())
        results = run_tasks(ctx, read_source_task, [(key, {**task_args, "key": key})],
                            "source", "datasets")
        finish(ctx, self.name, results, f"dataset {self.describe()!r}", self.source)


def _check_columns(problems: Problems, keep: list[str], text_key: str, id_key: str) -> None:
    for col in keep:
        if col in PROVENANCE:
            problems.add("keep_columns", f"{col!r} is a field the source writes itself "
                                         f"({', '.join(PROVENANCE)}); rename it or leave it out")
        elif col in (text_key, id_key):
            problems.add("keep_columns", f"{col!r} is already read as text_key or id_key")
    if len(set(keep)) != len(keep):
        problems.add("keep_columns", "names a column twice")


def finish(ctx: StageContext, stage: str, results: list[dict[str, Any]], what: str,
           source: str) -> None:
    """Place the workers' parts, merge their counts and fail past the skip threshold,
    naming the first files skipped for each reason."""
    clear_parts(ctx.output)
    files = [f for r in results for f in r["files"]]
    place_parts(ctx.work, files, ctx.output)
    examples: dict[str, list[str]] = {}
    seen = 0
    for r in results:
        merge_counts(ctx, r["counts"])
        seen += r["counts"].get("records_in", 0)
        for reason, rels in r.get("examples", {}).items():
            have = examples.setdefault(reason, [])
            have += [x for x in rels if x not in have][:EXAMPLES_PER_REASON - len(have)]
    ctx.count("documents_out", 0)
    try:
        ctx.check_skips(seen)
    except StageError as e:
        raise StageError(f"{stage}: {e}. {_where(examples)}") from None
    num_docs = sum(r["documents"] for r in results)
    num_bytes = sum(r["bytes"] for r in results)
    ctx.meta.update({"num_documents": num_docs, "num_bytes": num_bytes, "source": source})
    skipped = sum(v for k, v in ctx.counts.items() if k.startswith("skipped."))
    ctx.metrics.update({"documents": num_docs, "mbytes": round(num_bytes / 1e6, 3),
                        "skipped": skipped, "parts": len(files)})
    if num_docs == 0:
        raise StageError(f"{stage}: {what} gave no document ({dict(ctx.counts)})"
                         + (f". {_where(examples)}" if examples else ""))


def _where(examples: dict[str, list[str]]) -> str:
    if not examples:
        return ""
    return "Skipped: " + "; ".join(f"{reason} in {', '.join(rels)}"
                                   for reason, rels in sorted(examples.items()))


# -- reading (in the executor's workers) --------------------------------------------------------


class Tally:
    """A worker's counts, bytes and the first files skipped per reason."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"records_in": 0, "documents_out": 0}
        self.examples: dict[str, list[str]] = {}
        self.bytes = 0

    def bump(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.bump(f"skipped.{reason}", n)
        seen = self.examples.setdefault(reason, [])
        if where not in seen and len(seen) < EXAMPLES_PER_REASON:
            seen.append(where)

    def keep(self, doc: dict[str, Any], num_bytes: int) -> dict[str, Any]:
        self.bump("documents_out")
        self.bytes += num_bytes
        return doc


def read_source_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: read one task's input, write its documents as parts into the scratch dir."""
    tally = Tally()
    docs = READERS[task["reader"]](task, tally)
    (Path(task["work"]) / "source").mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    while True:
        batch = list(islice(docs, task["per_part"]))
        if not batch:
            break
        rel = f"source/{task['key']}-{len(files):04d}.jsonl.zst"
        write_documents(Path(task["work"]) / rel, batch)
        files.append(rel)
    return {"files": files, "documents": tally.counts["documents_out"], "bytes": tally.bytes,
            "counts": tally.counts, "examples": tally.examples}


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise StageError(f"{what} needs {module.split('.')[0]} ({CURATION}): {e}") from e


def _text_size(text: Any, tally: Any, where: str, max_bytes: int) -> int | None:
    """The UTF-8 size of a record's text, or None when the record is skipped (not a string)
    or dropped (empty, larger than ``max_bytes``), counted by reason."""
    if not isinstance(text, str):
        tally.skip("text_not_string", where)
        return None
    if not text.strip():
        tally.bump("dropped.empty")
        return None
    size = _utf8_len(text)
    if size > max_bytes:
        tally.bump("dropped.too_large")
        return None
    return size


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _files(task: dict[str, Any], tally: Tally) -> Iterator[tuple[str, int, Any]]:
    """The task's files that may be read, each ``(rel, size, open binary file)``; the rest
    counted (a name that is not UTF-8, a link out of the root, an unreadable file)."""
    root = task["root"]
    inside = None if task.get("follow_outside") or "://" in root else _inside(root)
    for rel, size in task["files"]:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            tally.bump("records_in")
            tally.skip("bad_filename", rel.encode("utf-8", "replace").decode())
            continue
        if inside is not None and not inside(rel):
            tally.bump("records_in")
            tally.skip("symlink_outside_root", rel)
            continue
        try:
            if size < 0:
                raise OSError("not a regular file")
            fh = _open(root, rel)
        except OSError:
            tally.bump("records_in")
            tally.skip("unreadable", rel)
            continue
        with fh:
            yield rel, size, fh


def _jsonable(value: Any) -> Any:
    """A column value as JSON can hold it: dates as ISO strings, bytes as UTF-8 (or hex),
    decimals and other scalars as strings."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


# Parquet


def _parquet_documents(task: dict[str, Any], tally: Tally) -> Iterator[dict[str, Any]]:
    pa = _import("pyarrow", "parquet_source")
    pq = _import("pyarrow.parquet", "parquet_source")
    for rel, _, fh in _files(task, tally):
        yield from _parquet_file(pa, pq, fh, rel, task, tally)


def _parquet_file(pa: Any, pq: Any, fh: Any, rel: str, task: dict[str, Any],
                  tally: Tally) -> Iterator[dict[str, Any]]:
    corrupt = (pa.ArrowException, OSError, ValueError, EOFError, IndexError)
    text_key, id_key, keep = task["text_key"], task["id_key"], task["keep_columns"]
    try:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        num_rows = pf.metadata.num_rows
    except corrupt:
        tally.bump("records_in")
        tally.skip("corrupt_parquet", rel)
        return
    for key, reason in ((text_key, "missing_text"), (id_key, "missing_id")):
        if key and key not in names:  # every row lacks it
            tally.bump("records_in", max(num_rows, 1))
            tally.skip(reason, rel, max(num_rows, 1))
            return
    columns = [text_key] + ([id_key] if id_key else []) + [c for c in keep if c in names]
    if _column_bytes(pf.metadata, set(columns)) > task["max_decompressed"]:
        tally.bump("records_in")
        tally.skip("decompressed_too_large", rel)
        return
    source, max_bytes = task["source"], task["max_bytes"]
    batches = pf.iter_batches(batch_size=task["batch_size"], columns=columns, use_threads=False)
    row = 0
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                break
            values = {c: batch.column(c).to_pylist() for c in columns}
        except corrupt:  # a damaged page: the rest of the file is lost, not the stage
            tally.bump("records_in")
            tally.skip("corrupt_parquet", rel)
            return
        for i, text in enumerate(values[text_key]):
            index = row + i
            tally.bump("records_in")
            if text is None:
                tally.skip("missing_text", rel)
                continue
            if isinstance(text, bytes):  # a binary column
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    tally.skip("bad_utf8", rel)
                    continue
            size = _text_size(text, tally, rel, max_bytes)
            if size is None:
                continue
            if id_key:
                ident = values[id_key][i]
                if ident is None:
                    tally.skip("missing_id", rel)
                    continue
                doc_id = f"{source}/{_jsonable(ident)}"
            else:
                doc_id = f"{source}/{rel}#{index}"
            doc = {c: _jsonable(values[c][i]) if c in values else None for c in keep}
            doc.update(id=doc_id, text=text, source=source, path=rel, row=index)
            yield tally.keep(doc, size)
        row += batch.num_rows


def _column_bytes(metadata: Any, columns: set[str]) -> int:
    """Uncompressed bytes of the named top-level columns, summed over row groups."""
    total = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if chunk.path_in_schema.split(".")[0] in columns:
                total += chunk.total_uncompressed_size
    return total


# HTML files


def _html_documents(task: dict[str, Any], tally: Tally) -> Iterator[dict[str, Any]]:
    source, max_bytes, options = task["source"], task["max_bytes"], task["extract"]
    for rel, size, fh in _files(task, tally):
        tally.bump("records_in")
        if size > max_bytes:  # from the listing: never read
            tally.bump("dropped.too_large")
            continue
        try:
            raw = fh.read(max_bytes + 1)
        except OSError:
            tally.skip("unreadable", rel)
            continue
        doc = _html_document(raw, None, None, rel, max_bytes, options, tally)
        if doc is not None:
            doc.update(id=f"{source}/{rel}", source=source, path=rel)
            yield tally.keep(doc, _utf8_len(doc["text"]))


def _html_document(raw: bytes, charset: str | None, url: str | None, where: str,
                   max_bytes: int, options: dict[str, Any], tally: Tally
                   ) -> dict[str, Any] | None:
    """``{"text", "title"?, "url"?}`` of one page, or None (counted)."""
    if len(raw) > max_bytes:
        tally.bump("dropped.too_large")
        return None
    if not raw.strip():
        tally.bump("dropped.empty")
        return None
    if b"\x00" in raw[:BINARY_SNIFF_BYTES] and not has_bom(raw):
        tally.skip("binary", where)
        return None
    html, codec = decode_html(raw, charset)
    if html is None:
        tally.skip(decode_failure(codec), where)
        return None
    text, found = extract_text(html, url=url, **options)
    if not text:
        tally.bump("dropped.no_text")
        return None
    return {"text": text, **found}


# WARC


def _warc_documents(task: dict[str, Any], tally: Tally) -> Iterator[dict[str, Any]]:
    archive = _import("warcio.archiveiterator", "warc_source")
    for rel, size, fh in _files(task, tally):
        yield from _warc_file(archive.ArchiveIterator, fh, rel, size, task, tally)


def _warc_file(iterator: Callable[[Any], Any], fh: Any, rel: str, size: int,
               task: dict[str, Any], tally: Tally) -> Iterator[dict[str, Any]]:
    """The documents of one WARC file. warcio ends quietly at a truncated gzip member or
    record, so completeness is checked here: every record has a Content-Length, every
    block is read to that length, and no bytes follow the last record."""
    source, max_bytes, options = task["source"], task["max_bytes"], task["extract"]

    def broken(where: str) -> None:
        tally.bump("records_in")
        tally.skip("bad_warc_record", where)

    try:
        records = iterator(fh)
    except Exception:  # noqa: BLE001 - warcio raises many types on a damaged file
        broken(rel)
        return
    total = 0
    previous, previous_offset = None, 0
    while True:
        try:
            record = next(records, None)
        except Exception:  # noqa: BLE001
            broken(f"{rel}@{getattr(records, 'offset', 0)}")
            return
        offset = records.offset  # where this record starts (warcio's own bookkeeping)
        if previous is not None and getattr(previous.raw_stream, "limit", 0) > 0:
            broken(f"{rel}@{previous_offset}")  # the block before was cut short
            return
        if record is None:
            break
        previous, previous_offset = record, offset
        length = record.rec_headers.get_header("Content-Length")
        if length is None or not length.strip().isdigit():  # a header cut short
            broken(f"{rel}@{offset}")
            return
        total += int(length)
        if total > task["max_decompressed"]:
            tally.bump("records_in")
            tally.skip("decompressed_too_large", rel)
            return
        if record.rec_type != "response":
            tally.bump("ignored.not_response")
            continue
        http = record.http_headers
        status = (http.get_statuscode() or "") if http is not None else ""
        if not status.startswith("2"):
            tally.bump("ignored.http_status")
            continue
        content_type = (http.get_header("Content-Type") or "").lower()
        if content_type.split(";")[0].strip() not in HTML_TYPES:
            tally.bump("ignored.not_html")
            continue
        try:
            raw = _read_at_most(record.content_stream(), max_bytes + 1)
        except Exception:  # noqa: BLE001 - a bad chunked or gzip content encoding
            broken(f"{rel}@{offset}")
            return
        if len(raw) <= max_bytes and getattr(record.raw_stream, "limit", 0) > 0:
            broken(f"{rel}@{offset}")  # the payload ends before its Content-Length
            return
        tally.bump("records_in")
        charset = _charset(content_type)
        url = record.rec_headers.get_header("WARC-Target-URI")
        doc = _html_document(raw, charset, url, f"{rel}@{offset}", max_bytes, options, tally)
        if doc is None:
            continue
        if url:
            doc["url"] = url
        doc.update(id=f"{source}/{rel}#{offset}", source=source, path=rel, offset=offset,
                   warc_record_id=record.rec_headers.get_header("WARC-Record-ID"))
        yield tally.keep(doc, _utf8_len(doc["text"]))
    end = getattr(records, "offset", None)
    if isinstance(end, int) and 0 <= end < size and _has_data_after(fh, end):
        broken(f"{rel}@{end}")  # a record warcio gave up on without a word


def _read_at_most(stream: Any, n: int) -> bytes:
    chunks, have = [], 0
    while have < n:
        chunk = stream.read(min(1 << 20, n - have))
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _has_data_after(fh: Any, offset: int) -> bool:
    try:
        fh.seek(offset)
        return bool(fh.read(1 << 16).strip())
    except (OSError, ValueError, AttributeError):  # not seekable: trust warcio
        return False


def _charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return None


# Hugging Face datasets


def _hf_documents(task: dict[str, Any], tally: Tally) -> Iterator[dict[str, Any]]:
    datasets = _import("datasets", "hf_source")
    where = task["path"]
    try:
        ds = datasets.load_dataset(
            task["dataset"], name=task["subset"] or None, split=task["split"], streaming=True,
            revision=task["revision"] or None, data_files=task["data_files"] or None)
        rows = iter(ds)
    except Exception as e:  # noqa: BLE001 - the Hub, the builder and the files all raise
        raise StageError(f"hf_source: cannot open dataset {where!r}: {type(e).__name__}: "
                         f"{e}") from None
    source, max_bytes, max_docs = task["source"], task["max_bytes"], task["max_documents"]
    text_key, id_key, keep = task["text_key"], task["id_key"], task["keep_columns"]
    index = -1
    while not max_docs or tally.counts["documents_out"] < max_docs:
        try:
            record = next(rows, None)
        except Exception as e:  # noqa: BLE001 - a network or file error mid-stream
            raise StageError(f"hf_source: reading dataset {where!r} failed after row "
                             f"{index}: {type(e).__name__}: {e}") from None
        if record is None:
            break
        index += 1
        tally.bump("records_in")
        text = record.get(text_key)
        if text is None:
            tally.skip("missing_text", where)
            continue
        size = _text_size(text, tally, where, max_bytes)
        if size is None:
            continue
        if id_key:
            if record.get(id_key) is None:
                tally.skip("missing_id", where)
                continue
            doc_id = f"{source}/{_jsonable(record[id_key])}"
        else:
            doc_id = f"{source}/{task['id_prefix']}#{index}"
        doc = {c: _jsonable(record.get(c)) for c in keep}
        doc.update(id=doc_id, text=text, source=source, path=where, row=index)
        yield tally.keep(doc, size)


READERS: dict[str, Callable[[dict[str, Any], Tally], Iterator[dict[str, Any]]]] = {
    "parquet": _parquet_documents, "html": _html_documents, "warc": _warc_documents,
    "hf": _hf_documents,
}

COMPONENTS: list[type] = [ParquetSource, HtmlSource, WarcSource, HfSource]
