"""The built-in data components: files_source, filter (+ length, code_quality), exact_dedup."""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import zstandard

from recipe_engine import Artifact, DocumentFilter, RecipeError, StageError
from recipe_engine.artifacts import iter_documents, list_parts, part_name, read_documents, write_documents
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data import (CodeQualityFilter, ExactDedup, FilesSource, FilterStage,
                                        LengthFilter)
from recipe_engine_plugins.data.source import list_files


@pytest.fixture(scope="module")
def pm():
    return PluginManager()


@pytest.fixture(scope="module")
def local(pm):
    return pm.registry.build("executor", {"name": "local", "num_workers": 2})


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def documents(tmp: Path, parts: list[list[str]]) -> Artifact:
    """A documents artifact with the given texts, one list per part."""
    tmp.mkdir(parents=True, exist_ok=True)
    for i, texts in enumerate(parts):
        write_documents(tmp / f"part-{i:05d}.jsonl.zst", [
            {"id": f"d{i}-{j}", "text": t, "source": "t", "path": None}
            for j, t in enumerate(texts)])
    return Artifact(kind="documents", path=tmp, manifest={})


def texts(artifact: Artifact) -> list[str]:
    return [d["text"] for d in iter_documents(artifact.path)]


CODE = "def f(x):\n    return x + 1\n"


def make_tree(root: Path) -> Path:
    write(root / "a.py", CODE)
    write(root / "pkg" / "b.py", "import os\nprint(os.getcwd())\n")
    write(root / "pkg" / "__init__.py", "")  # empty: dropped, not malformed
    write(root / "pkg" / "bad.py", b"x = '\xff\xfe'\n")  # not UTF-8
    write(root / "pkg" / "tests" / "test_b.py", "assert True\n")  # excluded
    write(root / "notes.txt", "not matched\n")
    lines = [json.dumps({"text": "first record", "lang": "en"}), "",
             "{not json", json.dumps({"body": "no text key"}),
             json.dumps({"text": "second record"})]
    write(root / "data" / "recs.jsonl", "\n".join(lines) + "\n")
    return root


def test_source_reads_files_and_jsonl_and_counts_bad_input(tmp_path):
    root = make_tree(tmp_path / "corpus")
    stage = FilesSource(root=str(root), include=["**/*.py", "**/*.jsonl"], exclude=["**/tests/**"])
    art = run_stage(stage, tmp_path / "run", max_skip_fraction=0.5)
    docs = list(iter_documents(art.path))
    assert [d["path"] for d in docs] == ["a.py", "data/recs.jsonl", "data/recs.jsonl", "pkg/b.py"]
    assert [d["id"] for d in docs] == ["corpus/a.py", "corpus/data/recs.jsonl#1",
                                       "corpus/data/recs.jsonl#5", "corpus/pkg/b.py"]
    assert docs[0] == {"id": "corpus/a.py", "text": CODE, "source": "corpus", "path": "a.py"}
    assert docs[1]["lang"] == "en"  # other JSONL fields are carried along
    counts = art.manifest["counts"]
    assert counts["skipped.bad_utf8"] == 1
    assert counts["skipped.bad_json"] == 1
    assert counts["skipped.missing_text"] == 1
    assert counts["dropped.empty"] == 1
    assert counts["documents_out"] == 4
    meta = art.manifest["meta"]
    assert meta["num_documents"] == 4
    assert meta["num_bytes"] == sum(len(d["text"].encode()) for d in docs)
    # stable: a second run gives the same documents in the same order
    again = run_stage(FilesSource(root=str(root), include=["**/*.py", "**/*.jsonl"],
                                  exclude=["**/tests/**"]), tmp_path / "again",
                      max_skip_fraction=0.5)
    assert list(iter_documents(again.path)) == docs


