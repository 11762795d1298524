"""decontaminate: eval texts read from the shipped lm-eval task (python_basics), documents
dropped or flagged on a shared n-gram, the short-item rule, and a fingerprint that follows
the task files."""
from __future__ import annotations

import json
import shutil

import pytest

from recipe_engine import Artifact, RecipeError, StageError
from recipe_engine.artifacts import iter_documents, write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data.decontaminate import (TASKS_DIR, Decontaminate, find_tasks,
                                                      item_text, words)

ITEMS = [json.loads(line) for line in
         (TASKS_DIR / "python_basics" / "test.jsonl").read_text().splitlines() if line.strip()]
CONFIG = find_tasks(["python_basics"], [TASKS_DIR])[0].config


def item(item_id: str) -> dict:
    return next(i for i in ITEMS if i["id"] == item_id)


def as_code(it: dict) -> str:
    """The item as it would appear in a training file: context + correct continuation."""
    return it["context"] + it["choices"][it["label"]]


UNRELATED = ("def parse(line):\n    fields = line.split(',')\n"
             "    return [f.strip() for f in fields]\n")
LONG = max(ITEMS, key=lambda i: len(words(as_code(i))))  # the one item of 13+ words


def documents(tmp, parts):
    tmp.mkdir(parents=True, exist_ok=True)
    for i, texts in enumerate(parts):
        write_documents(tmp / f"part-{i:05d}.jsonl.zst", [
            {"id": f"d{i}-{j}", "text": t, "source": "t", "path": None}
            for j, t in enumerate(texts)])
    return Artifact(kind="documents", path=tmp, manifest={})


def test_item_text_follows_the_yaml():
    it = item("pb-000")  # doc_to_text: context, doc_to_choice: choices, doc_to_target: label
    assert item_text(CONFIG, it) == "def add(a, b):\n    return a + b"  # target_delimiter ""
    templated = {**CONFIG, "doc_to_text": "Q: {{ context }}", "target_delimiter": " "}
    assert item_text(templated, it) == "Q: def add(a, b):\n    return a  + b"
    assert item_text({**CONFIG, "doc_to_text": "{{context | trim}}"}, it) is None  # Jinja
    assert words("Hello, World!\n  x_y = 3") == ["hello", "world", "x_y", "3"]
    assert len(words(as_code(LONG))) >= 13


def test_drops_a_document_containing_a_task_item(tmp_path):
    eight = item("pb-021")  # "def factorial(n): if n == 0: return 1": 8 words, used whole
    leaked = "# helpers\n" + as_code(LONG) + "\n\nprint('done')\n"
    inp = documents(tmp_path / "in", [[UNRELATED, leaked], ["x = 1\n" + as_code(eight) + "\n"]])
    art = run_stage(Decontaminate(), tmp_path / "run", inputs={"documents": inp})
    assert [d["text"] for d in iter_documents(art.path)] == [UNRELATED]
    c = art.manifest["counts"]
    assert (c["dropped"], c["dropped.python_basics"]) == (2, 2)
    assert (c["documents_in"], c["documents_out"]) == (3, 1)
    assert c["eval_items.python_basics"] == len(ITEMS)
    meta = art.manifest["meta"]["decontamination"]
    assert meta["num_eval_ngrams"] == c["eval_ngrams"] > 0
    assert meta["examples"][0]["id"] == "d0-1" and meta["examples"][0]["task"] == "python_basics"
    assert meta["examples"][0]["ngram"] in " ".join(words(as_code(LONG)))
    assert meta["examples"][1] == {"id": "d1-0", "task": "python_basics",
                                   "ngram": "def factorial n if n 0 return 1"}


def test_short_items_and_flag_mode(tmp_path):
    short = item("pb-002")  # "for i in range(n):": 5 words, below min_words=8
    inp = documents(tmp_path / "in", [[as_code(short) + "\n    pass\n", UNRELATED]])
    art = run_stage(Decontaminate(), tmp_path / "default", inputs={"documents": inp})
    assert len(list(iter_documents(art.path))) == 2  # a 5-word idiom is everywhere
    assert art.manifest["counts"]["eval_items_too_short.python_basics"] > 0

    flag = Decontaminate(mode="flag", min_words=5)  # used whole as one 5-gram
    art = run_stage(flag, tmp_path / "flag", inputs={"documents": inp})
    docs = list(iter_documents(art.path))
    assert docs[0]["contaminated"] is True
    assert docs[0]["contaminated_tasks"] == ["python_basics"]
    assert docs[0]["contaminated_ngram"] == "for i in range n"
    assert docs[0]["text"] == as_code(short) + "\n    pass\n"
    assert "contaminated" not in docs[1]  # clean documents are written unchanged
    assert art.manifest["counts"]["flagged.python_basics"] == 1
    assert "dropped" not in art.manifest["counts"]


