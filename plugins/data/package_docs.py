"""Prose every installed Python environment carries: the long descriptions (README texts) in
the metadata of the installed distributions, and the stage that turns their markup into text.

* ``package_docs_source``: one document per installed distribution whose metadata has a
  description of at least ``min_chars`` characters. The environment is the directories of
  ``paths``, by default the interpreter's ``sys.path`` less the current directory (so the
  corpus does not depend on where the command runs). In each directory, ``*.dist-info/METADATA``,
  ``*.egg-info/PKG-INFO`` and ``*.egg-info`` files are read with the ``email`` parser (the
  format of core metadata); the description is the message body (metadata 2.1+) or the
  ``Description`` header with its continuation indent removed (older tools). Documents are
  ``{"id": "<source_name>/<name>==<version>", "text": <description>, "source", "path":
  <metadata file relative to its directory>, "distribution", "version", "format",
  "content_type"}``, sorted by normalised name (PEP 503) then version. ``format`` comes from
  ``Description-Content-Type`` (``text/markdown``: markdown, ``text/x-rst``: rst,
  ``text/html``: html, ``text/plain``: plain) or, when absent or unknown, from the text
  (``sniff_format``). The same distribution (name and version) found again later on the path
  is skipped (``skipped.duplicate``, Python imports the first); metadata that cannot be read
  or decoded, or lacks a name or version, is skipped (``skipped.unreadable``,
  ``skipped.bad_utf8``, ``skipped.bad_metadata``); no description, ``UNKNOWN``, a short or an
  oversized one is dropped (``dropped.no_description``, ``dropped.too_short``,
  ``dropped.too_large``); names outside ``include``/``exclude`` are not read
  (``ignored.excluded``). The fingerprint is a digest of every listed metadata file's
  (name, version, path, content digest): installing, upgrading or removing a package reruns
  the stage, and two machines with the same packages share the fingerprint.
* ``markup_extract``: documents -> documents, the text of each document's markup as prose,
  by its ``format`` field. Markdown is parsed with markdown-it-py (CommonMark plus tables),
  reStructuredText with docutils (file inclusion and raw passthrough disabled: a document can
  neither read local files nor reach the network), HTML with the ``plain`` or ``trafilatura``
  extractor of ``html_extract``. Kept: headings, paragraphs (soft line breaks joined),
  list items (``- `` or ``N. ``), block quotes, table cells (one row per line, cells
  separated by a tab; ``keep_tables``), the text of links and inline code. Removed: images
  and badges (alt text too), link targets, raw HTML tags (the text of HTML blocks is kept),
  rST directives the parser does not know (``.. toctree::``), comments, substitution
  definitions, footnote and citation markers, and code blocks (fenced, indented, ``::``
  literal blocks, doctests) unless ``keep_code_blocks``: code is not prose, and the quality
  filters downstream would drop a README for it. Unknown interpreted-text roles
  (``:class:`Foo```) keep their text. The output is a function of each document and the
  parameters only.
"""
from __future__ import annotations

import email.parser
import email.policy
import fnmatch
import hashlib
import io
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import read_documents, write_documents

from ._parts import clear_parts, merge_counts, place_parts, run_part_stage, run_tasks, task_key
from .extract import EXTRACTORS, extract_text

FORMATS = ("markdown", "rst", "html", "plain")
CONTENT_TYPES = {"text/markdown": "markdown", "text/x-markdown": "markdown",
                 "text/x-rst": "rst", "text/rst": "rst", "text/restructuredtext": "rst",
                 "text/x-restructuredtext": "rst", "text/html": "html", "text/plain": "plain"}
MAX_METADATA_EXTRA = 1 << 20  # metadata bytes read beyond max_document_bytes (the headers)


