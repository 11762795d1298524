"""Two ``recipe run`` processes on one store never corrupt each other and never compute a
stage twice: the same recipe twice, and two jobs of a sweep that share upstream stages.

Each process is a real ``python`` running ``recipe_engine.cli.main`` with the toy plugin
installed through a faked entry point; both wait at a barrier until both are ready, so their
runs start together. ``slow`` sleeps while it holds its lock, so the second process meets it.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TESTS

RECIPE = """\
name: conc
executor: {name: serial}
stages:
  numbers:
    component: toy_numbers
    params: {count: 4}
  slow:
    component: toy_scratch
    inputs: {documents: numbers}
    params: {seconds: 0.6}
  report:
    component: toy_report
    inputs: {documents: slow}
"""

LAUNCHER = """\
import sys, time
from pathlib import Path

sys.path.insert(0, {tests!r})
from recipe_engine.testing import fake_entry_point


class Patch:  # what fake_entry_point needs of pytest's monkeypatch, for the process's life
    setattr = staticmethod(setattr)

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


fake_entry_point(Patch(), "toy", "toy_plugin")
import hydra  # noqa: F401  (imported before the barrier, so both runs start together)

from recipe_engine import config, runner  # noqa: F401
from recipe_engine.cli import main

ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
sys.exit(main(sys.argv[3:]))
"""


def run_together(tmp_path, *jobs):
    """Start one process per job (a list of overrides) on one store; return their results."""
    recipes = tmp_path / "recipes"
    recipes.mkdir(exist_ok=True)
    recipe = recipes / "conc.yaml"
    recipe.write_text(RECIPE)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(TESTS)))
    go = tmp_path / "go"
    procs = []
    for i, overrides in enumerate(jobs):
        ready = tmp_path / f"ready-{i}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, str(launcher), str(ready), str(go), "run", str(recipe), "--json",
             "--store", str(tmp_path / "store"), *overrides],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    deadline = time.monotonic() + 60
    while not all(r.exists() for r, _ in procs) and time.monotonic() < deadline:
        assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
        time.sleep(0.005)
    go.touch()
    results = []
    for _, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append((json.loads(out), err))
    return results


def statuses_by_stage(summaries):
    out = {}
    for s in summaries:
        for st in s["stages"]:
            out.setdefault(st["name"], []).append(st["status"])
    return {name: sorted(v) for name, v in out.items()}


def check_store(toy, store, summaries):
    """Every artifact verifies; both run summaries are whole and agree with stdout."""
    rc, out, err = toy("verify", "--all", "--json", "--store", store)
    assert rc == 0, out
    assert all(a["status"] == "ok" for a in json.loads(out)["artifacts"])
    saved = [json.loads(p.read_text()) for p in sorted((store / "runs").glob("*.json"))]
    assert len(saved) == 2
    key = lambda s: s["invocation"]  # noqa: E731
    assert sorted(saved, key=key) == sorted(summaries, key=key)
    for s in saved:
        assert s["recipe"] == "conc" and [st["name"] for st in s["stages"]] == [
            "numbers", "slow", "report"]
        for st in s["stages"]:
            assert Path(st["artifact"]) == store / "artifacts" / st["fingerprint"]
    assert not list((store / "live").iterdir())  # both runs ended: no live markers left
    assert not any(p.iterdir() for p in (store / "work").iterdir())  # no half-written output
    index = json.loads((store / "index" / "conc.json").read_text())
    assert set(index) == {"numbers", "slow", "report"}


def test_same_recipe_twice_at_once(toy, tmp_path):
    (a, err_a), (b, err_b) = run_together(tmp_path, [], [])
    assert statuses_by_stage([a, b]) == {stage: ["cached", "ran"]
                                         for stage in ("numbers", "slow", "report")}
    assert [s["fingerprint"] for s in a["stages"]] == [s["fingerprint"] for s in b["stages"]]
    # they met: one waited on the lock of the stage the other was computing
    assert "waiting for another run holding the lock" in err_a + err_b
    check_store(toy, tmp_path / "store", [a, b])
    assert len(list((tmp_path / "store" / "artifacts").iterdir())) == 3


def test_two_sweep_jobs_share_upstream_stages(toy, tmp_path):
    jobs = [[f"++stages.report.params.lr={lr}"] for lr in ("0.1", "0.3")]
    (a, err_a), (b, err_b) = run_together(tmp_path, *jobs)
    assert statuses_by_stage([a, b]) == {"numbers": ["cached", "ran"], "slow": ["cached", "ran"],
                                         "report": ["ran", "ran"]}
    assert a["stages"][1]["fingerprint"] == b["stages"][1]["fingerprint"]
    assert a["stages"][2]["fingerprint"] != b["stages"][2]["fingerprint"]
    scores = sorted(s["stages"][2]["metrics"]["score"] for s in (a, b))
    assert scores[1] == pytest.approx(3 * scores[0])
    check_store(toy, tmp_path / "store", [a, b])
    assert len(list((tmp_path / "store" / "artifacts").iterdir())) == 4
