"""Post-training data: the chat record schema (``chat_schema``), keeping text and messages in
step (``chat_sync``), and the generators from the standard library (``stdlib_instructions``,
``stdlib_preferences``), on a few real modules."""
from __future__ import annotations

import json

import pytest

from recipe_engine import Artifact, DocumentFilter
from recipe_engine.artifacts import is_heldout, iter_documents, list_parts, write_documents
from recipe_engine.testing import make_plugin_manager, run_stage
from recipe_engine_plugins import data
from recipe_engine_plugins.data.instructions import (
    SEPARATOR, ChatSchemaFilter, ChatSync, StdlibInstructions, StdlibPreferences, chat_text,
    mutants, mutations, realign, run_doctests, schema_problem)
from recipe_engine_plugins.data.pii import PiiRedact
from recipe_engine_plugins.data.source import FilesSource
from recipe_engine_plugins.data.split import HeldoutSplit

MODULES = ["textwrap", "heapq", "statistics"]


def conversation(**extra):
    doc = {"id": "c", "source": "t", "path": None,
           "messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Add two numbers."},
                        {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}]}
    doc.update(extra)
    doc.setdefault("text", chat_text(doc))
    return doc


def preference(**extra):
    doc = {"id": "p", "source": "t", "path": None,
           "prompt": [{"role": "user", "content": "Is 3 < 4?"}],
           "chosen": "Yes.", "rejected": "No."}
    doc.update(extra)
    doc.setdefault("text", chat_text(doc))
    return doc


def documents(path, docs):
    path.mkdir(parents=True, exist_ok=True)
    write_documents(path / "part-00000.jsonl.zst", docs)
    return Artifact(kind="documents", path=path, manifest={})


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    inst = run_stage(StdlibInstructions(modules=MODULES), root / "inst")
    prefs = run_stage(StdlibPreferences(modules=MODULES), root / "prefs")
    return root, inst, prefs


# -- the schema ---------------------------------------------------------------------------------


def test_text_is_the_contents_joined_by_a_blank_line():
    assert conversation()["text"] == \
        "Be brief.\n\nAdd two numbers.\n\ndef add(a, b):\n    return a + b\n"
    assert preference()["text"] == "Is 3 < 4?" + SEPARATOR + "Yes." + SEPARATOR + "No."
    assert schema_problem(conversation()) is None and schema_problem(preference()) is None


