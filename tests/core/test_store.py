"""The store keeps what it promises: verify, reuse only what is whole, ls, gc, stamped scratch.

Runs go through the CLI on the toy plugin (``toy`` fixture); a few store operations are
called directly where a race or a lock has to be staged.
"""
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import statuses
from recipe_engine.store import Store, check_files

# numbers -> scr (toy_scratch: shows the scratch it found) -> report
SCRATCH_RECIPE = """\
name: scr
executor: {name: serial}
stages:
  numbers:
    component: toy_numbers
    params: {count: 3}
  scr:
    component: toy_scratch
    inputs: {documents: numbers}
  report:
    component: toy_report
    inputs: {documents: scr}
"""


@pytest.fixture
def scr_recipe(tmp_path):
    d = tmp_path / "recipes"  # not tmp_path itself: the recipe's directory is scanned
    d.mkdir()
    path = d / "scr.yaml"
    path.write_text(SCRATCH_RECIPE)
    return str(path)


def by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


def data_file(artifact):
    return next(p for p in Path(artifact).rglob("*") if p.is_file() and p.name != "manifest.json")


def verify(toy, *args):
    rc, out, err = toy("verify", "--json", *args)
    return rc, json.loads(out), err


# -- verify ---------------------------------------------------------------------------------


def test_verify_a_recipe_all_ok_and_absent_stages(toy):
    toy.run_json("--until", "upper")
    rc, result, _ = verify(toy, toy.recipe)
    assert rc == 0 and result["ok"]
    assert {a["stage"]: a["status"] for a in result["artifacts"]} == {
        "numbers": "ok", "upper": "ok", "report": "absent"}
    rc, result, _ = verify(toy, toy.recipe, "upper", "stages.upper.params.suffix=zz")
    assert rc == 0 and [(a["stage"], a["status"]) for a in result["artifacts"]] == [
        ("upper", "absent")]
    rc, out, err = toy("verify", toy.recipe, "uper")
    assert rc == 1 and 'did you mean "upper"' in err
    rc, out, err = toy("verify")
    assert rc == 2 and "--all" in err


def test_verify_reports_every_kind_of_damage(toy):
    first = by_name(toy.run_json())
    other = by_name(toy.run_json("opt.lr=0.3"))["report"]
    numbers = data_file(first["numbers"]["artifact"])  # same size, other bytes
    numbers.write_bytes(bytes(b ^ 1 for b in numbers.read_bytes()))
    Path(first["upper"]["artifact"], "planted.txt").write_text("x")  # not in the manifest
    data_file(first["report"]["artifact"]).unlink()
    Path(other["artifact"], "manifest.json").write_text('{"kind": "eval_report"}')  # no files

    rc, result, _ = verify(toy, "--all")
    assert rc == 1 and not result["ok"]
    problems = {a["fingerprint"]: [(p["file"], p["problem"]) for p in a["problems"]]
                for a in result["artifacts"]}
    assert problems == {
        first["numbers"]["fingerprint"]: [(numbers.name, "sha256")],
        first["upper"]["fingerprint"]: [("planted.txt", "extra")],
        first["report"]["fingerprint"]: [("report.json", "missing")],
        other["fingerprint"]: [("manifest.json", "manifest")],
    }
    rc, out, err = toy("verify", "--all")
    assert rc == 1 and "DAMAGED" in out and "4 artifacts: 4 damaged" in out
    # one stage of a recipe, and a fingerprint prefix
    rc, result, _ = verify(toy, toy.recipe, "upper")
    assert rc == 1 and [a["stage"] for a in result["artifacts"]] == ["upper"]
    rc, result, _ = verify(toy, first["report"]["fingerprint"][:10])
    assert rc == 1 and result["artifacts"][0]["problems"][0]["problem"] == "missing"


def test_size_change_is_caught(tmp_path):
    store = Store(tmp_path)
    out, _ = store.begin("ab" * 32)
    (out / "sub").mkdir()
    (out / "sub" / "a.bin").write_bytes(b"abc")
    art = store.commit("ab" * 32, out, {"kind": "documents"})
    (art.path / "sub" / "a.bin").write_bytes(b"abcd")
    assert [p["problem"] for p in check_files(art.path, art.manifest["files"])] == ["size"]
    assert store.verify("ab" * 32)["status"] == "damaged"
    assert store.verify("cd" * 32)["status"] == "absent"


