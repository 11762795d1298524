"""HTML to text: the ``html_extract`` stage, and the extraction the HTML and WARC sources share.

Two extractors, chosen by the ``extractor`` parameter:

* ``trafilatura`` (default): trafilatura's main-content extraction. Navigation, headers,
  footers, boilerplate, scripts, styles and comments are removed; ``include_tables`` keeps
  table text (rows as ``| a | b |``), ``favor_precision`` drops more borderline text (as
  FineWeb's pipeline does). Title and canonical URL come from the page's metadata. A
  fragment without ``<html>``/``<body>`` (a forum post body) is wrapped in one first.
* ``plain``: the page's whole visible text with lxml, for pages where trafilatura keeps too
  little (short pages, listings, documentation): ``<script>``, ``<style>``, ``<noscript>``,
  ``<template>``, ``<svg>`` and the ``<head>`` removed, a line break after every block
  element, runs of spaces collapsed, blank lines dropped. Navigation stays.

Both are deterministic functions of the HTML and the parameters. A page that yields no text
is dropped (``dropped.no_text``). trafilatura and lxml are imported on first use.

Bytes to text (``decode_html``): a byte-order mark, else the charset the HTTP header
declares, else a ``<meta charset>`` in the first 4 KB, else UTF-8; decoding is strict, so a
page that does not decode is skipped (``skipped.bad_utf8``, or ``skipped.bad_encoding`` for
other charsets) rather than kept with replacement characters.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from recipe_engine import Stage, StageContext, StageError
from recipe_engine.artifacts import read_documents, write_documents

from ._parts import run_part_stage

Extractor = Literal["trafilatura", "plain"]
EXTRACTORS = ("trafilatura", "plain")


@dataclass(kw_only=True)
class HtmlExtract(Stage,
                  name="html_extract",
                  description="replace HTML documents' text with the text an extractor finds",
                  inputs={"documents": "documents"},
                  output="documents"):
    """Extract the text of documents whose ``text`` is HTML (trafilatura or plain lxml)."""

    extractor: Extractor = "trafilatura"
    include_tables: bool = True  # trafilatura: keep the text of tables
    favor_precision: bool = True  # trafilatura: drop borderline text (FineWeb's setting)

    def run(self, ctx: StageContext) -> None:
        totals = run_part_stage(ctx, extract_part, extract_options(self), label="extract")
        docs_in, docs_out = totals["documents_in"], totals["documents_out"]
        if docs_in and not docs_out:
            raise StageError(f"html_extract: the {self.extractor} extractor found no text in "
                             f"any of the {docs_in} documents ({dict(ctx.counts)}); are they "
                             f"HTML? extractor: plain keeps more")


def extract_options(component: Any) -> dict[str, Any]:
    """The extraction parameters of a component, as the workers take them."""
    return {"extractor": component.extractor, "include_tables": component.include_tables,
            "favor_precision": component.favor_precision}


def extract_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: extract the text of one part's documents into the scratch directory."""
    counts: dict[str, int] = {}
    totals = {"in": 0, "out": 0, "bytes": 0}

    def bump(k: str) -> None:
        counts[k] = counts.get(k, 0) + 1

    def extracted() -> Iterator[dict[str, Any]]:
        for doc in read_documents(Path(task["part"])):
            totals["in"] += 1
            if not isinstance(doc.get("text"), str):
                bump("skipped.missing_text")
                continue
            url = doc.get("url") if isinstance(doc.get("url"), str) else None
            text, found = extract_text(doc["text"], url=url, **task["options"])
            if not text:
                bump("dropped.no_text")
                continue
            out = {**doc, "text": text}
            for k, v in found.items():  # the document's own url/title win
                out.setdefault(k, v)
            totals["out"] += 1
            totals["bytes"] += len(text.encode("utf-8", "surrogatepass"))
            yield out

    work = Path(task["work"])
    (work / "extract").mkdir(parents=True, exist_ok=True)
    files = [f"extract/{task['key']}.jsonl.zst"]
    write_documents(work / files[0], extracted())
    return {"files": files, "documents_in": totals["in"], "documents_out": totals["out"],
            "bytes": totals["bytes"], "counts": counts}


# -- extraction ---------------------------------------------------------------------------------