def normalize_name(name: str) -> str:
    """PEP 503's normalised distribution name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


class DistEntry(NamedTuple):
    key: str  # normalised name
    name: str
    version: str
    site: str  # the directory on the path
    rel: str  # the metadata file, relative to site
    digest: str  # sha256 of the metadata file


class Listing(NamedTuple):
    entries: list[DistEntry]  # kept, sorted by (key, version)
    counts: dict[str, int]  # skips and drops found while listing
    examples: dict[str, list[str]]  # reason -> first metadata files
    material: str  # what the fingerprint digests


@dataclass(kw_only=True)
class PackageDocsSource(Stage,
                        name="package_docs_source",
                        version="1",
                        description="documents from the descriptions (READMEs) in installed "
                                    "Python packages' metadata",
                        output="documents"):
    """One document per installed distribution with a long description in its metadata."""

    paths: list[str] = field(default_factory=list)  # directories; empty: sys.path less cwd
    include: list[str] = field(default_factory=lambda: ["*"])  # name globs (normalised)
    exclude: list[str] = field(default_factory=list)
    min_chars: int = 200  # shorter descriptions (stripped) are dropped
    max_document_bytes: int = 1_000_000  # longer descriptions are dropped
    source_name: str = "python-packages"
    docs_per_part: int = 50

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.include), "include", "must name at least one glob ('*')")
        problems.require(self.min_chars >= 1, "min_chars", "must be at least 1")
        problems.require(self.max_document_bytes >= 1, "max_document_bytes", "must be positive")
        problems.require(self.docs_per_part >= 1, "docs_per_part", "must be positive")
        problems.require(bool(self.source_name.strip()) and "/" not in self.source_name,
                         "source_name", "must be a non-empty name without '/'")
        for p in self.paths:
            problems.require(bool(str(p).strip()), "paths", "holds an empty path")

    def search_path(self) -> list[str]:
        """The directories searched, in order, each once (by real path)."""
        if self.paths:
            found = [os.path.expanduser(p) for p in self.paths]
        else:
            cwd = os.path.realpath(os.getcwd())
            found = [p for p in sys.path if p and os.path.realpath(p) != cwd]
        out, seen = [], set()
        for p in found:
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                out.append(p)
        return out

    def wanted(self, key: str) -> bool:
        return (any(fnmatch.fnmatchcase(key, normalize_name(g)) for g in self.include)
                and not any(fnmatch.fnmatchcase(key, normalize_name(g)) for g in self.exclude))

    def listing(self) -> Listing:
        return list_distributions(self.search_path(), self.wanted,
                                  self.max_document_bytes + MAX_METADATA_EXTRA)

    def fingerprint_extra(self) -> str:
        """A digest of every listed distribution: name, version, metadata path and content."""
        return hashlib.sha256(self.listing().material.encode("utf-8", "surrogateescape")
                              ).hexdigest()

    def run(self, ctx: StageContext) -> None:
        listing = self.listing()
        if self.paths and not any(os.path.isdir(p) for p in self.search_path()):
            raise StageError(f"package_docs_source: none of paths={self.paths} is a directory")
        entries = listing.entries
        config = {"source": self.source_name, "min_chars": self.min_chars,
                  "max_bytes": self.max_document_bytes, "work": str(ctx.work)}
        tasks = []
        for i in range(0, len(entries), self.docs_per_part):
            chunk = [list(e) for e in entries[i:i + self.docs_per_part]]
            key = task_key(i // self.docs_per_part, self.version, config["source"],
                           self.min_chars, self.max_document_bytes, chunk)
            tasks.append((key, {**config, "key": key, "entries": chunk}))
        ctx.log(f"{len(entries)} distributions on {len(self.search_path())} path entries "
                f"in {len(tasks)} tasks")
        results = run_tasks(ctx, read_distributions, tasks, "source", "distributions",
                            weights=[len(t[1]["entries"]) for t in tasks])

        clear_parts(ctx.output)
        files = [f for r in results for f in r["files"]]
        place_parts(ctx.work, files, ctx.output)
        merge_counts(ctx, listing.counts)
        examples = {k: list(v) for k, v in listing.examples.items()}
        for r in results:
            merge_counts(ctx, r["counts"])
            for reason, where in r["examples"].items():
                examples.setdefault(reason, []).extend(where)
        ctx.count("documents_out", 0)
        seen = ctx.counts.get("records_in", 0)
        try:
            ctx.check_skips(seen)
        except StageError as e:
            raise StageError(f"package_docs_source: {e}. {_where(examples)}") from None
        num_docs = sum(r["documents"] for r in results)
        num_bytes = sum(r["bytes"] for r in results)
        formats = {k.removeprefix("format."): n for k, n in sorted(ctx.counts.items())
                   if k.startswith("format.")}
        ctx.meta.update({"num_documents": num_docs, "num_bytes": num_bytes,
                         "source": self.source_name, "formats": formats})
        skipped = sum(v for k, v in ctx.counts.items() if k.startswith("skipped."))
        ctx.metrics.update({"documents": num_docs, "mbytes": round(num_bytes / 1e6, 3),
                            "distributions": seen, "skipped": skipped, "parts": len(files)})
        if num_docs == 0:
            raise StageError(f"package_docs_source: none of the {seen} distributions found on "
                             f"{self.search_path()} has a description of {self.min_chars}+ "
                             f"characters matching include={self.include} "
                             f"exclude={self.exclude} ({dict(ctx.counts)})")


def _where(examples: dict[str, list[str]]) -> str:
    return "Skipped: " + "; ".join(f"{reason} in {', '.join(rels[:3])}"
                                   for reason, rels in sorted(examples.items()))


# -- listing (in the stage's process) -----------------------------------------------------------


def metadata_files(site: str) -> Iterator[str]:
    """The metadata files of the distributions in one directory, relative to it, sorted."""
    try:
        names = sorted(os.listdir(site))
    except OSError:  # not a directory (a zip on sys.path), or unreadable
        return
    for name in names:
        path = os.path.join(site, name)
        if name.endswith(".dist-info") and os.path.isdir(path):
            yield f"{name}/METADATA"
        elif name.endswith(".egg-info"):
            yield f"{name}/PKG-INFO" if os.path.isdir(path) else name


def read_metadata(path: str, limit: int) -> tuple[str | None, str]:
    """``(text, "")`` of a metadata file, or ``(None, reason)``: unreadable, too_large,
    bad_utf8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError:
        return None, "unreadable"
    if len(raw) > limit:
        return None, "too_large"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "bad_utf8"


