"""Executor workers orphaned by a killed run cannot touch the next attempt's files.

A ``recipe run`` (a process of its own session) runs a stage on the ``local`` executor whose
task 3 is slow in the first attempt. Only the runner's process is SIGKILLed, as the OOM
killer would do, not its process group: the worker running task 3 is orphaned. A second
attempt starts at once and the orphan is then released, while or after the second attempt
runs; it would write its part in place into the scratch directory (where the second
attempt's part may be linked into the output) or recreate the work directory after the
commit. Rules 1 and 2 of ``plugins/data/_parts.py`` (a local worker dies with its run; a task
of a superseded attempt does not start) must make that impossible: the orphan is gone, it
never wrote, and the second attempt's artifact equals a clean run's byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TESTS

ORPHAN_PLUGIN = '''
import os, time
from dataclasses import dataclass
from pathlib import Path

from recipe_engine import Stage, StageContext, hookimpl
from recipe_engine.artifacts import write_documents
from recipe_engine_plugins.data._parts import clear_parts, place_parts, run_tasks


def make_part(task):
    work, i = Path(task["work"]), task["i"]
    rel = f"parts/{i:05d}.jsonl.zst"
    if i == task["slow_at"] and Path(task["flag"]).exists():  # the first attempt only
        Path(task["pidfile"]).write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not Path(task["release"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(task["log"], "a") as f:
            f.write(f"orphan {os.getpid()} wrote\\n")
        # a careless worker: its part written in place, under its final name
        (work / "parts").mkdir(parents=True, exist_ok=True)
        with open(work / rel, "wb") as f:
            f.write(b"written by an orphan of a killed run")
        return {"files": [rel]}
    time.sleep(task["pause"])
    (work / "parts").mkdir(parents=True, exist_ok=True)
    write_documents(work / rel, [{"id": str(i), "text": f"part {i}", "source": "o",
                                  "path": None}])
    return {"files": [rel]}


@dataclass(kw_only=True)
class OrphanParts(Stage, name="orphan_parts", output="documents"):
    count: int = 8
    slow_at: int = 3
    pause: float = 0.2
    flag: str = ""
    pidfile: str = ""
    release: str = ""
    log: str = ""

    def run(self, ctx: StageContext) -> None:
        tasks = [(f"{i:05d}", {"i": i, "slow_at": self.slow_at, "pause": self.pause,
                               "flag": self.flag, "pidfile": self.pidfile,
                               "release": self.release, "log": self.log,
                               "work": str(ctx.work)})
                 for i in range(self.count)]
        results = run_tasks(ctx, make_part, tasks, "parts")
        clear_parts(ctx.output)
        place_parts(ctx.work, [f for r in results for f in r["files"]], ctx.output)


@hookimpl
def recipe_components():
    return [OrphanParts]
'''

LAUNCHER = """\
import sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {plugin_dir!r})
from recipe_engine.testing import fake_entry_point


class Patch:  # what fake_entry_point needs of pytest's monkeypatch, for the process's life
    setattr = staticmethod(setattr)

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


fake_entry_point(Patch(), "orphans", "orphan_plugin")

if __name__ == "__main__":  # not in the local executor's spawned workers, which import this
    from recipe_engine.cli import main

    sys.exit(main(sys.argv[1:]))
"""

RECIPE = """\
name: orphans
executor: {{name: local, num_workers: 2}}
stages:
  parts:
    component: orphan_parts
    params: {{flag: {flag}, pidfile: {pidfile}, release: {release}, log: {log}}}