# -- a damaged artifact is never reused --------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_artifact_reruns_and_is_replaced(toy, damage):
    first = by_name(toy.run_json())
    f = data_file(first["numbers"]["artifact"])
    f.write_bytes(f.read_bytes()[:3]) if damage == "truncate" else f.unlink()
    rc, out, err = toy("run", toy.recipe, "--json")
    assert rc == 0, err
    assert statuses(json.loads(out)) == {"numbers": "ran", "upper": "cached", "report": "cached"}
    assert "ignoring the damaged artifact" in err and f.name in err
    rc, result, _ = verify(toy, "--all")
    assert rc == 0, result  # the rerun's commit replaced the damaged directory
    assert not any((toy.store / "trash").iterdir())


def test_lookup_checks_sizes_and_warns(tmp_path, caplog):
    store = Store(tmp_path)
    out, _ = store.begin("ab" * 32)
    (out / "a.bin").write_bytes(b"abc")
    art = store.commit("ab" * 32, out, {"kind": "documents"})
    assert store.lookup("ab" * 32) is not None
    (art.path / "a.bin").write_bytes(b"ab")
    with caplog.at_level(logging.WARNING, logger="recipe_engine.store"):
        assert store.lookup("ab" * 32) is None
        assert store.find("ab" * 32) is None  # a run's first look is silent; its second reports
    assert caplog.text.count("ignoring the damaged artifact") == 1
    assert "a.bin: 2 bytes, 3 in the manifest" in caplog.text


def test_commit_replaces_an_existing_directory(tmp_path):
    store = Store(tmp_path)
    for content in (b"old", b"new!"):
        out, _ = store.begin("ab" * 32)
        (out / "a.bin").write_bytes(content)
        art = store.commit("ab" * 32, out, {"kind": "documents"})
    assert (art.path / "a.bin").read_bytes() == b"new!"
    assert store.verify("ab" * 32)["status"] == "ok"
    assert not any((tmp_path / "trash").iterdir())
    assert not (tmp_path / "work" / ("ab" * 32)).exists()


# -- ls ---------------------------------------------------------------------------------------


def test_ls_lists_artifacts_sizes_ages_and_references(toy):
    first = by_name(toy.run_json())
    second = by_name(toy.run_json("opt.lr=0.3"))
    rc, out, _ = toy("ls", "--json")
    assert rc == 0
    listing = {a["fingerprint"]: a for a in json.loads(out)["artifacts"]}
    assert len(listing) == 4
    old_report = listing[first["report"]["fingerprint"]]
    assert (old_report["recipe"], old_report["stage"], old_report["component"],
            old_report["kind"]) == ("toy", "report", "toy_report", "eval_report")
    assert old_report["bytes"] > 0 and old_report["age"] >= 0
    assert old_report["referenced_by"] == []  # superseded by the second run and the index
    new_report = listing[second["report"]["fingerprint"]]
    assert any(r.startswith("index toy/report") for r in new_report["referenced_by"])
    assert any(r.startswith("last run") for r in new_report["referenced_by"])
    rc, out, _ = toy("ls")
    assert rc == 0 and "FINGERPRINT" in out.splitlines()[0] and "4 artifacts" in out
    assert first["report"]["fingerprint"][:12] in out and "index,last-run" in out


# -- gc ---------------------------------------------------------------------------------------


def test_gc_removes_only_what_nothing_references(toy):
    first = by_name(toy.run_json())
    second = by_name(toy.run_json("opt.lr=0.3"))
    gone = first["report"]["fingerprint"]
    (toy.store / "work" / ("0" * 64) / "scratch").mkdir(parents=True)  # a stale attempt
    (toy.store / "work" / ("0" * 64) / "scratch" / "ckpt").write_bytes(b"x" * 100)
    (toy.store / "trash" / "leftover").mkdir(parents=True)

    rc, out, _ = toy("gc", "--dry-run", "--json")
    dry = json.loads(out)
    assert rc == 0 and [a["fingerprint"] for a in dry["artifacts"]] == [gone]
    assert [w["fingerprint"] for w in dry["work"]] == ["0" * 64]
    assert dry["freed_bytes"] >= dry["artifacts"][0]["bytes"] + 100 and dry["kept"] == 3
    assert Path(first["report"]["artifact"]).is_dir()  # a dry run removes nothing
    rc, out, _ = toy("gc", "--dry-run")
    assert "would remove" in out and gone[:12] in out

    rc, out, _ = toy("gc")
    assert rc == 0 and "removed" in out and gone[:12] in out
    assert not Path(first["report"]["artifact"]).exists()
    assert not (toy.store / "work" / ("0" * 64)).exists()
    assert not any((toy.store / "trash").iterdir())
    for st in second.values():
        assert Path(st["artifact"]).is_dir()
    assert set(statuses(toy.run_json("opt.lr=0.3")).values()) == {"cached"}
    assert verify(toy, "--all")[0] == 0