def parse_metadata(text: str) -> Any:
    """The core metadata as an ``email.message.Message`` (as ``importlib.metadata`` reads it)."""
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text)


def list_distributions(sites: list[str], wanted: Any, limit: int) -> Listing:
    """Every distribution in ``sites``, in path order; the first of each (name, version) kept,
    those ``wanted`` rejects left out; sorted by normalised name then version."""
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    material: list[str] = []

    def bump(key: str, where: str = "") -> None:
        counts[key] = counts.get(key, 0) + 1
        if where and key.startswith("skipped."):
            seen = examples.setdefault(key.removeprefix("skipped."), [])
            if len(seen) < 3:
                seen.append(where)

    kept: dict[tuple[str, str], DistEntry] = {}
    for site in sites:
        for rel in metadata_files(site):
            path = os.path.join(site, rel)
            text, problem = read_metadata(path, limit)
            if text is None:
                material.append(f"{rel}\0{problem}")
                bump("records_in")
                bump(f"dropped.{problem}" if problem == "too_large" else f"skipped.{problem}",
                     path)
                continue
            msg = parse_metadata(text)
            name, version = (str(msg.get("Name") or "").strip(),
                             str(msg.get("Version") or "").strip())
            if not name or not version:
                material.append(f"{rel}\0bad_metadata")
                bump("records_in")
                bump("skipped.bad_metadata", path)
                continue
            key = normalize_name(name)
            if not wanted(key):
                bump("ignored.excluded")
                continue
            bump("records_in")
            if (key, version) in kept:
                bump("skipped.duplicate", path)
                continue
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            kept[(key, version)] = DistEntry(key, name, version, site, rel, digest)
    entries = sorted(kept.values(), key=lambda e: (e.key, _version_key(e.version), e.version))
    material += [f"{e.key}\0{e.version}\0{e.rel}\0{e.digest}" for e in entries]
    return Listing(entries, counts, examples, "\n".join(material))