def test_keep_dropped_and_checks(tmp_path):
    inp = documents(tmp_path / "in", [[as_code(LONG), UNRELATED]])
    art = run_stage(Decontaminate(keep_dropped=True), tmp_path / "run",
                    inputs={"documents": inp})
    dropped = list(iter_documents(art.path / "dropped"))
    assert [d["drop_reason"] for d in dropped] == ["decontaminate.python_basics"]
    with pytest.raises(RecipeError, match="min_words"):
        Decontaminate(ngram=5, min_words=8)
    with pytest.raises(RecipeError, match="keep_dropped"):
        Decontaminate(mode="flag", keep_dropped=True)
    with pytest.raises(StageError, match=r'did you mean "python_basics"'):
        run_stage(Decontaminate(tasks=["python_basic"]), tmp_path / "bad",
                  inputs={"documents": inp})


def test_task_dirs_override_and_fingerprint_follows_task_files(tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, tasks)
    stage = Decontaminate(task_dirs=[str(tasks)])
    fp = stage.fingerprint_extra()
    assert fp == stage.fingerprint_extra() == Decontaminate().fingerprint_extra()
    assert not fp.startswith("unresolved")
    (tasks / "python_basics" / "fewshot.jsonl").write_text("")  # not the evaluated split
    assert stage.fingerprint_extra() == fp
    data = tasks / "python_basics" / "test.jsonl"
    with open(data, "a") as f:  # a new item in the copy
        f.write(json.dumps({"id": "pb-new", "context": "def tokenize_the_sentence(text):\n"
                            "    return [w.lower() for w in text.split() if", "choices": [
                            " w.isalpha()]", " w]"], "label": 0}) + "\n")
    fp2 = stage.fingerprint_extra()
    assert fp2 != fp
    yaml_file = tasks / "python_basics" / "python_basics.yaml"
    yaml_file.write_text(yaml_file.read_text().replace('target_delimiter: ""',
                                                       'target_delimiter: " "'))
    assert stage.fingerprint_extra() not in (fp, fp2)

    leaked = "def tokenize_the_sentence(text):\n    return [w.lower() for w in text.split() " \
             "if w.isalpha()]\n"
    inp = documents(tmp_path / "in", [[leaked]])
    assert len(list(iter_documents(run_stage(Decontaminate(), tmp_path / "shipped", inputs={
        "documents": inp}).path))) == 1  # the shipped task has no such item
    art = run_stage(stage, tmp_path / "copy", inputs={"documents": inp})
    assert list(iter_documents(art.path)) == []
    assert Decontaminate(tasks=["nope"]).fingerprint_extra().startswith("unresolved")


def test_groups_includes_and_fallback(tmp_path, caplog):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "qa.jsonl").write_text(json.dumps({"q": "what is the airspeed velocity of an unladen "
                                                 "swallow", "a": "african or european"}) + "\n")
    (d / "_base.yaml").write_text("dataset_kwargs:\n  data_files:\n    test: qa.jsonl\n"
                                  "test_split: test\n")
    (d / "qa.yaml").write_text("include: _base.yaml\ntask: qa_fn\ntag: [my_group]\n"
                               "doc_to_text: !function utils.make_prompt\ndoc_to_target: a\n")
    inp = documents(tmp_path / "in", [["What is the airspeed velocity of an unladen "
                                        "swallow? African or European?", UNRELATED]])
    with caplog.at_level("INFO"):
        art = run_stage(Decontaminate(tasks=["my_group"], task_dirs=[str(d)], ngram=13,
                                      min_words=8), tmp_path / "run", inputs={"documents": inp})
    assert [x["text"] for x in iter_documents(art.path)] == [UNRELATED]
    assert art.manifest["counts"]["dropped.qa_fn"] == 1
    assert art.manifest["meta"]["decontamination"]["tasks"]["qa_fn"]["fallback"] is True
    assert "using all string fields" in caplog.text
