"""Faults injected into real runs: a worker process of the local executor killed mid-task, an
input file changed while a stage reads it, the disk filling up while a stage writes, a
truncated or corrupt latest training checkpoint.

Each fault must end the way the design promises: the stage fails with a clear error (never a
traceback), nothing is committed for it, ``recipe verify --all`` stays clean, and the next
run, once the fault is gone, resumes from what was finished and succeeds.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import fake_entry_point, statuses
from recipe_engine.artifacts import iter_documents

# -- a worker process killed mid-task --------------------------------------------------------

# A plugin module written into the test's directory (a spawned worker imports it by name).
# ``fault_squares`` runs one task per number through ``run_tasks``; the task for ``die_at``
# kills its own worker process while the file ``flag`` exists. Every task that starts is
# logged, one line each, so the test sees what ran twice.
FAULT_PLUGIN = '''
import os, signal, time
from dataclasses import dataclass
from pathlib import Path

from recipe_engine import Stage, StageContext, hookimpl
from recipe_engine.artifacts import write_documents
from recipe_engine_plugins.data._parts import clear_parts, place_parts, run_tasks


def square(task):
    with open(task["log"], "a") as f:
        f.write(f"{task['i']}\\n")
    work = Path(task["work"])
    if task["i"] == task["die_at"] and Path(task["flag"]).exists():
        # once the runner has saved the results of the tasks before it (in order)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                (work / "squares" / f"{j:05d}.json").exists() for j in range(task["i"])):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    rel = f"parts/{task['i']:05d}.jsonl.zst"
    (work / "parts").mkdir(exist_ok=True)
    write_documents(work / rel, [
        {"id": str(task["i"]), "text": str(task["i"] ** 2), "source": "sq", "path": None}])
    return {"files": [rel]}


@dataclass(kw_only=True)
class FaultSquares(Stage, name="fault_squares", output="documents"):
    count: int = 6
    die_at: int = 3
    flag: str = ""
    log: str = ""

    def run(self, ctx: StageContext) -> None:
        tasks = [(f"{i:05d}", {"i": i, "die_at": self.die_at, "flag": self.flag,
                               "log": self.log, "work": str(ctx.work)})
                 for i in range(self.count)]
        results = run_tasks(ctx, square, tasks, "squares")
        clear_parts(ctx.output)
        place_parts(ctx.work, [f for r in results for f in r["files"]], ctx.output)


@hookimpl
def recipe_components():
    return [FaultSquares]
'''

SQUARES_RECIPE = """\
name: squares
stages:
  sq:
    component: fault_squares
    executor: {{name: local, num_workers: 2}}
    params: {{count: 6, die_at: 3, flag: {flag}, log: {log}}}
"""


def test_worker_killed_mid_task_fails_cleanly_and_resumes(toy, tmp_path, monkeypatch):
    (tmp_path / "fault_plugin.py").write_text(FAULT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_point(monkeypatch, "faults", "fault_plugin")
    flag, log = tmp_path / "die", tmp_path / "tasks.log"
    flag.touch()
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "squares.yaml"
    recipe.write_text(SQUARES_RECIPE.format(flag=flag, log=log))

    rc, out, err = toy("run", recipe, "--json")
    assert rc == 1
    assert "Traceback" not in err
    assert "stage 'sq' failed: a worker process of the 'local' executor died abruptly" in err
    assert "squares task 00003 was not finished" in err  # the task whose worker died
    assert json.loads(out)["stages"][0]["status"] == "failed"
    assert not (toy.store / "artifacts").exists() or not any((toy.store / "artifacts").iterdir())
    rc, out, _ = toy("verify", "--all", "--json")
    assert rc == 0
    (work,) = (toy.store / "work").iterdir()
    finished = sorted(p.stem for p in (work / "scratch" / "squares").glob("*.json"))
    assert finished[:3] == ["00000", "00001", "00002"] and "00003" not in finished
    first_attempt = log.read_text().split()

    flag.unlink()  # the fault is gone
    rc, out, err = toy("run", recipe, "--json")
    assert rc == 0, err
    assert "resuming: " in err
    summary = json.loads(out)
    assert statuses(summary) == {"sq": "ran"}
    resumed = log.read_text().split()[len(first_attempt):]
    # the tasks finished in the first attempt did not run again; the others did, once
    assert sorted(resumed) == [str(i) for i in range(6) if f"{i:05d}" not in finished]
    assert toy("verify", "--all")[0] == 0
    art = Path(summary["stages"][0]["artifact"])
    assert [d["text"] for d in iter_documents(art)] == [str(i * i) for i in range(6)]
    assert not (toy.store / "work" / work.name).exists()  # scratch went with the commit


# -- an input file changed while a stage reads it --------------------------------------------

SOURCE_RECIPE = """\
name: src
executor: {{name: serial}}
stages:
  source:
    component: files_source
    params: {{root: {root}, include: ["*.py"], docs_per_part: 1}}
