"""The sources beside files_source (parquet, html, warc, hf), html_extract, and bad input.

Every bad input of the curation issue is here, each skipped or dropped and counted by reason:
malformed JSON lines, invalid UTF-8, empty documents, a 50 MB document, missing text fields,
binary files, truncated .gz/.zst, corrupt Parquet, a WARC with a broken record, and
zstd/gzip bombs. Test WARCs are written with warcio's WARCWriter, Parquet with pyarrow.
"""
from __future__ import annotations

import datetime
import gzip
import io
import json
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from recipe_engine import Artifact, RecipeError, StageError
from recipe_engine.artifacts import iter_documents, list_parts, read_documents, write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data import FilesSource
from recipe_engine_plugins.data.extract import HtmlExtract, extract_text
from recipe_engine_plugins.data.source import split_lines
from recipe_engine_plugins.data.sources import HfSource, HtmlSource, ParquetSource, WarcSource

ARTICLE = """<html><head><title>Tide tables</title>
<link rel="canonical" href="https://example.org/tides">
<script>var tracking = "do not keep me";</script><style>p {color: red}</style></head>
<body><nav><a href="/">Home</a> | <a href="/about">About</a> | <a href="/shop">Shop</a></nav>
<article><h1>How tides work</h1>
<p>Tides are the rise and fall of sea levels caused by the combined effects of the
gravitational forces exerted by the Moon and the Sun and the rotation of the Earth.</p>
<p>Most places in the ocean usually experience two high tides and two low tides each day,
a pattern called a semi-diurnal tide, though some places see only one of each.</p>
</article><footer>Copyright 2024 Example Org. All rights reserved.</footer></body></html>"""
NO_TEXT = ("<html><head><title>t</title></head>"
           "<body><script>x()</script><img src=a.png></body></html>")


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def docs_of(art: Artifact) -> list[dict]:
    return list(iter_documents(art.path))


# -- parquet_source -----------------------------------------------------------------------------


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_rows_with_provenance_ids_and_kept_columns(tmp_path):
    root = tmp_path / "pq"
    day = datetime.date(2024, 5, 1)
    write_parquet(root / "a.parquet", {
        "text": [f"document {i}" for i in range(5)],
        "uid": [f"u{i}" for i in range(5)],
        "lang": ["en", "fr", "en", "de", "en"],
        "day": [day] * 5,
        "big": ["x" * 1000] * 5,  # not asked for: never read
    }, row_group_size=2)
    write_parquet(root / "sub" / "b.parquet", {
        "text": ["last one", None, "   ", "y" * 200],
        "uid": ["b0", "b1", "b2", None],
        "lang": ["en"] * 4,
        "day": [day] * 4,
    })
    stage = ParquetSource(root=str(root), keep_columns=["lang", "day"], batch_size=2,
                          docs_per_part=3, max_document_bytes=100)
    art = run_stage(stage, tmp_path / "run", max_skip_fraction=0.5)
    docs = docs_of(art)
    assert [d["text"] for d in docs] == [f"document {i}" for i in range(5)] + ["last one"]
    assert docs[1] == {"id": "pq/a.parquet#1", "text": "document 1", "source": "pq",
                       "path": "a.parquet", "row": 1, "lang": "fr", "day": "2024-05-01"}
    assert docs[-1]["path"] == "sub/b.parquet" and docs[-1]["row"] == 0
    assert [len(list(read_documents(p))) for p in list_parts(art.path)] == [3, 2, 1]
    c = art.manifest["counts"]
    assert (c["skipped.missing_text"], c["dropped.empty"], c["dropped.too_large"]) == (1, 1, 1)
    assert c["records_in"] == 9 and art.manifest["meta"]["num_documents"] == 6

    by_id = ParquetSource(root=str(root), include=["a.parquet"], id_key="uid")
    assert [d["id"] for d in docs_of(run_stage(by_id, tmp_path / "ids"))] == \
        [f"pq/u{i}" for i in range(5)]