@pytest.mark.parametrize("doc, reason", [
    ({"id": "x", "text": "plain", "source": "t", "path": None}, "missing_messages"),
    (conversation(messages=[]), "missing_messages"),
    (conversation(prompt=[{"role": "user", "content": "x"}]), "ambiguous_kind"),
    (conversation(messages=[{"role": "user"}, {"role": "assistant", "content": "a"}]),
     "bad_message"),
    (conversation(messages=["hi"]), "bad_message"),
    (conversation(messages=[{"role": "robot", "content": "q"},
                            {"role": "assistant", "content": "a"}]), "bad_role"),
    (conversation(messages=[{"role": "user", "content": "q"},
                            {"role": "system", "content": "s"},
                            {"role": "assistant", "content": "a"}]), "system_not_first"),
    (conversation(messages=[{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "  \n"}]), "empty_content"),
    (conversation(messages=[{"role": "system", "content": "s"},
                            {"role": "assistant", "content": "a"}]), "no_user_turn"),
    (conversation(messages=[{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a"},
                            {"role": "user", "content": "and?"}]), "last_not_assistant"),
    (conversation(text="something else"), "text_mismatch"),
    (preference(prompt=[{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]), "prompt_not_ending_with_user"),
    (preference(chosen=None), "missing_response"),
    ({k: v for k, v in preference().items() if k != "rejected"}, "missing_response"),
    (preference(rejected=""), "empty_content"),
    (preference(rejected="Yes."), "chosen_equals_rejected"),
    (preference(text="Is 3 < 4?"), "text_mismatch"),
])
def test_chat_schema_reasons(doc, reason):
    assert ChatSchemaFilter().reason(doc) == reason


def test_chat_schema_record_type_and_text_check():
    assert ChatSchemaFilter(expect="conversation").reason(preference()) == "wrong_kind"
    assert ChatSchemaFilter(expect="preference").reason(preference()) is None
    assert ChatSchemaFilter(check_text=False).reason(conversation(text="stale")) is None


def test_jsonl_conversations_through_files_source_and_the_filter_stage(tmp_path):
    good = conversation()
    rows = [good, preference(), conversation(messages=[{"role": "user", "content": "q"}]),
            conversation(text="stale text")]
    src = tmp_path / "chat"
    src.mkdir()
    (src / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pm = make_plugin_manager(data)
    docs = run_stage(FilesSource(root=str(src), include=["*.jsonl"]), tmp_path / "src", pm=pm)
    read = list(iter_documents(docs.path))
    assert read[0]["messages"] == good["messages"] and "chosen" in read[1]  # fields kept
    stage = pm.registry.build("stage", {"name": "filter", "filters": [{"name": "chat_schema"}]})
    out = run_stage(stage, tmp_path / "filter", {"documents": docs}, pm=pm)
    kept = list(iter_documents(out.path))
    assert [d["id"] for d in kept] == ["chat/chat.jsonl#1", "chat/chat.jsonl#2"]
    counts = out.manifest["counts"]
    assert counts["chat_schema.dropped.last_not_assistant"] == 1
    assert counts["chat_schema.dropped.text_mismatch"] == 1
    assert isinstance(pm.registry.build(DocumentFilter, {"name": "chat_schema"}), ChatSchemaFilter)


# -- keeping text and messages in step ------------------------------------------------------------


def test_realign_maps_edits_to_their_contents():
    segs = ["Mail me at a@b.org\n\nplease.", "def f():\n    return 1\n", "ok"]
    new = SEPARATOR.join(segs).replace("a@b.org", "<EMAIL>").replace("return 1", "return 10")
    assert realign(segs, new) == ["Mail me at <EMAIL>\n\nplease.", "def f():\n    return 10\n",
                                  "ok"]
    assert realign(segs, SEPARATOR.join(segs)) == segs
    assert realign(["a", "b"], "a b") is None  # the separator was edited away
    assert realign(["x", "y"], "z") is None


def test_pii_redaction_then_chat_sync_keeps_messages_redacted(tmp_path):
    doc = conversation(messages=[{"role": "user", "content": "Write to jane.doe@corp-mail.com"},
                                 {"role": "assistant",
                                  "content": "Sent to jane.doe@corp-mail.com."}])
    pref = preference(chosen="Ask bob@corp-mail.com", rejected="No.")
    inp = documents(tmp_path / "in", [doc, pref, {"id": "plain", "text": "x", "source": "t",
                                                  "path": None}])
    red = run_stage(PiiRedact(kinds=["email"]), tmp_path / "pii", {"documents": inp})
    stale = list(iter_documents(red.path))
    assert "<EMAIL>" in stale[0]["text"] and "jane" in stale[0]["messages"][0]["content"]
    assert schema_problem(stale[0]) == "text_mismatch"  # caught if chat_sync is left out
    synced = run_stage(ChatSync(), tmp_path / "sync", {"documents": red})
    out = list(iter_documents(synced.path))
    assert out[0]["messages"][0]["content"] == "Write to <EMAIL>"
    assert out[0]["messages"][1]["content"] == "Sent to <EMAIL>."
    assert out[1]["chosen"] == "Ask <EMAIL>" and out[2]["text"] == "x"
    assert all(schema_problem(d) is None for d in out[:2])
    assert synced.manifest["counts"]["rebuilt"] == 2
    assert synced.manifest["counts"]["not_chat"] == 1


def test_chat_sync_drops_what_it_cannot_align_and_rebuilds_text_from_messages(tmp_path):
    broken = conversation(text="Be brief. Add two numbers. def add(a, b): return a + b")
    inp = documents(tmp_path / "in", [broken, conversation(id="ok")])
    out = run_stage(ChatSync(), tmp_path / "t", {"documents": inp})
    assert [d["id"] for d in iter_documents(out.path)] == ["ok"]
    assert out.manifest["counts"]["dropped.unalignable"] == 1
    out = run_stage(ChatSync(authority="messages"), tmp_path / "m", {"documents": inp})
    assert [schema_problem(d) for d in iter_documents(out.path)] == [None, None]


# -- mutations and the doctest child ------------------------------------------------------------

SAMPLE = '''def f(xs, n=3):
    total = 0
    for x in xs:
        if x < n and not x is None:
            total = total + x
    return total
'''


def test_mutations_are_local_edits_that_parse():
    labels = [m[3] for m in mutations(SAMPLE)]
    kinds = " ".join(labels)
    for expected in ("'<='", "'and' swapped", "arithmetic", "constant 0 -> 1",
                     "condition negated", "'not' removed", "returns"):
        assert expected in kinds, (expected, labels)
    import random
    found = mutants(SAMPLE, random.Random(1), 100)
    assert len(found) == len(labels)
    for src, _ in found:  # one site changed, the rest of the text (comments too) as it was
        assert src != SAMPLE and src.splitlines()[0] == SAMPLE.splitlines()[0]


def test_doctest_child_contains_hangs_and_crashes(tmp_path):
    (tmp_path / "toymod.py").write_text('def double(x):\n    """Twice x.\n\n    >>> double(2)\n'
                                        '    4\n    """\n    return 2 * x\n')
    real = "def double(x):\n    return 2 * x\n"
    runs = [real, real,
            "def double(x):\n    while True:\n        pass\n",  # hangs
            "def double(x):\n    import os\n    os._exit(3)\n",  # kills its interpreter
            "def double(x):\n    return 2 * x\n\n\nimport sys\n",  # still passes
            "def double(x):\n    return 3 * x\n",  # fails: the one used
            "def double(x):\n    return 4 * x\n"]  # not run
    group = {"name": "double", "class": None, "qualname": "double",
             "docstring": "Twice x.\n\n>>> double(2)\n4\n", "runs": runs}
    bad = dict(group, runs=["def double(x):\n    return x\n"] * 2 + runs[2:])
    got = run_doctests(str(tmp_path), "toymod", [group, bad], timeout_s=0.5, memory_mb=512)
    assert got == [["pass", "pass", "timeout", "crash", "pass", "fail"], ["fail"]]


# -- the generators -------------------------------------------------------------------------------


def test_instructions_from_three_modules(generated):
    _, inst, _ = generated
    docs = list(iter_documents(inst.path))
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)) > 30
    assert "stdlib-instructions/textwrap.dedent" in ids
    assert "stdlib-instructions/statistics.NormalDist.overlap" in ids  # methods too
    assert {d["module"] for d in docs} == set(MODULES)
    # deterministic order: module files by path, then source order
    assert [d["module"] for d in docs] == sorted((d["module"] for d in docs),
                                                  key=lambda m: ["heapq", "statistics",
                                                                 "textwrap"].index(m))
    for d in docs:
        assert d["id"] == f"stdlib-instructions/{d['module']}.{d['qualname']}"
        assert schema_problem(d, "conversation") is None, d["id"]
        user, answer = d["messages"][0]["content"], d["messages"][1]["content"]
        assert d["qualname"].split(".")[-1] + "(" in user
        assert answer.startswith(("def ", "@")) and '"""' not in answer.split("\n", 2)[1]
        assert answer.count("\n") <= 40
    counts = inst.manifest["counts"]
    assert counts["documents_out"] == len(docs) == inst.manifest["meta"]["num_documents"]
    assert counts["ignored.short_docstring"] > 0 and counts["ignored.no_docstring"] > 0


def test_generators_are_deterministic(generated, tmp_path):
    root, inst, prefs = generated
    again = run_stage(StdlibInstructions(modules=MODULES), tmp_path / "inst")
    assert [p.read_bytes() for p in list_parts(again.path)] == \
        [p.read_bytes() for p in list_parts(inst.path)]
    again = run_stage(StdlibPreferences(modules=MODULES), tmp_path / "prefs")
    assert [p.read_bytes() for p in list_parts(again.path)] == \
        [p.read_bytes() for p in list_parts(prefs.path)]
    other = run_stage(StdlibInstructions(modules=MODULES, seed=1), tmp_path / "seed")
    prompts = [d["messages"][0]["content"] for d in iter_documents(other.path)]
    assert prompts != [d["messages"][0]["content"] for d in iter_documents(inst.path)]


def test_preferences_rejected_fails_and_chosen_passes(generated):
    root, inst, prefs = generated
    docs = list(iter_documents(prefs.path))
    assert len(docs) >= 5
    counts = prefs.manifest["counts"]
    assert counts["with_doctests"] >= len(docs) and counts["mutants.fail"] == len(docs)
    for d in docs:
        assert schema_problem(d, "preference") is None, d["id"]
        assert d["id"].startswith("stdlib-preferences/") and d["chosen"] != d["rejected"]
        assert d["mutation"]
    import ast
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    for d in docs[::2]:  # re-run a sample, fresh: chosen passes (twice), rejected fails
        module, qualname = d["module"], d["qualname"]
        tree = ast.parse(open(f"{stdlib}/{d['path']}", encoding="utf-8").read())
        cls, _, name = qualname.rpartition(".")
        scope = next(n for n in tree.body if getattr(n, "name", None) == cls).body if cls \
            else tree.body
        node = [n for n in scope if getattr(n, "name", None) == name][-1]
        group = {"name": name, "class": cls or None, "qualname": qualname,
                 "docstring": ast.get_docstring(node),
                 "runs": [d["chosen"], d["chosen"], d["rejected"]]}
        assert run_doctests(stdlib, module, [group], 5.0, 1024) == [["pass", "pass", "fail"]]


def test_records_survive_pii_redact_chat_sync_and_heldout_split(generated, tmp_path):
    _, inst, prefs = generated
    for name, art in (("inst", inst), ("prefs", prefs)):
        red = run_stage(PiiRedact(), tmp_path / f"{name}-pii", {"documents": art})
        synced = run_stage(ChatSync(), tmp_path / f"{name}-sync", {"documents": red})
        held = run_stage(HeldoutSplit(fraction=0.3), tmp_path / f"{name}-split",
                         {"documents": synced})
        before = list(iter_documents(art.path))
        after = list(iter_documents(held.path))
        assert [d["id"] for d in after] == [d["id"] for d in before]
        assert any(is_heldout(d) for d in after)
        for old, new in zip(before, after):
            assert schema_problem(new) is None, new["id"]
            assert set(new) - set(old) <= {"split"}


def test_parameters_are_checked():
    pm = make_plugin_manager(data)
    from recipe_engine import RecipeError
    with pytest.raises(RecipeError, match="modules"):
        pm.registry.build("stage", {"name": "stdlib_instructions", "modules": ["no-such mod"]})
    with pytest.raises(RecipeError, match="max_attempts"):
        pm.registry.build("stage", {"name": "stdlib_preferences", "max_attempts": 0})


@pytest.mark.slow
def test_a_process_pool_writes_the_same_bytes(generated, tmp_path):
    from recipe_engine_plugins.executors import LocalExecutor

    _, inst, prefs = generated
    for stage, art in ((StdlibInstructions(modules=MODULES, modules_per_task=1), inst),
                       (StdlibPreferences(modules=MODULES, modules_per_task=1), prefs)):
        with LocalExecutor(num_workers=2) as ex:
            out = run_stage(stage, tmp_path / stage.name, executor=ex)
        assert [d for d in iter_documents(out.path)] == [d for d in iter_documents(art.path)]
        modules = {d["module"] for d in iter_documents(art.path)}
        assert len(list_parts(out.path)) == len(modules)  # a part per module with records