"""


@pytest.mark.parametrize("when", ["reading", "fingerprinting"])
def test_input_file_changed_while_being_read(toy, tmp_path, monkeypatch, when):
    """a.py is rewritten while c.py is opened: by the stage's reading (the source compares
    its listing before and after) or by the run's fingerprinting, before the stage starts
    (the runner compares the stage's fingerprint_extra before and after)."""
    from recipe_engine_plugins.data import source

    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (root / name).write_text(f"print({name!r})\n")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "src.yaml"
    recipe.write_text(SOURCE_RECIPE.format(root=root))

    real_open = source._open
    opened = []

    def open_and_edit(r, rel):  # fingerprinting opens every file first, then the stage does
        opened.append(rel)
        if rel == "c.py" and opened.count("c.py") == (1 if when == "fingerprinting" else 2):
            (root / "a.py").write_text("print('a, edited')\n")
            os.utime(root / "a.py", ns=(1, 10**18))
        return real_open(r, rel)

    monkeypatch.setattr(source, "_open", open_and_edit)
    rc, out, err = toy("run", recipe, "--json")
    assert rc == 1
    assert "Traceback" not in err
    if when == "reading":
        assert "stage 'source' failed: files_source: files changed while being read: a.py; " \
               "rerun" in err
    else:
        assert "stage 'source' failed: what 'files_source' reads from outside the store " \
               "changed since this run fingerprinted it" in err
    assert not (toy.store / "artifacts").exists() or not any((toy.store / "artifacts").iterdir())

    rc, out, err = toy("run", recipe, "--json")  # nothing changes now
    assert rc == 0, err
    art = Path(json.loads(out)["stages"][0]["artifact"])
    assert sorted(d["text"] for d in iter_documents(art)) == [
        "print('a, edited')\n", "print('b.py')\n", "print('c.py')\n"]


# -- the disk fills up -----------------------------------------------------------------------

PAGE = 4096


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small file system that fills up")
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); the disk "
                    "full test needs a small real file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``fs``."""
    ballast = fs / "ballast"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize + (ballast.stat().st_size if ballast.exists() else 0)
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return ballast


def artifact_digests(summary) -> dict[str, dict[str, str]]:
    """stage -> {file: sha256} of the committed artifacts (manifest.json left out: it holds
    timings)."""
    out = {}
    for st in summary["stages"]:
        root = Path(st["artifact"])
        out[st["name"]] = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(root.rglob("*"))
                           if p.is_file() and p.name != "manifest.json"}
    return out


