"""List input slots (``inputs={"streams": ["documents"]}``): one or more upstream stages,
in order; validated, fingerprinted, planned and run like a plain slot."""
import json
import textwrap
from pathlib import Path

import pytest

from conftest import statuses
from recipe_engine import Stage
from recipe_engine.component import check_declaration

RECIPE = """
    name: mix
    executor: {name: serial}
    stages:
      a: {component: toy_numbers, params: {count: 2, prefix: a}}
      b: {component: toy_numbers, params: {count: 3, prefix: b}}
      both: {component: toy_concat, inputs: {streams: [a, b]}}
      one: {component: toy_concat, inputs: {streams: b}}
"""


def write(tmp_path, text, name="mix.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def run(toy, path, *args):
    rc, out, err = toy("run", path, "--json", *args)
    assert rc == 0, err
    return json.loads(out)


def docs(summary, name):
    from recipe_engine.artifacts import iter_documents

    stage = next(s for s in summary["stages"] if s["name"] == name)
    return [d["id"] for d in iter_documents(stage["artifact"])], stage


def test_a_list_slot_reads_every_upstream_in_order(toy, tmp_path):
    path = write(tmp_path, RECIPE)
    summary = run(toy, path)
    ids, both = docs(summary, "both")
    assert ids == ["0:a0", "0:a1", "1:b0", "1:b1", "1:b2"]
    manifest = json.loads((Path(both["artifact"]) / "manifest.json").read_text())
    assert manifest["meta"]["first"] == "a"  # ctx.inputs[slot] is the first upstream
    assert [i["stage"] for i in manifest["inputs"]["streams"]] == ["a", "b"]
    ids, _ = docs(summary, "one")  # a single name is a list of one
    assert ids == ["0:b0", "0:b1", "0:b2"]
    again = run(toy, path)
    assert set(statuses(again).values()) == {"cached"}


def test_order_and_membership_are_in_the_fingerprint(toy, tmp_path):
    first = run(toy, write(tmp_path, RECIPE))
    swapped = run(toy, write(tmp_path, RECIPE.replace("[a, b]", "[b, a]"), "mix2.yaml"))
    assert statuses(swapped) == {"a": "cached", "b": "cached", "both": "ran", "one": "cached"}
    fp = {s["name"]: s["fingerprint"] for s in first["stages"]}
    fp2 = {s["name"]: s["fingerprint"] for s in swapped["stages"]}
    assert fp["both"] != fp2["both"]
    changed = run(toy, write(tmp_path, RECIPE), "stages.b.params.count=4")
    assert statuses(changed) == {"a": "cached", "b": "ran", "both": "ran", "one": "ran"}


def test_plan_gives_a_list_slot_every_meta(toy, tmp_path):
    path = write(tmp_path, RECIPE)
    run(toy, path)
    rc, out, err = toy("plan", path, "--json")
    assert rc == 0, err
    both = next(s for s in json.loads(out)["stages"] if s["name"] == "both")
    assert both["inputs"] == {"streams": ["a", "b"]}
    assert both["estimates"] == {"streams": 2, "documents": 5}


@pytest.mark.parametrize("inputs, message", [
    ("{streams: []}", "stages.both.inputs.streams: names no stage"),
    ("{streams: [a, nope]}", "stages.both.inputs.streams[1]: no stage named 'nope'"),
    ("{streams: [a, a]}", "stages.both.inputs.streams: names a stage twice"),
    ("{streams: [a, rep]}", "stages.both.inputs.streams[1]: input 'streams' needs a documents "
                            "artifact, but stage 'rep' produces eval_report"),
])
def test_list_slot_errors_name_the_key(toy, tmp_path, inputs, message):
    body = RECIPE.replace("{streams: [a, b]}", inputs) + \
        "      rep: {component: toy_report, inputs: a}\n"
    rc, out, err = toy("validate", write(tmp_path, body))
    assert rc != 0 and message in err, err


def test_a_plain_slot_refuses_a_list(toy, tmp_path):
    body = RECIPE + "      up: {component: toy_upper, inputs: {documents: [a, b]}}\n"
    rc, out, err = toy("validate", write(tmp_path, body))
    assert rc != 0 and "stages.up.inputs.documents: takes one upstream stage" in err, err


def test_declaration_of_a_list_slot_is_checked():
    class Bad(Stage, name="bad_slots", inputs={"x": ["documents", "shards"]}, output="documents"):
        pass

    assert any("input 'x'" in p for p in check_declaration(Bad))