def test_parquet_corrupt_file_is_counted_then_fails_past_threshold(tmp_path):
    root = tmp_path / "pq"
    good = write_parquet(root / "good.parquet", {"text": [f"row {i}" for i in range(9)]})
    write(root / "garbage.parquet", b"PAR1 this is not a parquet file PAR1")
    write(root / "truncated.parquet", good.read_bytes()[:-20])  # footer cut off
    stage = ParquetSource(root=str(root))
    with pytest.raises(StageError, match=r"corrupt_parquet in garbage\.parquet, "
                                         r"truncated\.parquet"):
        run_stage(stage, tmp_path / "strict")
    art = run_stage(stage, tmp_path / "lenient", max_skip_fraction=0.5)
    assert art.manifest["counts"]["skipped.corrupt_parquet"] == 2
    assert [d["text"] for d in docs_of(art)] == [f"row {i}" for i in range(9)]


def test_parquet_column_problems(tmp_path):
    import pyarrow as pa

    root = tmp_path / "pq"
    write_parquet(root / "body.parquet", {"body": ["no text column"] * 3})
    write_parquet(root / "ints.parquet", {"text": [1, 2]})
    write_parquet(root / "bytes.parquet", {"text": pa.array([b"caf\xc3\xa9", b"\xff\xfe"],
                                                            type=pa.binary())})
    art = run_stage(ParquetSource(root=str(root)), tmp_path / "run", max_skip_fraction=1.0)
    c = art.manifest["counts"]
    assert (c["skipped.missing_text"], c["skipped.text_not_string"], c["skipped.bad_utf8"]) == \
        (3, 2, 1)
    assert [d["text"] for d in docs_of(art)] == ["café"]
    # a file whose needed columns would inflate past the cap is not read
    with pytest.raises(StageError, match="decompressed_too_large in bytes.parquet"):
        run_stage(ParquetSource(root=str(root), include=["bytes.parquet"],
                                max_decompressed_bytes=4), tmp_path / "cap")
    with pytest.raises(RecipeError, match="keep_columns"):
        ParquetSource(root=str(root), keep_columns=["path"])


# -- html_source and html_extract ---------------------------------------------------------------


def test_extractors():
    text, found = extract_text(ARTICLE)
    assert "semi-diurnal tide" in text and "Moon and the Sun" in text
    assert "Home" not in text and "tracking" not in text and "Copyright" not in text
    assert found["url"] == "https://example.org/tides"
    plain, found = extract_text(ARTICLE, extractor="plain")
    assert plain.startswith("Home | About | Shop\nHow tides work\nTides are the rise")
    assert "tracking" not in plain and "color" not in plain
    assert found == {"title": "Tide tables", "url": "https://example.org/tides"}
    assert extract_text(NO_TEXT)[0] == extract_text(NO_TEXT, extractor="plain")[0] == ""
    assert extract_text("   ", extractor="plain") == ("", {})


