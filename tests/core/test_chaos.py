"""Chaos: a recipe killed with SIGKILL at random moments, several rounds, then run to the end.

Every ``recipe run`` is a real process (its own session, so the kill takes the local
executor's worker processes too); the moments are drawn by a seeded RNG over the length of
an uninterrupted run, so the kills land in start-up, inside stages, during commits and
between stages. Afterwards one run to the end must give, stage by stage, artifacts whose
files equal an uninterrupted run's byte for byte (``manifest.json`` aside: it holds
timings); ``recipe verify --all`` passes; no committed stage keeps a ``work/`` directory; no
committed artifact holds a stray file; and ``recipe gc`` then removes the crashed runs'
markers and leftovers without touching what the last run uses.

Two recipes: the toy plugin's (cheap stages, one that sleeps while it holds scratch state)
and a real-data one on the built-in components (files_source -> filter -> exact_dedup on
a local executor with two workers).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TESTS

LAUNCHER = """\
import sys
sys.path.insert(0, {tests!r})
from recipe_engine.testing import fake_entry_point


class Patch:  # what fake_entry_point needs of pytest's monkeypatch, for the process's life
    setattr = staticmethod(setattr)

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


fake_entry_point(Patch(), "toy", "toy_plugin")

if __name__ == "__main__":  # not in the local executor's spawned workers, which import this
    from recipe_engine.cli import main

    sys.exit(main(sys.argv[1:]))
"""

TOY_RECIPE = """\
name: chaos_toy
executor: {name: serial}
stages:
  numbers:
    component: toy_numbers
    params: {count: 50}
  slow:
    component: toy_scratch
    inputs: {documents: numbers}
    params: {seconds: 0.4}
  upper:
    component: toy_upper
    inputs: {documents: slow}
    params: {suffix: "!"}
  report:
    component: toy_report
    inputs: {documents: upper}
"""

DATA_RECIPE = """\
name: chaos_data
executor: {{name: local, num_workers: 2}}
stages:
  source:
    component: files_source
    params: {{root: {root}, include: ["**/*.py"], docs_per_part: 3}}
  filter:
    component: filter
    inputs: {{documents: source}}
    params:
      filters: [{{name: length, min_chars: 40}}]
  dedup:
    component: exact_dedup
    inputs: {{documents: filter}}
"""


def make_corpus(root: Path) -> None:
    """A handful of Python files: some short (filtered out), some duplicated."""
    rng = random.Random(7)
    for i in range(24):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 99)}\n"
                       for j in range(rng.randint(0, 6)))
        path = root / f"pkg{i % 3}" / f"m{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body or "x = 1\n")
    for i in range(4):  # exact duplicates of earlier files
        (root / "dups" / f"copy{i}.py").parent.mkdir(exist_ok=True)
        (root / "dups" / f"copy{i}.py").write_text((root / "pkg0" / f"m{3 * i:02d}.py").read_text())


class Runner:
    """``recipe run`` as a process of its own session, on one store."""

    def __init__(self, tmp_path: Path, recipe: Path):
        self.launcher = tmp_path / "launch.py"
        self.launcher.write_text(LAUNCHER.format(tests=str(TESTS)))
        self.recipe = recipe

    def command(self, store: Path, *args: str) -> list[str]:
        return [sys.executable, str(self.launcher), *args, "--store", str(store)]

    def run(self, store: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(store, *args), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    def complete(self, store: Path) -> tuple[dict, float]:
        t0 = time.monotonic()
        done = self.run(store, "run", str(self.recipe), "--json", "-q")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return json.loads(done.stdout), time.monotonic() - t0

    def killed(self, store: Path, after: float) -> int | None:
        """Start a run and SIGKILL its whole process group ``after`` seconds later; the
        run's exit status if it ended before that (None when it was killed)."""
        proc = subprocess.Popen(self.command(store, "run", str(self.recipe), "--json", "-q"),
                                cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=after)
            return proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# toy_scratch writes down the scratch files it found when it started: that differs, by
# design, between a first attempt ([]) and one resumed after a kill (["attempt.txt"])
RESUME_PROBE = "scratch_seen.json"


def digests(summary: dict) -> dict[str, dict[str, str]]:
    """stage -> {file: sha256}, manifest.json (timings) and the toy's resume probe aside."""
    out = {}
    for st in summary["stages"]:
        root = Path(st["artifact"])
        out[st["name"]] = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(root.rglob("*"))
                           if p.is_file() and p.name not in ("manifest.json", RESUME_PROBE)}
        probe = root / RESUME_PROBE
        if probe.exists():
            assert json.loads(probe.read_text()) in ([], ["attempt.txt"])
    return out


def chaos(cli, tmp_path: Path, recipe: Path, seed: int, cycles: int, kills: int) -> None:
    """``cycles`` times, on a fresh store: up to ``kills`` runs, each SIGKILLed at a moment
    drawn uniformly over an uninterrupted run's length (each resumes what the last left),
    then one run to the end; then check that store. ``cli``: the in-process CLI (toy)."""
    runner = Runner(tmp_path, recipe)
    reference, seconds = runner.complete(tmp_path / "reference")
    rng = random.Random(seed)
    history = []
    for cycle in range(cycles):
        store = tmp_path / f"store{cycle}"
        outcomes: list[tuple[float, int | None]] = []
        for _ in range(kills):
            # inside the first 80% of the reference run: a run that is a little faster than
            # the reference (warm caches) must still be killed, not finish first
            after = rng.uniform(0.1, 0.8 * seconds)
            outcomes.append((round(after, 2), runner.killed(store, after)))
            if outcomes[-1][1] is not None:  # it ended before the kill
                break
        history.append(outcomes)
        why = f"seed {seed}, cycle {cycle}: kills (seconds, exit status if it ended first) " \
              f"{outcomes}; store {store}"
        assert all(rc in (None, 0) for _, rc in outcomes), why  # no run failed by itself
        check_store(cli, runner, store, reference, why)
    landed = sum(rc is None for outcomes in history for _, rc in outcomes)
    assert landed >= cycles, history  # the kills did land (the first of a cycle, at least)