def disk_full_rounds(toy, tmp_path, rounds) -> list[int]:
    """The toy recipe on a 256 KiB tmpfs with ``pages`` pages left free, for each in
    ``rounds`` until one run fits: a run that does not fit fails cleanly naming the full
    disk, leaves a store that verifies, and the next run (space back) succeeds with the
    same artifacts as a run on a roomy disk. Returns the rounds that failed."""
    reference = artifact_digests(toy.run_json())
    failures = []
    with tmpfs(tmp_path / "fs", "256k") as fs:
        store = fs / "store"
        for pages in rounds:
            shutil.rmtree(store, ignore_errors=True)
            ballast = fill(fs, pages * PAGE)
            rc, out, err = toy("run", toy.recipe, "--json", "--store", store)
            assert "Traceback" not in err, err
            if rc == 0:  # enough room for the whole run
                return failures
            assert rc == 1, err
            assert "No space left on device (the disk is full: free some space" in err, err
            failures.append(pages)
            # the store stays consistent: whatever was committed verifies
            rc, out, err = toy("verify", "--all", "--json", "--store", store)
            assert rc == 0, out
            assert all(a["status"] == "ok" for a in json.loads(out)["artifacts"])
            assert not list(store.rglob("*.tmp"))  # no half-written temporary files
            ballast.unlink()  # space is back: the next run succeeds
            rc, out, err = toy("run", toy.recipe, "--json", "--store", store)
            assert rc == 0, err
            assert artifact_digests(json.loads(out)) == reference
            rc, _, err = toy("verify", "--all", "--store", store)
            assert rc == 0, err
    return failures


def test_disk_full_fails_cleanly_and_the_next_run_succeeds(toy, tmp_path):
    """No room for the run's live marker; no room in the first stage; in a later stage."""
    assert disk_full_rounds(toy, tmp_path, [0, 2, 5])[:2] == [0, 2]


@pytest.mark.slow
def test_disk_full_at_every_write(toy, tmp_path):
    """0, 1, 2, ... pages left free: every write of a run (its live marker, scratch stamps,
    stage outputs, manifests) meets a full disk in one of the rounds."""
    failures = disk_full_rounds(toy, tmp_path, range(40))
    assert failures == list(range(len(failures))) and len(failures) >= 5


# -- a damaged training checkpoint -----------------------------------------------------------


def training_helpers():
    """``make_shards`` and ``stage`` of tests/plugins/test_training.py (not a package)."""
    import importlib.util

    from conftest import TESTS

    spec = importlib.util.spec_from_file_location("training_helpers",
                                                  TESTS / "plugins" / "test_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_or_starts_afresh(tmp_path, caplog):
    """12 batches, a checkpoint every 4, two kept (ba8, ba12). The latest one truncated: the
    rerun resumes from ba8 and says so; every checkpoint damaged: it trains afresh and says
    so. Both end with the weights of the first, undamaged run (bit for bit, on CPU)."""
    import logging

    import torch
    from safetensors.torch import load_file

    from recipe_engine.testing import run_stage

    pytest.importorskip("composer")
    t = training_helpers()
    shards = t.make_shards(tmp_path / "shards", None, n_train=64, n_val=16)
    params = dict(max_duration="12ba", save_interval="4ba", num_checkpoints_to_keep=2)
    root = tmp_path / "train"
    first = load_file(run_stage(t.stage(**params), root, {"shards": shards}).path
                      / "model.safetensors")
    ckpts = root / "work" / "checkpoints"
    assert os.readlink(ckpts / "latest-rank0.pt") == "ep2-ba12-rank0.pt"
    assert sorted(p.name for p in ckpts.glob("ep*")) == ["ep1-ba8-rank0.pt", "ep2-ba12-rank0.pt"]

    def rerun():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="recipe_engine"):
            art = run_stage(t.stage(**params), root, {"shards": shards})
        weights = load_file(art.path / "model.safetensors")
        assert weights.keys() == first.keys()
        assert all(torch.equal(weights[k], first[k]) for k in first)
        return art, caplog.text

    latest = ckpts / "ep2-ba12-rank0.pt"  # cut short, as by a crash while it was written
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    art, text = rerun()
    assert ("the latest checkpoint ep2-ba12-rank0.pt is damaged (not a complete zip archive "
            "(truncated?)); removed it and resuming from ep1-ba8-rank0.pt instead") in text
    assert "resumed from the checkpoint at batch 8" in text
    assert art.manifest["meta"]["resumed_from_step"] == 8

    for p in ckpts.glob("ep*"):  # every byte flipped in the middle of each checkpoint
        data = bytearray(p.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        p.write_bytes(bytes(data))
    art, text = rerun()
    assert "the latest checkpoint ep2-ba12-rank0.pt is damaged (member " in text
    assert "and no earlier whole checkpoint was kept; training this stage afresh" in text
    assert art.manifest["meta"]["resumed_from_step"] == 0