def _version_key(version: str) -> tuple[Any, ...]:
    """Numbers compared as numbers (``1.10`` after ``1.9``); deterministic for any string."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                 for p in re.split(r"[.+!-]", version))


# -- reading (in the executor's workers) --------------------------------------------------------


def description_of(msg: Any) -> str:
    """The long description: the body (metadata 2.1+), else the ``Description`` header with
    the continuation indent setuptools (8 spaces) or distutils (7 spaces and ``|``) added."""
    body = msg.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    header = msg.get("Description")
    if not header:
        return ""
    lines = str(header).splitlines()
    out = lines[:1]
    for line in lines[1:]:
        if line.startswith("        ") or line.startswith("       |"):
            line = line[8:]
        out.append(line)
    return "\n".join(out)


_RST_SIGNS = re.compile(
    r"^\.\. [\w:-]+::|^\.\. _[^:]+:|^\.\. \|[^|]+\| |:[\w:-]+:`[^`]+`|`[^`]+`_{1,2}\b|::\s*$"
    r"|^([~^*+#\"'`:])\1{3,}\s*$", re.M)
_MD_SIGNS = re.compile(r"^#{1,6} \S|^```|^~~~|!?\[[^\]\n]*\]\([^)\s]+\)|^\s*[-*] \[[ xX]\]"
                       r"|^\|.*\|\s*$", re.M)
_UNDERLINE = re.compile(r"^\S.*\n([=\-])\1{3,}\s*$", re.M)
_HTML_SIGNS = re.compile(r"<(?:p|div|h[1-6]|html|body|br|ul|ol|li|table|a|img)\b[^>]*>", re.I)


def sniff_format(text: str) -> str:
    """markdown, rst, html or plain, from the look of a text without a declared type."""
    head = text[:20000]
    if head.lstrip().startswith("<") and len(_HTML_SIGNS.findall(head)) >= 2:
        return "html"
    rst, md = len(_RST_SIGNS.findall(head)), len(_MD_SIGNS.findall(head))
    if md > rst:
        return "markdown"
    if rst or _UNDERLINE.search(head):  # setext/rST titles: PyPI renders untyped text as rST
        return "rst"
    return "plain"


def format_of(content_type: str, text: str) -> str:
    """The markup of a description from its ``Description-Content-Type``, else its look."""
    main = content_type.split(";")[0].strip().lower()
    return CONTENT_TYPES.get(main) or sniff_format(text)


def read_distributions(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: one document per distribution of a task, written as parts into scratch."""
    counts: dict[str, int] = {"documents_out": 0}
    examples: dict[str, list[str]] = {}
    totals = {"bytes": 0}

    def documents() -> Iterator[dict[str, Any]]:
        for key, name, version, site, rel, digest in task["entries"]:
            path = os.path.join(site, rel)
            text, problem = read_metadata(path, task["max_bytes"] + MAX_METADATA_EXTRA)
            if text is None or hashlib.sha256(text.encode("utf-8")).hexdigest() != digest:
                raise StageError(f"package_docs_source: {path} changed while being read (a "
                                 "package installed meanwhile?); rerun once it stays put")
            msg = parse_metadata(text)
            desc = description_of(msg).strip()
            if not desc or desc == "UNKNOWN":
                counts["dropped.no_description"] = counts.get("dropped.no_description", 0) + 1
                continue
            if len(desc) < task["min_chars"]:
                counts["dropped.too_short"] = counts.get("dropped.too_short", 0) + 1
                continue
            n = len(desc.encode("utf-8", "surrogatepass"))
            if n > task["max_bytes"]:
                counts["dropped.too_large"] = counts.get("dropped.too_large", 0) + 1
                continue
            content_type = str(msg.get("Description-Content-Type") or "").strip()
            fmt = format_of(content_type, desc)
            counts[f"format.{fmt}"] = counts.get(f"format.{fmt}", 0) + 1
            counts["documents_out"] += 1
            totals["bytes"] += n
            yield {"id": f"{task['source']}/{name}=={version}", "text": desc,
                   "source": task["source"], "path": rel, "distribution": name,
                   "version": version, "format": fmt, "content_type": content_type}

    docs = documents()
    (Path(task["work"]) / "source").mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    while batch := list(islice(docs, 1000)):
        rel = f"source/{task['key']}-{len(files):04d}.jsonl.zst"
        write_documents(Path(task["work"]) / rel, batch)
        files.append(rel)
    return {"files": files, "documents": counts["documents_out"], "bytes": totals["bytes"],
            "counts": counts, "examples": examples}