def test_source_fails_clearly(tmp_path):
    root = make_tree(tmp_path / "corpus")
    with pytest.raises(StageError, match="malformed"):  # 3 of 8 records bad > 5%
        run_stage(FilesSource(root=str(root), include=["**/*.py", "**/*.jsonl"]), tmp_path / "a")
    missing = FilesSource(root=str(tmp_path / "nope"))
    with pytest.raises(StageError, match="not a directory"):
        run_stage(missing, tmp_path / "b")
    assert missing.fingerprint_extra().startswith("unlisted")  # plan still works
    with pytest.raises(StageError, match="no file"):
        run_stage(FilesSource(root=str(root), include=["**/*.rs"]), tmp_path / "c")


def test_source_parts_compressed_jsonl_and_text_key(tmp_path):
    root = tmp_path / "src"
    for i in range(5):
        write(root / f"f{i}.py", f"x = {i}\n")
    recs = "".join(json.dumps({"content": f"doc {i}", "id": "theirs"}) + "\n" for i in range(3))
    zc = zstandard.ZstdCompressor()  # two frames, cut inside a record
    write(root / "shard.jsonl.zst",
          zc.compress(recs[:30].encode()) + zc.compress(recs[30:].encode()))
    stage = FilesSource(root=str(root), include=["*.py", "*.jsonl.zst"], text_key="content",
                        source_name="s", docs_per_part=2)
    art = run_stage(stage, tmp_path / "run")
    assert [len(list(read_documents(p))) for p in list_parts(art.path)] == [2, 2, 1, 2, 1]
    docs = list(iter_documents(art.path))
    assert [d["id"] for d in docs][-3:] == ["s/shard.jsonl.zst#1", "s/shard.jsonl.zst#2",
                                            "s/shard.jsonl.zst#3"]
    assert len({d["id"] for d in docs}) == 8
    # format: jsonl reads any file line by line; format: text reads a .jsonl whole
    write(root / "recs.txt", recs)
    art = run_stage(FilesSource(root=str(root), include=["*.txt"], format="jsonl",
                                text_key="content"), tmp_path / "jsonl")
    assert texts(art) == ["doc 0", "doc 1", "doc 2"]
    write(root / "recs.jsonl", recs)
    art = run_stage(FilesSource(root=str(root), include=["*.jsonl"], format="text"),
                    tmp_path / "text")
    assert texts(art) == [recs]


def test_source_globs(tmp_path):
    root = tmp_path / "r"
    for rel in ["top.py", "pkg/mod.py", "pkg/tests/t.py", "test/x.py", "deep/a/b/c.py",
                "pkg/data.json"]:
        write(root / rel, "x = 1\n")

    def rels(include, exclude=()):
        return [e.rel for e in list_files(str(root), include, list(exclude))]

    assert rels(["*.py"]) == ["top.py"]
    assert rels(["**/*.py"], ["test/**", "**/tests/**"]) == ["deep/a/b/c.py", "pkg/mod.py",
                                                             "top.py"]
    assert rels(["pkg/**/*.py"]) == ["pkg/mod.py", "pkg/tests/t.py"]
    assert rels(["**/*.[jp][sy]*"], ["deep/**"]) == ["pkg/data.json", "pkg/mod.py",
                                                     "pkg/tests/t.py", "test/x.py", "top.py"]


