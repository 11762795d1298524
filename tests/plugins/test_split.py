"""``heldout_split``: which documents are held out, independence from part layout and
executor, resume, and the marks downstream stages rely on."""
from __future__ import annotations

import pytest

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import is_heldout, iter_documents, write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data.split import HeldoutSplit, split_value
from recipe_engine_plugins.executors import LocalExecutor


def documents(tmp, parts, extra=None):
    tmp.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(parts):
        write_documents(tmp / f"part-{i:05d}.jsonl.zst", [
            {"id": d, "text": f"text of {d}\n", "source": "t", "path": None, **(extra or {}).get(d, {})}
            for d in ids])
    return Artifact(kind="documents", path=tmp, manifest={})


IDS = [f"doc-{i}" for i in range(400)]


def expected(ids, fraction, limit, seed=0):
    values = sorted((split_value(seed, d), d) for d in ids if split_value(seed, d) < fraction)
    return {d for _, d in values[:limit]}


def heldout_ids(art):
    return {d["id"] for d in iter_documents(art.path) if is_heldout(d)}


def test_holds_out_the_smallest_values_under_the_fraction(tmp_path):
    inp = documents(tmp_path / "in", [IDS[:150], IDS[150:]])
    art = run_stage(HeldoutSplit(fraction=0.1, max_documents=1000), tmp_path / "run",
                    inputs={"documents": inp})
    want = expected(IDS, 0.1, 1000)
    assert 20 < len(want) < 60  # ~40 expected of 400
    assert heldout_ids(art) == want
    docs = list(iter_documents(art.path))
    assert [d["id"] for d in docs] == IDS  # every document kept, in order
    source = {d["id"]: d for d in iter_documents(inp.path)}
    for d in docs:  # the others are untouched; the held-out ones only gain the mark
        assert d == source[d["id"]] if d["id"] not in want else \
            d == {**source[d["id"]], "split": "heldout"}
    meta = art.manifest["meta"]
    assert meta["num_documents"] == 400 and meta["heldout"]["num_documents"] == len(want)
    assert meta["heldout"]["num_bytes"] == sum(len(f"text of {d}\n") for d in want)
    assert art.manifest["counts"]["train_documents"] == 400 - len(want)


def test_cap_keeps_the_smallest_values(tmp_path):
    inp = documents(tmp_path / "in", [IDS[:7], IDS[7:200], IDS[200:]])
    art = run_stage(HeldoutSplit(fraction=0.5, max_documents=5), tmp_path / "run",
                    inputs={"documents": inp})
    assert heldout_ids(art) == expected(IDS, 0.5, 5)


def test_independent_of_parts_and_executor(tmp_path):
    one = run_stage(HeldoutSplit(fraction=0.2, max_documents=30), tmp_path / "a",
                    inputs={"documents": documents(tmp_path / "in1", [IDS])})
    many = run_stage(HeldoutSplit(fraction=0.2, max_documents=30), tmp_path / "b",
                     inputs={"documents": documents(tmp_path / "in2",
                                                    [IDS[i:i + 37] for i in range(0, 400, 37)])},
                     executor=LocalExecutor(num_workers=2))
    assert heldout_ids(one) == heldout_ids(many) == expected(IDS, 0.2, 30)
    other_seed = run_stage(HeldoutSplit(fraction=0.2, max_documents=30, seed=7), tmp_path / "c",
                           inputs={"documents": documents(tmp_path / "in3", [IDS])})
    assert heldout_ids(other_seed) != heldout_ids(one)


def test_an_upstream_mark_is_kept_and_resume_reuses_parts(tmp_path):
    inp = documents(tmp_path / "in", [IDS[:200], IDS[200:]],
                    extra={"doc-3": {"split": "heldout"}})
    art = run_stage(HeldoutSplit(fraction=0.05, max_documents=100), tmp_path / "run",
                    inputs={"documents": inp})
    got = heldout_ids(art)
    assert got == expected(IDS, 0.05, 100) | {"doc-3"}
    assert art.manifest["counts"]["already_heldout"] == 1
    done = sorted((tmp_path / "run" / "work" / "split_mark").glob("*.jsonl.zst"))
    done[0].unlink()
    again = run_stage(HeldoutSplit(fraction=0.05, max_documents=100), tmp_path / "run",
                      inputs={"documents": inp})
    assert heldout_ids(again) == got
    assert again.manifest["metrics"]["split_mark_tasks_resumed"] == 1


@pytest.mark.parametrize("params, key", [({"fraction": 0}, "fraction"), ({"fraction": 1.0}, "fraction"),
                                         ({"max_documents": 0}, "max_documents")])
def test_bad_parameters_fail_validation(params, key):
    with pytest.raises(RecipeError, match=key):
        HeldoutSplit(**params)