"""


def alive(pid: int) -> bool:
    """Is ``pid`` a running process (not gone, not a zombie waiting to be reaped)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def files_of(artifact: Path) -> dict[str, str]:
    return {str(p.relative_to(artifact)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def wait_for(what, timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


@pytest.mark.slow  # three `recipe run` processes with spawned workers: about 20 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_orphaned_worker_cannot_touch_the_next_attempt(tmp_path):
    (tmp_path / "orphan_plugin.py").write_text(ORPHAN_PLUGIN)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(TESTS), plugin_dir=str(tmp_path)))
    flag, pidfile, release, log = (tmp_path / n for n in ("slow", "pid", "release", "log"))
    recipe = tmp_path / "recipes" / "orphans.yaml"
    recipe.parent.mkdir()
    recipe.write_text(RECIPE.format(flag=flag, pidfile=pidfile, release=release, log=log))

    def command(store: Path) -> list[str]:
        return [sys.executable, str(launcher), "run", str(recipe), "--json", "-q",
                "--store", str(store)]

    clean = subprocess.run(command(tmp_path / "clean"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_art = Path(json.loads(clean.stdout)["stages"][0]["artifact"])

    store = tmp_path / "store"
    flag.touch()
    first = subprocess.Popen(command(store), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    second = None
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 120,
                 "the first attempt never reached its slow task")
        orphan = int(pidfile.read_text())
        (attempt_file,) = store.glob("work/*/scratch/.attempt")
        first_token = attempt_file.read_text()
        os.kill(first.pid, signal.SIGKILL)  # the runner only: its workers are not signalled
        first.wait()
        flag.unlink()  # the second attempt's task 3 is quick

        second = subprocess.Popen(command(store), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        # once the second attempt owns the scratch, the orphan (if alive) may write
        wait_for(lambda: not attempt_file.exists() or attempt_file.read_text() != first_token,
                 120, "the second attempt never claimed the scratch")
        release.touch()
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
        time.sleep(1.0)  # an orphan released above has long written by now
        assert not alive(orphan), "the orphaned worker outlived its run"
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the first run's session: any orphan left
        if second is not None and second.poll() is None:
            second.kill()

    assert not log.exists(), log.read_text()  # the orphan never wrote
    summary = json.loads(out)
    assert summary["stages"][0]["status"] == "ran"
    art = Path(summary["stages"][0]["artifact"])
    assert files_of(art) == files_of(clean_art)
    fp = summary["stages"][0]["fingerprint"]
    assert not (store / "work" / fp).exists()  # nothing recreated the work dir after commit
    check = subprocess.run([sys.executable, str(launcher), "verify", "--all", "--store",
                            str(store)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]


def test_a_task_of_a_superseded_attempt_does_not_start(tmp_path):
    """Rule 2, for orphans that no kernel signal reaches (a Ray task whose driver died, a
    task still queued in a dead run's pool): once a new attempt has claimed the scratch, a
    task of the old one returns without running; and a stage that gets such an answer
    fails instead of recording it."""
    from recipe_engine import StageError
    from recipe_engine.testing import InlineExecutor
    from recipe_engine_plugins.data._parts import ATTEMPT, STALE, Attempt, claim, run_tasks

    from recipe_engine import StageContext

    ran: list[int] = []

    def record(arg):
        ran.append(arg)
        return {"files": []}

    def context() -> StageContext:
        return StageContext(stage="s", fingerprint="f", inputs={}, output=tmp_path / "out",
                            work=tmp_path / "work", executor=InlineExecutor(),
                            build=lambda *a: None)

    old, new = context(), context()
    old_task = Attempt(record, claim(old), str(old.work / ATTEMPT), -1)
    assert old_task(1) == {"files": []} and ran == [1]  # it owns the scratch: it runs
    new_task = Attempt(record, claim(new), str(new.work / ATTEMPT), -1)
    assert claim(new) == new_task.token  # one token per attempt, however many passes
    assert old_task(2) == {STALE: True} and ran == [1]  # superseded: it does not start
    assert new_task(3) == {"files": []} and ran == [1, 3]

    class Thief(InlineExecutor):  # another attempt claims the scratch while tasks run
        def map(self, fn, items):
            for item in items:
                (tmp_path / "work" / ATTEMPT).write_text("another attempt")
                yield fn(item)

    thief = context()
    thief.executor = Thief()
    with pytest.raises(StageError, match="another attempt of stage 's' took over"):
        run_tasks(thief, record, [("00000", 5)], "state")
    assert ran == [1, 3]
    assert not (tmp_path / "work" / "state" / "00000.json").exists()