# -- markup to text -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class MarkupExtract(Stage,
                    name="markup_extract",
                    version="1",
                    description="Markdown, reStructuredText or HTML documents to prose, by "
                                "their format field",
                    inputs={"documents": "documents"},
                    output="documents"):
    """Replace each document's markup (Markdown, rST, HTML) with its prose."""

    format_key: str = "format"  # the field naming each document's markup
    default_format: Literal["auto", "markdown", "rst", "html", "plain"] = "auto"
    keep_code_blocks: bool = False
    keep_tables: bool = True
    html_extractor: Literal["plain", "trafilatura"] = "plain"

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.format_key), "format_key", "must name a field")
        problems.require(self.html_extractor in EXTRACTORS, "html_extractor",
                         f"must be one of {EXTRACTORS}")

    def fingerprint_extra(self) -> str:
        """The parsers' versions: another version may parse otherwise."""
        import importlib.metadata as md

        found = []
        for dist in ("markdown-it-py", "docutils"):
            try:
                found.append(f"{dist} {md.version(dist)}")
            except md.PackageNotFoundError:
                found.append(f"{dist} missing")
        return "; ".join(found)

    def run(self, ctx: StageContext) -> None:
        _markdown_parser(), _docutils()  # fail before any work when a parser is missing
        options = {"format_key": self.format_key, "default_format": self.default_format,
                   "keep_code_blocks": self.keep_code_blocks, "keep_tables": self.keep_tables,
                   "html_extractor": self.html_extractor}
        totals = run_part_stage(ctx, markup_part, options, self.version, label="markup")
        docs_in, docs_out = totals["documents_in"], totals["documents_out"]
        if docs_in and not docs_out:
            raise StageError(f"markup_extract: no text left in any of the {docs_in} documents "
                             f"({dict(ctx.counts)})")


def markup_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: the prose of one part's documents, into the scratch directory."""
    o = task["options"]
    counts: dict[str, int] = {}
    totals = {"in": 0, "out": 0, "bytes_in": 0, "bytes": 0}

    def bump(k: str) -> None:
        counts[k] = counts.get(k, 0) + 1

    def extracted() -> Iterator[dict[str, Any]]:
        for doc in read_documents(Path(task["part"])):
            totals["in"] += 1
            text = doc.get("text")
            if not isinstance(text, str):
                bump("skipped.missing_text")
                continue
            fmt = doc.get(o["format_key"])
            if fmt not in FORMATS:
                fmt = o["default_format"]
                if fmt == "auto":
                    fmt = sniff_format(text)
            bump(f"format.{fmt}")
            totals["bytes_in"] += len(text.encode("utf-8", "surrogatepass"))
            try:
                prose = markup_to_text(text, fmt, keep_code_blocks=o["keep_code_blocks"],
                                       keep_tables=o["keep_tables"],
                                       html_extractor=o["html_extractor"])
            except RecursionError:  # nesting deeper than the parser (or walker) goes
                bump("skipped.markup_error")
                continue
            if not prose:
                bump("dropped.no_text")
                continue
            totals["out"] += 1
            totals["bytes"] += len(prose.encode("utf-8", "surrogatepass"))
            yield {**doc, "text": prose}

    work = Path(task["work"])
    (work / "markup").mkdir(parents=True, exist_ok=True)
    files = [f"markup/{task['key']}.jsonl.zst"]
    write_documents(work / files[0], extracted())
    return {"files": files, "documents_in": totals["in"], "documents_out": totals["out"],
            "bytes_in": totals["bytes_in"], "bytes": totals["bytes"], "counts": counts}


