"""minhash_dedup and line_dedup: clusters against exact Jaccard, keep-first, executors, resume."""
from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest

from recipe_engine import Artifact, Executor, RecipeError
from recipe_engine.artifacts import iter_documents, list_parts, write_documents
from recipe_engine.testing import make_plugin_manager, run_stage
from recipe_engine_plugins.data import near_dedup
from recipe_engine_plugins.data.near_dedup import (LineDedup, MinhashDedup, candidate_probability,
                                                   false_negative_area, false_positive_area,
                                                   lsh_tradeoff, normalize_text, shingle_hashes,
                                                   signature)
from recipe_engine_plugins.executors import LocalExecutor, SerialExecutor

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["json/decoder.py", "json/encoder.py", "csv.py", "shlex.py", "textwrap.py", "fnmatch.py",
         "getopt.py", "glob.py", "queue.py", "sched.py", "graphlib.py", "tabnanny.py"]


PM = make_plugin_manager()  # these stages build no sub-components: no plugin needed


def run(stage, root: Path, **kwargs) -> Artifact:
    return run_stage(stage, root, pm=PM, **kwargs)


def documents(tmp: Path, parts: list[list[tuple[str, str | None]]]) -> Artifact:
    """A documents artifact of (id, text) pairs, one list per part."""
    tmp.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(parts):
        write_documents(tmp / f"part-{i:05d}.jsonl.zst", [
            {"id": doc_id, "text": text, "source": "t", "path": None} for doc_id, text in docs])
    return Artifact(kind="documents", path=tmp, manifest={})


def ids(artifact: Artifact) -> list[str]:
    return [d["id"] for d in iter_documents(artifact.path)]


def edit(text: str, rate: float, seed: int) -> str:
    """``text`` with a fraction ``rate`` of its words replaced."""
    rng = random.Random(seed)
    return re.sub(r"\w+", lambda m: f"zz{rng.randrange(10**6)}" if rng.random() < rate
                  else m.group(0), text)


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of lowercased word 5-gram sets (the truth)."""
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def stdlib() -> dict[str, str]:
    return {f: (STDLIB / f).read_text(encoding="utf-8") for f in FILES}


def corpus(stdlib: dict[str, str]) -> list[list[tuple[str, str]]]:
    """Three parts: originals, edited copies (1% of words) and one copy placed before its
    original, so the copy is the one kept."""
    src = stdlib
    return [
        [(f, src[f]) for f in FILES[:6]] + [("graphlib.py~", edit(src["graphlib.py"], 0.01, 1))],
        [("csv.py~", edit(src["csv.py"], 0.01, 2)), ("getopt.py", src["getopt.py"]),
         ("graphlib.py", src["graphlib.py"]), ("glob.py", src["glob.py"])],
        [("csv.py~~", edit(src["csv.py"], 0.01, 3)), ("queue.py", src["queue.py"]),
         ("shlex.py~", edit(src["shlex.py"], 0.01, 4)), ("sched.py", src["sched.py"]),
         ("tabnanny.py", src["tabnanny.py"])],
    ]


KEPT = ["json/decoder.py", "json/encoder.py", "csv.py", "shlex.py", "textwrap.py", "fnmatch.py",
        "graphlib.py~", "getopt.py", "glob.py", "queue.py", "sched.py", "tabnanny.py"]


def test_minhash_clusters_near_duplicates_and_keeps_the_first(tmp_path, stdlib):
    parts = corpus(stdlib)
    texts = {doc_id: text for part in parts for doc_id, text in part}
    # the truth: copies are near duplicates, different files are not
    for copy in ("csv.py~", "csv.py~~", "shlex.py~", "graphlib.py~"):
        assert jaccard(texts[copy], texts[copy.rstrip("~")]) > 0.85
    assert max(jaccard(stdlib[a], stdlib[b]) for a in FILES for b in FILES if a < b) < 0.2

    inp = documents(tmp_path / "in", parts)
    art = run(MinhashDedup(threshold=0.7), tmp_path / "run", inputs={"documents": inp})
    assert ids(art) == KEPT
    counts = art.manifest["counts"]
    assert counts["documents_in"] == 16 and counts["documents_out"] == 12
    assert counts["dropped.near_duplicate"] == 4
    meta = art.manifest["meta"]
    clusters = meta["near_duplicate_clusters"]
    assert clusters["num_clusters"] == 3
    assert clusters["size_histogram"] == {"2": 2, "3-4": 1}
    examples = clusters["examples"]  # in order of the kept document
    assert [e["kept"] for e in examples] == ["csv.py", "shlex.py", "graphlib.py~"]
    assert [m["id"] for m in examples[0]["members"]] == ["csv.py~", "csv.py~~"]
    for e in examples:
        for m in e["members"]:
            assert abs(m["jaccard"] - jaccard(texts[m["id"]], texts[e["kept"]])) < 0.1
    assert meta["num_documents"] == 12
    assert meta["num_bytes"] == sum(len(texts[i].encode()) for i in KEPT)
    lsh = meta["lsh"]
    assert (lsh["bands"], lsh["rows"]) == (14, 9)  # datasketch's choice for 0.7 and 128
    assert lsh["false_positive_area"] == pytest.approx(0.0346379, abs=1e-6)
    assert lsh["false_negative_area"] == pytest.approx(0.0378710, abs=1e-6)
    assert list(lsh["candidate_probability"]) == ["0.5", "0.7", "0.8", "0.9", "0.95"]
    metrics = art.manifest["metrics"]
    assert metrics["near_duplicates_removed"] == 4 and metrics["verified_pairs"] >= 4

    # character shingles find the same clusters
    char = run(MinhashDedup(shingle="char", threshold=0.7), tmp_path / "char",
                     inputs={"documents": inp})
    assert ids(char) == KEPT


def test_verify_drops_candidates_below_threshold(tmp_path, stdlib):
    """With few rows per band, documents of similarity ~0.5 often share a bucket; verify
    keeps them apart, verify: false does not."""
    a = stdlib["textwrap.py"]
    b = edit(a, 0.12, 7)
    assert 0.3 < jaccard(a, b) < 0.6
    inp = documents(tmp_path / "in", [[("a", a), ("b", b)]])
    stage = dict(num_perm=64, bands=32, rows=2, threshold=0.8)
    verified = run(MinhashDedup(**stage), tmp_path / "v", inputs={"documents": inp})
    assert ids(verified) == ["a", "b"]
    assert verified.manifest["metrics"]["candidate_pairs"] > 0
    assert verified.manifest["metrics"]["verified_pairs"] == 0
    loose = run(MinhashDedup(**stage, verify=False), tmp_path / "l",
                      inputs={"documents": inp})
    assert ids(loose) == ["a"]


@dataclass(kw_only=True)
class Backwards(Executor):
    """In-process, but runs the tasks last to first (results still in input order): a
    task that depended on an earlier one having run would show."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        yield from reversed([fn(item) for item in reversed(items)])


