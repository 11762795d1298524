"""package_docs_source on hand-made site-packages directories, and markup_extract on
hand-made Markdown, reStructuredText and HTML: what is kept, what is removed, what is counted."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recipe_engine import Artifact, StageError
from recipe_engine.artifacts import iter_documents, write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data.package_docs import (MarkupExtract, PackageDocsSource,
                                                     markup_to_text, sniff_format)

MARKDOWN = """# Tidewater ![build](https://ci.example.org/badge.svg)

[![PyPI](https://img.shields.io/pypi/v/tidewater.svg)](https://pypi.org/project/tidewater)

Tidewater predicts the *height* of the tide in a harbour from a [table of constants](https://example.org/constants), using `harmonic` analysis.
It works offline.

<p align="center"><img src="logo.png" alt="logo"></p>
<div>Made with <b>care</b> by sailors.</div>

```python
import tidewater
tidewater.predict("Brest")
```

    $ pip install tidewater

- fast
- accurate
  1. nested item

| harbour | range |
|---------|-------|
| Brest   | 7 m   |

> Quoted wisdom about the sea.
"""

RST = """Tidewater
=========

.. image:: https://img.shields.io/pypi/v/tidewater.svg
   :target: https://pypi.org/project/tidewater

|badge| Tidewater predicts the *height* of the tide with a `table of constants
<https://example.org/constants>`_, ``harmonic`` analysis and :class:`Predictor`.

.. |badge| image:: https://ci.example.org/badge.svg

.. toctree::
   :maxdepth: 2

   intro

.. include:: {secret}

.. raw:: html

   <b>raw markup</b>

.. raw:: html
   :file: {secret}

Usage::

    tidewater.predict("Brest")

>>> 1 + 1
2

* fast
* accurate

.. code-block:: python

   x = 1

.. note:: Tables are approximate.

.. Comment that nobody reads.

=======  =====
harbour  range
=======  =====
Brest    7 m
=======  =====

See the footnote [1]_.

.. [1] Published by the harbour office.
"""

HTML = """<html><head><title>T</title><script>alert('x')</script></head><body>
<h1>Tidewater</h1><p>Tidewater predicts the <a href="https://example.org">tide</a>.</p>
<style>p {color: red}</style></body></html>"""

LONG = " It is used by harbour masters, sailors and fishermen along the whole coast." * 4


def metadata(name: str, version: str, body: str = "", content_type: str | None = None,
             description_header: str | None = None, extra: str = "") -> str:
    head = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: s\n"
    if content_type:
        head += f"Description-Content-Type: {content_type}\n"
    if description_header is not None:  # old style: the text in a folded header
        head += "Description: " + description_header.replace("\n", "\n        ") + "\n"
    return head + extra + ("\n" + body if body else "")


def dist(site: Path, dirname: str, content: str | bytes, file: str = "METADATA") -> Path:
    d = site / dirname
    d.mkdir(parents=True, exist_ok=True)
    path = d / file
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.fixture
def sites(tmp_path):
    """Two site directories: a bit of everything, and a duplicate of one distribution."""
    site, other = tmp_path / "site-packages", tmp_path / "other"
    dist(site, "tidewater-1.2.dist-info", metadata("Tidewater", "1.2", MARKDOWN + LONG,
                                                   "text/markdown; charset=UTF-8"))
    dist(site, "harbour_tools-0.3.dist-info",
         metadata("harbour_tools", "0.3", description_header=RST.format(secret="x") + LONG))
    dist(site, "webby-2.0.dist-info", metadata("webby", "2.0", HTML + LONG, "text/html"))
    dist(site, "plain_pkg-1.0.dist-info", metadata("plain-pkg", "1.0", "Just words." + LONG))
    dist(site, "nodesc-1.0.dist-info", metadata("nodesc", "1.0"))
    dist(site, "unknown-1.0.dist-info", metadata("unknown", "1.0", description_header="UNKNOWN"))
    dist(site, "short-1.0.dist-info", metadata("short", "1.0", "Too short."))
    dist(site, "broken-1.0.dist-info", b"Name: broken\nVersion: 1\n\n\xff\xfe not utf-8")
    dist(site, "nameless-1.0.dist-info", "Metadata-Version: 2.1\nVersion: 1.0\n\nText" + LONG)
    (site / "empty-1.0.dist-info").mkdir()  # no METADATA at all
    dist(site, "old_egg-0.1.egg-info", metadata("old-egg", "0.1", "An egg." + LONG), "PKG-INFO")
    (site / "not_metadata.py").write_text("x = 1\n")
    dist(other, "tidewater-1.2.dist-info", metadata("Tidewater", "1.2", "A shadowed copy." + LONG))
    dist(other, "tidewater-0.9.dist-info", metadata("tidewater", "0.9", "An older one." + LONG))
    return [str(site), str(other)]


def docs_of(art: Artifact) -> list[dict]:
    return list(iter_documents(art.path))


def source(sites, **kw) -> PackageDocsSource:
    return PackageDocsSource(paths=sites, min_chars=100, **kw)


def test_one_document_per_distribution_with_provenance(tmp_path, sites):
    art = run_stage(source(sites), tmp_path / "run", max_skip_fraction=0.5)
    docs = docs_of(art)
    assert [d["id"] for d in docs] == [
        "python-packages/harbour_tools==0.3", "python-packages/old-egg==0.1",
        "python-packages/plain-pkg==1.0", "python-packages/tidewater==0.9",
        "python-packages/Tidewater==1.2", "python-packages/webby==2.0"]  # by normalised name
    by = {d["distribution"]: d for d in docs}
    md = by["Tidewater"]
    assert md["path"] == "tidewater-1.2.dist-info/METADATA" and md["version"] == "1.2"
    assert md["format"] == "markdown" and md["content_type"] == "text/markdown; charset=UTF-8"
    assert md["source"] == "python-packages" and md["text"].startswith("# Tidewater")
    assert "shadowed" not in md["text"]  # the first on the path wins
    rst = by["harbour_tools"]
    assert rst["format"] == "rst" and rst["content_type"] == ""  # sniffed
    assert "\nTidewater\n=========\n" in "\n" + rst["text"]  # continuation indent removed
    assert "\n    tidewater.predict" in rst["text"]  # the literal block's own indent kept
    assert by["webby"]["format"] == "html" and by["plain-pkg"]["format"] == "plain"
    assert by["old-egg"]["path"] == "old_egg-0.1.egg-info/PKG-INFO"
    counts = art.manifest["counts"]
    assert counts["records_in"] == 13 and counts["documents_out"] == 6
    assert counts["skipped.duplicate"] == 1 and counts["skipped.bad_utf8"] == 1
    assert counts["skipped.bad_metadata"] == 1 and counts["skipped.unreadable"] == 1
    assert counts["dropped.no_description"] == 2 and counts["dropped.too_short"] == 1
    assert art.manifest["meta"]["formats"] == {"html": 1, "markdown": 1, "plain": 3, "rst": 1}


def test_include_exclude_and_limits(tmp_path, sites):
    art = run_stage(source(sites, include=["tide*", "Harbour_*", "plain*"],
                           exclude=["tidewater"], max_document_bytes=1000), tmp_path / "run",
                    max_skip_fraction=0.9)
    assert [d["distribution"] for d in docs_of(art)] == ["plain-pkg"]
    counts = art.manifest["counts"]
    # the three tidewaters and five others are left out, names normalised on both sides;
    # harbour_tools's description is over 1000 bytes
    assert counts["ignored.excluded"] == 8 and counts["dropped.too_large"] == 1


def test_no_document_fails_naming_counts(tmp_path, sites):
    with pytest.raises(StageError, match="none of the .* distributions"):
        run_stage(source(sites, include=["nodesc", "short"]), tmp_path / "run",
                  max_skip_fraction=0.9)


def test_a_flood_of_broken_metadata_fails_naming_the_files(tmp_path):
    site = tmp_path / "site"
    dist(site, "good-1.0.dist-info", metadata("good", "1.0", "Good." + LONG))
    for i in range(3):
        dist(site, f"bad{i}-1.0.dist-info", b"Name: bad\n\n\xff")
    with pytest.raises(StageError, match=r"bad_utf8 in .*bad0-1\.0\.dist-info"):
        run_stage(source([str(site)]), tmp_path / "run")


def test_fingerprint_follows_installed_packages_not_their_location(tmp_path, sites):
    before = source(sites).fingerprint_extra()
    assert source(sites).fingerprint_extra() == before
    copies = [str(tmp_path / "copy" / Path(s).name) for s in sites]
    for s, c in zip(sites, copies):
        shutil.copytree(s, c)
    assert source(copies).fingerprint_extra() == before  # same packages elsewhere
    dist(Path(copies[0]), "newpkg-1.0.dist-info", metadata("newpkg", "1.0", "New." + LONG))
    installed = source(copies).fingerprint_extra()
    assert installed != before
    dist(Path(copies[0]), "newpkg-1.0.dist-info", metadata("newpkg", "1.0", "Newer." + LONG))
    assert source(copies).fingerprint_extra() not in (before, installed)


def test_default_path_is_sys_path_without_the_current_directory(monkeypatch, tmp_path, sites):
    monkeypatch.chdir(sites[0])
    monkeypatch.setattr("sys.path", ["", sites[0], sites[1], sites[1], "/no/such/dir"])
    stage = PackageDocsSource(min_chars=100)
    assert stage.search_path() == [sites[1], "/no/such/dir"]
    docs = docs_of(run_stage(stage, tmp_path / "run"))
    assert [d["id"] for d in docs] == ["python-packages/tidewater==0.9",
                                       "python-packages/Tidewater==1.2"]
    assert "shadowed" in docs[1]["text"]


# -- markup to text -----------------------------------------------------------------------------


def test_markdown_keeps_prose_and_drops_markup():
    text = markup_to_text(MARKDOWN, "markdown")
    assert text.startswith("Tidewater\n\nTidewater predicts the height of the tide")
    assert "a table of constants, using harmonic analysis. It works offline." in text
    assert "Made with care by sailors." in text  # the text of an HTML block
    assert "- fast\n- accurate\n  1. nested item" in text
    assert "harbour\trange\nBrest\t7 m" in text  # a table row per line, no pipes
    assert "Quoted wisdom about the sea." in text
    for gone in ("![", "](", "https://", "shields", "<", ">", "*height*", "`", "import",
                 "pip install", "logo", "#", "|"):
        assert gone not in text, gone
    kept = markup_to_text(MARKDOWN, "markdown", keep_code_blocks=True, keep_tables=False)
    assert 'tidewater.predict("Brest")' in kept and "$ pip install tidewater" in kept
    assert "Brest\t7 m" not in kept


def test_rst_keeps_prose_and_reads_no_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET CONTENT")
    text = markup_to_text(RST.format(secret=secret), "rst")
    assert text.startswith("Tidewater\n\nTidewater predicts the height of the tide with a "
                           "table of constants, harmonic analysis and Predictor.")
    assert "- fast\n- accurate" in text
    assert "harbour\trange\nBrest\t7 m" in text
    assert "Tables are approximate." in text  # admonitions are prose
    assert "See the footnote ." in text and "Published by the harbour office." in text
    for gone in ("TOP SECRET", "raw markup", "toctree", "maxdepth", "intro", "shields",
                 "https://", "predict(", ">>>", "x = 1", "Comment", "|badge|", ":class:",
                 "``", "`", "[1]", "::"):
        assert gone not in text, gone
    assert "Usage:" in text  # the paragraph before a literal block keeps one colon
    assert 'tidewater.predict("Brest")' in markup_to_text(RST.format(secret=secret), "rst",
                                                         keep_code_blocks=True)


def test_html_and_plain():
    text = markup_to_text(HTML, "html")
    assert "Tidewater" in text and "predicts the tide." in text
    assert "alert" not in text and "color" not in text and "<" not in text
    assert markup_to_text("  line one   \n\n\n\nline two\n", "plain") == "line one\n\nline two"


@pytest.mark.parametrize("text,fmt", [
    (MARKDOWN, "markdown"), (RST.format(secret="x"), "rst"), (HTML, "html"),
    ("Title\n=====\n\nSome text.", "rst"), ("Just a sentence.\nAnd another.", "plain"),
    ("## Usage\n\nSee [docs](https://x.org).", "markdown")])
def test_sniff_format(text, fmt):
    assert sniff_format(text) == fmt


def test_markup_extract_stage(tmp_path):
    (tmp_path / "in").mkdir()
    write_documents(tmp_path / "in" / "part-00000.jsonl.zst", [
        {"id": "md", "text": MARKDOWN, "source": "t", "path": None, "format": "markdown"},
        {"id": "rst", "text": RST.format(secret="x"), "source": "t", "path": None,
         "format": "rst"},
        {"id": "html", "text": HTML, "source": "t", "path": None, "format": "html"},
        {"id": "sniffed", "text": "Plain\n=====\n\nA paragraph.", "source": "t", "path": None},
        {"id": "empty", "text": "![only](badge.svg) <img src=x.png>", "source": "t", "path": None,
         "format": "markdown"},
        {"id": "no_text", "source": "t", "path": None, "format": "markdown"}])
    inp = Artifact(kind="documents", path=tmp_path / "in", manifest={})
    art = run_stage(MarkupExtract(), tmp_path / "run", inputs={"documents": inp},
                    max_skip_fraction=0.5)
    docs = {d["id"]: d for d in docs_of(art)}
    assert sorted(docs) == ["html", "md", "rst", "sniffed"]
    assert docs["sniffed"]["text"] == "Plain\n\nA paragraph."
    assert docs["md"]["format"] == "markdown" and "![" not in docs["md"]["text"]
    counts = art.manifest["counts"]
    assert counts["format.markdown"] == 2 and counts["format.rst"] == 2
    assert counts["format.html"] == 1 and counts["dropped.no_text"] == 1
    assert counts["skipped.missing_text"] == 1
    assert counts["documents_in"] == 6 and counts["documents_out"] == 4
    assert 0 < art.manifest["metrics"]["bytes_kept_fraction"] < 1