def test_gc_keep_prefix_and_keep_runs(toy):
    first = by_name(toy.run_json())
    toy.run_json("opt.lr=0.3")
    old = first["report"]["fingerprint"]
    assert json.loads(toy("gc", "--dry-run", "--json", "--keep-runs", "2")[1])["artifacts"] == []
    assert json.loads(toy("gc", "--dry-run", "--json", "--keep", old[:8])[1])["artifacts"] == []
    with pytest.raises(SystemExit) as e:  # keeping no run would break the promise
        toy("gc", "--keep-runs", "0")
    assert e.value.code == 2


def test_gc_keeps_every_job_of_the_last_multirun(toy):
    rc, out, err = toy("run", toy.recipe, "-m", "opt.lr=0.1,0.3", "--json")
    assert rc == 0, err
    assert len({s["fingerprint"] for j in json.loads(out)["jobs"] for s in j["stages"]}) == 4
    rc, out, _ = toy("gc", "--json")
    assert rc == 0 and json.loads(out)["artifacts"] == []


def test_gc_keeps_the_resume_state_of_a_failed_last_run(toy, scr_recipe, monkeypatch):
    monkeypatch.setenv("TOY_SCRATCH_FAIL", "1")
    rc, out, _ = toy("run", scr_recipe, "--json")
    assert rc == 1
    scr = by_name(json.loads(out))["scr"]
    assert scr["status"] == "failed"
    work = toy.store / "work" / scr["fingerprint"]
    assert (work / "scratch" / "attempt.txt").is_file()
    assert json.loads(toy("gc", "--json")[1])["work"] == []
    assert (work / "scratch" / "attempt.txt").is_file()


def test_gc_refuses_while_a_summary_is_unreadable(toy):
    first = by_name(toy.run_json())
    toy.run_json("opt.lr=0.3")
    (toy.store / "runs" / "20990101-000000-000000-toy.json").write_text("{truncated")
    rc, out, err = toy("gc")
    assert rc == 1 and "removes nothing" in err and "20990101" in err
    assert Path(first["report"]["artifact"]).is_dir()


def test_gc_skips_what_a_run_holds_or_marks_live(toy):
    first = by_name(toy.run_json())
    toy.run_json("opt.lr=0.3")
    store, fp = Store(toy.store), first["report"]["fingerprint"]
    with store.lock(fp):  # a run is committing or gc-ing it right now
        result = store.gc()
    assert [b["fingerprint"] for b in result["busy"]] == [fp] and result["artifacts"] == []
    live = store.begin_run("toy", [fp], "inv")  # a run in progress (this process) may use it
    assert store.gc()["artifacts"] == [] and Path(first["report"]["artifact"]).is_dir()
    store.save_run({"recipe": "other", "stages": []}, live)  # the run ends: marker gone
    assert not live.exists()
    assert [a["fingerprint"] for a in store.gc()["artifacts"]] == [fp]


def test_gc_rechecks_under_the_lock(toy, monkeypatch):
    """A run that starts after gc read the references, and finds the artifact, keeps it."""
    first = by_name(toy.run_json())
    toy.run_json("opt.lr=0.3")
    store, fp = Store(toy.store), first["report"]["fingerprint"]
    real = Store.roots

    def roots_then_a_run_starts(self, keep_runs=1):
        roots = real(self, keep_runs)
        self.begin_run("toy", [fp], "late")
        return roots

    monkeypatch.setattr(Store, "roots", roots_then_a_run_starts)
    result = store.gc()
    assert result["artifacts"] == [] and [b["fingerprint"] for b in result["busy"]] == [fp]
    assert Path(first["report"]["artifact"]).is_dir()


def test_crashed_run_marker_protects_until_a_newer_run(toy):
    first = by_name(toy.run_json())
    store, fp = Store(toy.store), first["report"]["fingerprint"]
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)

    def crashed(fps, started):
        marker = store.begin_run("toy", fps, f"crashed-{started}")
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "pid": dead,
                                      "started": started}))
        return marker

    # a run that crashed before the newest run of its recipe is superseded; its marker goes
    old = crashed([fp], started=0)
    toy.run_json("opt.lr=0.3")
    assert [a["fingerprint"] for a in store.gc()["artifacts"]] == [fp]
    assert not old.exists()
    # the newest run of the recipe crashed: its resume state stays
    (toy.store / "work" / ("f" * 64) / "scratch").mkdir(parents=True)
    new = crashed(["f" * 64], started=time.time() + 1)
    assert store.gc()["work"] == []
    assert (toy.store / "work" / ("f" * 64)).is_dir() and new.exists()


# -- scratch is stamped with its inputs ----------------------------------------------------------


def seen(summary, stage="scr"):
    return json.loads(Path(by_name(summary)[stage]["artifact"], "scratch_seen.json").read_text())