def run_both(tmp: Path, inp: Artifact, runs: list[tuple[str, Executor | None]]) -> list:
    out = []
    for name, executor in runs:
        dedup = run(MinhashDedup(threshold=0.7), tmp / name / "m",
                          inputs={"documents": inp}, executor=executor)
        lines = run(LineDedup(unit="line", min_chars=20), tmp / name / "l",
                          inputs={"documents": dedup}, executor=executor)
        out.append([(a.manifest["meta"], a.manifest["counts"],
                     [p.read_bytes() for p in list_parts(a.path)]) for a in (dedup, lines)])
    return out


def test_same_result_whatever_the_task_order(tmp_path, stdlib):
    runs = run_both(tmp_path, documents(tmp_path / "in", corpus(stdlib)),
                    [("inline", None), ("backwards", Backwards())])
    assert runs[0] == runs[1]
    assert runs[0][1][1]["lines_removed"] > 0


@pytest.mark.slow  # a process pool per pass: about 10 s
def test_same_result_serial_and_local_executor(tmp_path, stdlib):
    runs = run_both(tmp_path, documents(tmp_path / "in", corpus(stdlib)),
                    [("serial", SerialExecutor()), ("local", LocalExecutor(num_workers=2))])
    assert runs[0] == runs[1]
    assert runs[0][0][1]["dropped.near_duplicate"] == 4