def test_html_source_extracts_and_counts(tmp_path):
    root = tmp_path / "site"
    write(root / "tides.html", ARTICLE)
    write(root / "old" / "latin.htm",
          ARTICLE.replace("<head>", '<head><meta charset="iso-8859-1">')
          .replace("Tides are", "Marées are").encode("latin-1"))
    write(root / "script.html", NO_TEXT)
    write(root / "empty.html", "  \n")
    write(root / "bad.html", ARTICLE.encode() + b"\xff\xfe")  # not UTF-8, none declared
    write(root / "image.html", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    write(root / "huge.html", "<p>" + "x" * 5000 + "</p>")
    write(root / "notes.txt", "not matched")
    stage = HtmlSource(root=str(root), max_file_bytes=4000)
    art = run_stage(stage, tmp_path / "run", max_skip_fraction=0.5)
    docs = docs_of(art)
    assert [d["path"] for d in docs] == ["old/latin.htm", "tides.html"]
    assert "Marées are" in docs[0]["text"]
    assert docs[1]["id"] == "site/tides.html" and docs[1]["url"] == "https://example.org/tides"
    assert "semi-diurnal" in docs[1]["text"] and "Home" not in docs[1]["text"]
    c = art.manifest["counts"]
    assert (c["dropped.no_text"], c["dropped.empty"], c["dropped.too_large"]) == (1, 1, 1)
    assert (c["skipped.bad_utf8"], c["skipped.binary"]) == (1, 1)
    plain = run_stage(HtmlSource(root=str(root), include=["tides.html"], extractor="plain"),
                      tmp_path / "plain")
    assert [d["text"].split("\n")[0] for d in docs_of(plain)] == ["Home | About | Shop"]


def test_html_extract_stage(tmp_path):
    tmp_path.joinpath("in").mkdir()
    write_documents(tmp_path / "in" / "part-00000.jsonl.zst", [
        {"id": "a", "text": ARTICLE, "source": "t", "path": None, "url": "https://mine.org/a"},
        {"id": "b", "text": NO_TEXT, "source": "t", "path": None},
        {"id": "c", "text": "<p>A short plain page.</p>", "source": "t", "path": None}])
    inp = Artifact(kind="documents", path=tmp_path / "in", manifest={})
    art = run_stage(HtmlExtract(), tmp_path / "run", inputs={"documents": inp})
    docs = docs_of(art)
    assert [d["id"] for d in docs] == ["a", "c"]
    assert docs[0]["url"] == "https://mine.org/a"  # the document's own url is kept
    assert "semi-diurnal" in docs[0]["text"] and "<p>" not in docs[0]["text"]
    assert art.manifest["counts"]["dropped.no_text"] == 1


# -- warc_source --------------------------------------------------------------------------------


def make_warc(path: Path, pages: list[tuple[str, str, str | bytes]], gz: bool = True) -> Path:
    """A WARC of (url, content type, body) responses (status 404 when the url says so), with
    a request record before each."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gz)
    for url, ctype, body in pages:
        body = body.encode() if isinstance(body, str) else body
        request = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")],
                                   is_http_request=True)
        writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
        status = "404 Not Found" if "missing" in url else "200 OK"
        headers = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                      http_headers=headers))
    return write(path, buf.getvalue())


PAGES = [
    ("https://example.org/tides", "text/html; charset=utf-8", ARTICLE),
    ("https://example.org/logo.png", "image/png", b"\x89PNG\r\n"),
    ("https://example.org/missing", "text/html", ARTICLE),
    ("https://example.org/nav", "text/html", NO_TEXT),
    ("https://example.org/latin", "text/html; charset=ISO-8859-1",
     ARTICLE.replace("Tides are", "Marées are").encode("latin-1")),
]


@pytest.mark.parametrize("gz", [True, False], ids=["warc.gz", "warc"])
def test_warc_source_reads_html_responses_with_provenance(tmp_path, gz):
    from warcio.archiveiterator import ArchiveIterator

    name = "crawl.warc.gz" if gz else "crawl.warc"
    warc = make_warc(tmp_path / "w" / name, PAGES, gz=gz)
    art = run_stage(WarcSource(root=str(tmp_path / "w")), tmp_path / "run")
    docs = docs_of(art)
    assert [d["url"] for d in docs] == ["https://example.org/tides", "https://example.org/latin"]
    assert "Marées are" in docs[1]["text"] and "semi-diurnal" in docs[0]["text"]
    c = art.manifest["counts"]
    assert (c["ignored.not_response"], c["ignored.not_html"], c["ignored.http_status"]) == \
        (5, 1, 1)
    assert c["dropped.no_text"] == 1 and c["records_in"] == 3
    for d in docs:  # offset and record id find the record again
        assert d["id"] == f"w/{name}#{d['offset']}" and d["path"] == name
        with open(warc, "rb") as fh:
            fh.seek(d["offset"])
            record = next(iter(ArchiveIterator(fh)))
            assert record.rec_headers.get_header("WARC-Record-ID") == d["warc_record_id"]


@pytest.mark.parametrize("gz", [True, False], ids=["warc.gz", "warc"])
def test_warc_broken_record_stops_that_file_only(tmp_path, gz):
    suffix = ".warc.gz" if gz else ".warc"
    make_warc(tmp_path / "w" / f"whole{suffix}", PAGES[:1], gz=gz)
    data = make_warc(tmp_path / f"full{suffix}", PAGES[:1] + PAGES[3:5], gz=gz).read_bytes()
    write(tmp_path / "w" / f"cut{suffix}", data[:len(data) - 300])  # inside the last response
    with pytest.raises(StageError, match=rf"bad_warc_record in cut{suffix}@\d+"):
        run_stage(WarcSource(root=str(tmp_path / "w")), tmp_path / "strict")
    art = run_stage(WarcSource(root=str(tmp_path / "w")), tmp_path / "run",
                    max_skip_fraction=0.5)
    assert art.manifest["counts"]["skipped.bad_warc_record"] == 1
    assert [d["path"] for d in docs_of(art)] == [f"cut{suffix}", f"whole{suffix}"]


def test_warc_garbage_and_oversized(tmp_path):
    make_warc(tmp_path / "w" / "ok.warc.gz", PAGES[:1])
    write(tmp_path / "w" / "junk.warc.gz", b"\x1f\x8b\x08\x00 not really gzip at all")
    write(tmp_path / "w" / "text.warc", "hello, I am no WARC\n")
    art = run_stage(WarcSource(root=str(tmp_path / "w")), tmp_path / "run",
                    max_skip_fraction=1.0)
    assert art.manifest["counts"]["skipped.bad_warc_record"] == 2
    assert len(docs_of(art)) == 1
    small = WarcSource(root=str(tmp_path / "w"), include=["ok.warc.gz"], max_document_bytes=100)
    with pytest.raises(StageError, match="no document"):
        run_stage(small, tmp_path / "small")
    capped = WarcSource(root=str(tmp_path / "w"), include=["ok.warc.gz"],
                        max_decompressed_bytes=100)
    with pytest.raises(StageError, match="decompressed_too_large in ok.warc.gz"):
        run_stage(capped, tmp_path / "capped")


# -- hf_source ----------------------------------------------------------------------------------


def test_hf_source_offline_fails_clearly_and_fingerprints_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = HfSource(path="HuggingFaceFW/fineweb", subset="sample-10BT", revision="v1.0")
    assert hub.fingerprint_extra() is None  # the params are the fingerprint; nothing fetched
    assert hub.params()["revision"] == "v1.0" and hub.params()["subset"] == "sample-10BT"
    with pytest.raises(StageError, match="HF_DATASETS_OFFLINE=1 forbids network"):
        run_stage(hub, tmp_path / "run")
    data = write(tmp_path / "d.jsonl", '{"text": "a"}\n')
    local = HfSource(path="json", data_files=[str(data)])
    before = local.fingerprint_extra()
    write(data, '{"text": "b"}\n{"text": "c"}\n')
    assert local.fingerprint_extra() != before
    with pytest.raises(RecipeError, match="keep_columns"):
        HfSource(path="json", keep_columns=["row"])


@pytest.mark.slow  # importing datasets takes seconds
def test_hf_source_streams_a_local_dataset(tmp_path):
    lines = [{"text": f"doc {i}", "meta": {"n": i}} for i in range(7)]
    lines[2] = {"body": "no text"}
    lines[4] = {"text": ""}
    write(tmp_path / "data" / "train.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    stage = HfSource(path="json", data_files=[str(tmp_path / "data" / "*.jsonl")],
                     keep_columns=["meta"], source_name="local", docs_per_part=2)
    art = run_stage(stage, tmp_path / "run", max_skip_fraction=0.5)
    docs = docs_of(art)
    assert [d["text"] for d in docs] == ["doc 0", "doc 1", "doc 3", "doc 5", "doc 6"]
    assert docs[2] == {"id": "local/train#3", "text": "doc 3", "source": "local",
                       "path": "json:train", "row": 3, "meta": {"n": 3}}
    c = art.manifest["counts"]
    assert (c["skipped.missing_text"], c["dropped.empty"]) == (1, 1)
    first = run_stage(HfSource(path="json", data_files=[str(tmp_path / "data" / "*.jsonl")],
                               max_documents=2), tmp_path / "two")
    assert [d["text"] for d in docs_of(first)] == ["doc 0", "doc 1"]
    with pytest.raises(StageError, match="cannot open dataset"):
        run_stage(HfSource(path="json", data_files=[str(tmp_path / "none.jsonl")]),
                  tmp_path / "missing")


# -- files_source: bad input and bounded memory -------------------------------------------------


def test_files_source_counts_every_bad_input(tmp_path):
    root = tmp_path / "bad"
    write(root / "good.py", "x = 1\n")
    write(root / "blob.py", b"\x00\x01\x02ELF" + bytes(range(256)) * 4)  # binary
    write(root / "latin.py", "name = 'caf\xe9'\n".encode("latin-1"))  # invalid UTF-8
    write(root / "empty.py", "\n\n")
    recs = "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20))
    write(root / "recs.jsonl", (recs + '{"text": "half\n{"body": "no text"}\n{"text": "  "}\n')
          .encode() + b'{"text": "bad \xff"}\n')
    write(root / "cut.jsonl.gz", gzip.compress(recs.encode())[:-30])  # truncated gzip
    whole = zstandard.ZstdCompressor().compress(recs.encode())
    write(root / "cut.jsonl.zst", whole[:-10])  # truncated zstd
    with open(root / "big.py", "wb") as f:  # a 50 MB document: dropped from its size, unread
        f.truncate(50_000_000)
    art = run_stage(FilesSource(root=str(root), include=["*.py", "*.jsonl*"]),
                    tmp_path / "run", max_skip_fraction=0.5)
    c = art.manifest["counts"]
    assert (c["skipped.binary"], c["skipped.bad_utf8"], c["dropped.empty"]) == (1, 2, 2)
    assert (c["skipped.bad_json"], c["skipped.missing_text"]) == (1, 1)
    assert (c["skipped.corrupt_file"], c["dropped.too_large"]) == (2, 1)
    texts = [d["text"] for d in docs_of(art)]
    assert texts.count("record 0") == 1 and "x = 1\n" in texts


def test_jsonl_long_line_is_dropped_in_bounded_memory(tmp_path):
    root = tmp_path / "long"
    with open(write(root / "a.jsonl", ""), "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        block = b"y" * (1 << 20)
        for _ in range(50):  # one 50 MB line
            f.write(block)
        f.write(b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    try:
        art = run_stage(FilesSource(root=str(root), include=["*.jsonl"],
                                    max_file_bytes=1_000_000), tmp_path / "run")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d["text"] for d in docs_of(art)] == ["before", "after"]
    assert art.manifest["counts"]["dropped.too_large"] == 1
    assert peak < 20_000_000, f"held {peak / 1e6:.0f} MB for a 50 MB line"
    assert list(split_lines(iter([b"ab", b"c\nde", b"f" * 10, b"\n", b"g"]), 5)) == \
        [b"abc", None, b"g"]


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_decompression_bomb_is_capped(tmp_path, suffix):
    line = (json.dumps({"text": "z" * 900}) + "\n").encode()
    raw = line * 30_000  # 27 MB decompressed, a few dozen KB compressed
    packed = zstandard.ZstdCompressor(level=3).compress(raw) if suffix.endswith("zst") \
        else gzip.compress(raw, compresslevel=1)
    root = tmp_path / "bomb"
    write(root / f"bomb{suffix}", packed)
    write(root / "fine.jsonl", line * 3)
    stage = FilesSource(root=str(root), include=["*.jsonl*"], max_decompressed_bytes=2_000_000)
    art = run_stage(stage, tmp_path / "run", max_skip_fraction=0.5)
    c = art.manifest["counts"]
    assert c["skipped.decompressed_too_large"] == 1
    assert 3 <= c["documents_out"] <= 3 + 2_000_000 // len(line)  # records before the cap


def test_new_stages_are_registered():
    from recipe_engine.plugins import PluginManager

    reg = PluginManager().registry
    for name in ("parquet_source", "html_source", "warc_source", "hf_source", "html_extract"):
        assert reg.find("stage", name) is not None, name