def fail_once(toy, recipe, monkeypatch, *args):
    monkeypatch.setenv("TOY_SCRATCH_FAIL", "1")
    rc, out, _ = toy("run", recipe, "--json", *args)
    monkeypatch.delenv("TOY_SCRATCH_FAIL")
    assert rc == 1
    return toy.store / "work" / by_name(json.loads(out))["scr"]["fingerprint"]


def test_scratch_resumes_when_its_inputs_are_unchanged(toy, scr_recipe, monkeypatch):
    work = fail_once(toy, scr_recipe, monkeypatch)
    assert json.loads((work / "scratch.json").read_text())["inputs"]["documents"]["content"]
    summary = json.loads(toy("run", scr_recipe, "--json")[1])
    assert by_name(summary)["scr"]["status"] == "ran"
    assert seen(summary) == ["attempt.txt"]
    manifest = json.loads(Path(by_name(summary)["scr"]["artifact"], "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert not work.exists()  # committed: scratch and stamp are gone


def test_force_discards_scratch(toy, scr_recipe):
    first = json.loads(toy("run", scr_recipe, "--json")[1])
    fp = by_name(first)["scr"]["fingerprint"]
    planted = toy.store / "work" / fp / "scratch" / "stale-checkpoint.pt"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"stale")
    rc, out, err = toy("run", scr_recipe, "--json", "--force", "scr")
    assert rc == 0, err
    forced = json.loads(out)
    assert statuses(forced) == {"numbers": "cached", "scr": "ran", "report": "ran"}
    assert seen(forced) == []  # ran from scratch: the planted state was gone before it started
    assert "discarding the scratch state of scr" in err and "--force" in err
    manifest = json.loads(Path(by_name(forced)["scr"]["artifact"], "manifest.json").read_text())
    assert manifest["resumed"] is False
    assert not planted.exists()


def test_fresh_discards_scratch_without_forcing(toy, scr_recipe, monkeypatch):
    work = fail_once(toy, scr_recipe, monkeypatch)
    (work / "scratch" / "planted").write_text("x")
    rc, out, err = toy("run", scr_recipe, "--json", "--fresh", "scr")
    assert rc == 0, err
    assert seen(json.loads(out)) == [] and "discarding the scratch state of scr" in err
    # --fresh does not rerun what is cached, nor anything downstream
    again = json.loads(toy("run", scr_recipe, "--json", "--fresh", "scr")[1])
    assert set(statuses(again).values()) == {"cached"}
    rc, out, err = toy("run", scr_recipe, "--fresh", "nope")
    assert rc == 1 and "no stage named 'nope'" in err


def test_scratch_made_from_other_input_contents_is_discarded(toy, scr_recipe, monkeypatch):
    work = fail_once(toy, scr_recipe, monkeypatch)
    stamp = json.loads((work / "scratch.json").read_text())
    stamp["inputs"]["documents"]["content"] = "0" * 64  # made from other bytes of `numbers`
    (work / "scratch.json").write_text(json.dumps(stamp))
    rc, out, err = toy("run", scr_recipe, "--json")
    assert rc == 0, err
    assert seen(json.loads(out)) == []
    assert "discarding the scratch state of scr" in err
    assert "other contents of input 'documents'" in err


def test_forcing_upstream_discards_downstream_scratch(toy, scr_recipe, monkeypatch):
    fail_once(toy, scr_recipe, monkeypatch)
    rc, out, err = toy("run", scr_recipe, "--json", "--force", "numbers")
    assert rc == 0, err
    assert seen(json.loads(out)) == []


def test_begin_without_stamp_file_discards(tmp_path, caplog):
    store = Store(tmp_path)
    _, scratch = store.begin("ab" * 32)  # an attempt from before stamps existed
    (scratch / "old").write_text("x")
    stamp = {"inputs": {"documents": {"fingerprint": "f", "content": "c"}}}
    with caplog.at_level(logging.WARNING, logger="recipe_engine.store"):
        _, scratch = store.begin("ab" * 32, stamp=stamp, name="s")
        assert not any(scratch.iterdir()) and "has no stamp" in caplog.text
        (scratch / "new").write_text("x")
        _, scratch = store.begin("ab" * 32, stamp=stamp, name="s")
    assert [p.name for p in scratch.iterdir()] == ["new"]  # same stamp: resumed


# -- docs/reliability.md names tests that exist ---------------------------------------------------


def test_reliability_doc_names_existing_tests():
    import re

    from conftest import ROOT

    doc = (ROOT / "docs" / "reliability.md").read_text()
    cited, current = [], None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(test_\w+)", doc):
        current = path or current
        cited.append((current, name))
    assert len(cited) > 30
    for path, name in cited:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"