def test_minhash_resumes_from_a_partial_run(tmp_path, stdlib):
    inp = documents(tmp_path / "in", corpus(stdlib))
    stage = MinhashDedup(threshold=0.7)
    first = run(stage, tmp_path / "run", inputs={"documents": inp})
    work = tmp_path / "run" / "work"
    # as if the first attempt died during the signature pass: part 1's signatures are gone
    sigs = sorted((work / "minhash_signature").glob("00001-*.npy"))
    assert len(sigs) == 2
    for f in sigs:
        f.unlink()
    again = run(stage, tmp_path / "run", inputs={"documents": inp})
    assert again.manifest["metrics"]["minhash_signature_tasks_resumed"] == 2
    assert list(iter_documents(again.path)) == list(iter_documents(first.path))
    assert again.manifest["meta"] == first.manifest["meta"]
    # a finished write task is reused, not redone: mark part 0's output
    done = sorted((work / "dedup_write").glob("00000-*.jsonl.zst"))
    write_documents(done[0], [{"id": "m", "text": "from the first attempt", "source": "t",
                               "path": None}])
    third = run(stage, tmp_path / "run", inputs={"documents": inp})
    assert ids(third) == ["m"] + KEPT[7:]
    assert third.manifest["metrics"]["minhash_filter_tasks_resumed"] == 3


def test_missing_text_is_skipped_and_counted(tmp_path):
    inp = documents(tmp_path / "in", [[("a", "one two three four five six"), ("b", None),
                                       ("c", "one two three four five six"), ("d", "")]])
    art = run(MinhashDedup(), tmp_path / "run", inputs={"documents": inp},
                    max_skip_fraction=0.5)
    assert ids(art) == ["a", "d"]
    assert art.manifest["counts"]["skipped.missing_text"] == 1
    assert art.manifest["counts"]["dropped.near_duplicate"] == 1
    empty = run(MinhashDedup(), tmp_path / "empty",
                      inputs={"documents": documents(tmp_path / "none", [])})
    assert ids(empty) == [] and empty.manifest["counts"]["documents_in"] == 0


def test_bands_rows_validation():
    assert MinhashDedup(num_perm=128, bands=16, rows=8).bands_rows() == (16, 8)
    for params, key in [({"bands": 8, "rows": 8}, "bands"), ({"bands": 16}, "rows"),
                        ({"rows": 8}, "bands"), ({"num_perm": 1}, "num_perm"),
                        ({"threshold": 0.0}, "threshold"), ({"ngram": 0}, "ngram"),
                        ({"seed": -1}, "seed")]:
        with pytest.raises(RecipeError) as err:
            MinhashDedup(**params)
        assert [p.key for p in err.value.problems] == [key], params
    with pytest.raises(RecipeError, match="must equal num_perm"):
        MinhashDedup(num_perm=128, bands=10, rows=10)
    with pytest.raises(RecipeError):
        LineDedup(min_documents=1)


def test_derived_bands_rows_match_datasketch():
    from datasketch import MinHashLSH

    for threshold, num_perm in [(0.5, 64), (0.8, 128), (0.9, 128), (0.95, 256)]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        stage = MinhashDedup(threshold=threshold, num_perm=num_perm)
        assert stage.bands_rows() == (lsh.b, lsh.r), (threshold, num_perm)


def test_s_curve_for_known_bands_rows():
    from datasketch.lsh import _false_negative_probability, _false_positive_probability

    assert candidate_probability(0.5, 20, 5) == pytest.approx(1 - (1 - 0.5 ** 5) ** 20)
    t = lsh_tradeoff(0.8, 20, 5)
    assert t["candidate_probability"] == {"0.5": 0.470051, "0.7": 0.974781, "0.8": 0.999644,
                                          "0.9": 1.0, "0.95": 1.0}
    assert t["false_positive_area"] == pytest.approx(0.298655, abs=1e-6)
    assert t["false_negative_area"] == pytest.approx(5.2e-06, abs=1e-6)
    for threshold, b, r in [(0.8, 20, 5), (0.5, 9, 13), (0.9, 4, 32)]:
        assert false_positive_area(threshold, b, r) == pytest.approx(
            _false_positive_probability(threshold, b, r), abs=1e-9)
        assert false_negative_area(threshold, b, r) == pytest.approx(
            _false_negative_probability(threshold, b, r), abs=1e-9)