def test_fingerprint_extra_follows_the_files(tmp_path):
    root = make_tree(tmp_path / "corpus")
    stage = FilesSource(root=str(root), exclude=["**/tests/**"])
    fp = stage.fingerprint_extra()
    assert stage.fingerprint_extra() == fp
    write(root / "pkg" / "tests" / "test_b.py", "assert False\n")  # excluded: no change
    assert stage.fingerprint_extra() == fp
    write(root / "a.py", CODE + "# changed\n")
    fp2 = stage.fingerprint_extra()
    assert fp2 != fp
    st = os.stat(root / "a.py")
    os.utime(root / "a.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, touched
    assert stage.fingerprint_extra() == fp2  # same bytes: nothing downstream reruns
    write(root / "new.py", "y = 2\n")
    assert stage.fingerprint_extra() not in (fp, fp2)


def test_source_skips_symlinks_outside_root(tmp_path):
    root = tmp_path / "corpus"
    write(root / "a.py", CODE)
    secret = write(tmp_path / "secret.py", "token = 'hunter2'\n")
    (root / "inside.py").symlink_to(root / "a.py")  # within the root: read
    (root / "creds.py").symlink_to(secret)  # outside: skipped and counted
    (root / "pkg").mkdir()
    (root / "pkg" / "up.py").symlink_to("../../secret.py")
    art = run_stage(FilesSource(root=str(root)), tmp_path / "run", max_skip_fraction=0.9)
    assert [d["path"] for d in iter_documents(art.path)] == ["a.py", "inside.py"]
    assert art.manifest["counts"]["skipped.symlink_outside_root"] == 2
    assert "hunter2" not in "".join(texts(art))
    follow = FilesSource(root=str(root), follow_symlinks_outside_root=True)
    art = run_stage(follow, tmp_path / "follow")
    assert [d["path"] for d in iter_documents(art.path)] == ["a.py", "creds.py", "inside.py",
                                                             "pkg/up.py"]
    assert "skipped.symlink_outside_root" not in art.manifest["counts"]


def test_source_fingerprint_follows_content_not_mtime(tmp_path):
    root = tmp_path / "corpus"
    a = write(root / "a.py", CODE)
    source = FilesSource(root=str(root))
    before = source.fingerprint_extra()
    os.utime(a, ns=(1, 1))  # touched: same bytes, another mtime
    assert source.fingerprint_extra() == before
    write(a, CODE.replace("return", "yield"))  # same size class, other bytes
    assert source.fingerprint_extra() != before
    stamp = FilesSource(root=str(root), change_detection="stamp")
    old = stamp.fingerprint_extra()
    os.utime(a, ns=(2, 2))
    assert stamp.fingerprint_extra() != old  # "stamp" trusts mtimes instead of reading


def test_source_fsspec_url(tmp_path):
    root = make_tree(tmp_path / "corpus")
    art = run_stage(FilesSource(root=f"file://{root}", include=["a.py", "pkg/b.py"]),
                    tmp_path / "run")
    assert [d["id"] for d in iter_documents(art.path)] == ["corpus/a.py", "corpus/pkg/b.py"]
    assert FilesSource(root=f"file://{root}").fingerprint_extra() != \
        FilesSource(root=f"file://{root}", include=["a.py"]).fingerprint_extra()


def test_length_and_code_quality_reasons():
    length = LengthFilter(min_chars=5, max_chars=50, min_lines=2, max_lines=3)
    assert length.reason({"text": "abc"}) == "too_short"
    assert length.reason({"text": "x" * 51}) == "too_long"
    assert length.reason({"text": "one line only"}) == "too_few_lines"
    assert length.reason({"text": "a\nb\nc\nd\n"}) == "too_many_lines"
    assert length.reason({"text": "a = 1\nb = 2\n"}) is None
    with pytest.raises(RecipeError, match="min_chars"):
        LengthFilter(min_chars=10, max_chars=5)

    q = CodeQualityFilter(max_line_length=40, max_mean_line_length=20, autogen_header_lines=2)
    assert q.reason({"text": CODE}) is None
    assert q.reason({"text": "# Generated by protoc. DO NOT EDIT\nx = 1\n"}) == "autogenerated"
    assert q.reason({"text": "x = 1\ny = 2\n# generated by hand\n"}) is None  # past the header
    assert q.reason({"text": "x = 1\n" + "y" * 41 + "\n"}) == "line_too_long"
    assert q.reason({"text": ("y" * 30 + "\n") * 3}) == "mean_line_too_long"
    assert q.reason({"text": "x = [1, 2]\n{}()[];;\n-- -- --\n"}) == "low_alnum"


def test_filter_stage_counts_per_filter_and_keeps_dropped(tmp_path):
    inp = documents(tmp_path / "in", [
        [CODE, "x", "# auto-generated\nx = 1\n"],
        ["short", CODE + "z = 2\n", "#" * 60 + "\n"],
    ])
    stage = FilterStage(filters=[{"name": "length", "min_chars": 6},
                                 {"name": "code_quality", "max_line_length": 50}],
                        keep_dropped=True)
    art = run_stage(stage, tmp_path / "run", inputs={"documents": inp})
    assert texts(art) == [CODE, CODE + "z = 2\n"]
    c = art.manifest["counts"]
    assert (c["length.kept"], c["length.dropped"], c["length.dropped.too_short"]) == (4, 2, 2)
    # the two short documents never reach code_quality
    assert (c["code_quality.kept"], c["code_quality.dropped"]) == (2, 2)
    assert c["code_quality.dropped.autogenerated"] == 1
    assert c["code_quality.dropped.line_too_long"] == 1
    assert art.manifest["metrics"]["documents_in"] == 6
    assert art.manifest["metrics"]["documents_out"] == 2
    dropped = list(iter_documents(art.path / "dropped"))
    assert [d["drop_reason"] for d in dropped] == [
        "length.too_short", "code_quality.autogenerated", "length.too_short",
        "code_quality.line_too_long"]
    assert art.manifest["meta"]["num_documents"] == 2


def test_filter_builds_specs_through_the_registry(tmp_path, pm):
    inp = documents(tmp_path / "in", [[CODE, "x"]])
    art = run_stage(FilterStage(filters=["length", {"name": "length", "min_chars": 3}]),
                    tmp_path / "run", inputs={"documents": inp}, pm=pm)
    c = art.manifest["counts"]
    assert c["length.kept"] == 2 and c["length#2.dropped.too_short"] == 1
    assert not (art.path / "dropped").exists()


def test_filter_resumes_parts_already_done(tmp_path):
    inp = documents(tmp_path / "in", [[CODE], [CODE + "# b\n"], [CODE + "# c\n"]])
    stage = FilterStage(filters=[{"name": "length"}])
    first = run_stage(stage, tmp_path / "run", inputs={"documents": inp})
    assert len(texts(first)) == 3
    done = sorted((tmp_path / "run" / "work" / "filter").glob("*.jsonl.zst"))
    assert len(done) == 3
    # as if the first attempt died: part 0 finished (we mark its output), part 1 did not
    write_documents(done[0], [{"id": "m", "text": "from the first attempt", "source": "t",
                               "path": None}])
    done[1].unlink()
    again = run_stage(stage, tmp_path / "run", inputs={"documents": inp})
    assert texts(again) == ["from the first attempt", CODE + "# b\n", CODE + "# c\n"]
    assert again.manifest["metrics"]["filter_tasks_resumed"] == 2


def test_exact_dedup_keeps_first_whitespace_variant(tmp_path):
    a = "def f():\n    return 1\n"
    inp = documents(tmp_path / "in", [
        [a, "other = 2\n", "\n\ndef f():  \r\n    return 1\r\n\n"],
        ["DEF F():\n    RETURN 1\n", a, "other = 2"],
    ])
    art = run_stage(ExactDedup(), tmp_path / "ws", inputs={"documents": inp})
    assert texts(art) == [a, "other = 2\n", "DEF F():\n    RETURN 1\n"]
    assert art.manifest["counts"]["duplicates_removed"] == 3
    assert art.manifest["meta"]["duplicate_examples"] == [["d0-0", "d0-2", "d1-1"],
                                                          ["d0-1", "d1-2"]]
    lower = run_stage(ExactDedup(normalize="whitespace_lower"), tmp_path / "lo",
                      inputs={"documents": inp})
    assert texts(lower) == [a, "other = 2\n"]
    none = run_stage(ExactDedup(normalize="none"), tmp_path / "none", inputs={"documents": inp})
    assert len(texts(none)) == 5  # only the byte-identical copy goes


def pipeline(root: Path, out: Path, executor) -> list:
    src = run_stage(FilesSource(root=str(root), docs_per_part=3), out / "s", executor=executor)
    flt = run_stage(FilterStage(filters=[{"name": "length", "min_chars": 10},
                                         {"name": "code_quality"}]), out / "f",
                    inputs={"documents": src}, executor=executor)
    ded = run_stage(ExactDedup(), out / "d", inputs={"documents": flt}, executor=executor)
    return [(a.manifest["counts"], a.manifest["meta"], list(iter_documents(a.path)),
             [p.name for p in list_parts(a.path)]) for a in (src, flt, ded)]


def test_same_result_serial_and_local_executor(tmp_path, local):
    root = tmp_path / "corpus"
    for i in range(8):
        write(root / f"m{i}.py", CODE if i % 3 == 0 else f"value_{i} = {i}\n")
    write(root / "gen.py", "# autogenerated, do not edit\nx = 1\n")
    write(root / "tiny.py", "x=1\n")
    serial = pipeline(root, tmp_path / "serial", None)
    parallel = pipeline(root, tmp_path / "local", local)
    assert serial == parallel
    assert serial[2][0]["duplicates_removed"] == 2
    assert [d["path"] for d in serial[2][2]] == ["m0.py"] + [f"m{i}.py" for i in (1, 2, 4, 5, 7)]


def test_stdlib_email_reads_without_skips(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    art = run_stage(FilesSource(root=stdlib, include=["email/**/*.py"], source_name="stdlib"),
                    tmp_path / "run")
    counts = art.manifest["counts"]
    assert not [k for k in counts if k.startswith("skipped.")]
    assert art.manifest["meta"]["num_documents"] > 20
    assert "stdlib/email/message.py" in {d["id"] for d in iter_documents(art.path)}


def test_components_are_registered(pm):
    reg = pm.registry
    for name in ("files_source", "filter", "exact_dedup"):
        assert reg.find("stage", name) is not None
    built = reg.build("document_filter", {"name": "code_quality", "min_alnum_fraction": 0.3})
    assert isinstance(built, CodeQualityFilter) and built.min_alnum_fraction == 0.3
    assert FilterStage.subcomponent_params() == {"filters": (DocumentFilter, True)}


def test_source_survives_corrupt_jsonl(tmp_path):
    root = tmp_path / "src"
    recs = "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(50))
    whole = zstandard.ZstdCompressor().compress(recs.encode())
    write(root / "a.jsonl.zst", whole[: len(whole) // 2])  # truncated
    write(root / "b.jsonl", '{"text": "lone \\ud800 surrogate"}\n[1, 2]\n{"text": 3}\n'
                            '{"text": "fine"}\n')
    art = run_stage(FilesSource(root=str(root), include=["*.jsonl*"]), tmp_path / "run",
                    max_skip_fraction=1.0)
    c = art.manifest["counts"]
    assert c["skipped.corrupt_file"] == 1
    assert (c["skipped.bad_unicode"], c["skipped.bad_json"], c["skipped.text_not_string"]) == \
        (1, 1, 1)
    assert texts(art)[-1] == "fine"


def test_a_filter_chain_that_keeps_nothing_fails_naming_the_worst_filter(tmp_path):
    docs = Artifact(kind="documents", path=tmp_path / "in", manifest={})
    (tmp_path / "in").mkdir()
    write_documents(tmp_path / "in" / part_name(0),
                    [{"id": str(i), "text": "x = 1\n", "source": "t", "path": None}
                     for i in range(4)])
    stage = FilterStage(filters=[{"name": "length", "min_chars": 1},
                                 {"name": "length", "min_chars": 100}])
    with pytest.raises(StageError, match="'length#2' dropped the most \\(4, reasons "
                                         "\\{'too_short': 4\\}\\)"):
        run_stage(stage, tmp_path / "run", inputs={"documents": docs})