def check_store(cli, runner: Runner, store: Path, reference: dict, why: str) -> None:
    final, _ = runner.complete(store)
    assert [s["name"] for s in final["stages"]] == [s["name"] for s in reference["stages"]]
    assert digests(final) == digests(reference), why

    rc, out, _ = cli("verify", "--all", "--json", "--store", store)
    assert rc == 0, (why, out[-3000:])
    rows = json.loads(out)["artifacts"]
    assert rows and all(r["status"] == "ok" for r in rows), why  # no stray file in any
    committed = {s["fingerprint"] for s in final["stages"]}
    assert committed <= {r["fingerprint"] for r in rows}, why
    leftovers = [fp[:12] for fp in committed if (store / "work" / fp).exists()]
    assert not leftovers, (why, leftovers)  # no scratch or output left for a committed stage
    assert not [p for p in (store / "artifacts").rglob("*") if p.name.endswith(".tmp")], why

    # gc: the crashed runs' markers and leftovers go, what the last run uses stays
    rc, out, err = cli("gc", "--json", "--store", store)
    assert rc == 0, (why, err[-3000:])
    assert not list((store / "live").glob("*.json")), why
    assert not (store / "work").exists() or not list((store / "work").iterdir()), why
    rc, out, _ = cli("verify", "--all", "--json", "--store", store)
    assert rc == 0, why
    assert {r["fingerprint"] for r in json.loads(out)["artifacts"]} == committed, why
    rc, out, err = cli("run", runner.recipe, "--json", "-q", "--store", store)
    assert rc == 0, (why, err[-3000:])
    assert {s["status"] for s in json.loads(out)["stages"]} == {"cached"}, why


def test_work_dir_left_by_a_kill_after_commit_is_removed(toy):
    """A run killed between its commit's rename and the removal of its work directory left
    ``work/<fp>/`` (its scratch: checkpoints, parts) beside the committed artifact; the next
    run that finds the artifact removes it."""
    first = toy.run_json()
    fp = first["stages"][0]["fingerprint"]
    leftover = toy.store / "work" / fp / "scratch"
    leftover.mkdir(parents=True)
    (leftover / "big.bin").write_bytes(b"x" * 1000)
    again = toy.run_json()
    assert {s["status"] for s in again["stages"]} == {"cached"}
    assert not (toy.store / "work" / fp).exists()
    assert toy("verify", "--all")[0] == 0


@pytest.mark.slow
def test_chaos_toy_recipe(toy, tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "chaos_toy.yaml"
    recipe.write_text(TOY_RECIPE)
    chaos(toy, tmp_path, recipe, seed=1, cycles=4, kills=3)


@pytest.mark.slow
def test_chaos_data_recipe_with_executor_workers(toy, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "chaos_data.yaml"
    recipe.write_text(DATA_RECIPE.format(root=corpus))
    chaos(toy, tmp_path, recipe, seed=2, cycles=3, kills=3)


HOLD_RECIPE = """\
name: hold
executor: {name: serial}
stages:
  numbers:
    component: toy_numbers
    params: {count: 5}
  slow:
    component: toy_scratch
    inputs: {documents: numbers}
    params: {seconds: 4}
"""


@pytest.mark.slow
def test_a_run_killed_while_holding_a_lock_is_taken_over(toy, tmp_path):
    """Run A is SIGKILLed inside ``slow`` (holding its lock, scratch written) while run B
    waits on that lock: B takes the lock over, resumes A's scratch, commits; the store
    verifies and gc then removes A's marker."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "hold.yaml"
    recipe.write_text(HOLD_RECIPE)
    runner = Runner(tmp_path, recipe)
    store = tmp_path / "store"
    a = subprocess.Popen(runner.command(store, "run", str(recipe), "-q"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    b_err = tmp_path / "b.err"
    b = None
    try:
        deadline = time.monotonic() + 120
        while not list(store.glob("work/*/scratch/attempt.txt")):  # A is inside `slow`
            assert a.poll() is None and time.monotonic() < deadline, "A never reached slow"
            time.sleep(0.02)
        with open(b_err, "w") as err:
            b = subprocess.Popen(runner.command(store, "run", str(recipe), "--json"),
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        while "waiting for another run holding the lock" not in b_err.read_text():
            assert b.poll() is None and a.poll() is None and time.monotonic() < deadline, \
                b_err.read_text()
            time.sleep(0.02)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
        out, _ = b.communicate(timeout=120)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert b.returncode == 0, b_err.read_text()[-3000:]
    summary = json.loads(out)
    assert {s["name"]: s["status"] for s in summary["stages"]} == {"numbers": "cached",
                                                                  "slow": "ran"}
    slow = Path(summary["stages"][1]["artifact"])
    assert json.loads((slow / "scratch_seen.json").read_text()) == ["attempt.txt"]  # resumed
    assert toy("verify", "--all", "--store", store)[0] == 0
    assert len(list((store / "live").glob("*.json"))) == 1  # A's, a crashed run
    rc, _, err = toy("gc", "--store", store)
    assert rc == 0, err
    assert not list((store / "live").glob("*.json"))  # superseded by B's run, removed
    assert toy("verify", "--all", "--store", store)[0] == 0