def extract_text(html: str, *, extractor: str = "trafilatura", include_tables: bool = True,
                 favor_precision: bool = True, url: str | None = None
                 ) -> tuple[str, dict[str, str]]:
    """The text of an HTML page ("" when none) and the ``title``/``url`` found in it."""
    if not html.strip():
        return "", {}
    if extractor == "plain":
        return _plain(html)
    if extractor != "trafilatura":
        raise ValueError(f"unknown extractor {extractor!r}; one of {EXTRACTORS}")
    return _trafilatura(html, include_tables, favor_precision, url)


def _trafilatura(html: str, include_tables: bool, favor_precision: bool,
                 url: str | None) -> tuple[str, dict[str, str]]:
    import trafilatura

    def run(page: str) -> Any:
        try:
            return trafilatura.bare_extraction(
                page, url=url, include_comments=False, include_tables=include_tables,
                favor_precision=favor_precision, with_metadata=True, deduplicate=False)
        except (ValueError, TypeError, RecursionError):  # a tree lxml cannot build
            return None

    doc = run(html)
    if doc is None and not _DOCUMENT_TAG.search(html):  # a fragment: trafilatura wants a page
        doc = run(f"<html><body>{html}</body></html>")
    if doc is None:
        return "", {}
    text = (getattr(doc, "text", None) or "").strip()
    found = {k: v.strip() for k in ("title", "url")
             if isinstance(v := getattr(doc, k, None), str) and v.strip()}
    return text, found


_DOCUMENT_TAG = re.compile(r"<(?:html|body)[\s>]", re.I)
DROP_TAGS = ("script", "style", "noscript", "template", "svg", "head", "iframe", "object")
BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd details div dl dt fieldset figcaption figure "
    "footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary table tr "
    "ul".split())
CELL_TAGS = frozenset(("td", "th"))


def _plain(html: str) -> tuple[str, dict[str, str]]:
    from lxml import etree
    from lxml import html as lxml_html

    try:  # bytes, so an <?xml encoding=...?> declaration cannot refuse a str
        root = lxml_html.document_fromstring(
            html.encode("utf-8", "surrogatepass"),
            parser=lxml_html.HTMLParser(encoding="utf-8", remove_comments=True))
    except (etree.ParserError, ValueError):
        return "", {}
    found = {}
    title = root.findtext(".//title")
    if title and title.strip():
        found["title"] = " ".join(title.split())
    canonical = root.xpath("//link[@rel='canonical']/@href")
    if canonical and str(canonical[0]).strip():
        found["url"] = str(canonical[0]).strip()
    for el in list(root.iter(*DROP_TAGS)):
        if el.getparent() is not None:
            el.drop_tree()
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        if el.tag in BLOCK_TAGS:
            el.text = "\n" + (el.text or "")
            el.tail = "\n" + (el.tail or "")
        elif el.tag in CELL_TAGS:
            el.tail = " " + (el.tail or "")
    return _tidy(root.text_content()), found


def _tidy(text: str) -> str:
    """Spaces collapsed within each line, blank lines dropped, the ends stripped."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


# -- bytes to text ------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]{1,40})""",
                           re.I)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def has_bom(raw: bytes) -> bool:
    return raw.startswith(tuple(b for b, _ in _BOMS))


def html_encoding(raw: bytes, declared: str | None = None) -> str:
    """The codec to decode an HTML page with: its byte-order mark, the declared (HTTP)
    charset, a ``<meta charset>`` near the top, or UTF-8."""
    for bom, name in _BOMS:
        if raw.startswith(bom):
            return name
    m = _META_CHARSET.search(raw[:4096])
    for name in (declared, m.group(1).decode("ascii") if m else None):
        if name:
            try:
                codec = codecs.lookup(name.strip()).name
            except LookupError:
                continue
            # a page that says utf-16 in a <meta> yet reached us as ASCII-compatible bytes lies
            return "utf-8" if codec.startswith("utf-16") or codec.startswith("utf-32") else codec
    return "utf-8"


def decode_html(raw: bytes, declared: str | None = None) -> tuple[str | None, str]:
    """``(text, codec)``: the page decoded strictly, or ``(None, codec)`` when it does not
    decode with the codec its marks and declarations name."""
    codec = html_encoding(raw, declared)
    try:
        return raw.decode(codec), codec
    except (UnicodeDecodeError, LookupError):
        return None, codec


def decode_failure(codec: str) -> str:
    """The skip reason for a page that did not decode with ``codec``."""
    return "bad_utf8" if codec.replace("_", "-").startswith("utf-8") else "bad_encoding"


COMPONENTS: list[type] = [HtmlExtract]
