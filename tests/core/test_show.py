"""`recipe show`: the data funnel of a recipe's last run, on the toy recipe and on a small real
curation run (files -> filter -> language_id -> exact_dedup -> minhash_dedup), as a table
and as JSON."""
from __future__ import annotations

import json
import re

import pytest

from recipe_engine.cli import main

ENGLISH = ["The river flooded the lower town after three days of heavy rain this spring.",
           "Our neighbours planted apple trees along the old garden wall last year.",
           "The museum opens an exhibition of early photographs at the end of next month."]
FRENCH = "La rivière a inondé la ville basse après trois jours de pluie ce printemps."
GERMAN = "Der Fluss überschwemmte nach drei Tagen Regen die Unterstadt in diesem Frühling."


def test_show_toy_before_and_after_a_run(toy):
    rc, out, err = toy("show", toy.recipe)
    assert rc == 0, err
    assert "not in the store" in out and "numbers" in out
    toy.run_json()
    rc, out, err = toy("show", toy.recipe, "--json")
    assert rc == 0, err
    result = json.loads(out)
    rows = {r["stage"]: r for r in result["stages"]}
    assert list(rows) == ["numbers", "upper", "report"]  # each reads or writes documents
    assert all(r["status"] == "current" for r in rows.values())
    assert rows["numbers"]["documents_out"] == 5
    assert rows["upper"]["documents_in"] == 5 and rows["upper"]["documents_out"] == 5
    assert rows["report"]["documents_in"] == 5 and rows["report"]["documents_out"] is None
    # another configuration: the stages it changes show their earlier run
    rc, out, err = toy("show", toy.recipe, "+stages.upper.params.mode=lower", "--json")
    assert rc == 0, err
    rows = {r["stage"]: r for r in json.loads(out)["stages"]}
    assert rows["numbers"]["status"] == "current" and rows["upper"]["status"] == "earlier"
    rc, out, err = toy("show", toy.recipe, "upper")
    assert rc == 0 and out.splitlines()[1].split() == [
        "STAGE", "COMPONENT", "STATUS", "DOCS", "IN", "DOCS", "OUT", "KEPT", "BYTES", "IN",
        "BYTES", "OUT"]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["upper"]


def test_show_names_an_unknown_stage(toy):
    rc, out, err = toy("show", toy.recipe, "uper")
    assert rc == 1 and 'did you mean "upper"' in err


@pytest.fixture
def curation(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = ENGLISH + [FRENCH, GERMAN, "short", ENGLISH[0], ENGLISH[1] + " Indeed.",
                       "x = [i for i in range(10)]\nprint(x)\n"]
    for i, text in enumerate(texts):
        (docs / f"{i:02d}.txt").write_text(text)
    (docs / "bad.txt").write_bytes(b"\xff\xfe\x00 binary")
    recipe = tmp_path / "curation.yaml"
    recipe.write_text(f"""\
# curation: a small real data funnel for the `recipe show` tests
name: curation
executor: {{name: serial}}
max_skip_fraction: 0.5
stages:
  source:
    component: files_source
    params: {{root: "{docs}", include: ["*.txt"], docs_per_part: 4}}
  filter:
    component: filter
    inputs: {{documents: source}}
    params:
      filters: [{{name: length, min_chars: 20}}]
  language:
    component: language_id
    inputs: {{documents: filter}}
    params: {{languages: [en, fr]}}
  dedup:
    component: exact_dedup
    inputs: {{documents: language}}
  near_dedup:
    component: minhash_dedup
    inputs: {{documents: dedup}}
    params: {{ngram: 3, threshold: 0.5}}
""")
    monkeypatch.setenv("RECIPE_STORE", str(tmp_path / "store"))
    assert main(["run", str(recipe), "-q"]) == 0
    return recipe


def test_show_a_real_curation_run(curation, capsys):
    capsys.readouterr()
    assert main(["show", str(curation), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    assert list(rows) == ["source", "filter", "language", "dedup", "near_dedup"]
    src, flt, lang, dedup, near = rows.values()
    assert src["documents_in"] == 10 and src["documents_out"] == 9
    assert src["reasons"] == [{"reason": "skipped.binary", "count": 1}]
    assert flt["documents_in"] == 9 and flt["documents_out"] == 8
    assert flt["reasons"] == [{"reason": "length.dropped.too_short", "count": 1}]
    assert flt["bytes_in"] == src["bytes_out"] and flt["bytes_out"] < flt["bytes_in"]
    assert lang["documents_in"] == 8 and lang["documents_out"] == 6
    assert {r["reason"]: r["count"] for r in lang["reasons"]} == {
        "dropped.language.de": 1, "dropped.low_language_score": 1}  # German; the code
    assert lang["languages"] == {"en": 5, "fr": 1}
    assert lang["kept_fraction"] == 0.75
    assert dedup["clusters"] == {"documents_removed": 1, "distinct": 5}
    assert near["clusters"]["num_clusters"] == 1 and near["documents_out"] == 4

    assert main(["show", str(curation)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[1]
    assert header.split() == ["STAGE", "COMPONENT", "STATUS", "DOCS", "IN", "DOCS", "OUT",
                              "KEPT", "BYTES", "IN", "BYTES", "OUT"]
    row = next(line for line in lines if line.startswith("language "))
    cells = [(m.group(), m.end()) for m in re.finditer(r"\S+", row)]
    assert [c for c, _ in cells[:6]] == ["language", "language_id", "current", "8", "6", "75.0%"]
    assert cells[4][1] == header.index("DOCS OUT") + len("DOCS OUT")  # numbers right-aligned
    assert "languages: en 5 (83.3%), fr 1 (16.7%)" in out
    assert "dropped.language.de" in out and "clusters: 1 (1 of size 2), 1 removed" in out
    assert "distinct texts: 5" in out

    assert main(["show", str(curation), "language"]) == 0
    detail = capsys.readouterr().out
    assert "counts:" in detail and "language.en" in detail and "near_dedup" not in detail