def test_signature_is_datasketchs_minhash(stdlib):
    from datasketch import MinHash

    text = normalize_text(stdlib["fnmatch.py"], "whitespace_lower", "word")
    hashes = shingle_hashes(text, "word", 5)
    assert len(hashes) == len({tuple(text.split()[i:i + 5]) for i in range(len(text.split()) - 4)})
    m = MinHash(num_perm=128, seed=3, hashfunc=int)
    m.update_batch(hashes.tolist())
    assert np.array_equal(signature(hashes, *m.permutations), m.hashvalues)
    # shingles are substrings, independent of where they occur
    assert np.array_equal(shingle_hashes("a b c", "word", 2),
                          np.intersect1d(shingle_hashes("x a b c", "word", 2),
                                         shingle_hashes("a b c y", "word", 2)))
    assert len(shingle_hashes("abcdef", "char", 5)) == 2
    assert len(shingle_hashes("abc", "char", 5)) == 1 and len(shingle_hashes("", "word", 5)) == 1
    assert normalize_text("A  b\n\tC", "whitespace", "char") == "A b C"
    assert normalize_text("A  b\n\tC", "none", "char") == "A  b\n\tC"
    assert normalize_text("A  b\n\tC", "none", "word") == "A b C"


LICENCE = """# Copyright (c) 2024 Example Corp.
# Licensed under the Apache License, Version 2.0; you may not use this file
# except in compliance with the License."""


def test_line_dedup_removes_a_repeated_licence_header(tmp_path):
    docs = [
        ("a", f"{LICENCE}\n\nimport os\n\n\ndef a():\n    return os.sep\n"),
        ("b", f"{LICENCE}\n\nimport os\n\n\ndef b():\n    return 2\n"),
        ("c", "def c():\n    return 3\n"),
    ]
    later = [("d", f"{LICENCE}\n\ndef d():\n    return 4\n"), ("e", f"{LICENCE}\n"),
             ("f", f"{LICENCE.lower()}\n\ndef f():\n    pass\n")]
    inp = documents(tmp_path / "in", [docs, later])
    art = run(LineDedup(), tmp_path / "run", inputs={"documents": inp})
    out = {d["id"]: d["text"] for d in iter_documents(art.path)}
    assert list(out) == ["a", "b", "c", "d", "f"]
    assert out["a"] == docs[0][1]  # the first document keeps it
    assert out["b"] == "import os\n\n\ndef b():\n    return 2\n"  # `import os` is too short
    assert out["d"] == "def d():\n    return 4\n"
    assert out["f"] == later[2][1]  # case differs: another paragraph
    counts = art.manifest["counts"]
    assert counts["paragraphs_removed"] == 3
    assert counts["dropped.empty_after_line_dedup"] == 1
    assert counts["bytes_removed"] == 3 * len(LICENCE) + 2 + 2 + 1
    assert counts["documents_out"] == 5
    assert art.manifest["meta"]["repeated_units"] == [{"text": LICENCE, "documents": 4}]
    # keep_first: false removes it from the first document too
    strict = run(LineDedup(keep_first=False), tmp_path / "strict",
                       inputs={"documents": inp})
    assert next(iter_documents(strict.path))["text"].startswith("import os\n")


def test_line_dedup_lines_threshold_and_shards(tmp_path, monkeypatch):
    common = "from recipe_engine import something_long_enough"
    docs = [(f"d{i}", f"{common}\nunique line number {i} is long enough here\nx = {i}\n")
            for i in range(5)]
    docs.append(("d5", "only here: a line that appears once in the corpus\n" + common + "  \n"))
    inp = documents(tmp_path / "in", [docs[:3], docs[3:]])
    art = run(LineDedup(unit="line", min_chars=20, min_documents=3), tmp_path / "run",
                    inputs={"documents": inp})
    texts = [d["text"] for d in iter_documents(art.path)]
    assert texts[0] == docs[0][1]
    assert texts[1] == "unique line number 1 is long enough here\nx = 1\n"
    assert texts[5] == "only here: a line that appears once in the corpus\n"  # trailing spaces
    assert art.manifest["counts"]["lines_removed"] == 5
    # found in 2 documents only: below min_documents=3, nothing is removed
    two = run(LineDedup(unit="line", min_chars=20, min_documents=3), tmp_path / "two",
                    inputs={"documents": documents(tmp_path / "in2", [docs[:2]])})
    assert [d["text"] for d in iter_documents(two.path)] == [docs[0][1], docs[1][1]]
    # the result does not depend on how the hash range is sharded
    monkeypatch.setattr(near_dedup, "UNITS_PER_SHARD", 2)
    sharded = run(LineDedup(unit="line", min_chars=20, min_documents=3),
                        tmp_path / "sharded", inputs={"documents": inp})
    assert [d["text"] for d in iter_documents(sharded.path)] == texts
    assert len(list((tmp_path / "sharded" / "work" / "line_shard").glob("*.npy"))) > 1