def markup_to_text(text: str, fmt: str, *, keep_code_blocks: bool = False,
                   keep_tables: bool = True, html_extractor: str = "plain") -> str:
    """The prose of ``text`` written in ``fmt`` (markdown, rst, html or plain)."""
    if fmt == "markdown":
        out = _markdown_text(text, keep_code_blocks, keep_tables, html_extractor)
    elif fmt == "rst":
        out = _rst_text(text, keep_code_blocks, keep_tables)
    elif fmt == "html":
        out = extract_text(text, extractor=html_extractor)[0]
    else:
        out = text
    return _tidy(out)


def _tidy(text: str) -> str:
    """Trailing spaces stripped, runs of blank lines cut to one, the ends stripped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class _Blocks:
    """Output blocks: consecutive blocks of one group (the items of a list, the rows of a
    table) one line apart, the others separated by a blank line."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.last_group: object = None

    def add(self, text: str, group: object = None) -> None:
        text = text.strip("\n")
        if not text.strip():
            return
        if self.parts:
            same = group is not None and group is self.last_group
            self.parts.append("\n" if same else "\n\n")
        self.parts.append(text)
        self.last_group = group

    def text(self) -> str:
        return "".join(self.parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# Markdown, with markdown-it-py

_md: Any = None


def _markdown_parser() -> Any:
    global _md
    if _md is None:
        try:
            from markdown_it import MarkdownIt
        except ImportError as e:
            raise StageError("markup_extract needs markdown-it-py for Markdown: "
                             "pip install 'recipe-engine[curation]'") from e
        _md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    return _md


def _markdown_inline(token: Any) -> str:
    out: list[str] = []
    for child in token.children or []:  # an image's alt text is in its own children: left out
        t = child.type
        if t in ("text", "code_inline"):
            out.append(child.content)
        elif t == "softbreak":
            out.append(" ")
        elif t == "hardbreak":
            out.append("\n")
    return "".join(out)


def _markdown_text(text: str, keep_code: bool, keep_tables: bool, html_extractor: str) -> str:
    tokens = _markdown_parser().parse(text)
    blocks = _Blocks()
    lists: list[list[Any]] = []  # per open list: [ordered, next number, group]
    item_prefix: str | None = None  # the marker for the first block of a list item
    row: list[str] | None = None
    table: object = None
    for tok in tokens:
        t = tok.type
        if t in ("bullet_list_open", "ordered_list_open"):
            start = tok.attrGet("start")
            group = lists[0][2] if lists else object()  # nested lists join the outer one
            lists.append([t == "ordered_list_open", int(start) if start else 1, group])
        elif t in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif t == "list_item_open" and lists:
            ordered, n, _ = lists[-1]
            item_prefix = "  " * (len(lists) - 1) + (f"{n}. " if ordered else "- ")
            lists[-1][1] += 1
        elif t == "table_open":
            table = object()
        elif t == "tr_open":
            row = []
        elif t == "tr_close":
            if keep_tables and row is not None and any(c.strip() for c in row):
                blocks.add("\t".join(c.strip() for c in row), table)
            row = None
        elif t == "inline":
            content = _markdown_inline(tok)
            if row is not None:
                row.append(_one_line(content))
                continue
            group = lists[0][2] if lists else None
            if item_prefix is not None:
                blocks.add(item_prefix + content.strip(), group)
                item_prefix = None
            else:
                blocks.add(content.strip(), group)
        elif t in ("fence", "code_block"):
            if keep_code:
                blocks.add(tok.content.rstrip("\n"))
        elif t == "html_block":
            found = extract_text(tok.content, extractor=html_extractor)[0] \
                if re.search(r"[^\s<>]", _TAGS.sub("", tok.content)) else ""
            blocks.add(found)
    return blocks.text()


_TAGS = re.compile(r"<[^>]*>")

# reStructuredText, with docutils

_DOCUTILS_SETTINGS = {
    "file_insertion_enabled": False,  # .. include:: and :file: options would read local files
    "raw_enabled": False,  # .. raw:: (and its :url: option) passes markup through
    "report_level": 5, "halt_level": 5, "warning_stream": io.StringIO(),
    "_disable_config": True, "input_encoding": "unicode", "doctitle_xform": False,
    "smart_quotes": False, "syntax_highlight": "none", "character_level_inline_markup": False,
}


def _docutils() -> Any:
    try:
        from docutils import nodes
        from docutils.core import publish_doctree
    except ImportError as e:
        raise StageError("markup_extract needs docutils for reStructuredText: "
                         "pip install 'recipe-engine[curation]'") from e
    return nodes, publish_doctree


_ROLE_TEXT = re.compile(r"`([^`]*)`")


def _rst_text(text: str, keep_code: bool, keep_tables: bool) -> str:
    nodes, publish_doctree = _docutils()
    settings = {**_DOCUTILS_SETTINGS, "warning_stream": io.StringIO()}
    doctree = publish_doctree(text, settings_overrides=settings)
    drop = (nodes.system_message, nodes.comment, nodes.substitution_definition, nodes.image,
            nodes.raw, nodes.target, nodes.footnote_reference, nodes.citation_reference,
            nodes.figure, nodes.label, nodes.Invisible)
    code = (nodes.literal_block, nodes.doctest_block)

    def inline(node: Any) -> str:
        if isinstance(node, nodes.Text):
            return str(node)
        if isinstance(node, drop):
            return ""
        if isinstance(node, nodes.problematic):  # an unknown role: :class:`Foo` -> Foo
            m = _ROLE_TEXT.search(node.astext())
            return m.group(1) if m else node.astext()
        return "".join(inline(c) for c in node.children)

    blocks = _Blocks()

    def walk(node: Any, group: object = None) -> None:
        if isinstance(node, drop):
            return
        if isinstance(node, code):
            if keep_code:
                blocks.add(node.astext())
            return
        if isinstance(node, (nodes.bullet_list, nodes.enumerated_list)):
            ordered = isinstance(node, nodes.enumerated_list)
            start = int(node.get("start", 1))
            group = group or object()  # nested lists join the outer one
            for n, item in enumerate(node.children):
                marker = f"{start + n}. " if ordered else "- "
                walk_item(item, marker, group)
            return
        if isinstance(node, nodes.table):
            if keep_tables:
                rows = object()
                for row in node.findall(nodes.row):
                    cells = [_one_line(inline(entry)) for entry in row.children]
                    blocks.add("\t".join(cells), rows)
            return
        if isinstance(node, nodes.line_block):
            blocks.add("\n".join(inline(line).strip() for line in node.findall(nodes.line)),
                       group)
            return
        if isinstance(node, (nodes.field_list, nodes.docinfo)):
            fields = group or object()
            for f in node.children:
                if isinstance(f, nodes.field) and len(f) == 2:
                    name, body = _one_line(inline(f[0])), _one_line(inline(f[1]))
                else:  # a docinfo element: <author>Me</author>
                    name, body = f.tagname.capitalize(), _one_line(inline(f))
                blocks.add(f"{name}: {body}".strip(": "), fields)
            return
        if isinstance(node, nodes.TextElement):
            blocks.add(_one_line(inline(node)), group)
            return
        for child in node.children:
            walk(child, group)

    def walk_item(item: Any, marker: str, group: object) -> None:
        first = True
        for child in item.children:
            if first and isinstance(child, nodes.paragraph):
                blocks.add(marker + _one_line(inline(child)), group)
                first = False
            else:
                walk(child, group)

    walk(doctree)
    return blocks.text()


COMPONENTS: list[type] = [PackageDocsSource, MarkupExtract]
