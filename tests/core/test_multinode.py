"""Multi-node jobs in the core: one ``recipe run`` per node on one store, with NNODES,
NODE_RANK, MASTER_ADDR and MASTER_PORT (``runner.Nodes``). Node 0 runs and commits every
stage; another node waits for node 0's commits, joins the ``distributed`` stages through
``run_follower`` and leaves the rest to node 0. And ``recipe sbatch``, which writes the
Slurm script that starts those runs.

Every node runs the same command (the same overrides: they make the fingerprints). The
nodes are threads of the test's process, each running ``runner.run`` with its own ``Nodes``
on one store (the follower polls the store as it would across machines), with a
small plugin defined here: ``mn_source`` and ``mn_copy`` are ordinary stages that note which
node ran them; ``mn_gather`` is distributed. ``tests/plugins/test_multinode.py`` runs two
real ``recipe run`` processes of two training processes each.
"""
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, TESTS
from recipe_engine import Stage, StageContext, StageError, hookimpl, runner
from recipe_engine.artifacts import iter_documents, part_name, write_documents
from recipe_engine.progress import Progress

# -- the plugin: an ordinary stage before and after a distributed one ---------------------

NOTES: list[str] = []  # "<stage> <what> <thread name>"; each simulated node is a thread
FAIL = {"source": False}


def _note(ctx, what):
    NOTES.append(f"{ctx.stage} {what} {threading.current_thread().name}")


@dataclass(kw_only=True)
class MnSource(Stage, name="mn_source", output="documents"):
    count: int = 3
    seconds: float = 0.0

    def run(self, ctx: StageContext) -> None:
        _note(ctx, "ran")
        time.sleep(self.seconds)
        if FAIL["source"]:
            raise StageError("mn_source failure requested")
        write_documents(ctx.output / part_name(0), [
            {"id": f"d{i}", "text": f"doc {i}", "source": "mn", "path": None}
            for i in range(self.count)])


@dataclass(kw_only=True)
class MnGather(Stage, name="mn_gather", inputs={"documents": "documents"},
               output="documents", distributed=True):
    """Node 0 waits until every other node has left its mark in the shared work directory
    (so it cannot finish without them); the others leave that mark."""

    def run(self, ctx: StageContext) -> None:
        _note(ctx, f"ran-of-{ctx.num_nodes}")
        marks = [ctx.work / f"node{r}" for r in range(1, ctx.num_nodes)]
        deadline = time.monotonic() + 30
        while not all(m.exists() for m in marks):
            if time.monotonic() > deadline:
                raise StageError("the other nodes never joined")
            time.sleep(0.02)
        write_documents(ctx.output / part_name(0), list(iter_documents(ctx.inputs["documents"].path)))
        ctx.meta["joined"] = sorted(m.read_text() for m in marks)

    def run_follower(self, ctx: StageContext) -> None:
        _note(ctx, f"joined-as-{ctx.node_rank}-of-{ctx.num_nodes}")
        assert not ctx.output.exists() and ctx.work.is_dir()  # node 0 began the work dir
        (ctx.work / f"node{ctx.node_rank}").write_text(f"node{ctx.node_rank}")


@dataclass(kw_only=True)
class MnCopy(Stage, name="mn_copy", inputs={"documents": "documents"}, output="documents"):
    def run(self, ctx: StageContext) -> None:
        _note(ctx, "ran")
        write_documents(ctx.output / part_name(0), list(iter_documents(ctx.inputs["documents"].path)))


class MnPlugin:
    @staticmethod
    @hookimpl
    def recipe_components():
        return [MnSource, MnGather, MnCopy]


RECIPE = """\
name: mn
executor: {name: serial}
stages:
  source:
    component: mn_source
    params: {count: 3}
  gather:
    component: mn_gather
    inputs: {documents: source}
  after:
    component: mn_copy
    inputs: {documents: gather}
"""


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Nodes of one job as threads of this process, each running ``runner.run`` on one store
    with its own ``Nodes``."""
    from recipe_engine import config
    from recipe_engine.store import Store
    from recipe_engine.testing import make_plugin_manager
    from recipe_engine.validate import validate

    NOTES.clear()
    FAIL["source"] = False
    monkeypatch.setattr(runner._Leader, "POLL", 0.02)
    (tmp_path / "mn.yaml").write_text(RECIPE)
    pm = make_plugin_manager(MnPlugin(), entry_points=True)

    class Job:
        store = Store(tmp_path / "store")
        results: dict[int, Any] = {}

        def start(self, rank, *overrides, nnodes=2, timeout=30.0):
            loaded = config.load(str(tmp_path / "mn.yaml"), list(overrides), pm.config_dirs())
            recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
            nodes = runner.Nodes(count=nnodes, rank=rank, master="127.0.0.1:29999",
                                 timeout=timeout)

            def target():
                try:
                    self.results[rank] = runner.run(recipe, pm, self.store, nodes=nodes,
                                                    progress=Progress(3, enabled=False))
                except Exception as e:
                    self.results[rank] = e

            t = threading.Thread(target=target, name=f"node{rank}")
            t.start()
            return t

        def finish(self, thread, rank):
            thread.join(60)
            assert not thread.is_alive()
            return self.results[rank]

    return Job()


def statuses(summary):
    return {s["name"]: s["status"] for s in summary["stages"]}


def test_follower_waits_for_node0_joins_the_distributed_stage_and_leaves_the_rest(job, caplog):
    caplog.set_level(logging.INFO, logger="recipe_engine")
    follower = job.start(1)
    # node 1 alone: it waits (its live marker is the sign), running and committing nothing
    wait_until(lambda: (job.store.root / "live").is_dir() and any((job.store.root / "live").iterdir()))
    time.sleep(0.3)
    assert follower.is_alive() and NOTES == []
    assert not (job.store.root / "artifacts").exists()
    s0 = job.finish(job.start(0), 0)
    s1 = job.finish(follower, 1)
    assert not isinstance(s0, Exception), s0
    assert not isinstance(s1, Exception), s1
    assert statuses(s0) == {"source": "ran", "gather": "ran", "after": "ran"}
    # the follower waited for source, joined gather, and left `after` to node 0
    assert statuses(s1) == {"source": "cached", "gather": "joined"}
    assert s1["node_rank"] == 1 and s1["num_nodes"] == 2
    assert "node 1 of 2: waiting for node 0 to commit stage 'source'" in caplog.text
    assert sorted(NOTES) == sorted(["source ran node0", "gather ran-of-2 node0",
                                    "gather joined-as-1-of-2 node1", "after ran node0"])
    gather = json.loads((Path(s0["stages"][1]["artifact"]) / "manifest.json").read_text())
    assert gather["meta"]["joined"] == ["node1"]
    # one run summary (node 0's), one commit per stage, nothing left behind
    root = job.store.root
    assert len(list((root / "runs").glob("*.json"))) == 1
    assert len(list((root / "artifacts").iterdir())) == 3
    assert not list((root / "live").iterdir())
    assert not (root / "trash").exists() or not list((root / "trash").iterdir())
    record = json.loads(next((root / "nodes").glob("mn-*.json")).read_text())
    assert record["state"] == "finished" and record["stages"] == {
        "source": "ran", "gather": "ran", "after": "ran"}

    # again: everything is committed; the follower finds gather cached and has nothing to join
    again = job.finish(job.start(1), 1)
    assert statuses(again) == {"source": "cached", "gather": "cached"}


def test_node0_failing_makes_the_follower_fail_naming_the_stage(job):
    follower = job.start(1)
    wait_until(lambda: (job.store.root / "live").is_dir() and any((job.store.root / "live").iterdir()))
    FAIL["source"] = True
    e0 = job.finish(job.start(0), 0)
    assert isinstance(e0, runner.StageFailed) and "mn_source failure requested" in str(e0)
    e1 = job.finish(follower, 1)
    assert isinstance(e1, runner.StageFailed) and e1.stage == "source"
    assert runner.format_error(e1) == (
        "stage 'source' failed: node 0 failed at stage 'source': StageError: mn_source "
        "failure requested; node 1 of 2 stops too (it was waiting for node 0 to commit stage "
        "'source')")
    assert e1.summary["stages"][-1]["status"] == "failed"
    assert NOTES == ["source ran node0"]
    assert len(list((job.store.root / "runs").glob("*.json"))) == 1  # node 0's


def test_follower_without_node0_times_out_with_a_message(job):
    e1 = job.finish(job.start(1, timeout=0.3), 1)
    assert isinstance(e1, runner.StageFailed) and e1.stage == "source"
    text = str(e1.error)
    assert "no sign of node 0 for" in text and "waited for it to commit stage 'source'" in text
    assert "none is there" in text and "MASTER_ADDR:MASTER_PORT=127.0.0.1:29999" in text
    assert NOTES == []


def test_a_stale_record_of_another_job_is_not_node0s_current_run(job):
    """A failed record left by an earlier job with other fingerprints: the follower neither
    obeys it nor mistakes it for node 0's run; it times out naming what differs."""
    FAIL["source"] = True
    assert isinstance(job.finish(job.start(0, "stages.source.params.count=9"), 0), Exception)
    FAIL["source"] = False
    e1 = job.finish(job.start(1, timeout=0.5), 1)
    assert isinstance(e1, runner.StageFailed)
    assert "has other fingerprints (stages after, gather, source)" in str(e1.error)
    assert "it says node 0 failed at stage 'source'" in str(e1.error)


def test_single_node_runs_are_unchanged(job):
    s = job.finish(job.start(0, nnodes=1), 0)
    assert statuses(s) == {"source": "ran", "gather": "ran", "after": "ran"}
    assert "gather ran-of-1 node0" in NOTES
    assert not (job.store.root / "nodes").exists()


def wait_until(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_cli_processes(tmp_path):
    """The same through ``recipe run``: two processes, the variables in their environment
    (toy plugin: the follower has no distributed stage to join, so it only checks that the
    environment is read and that a follower saves no summary and writes no report)."""
    env = {**os.environ, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29998",
           "RECIPE_STORE": str(tmp_path / "store")}
    code = ("import sys; sys.path.insert(0, {t!r}); from conftest import fake_entry_point\n"
            "class P:\n    setattr = staticmethod(setattr)\n"
            "    @staticmethod\n    def setitem(m, k, v): m[k] = v\n"
            "fake_entry_point(P(), 'toy', 'toy_plugin')\n"
            "from recipe_engine.cli import main; sys.exit(main(sys.argv[1:]))").format(t=str(TESTS))
    recipe = str(TESTS / "recipes" / "toy.yaml")
    runs = {}
    for rank in (1, 0):
        runs[rank] = subprocess.run([sys.executable, "-c", code, "run", recipe, "--json"],
                                    env={**env, "NODE_RANK": str(rank)}, cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    assert runs[1].returncode == 0, runs[1].stderr[-3000:]
    assert json.loads(runs[1].stdout)["stages"] == []  # nothing runs on every node
    assert "node 1 of 2: no stage of toy runs on every node" in runs[1].stderr
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    assert {s["status"] for s in json.loads(runs[0].stdout)["stages"]} == {"ran"}
    assert len(list((tmp_path / "store" / "runs").glob("*.json"))) == 1
    assert "report:" in runs[0].stderr and "report:" not in runs[1].stderr


# -- the variables -----------------------------------------------------------------------


def test_nodes_from_env():
    from recipe_engine.errors import RecipeError
    from recipe_engine.runner import Nodes

    assert Nodes.from_env({}) == Nodes()
    two = Nodes.from_env({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h0",
                          "MASTER_PORT": "29500", "RECIPE_NODE_TIMEOUT": "30"})
    assert (two.count, two.rank, two.master, two.timeout) == (2, 1, "h0:29500", 30.0)
    assert two.job("r") == Nodes.from_env({"NNODES": "2", "MASTER_ADDR": "h0",
                                           "MASTER_PORT": "29500"}).job("r")
    bad = {
        "LOCAL_RANK": ({"LOCAL_RANK": "0"}, "one process of a distributed launcher"),
        "world": ({"WORLD_SIZE": "16"}, "WORLD_SIZE=16 is set but NNODES is not"),
        "rank": ({"NODE_RANK": "1"}, "NODE_RANK=1 is set but NNODES is not"),
        "range": ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
                  "NODE_RANK one of 0 .. NNODES-1"),
        "master": ({"NNODES": "2"}, "set MASTER_ADDR"),
        "int": ({"NNODES": "two"}, "NNODES='two' is not an integer"),
        "timeout": ({"RECIPE_NODE_TIMEOUT": "0"}, "give a positive number"),
    }
    for env, message in bad.values():
        with pytest.raises(RecipeError, match=message):
            Nodes.from_env(env)


def test_a_distributed_stage_must_say_what_followers_do():
    from dataclasses import dataclass

    from recipe_engine import Stage
    from recipe_engine.component import check_declaration

    @dataclass(kw_only=True)
    class Half(Stage, name="half", output="documents", distributed=True):
        pass

    assert Half.distributed and not Stage.distributed
    assert any("run_follower" in p for p in check_declaration(Half))


# -- Slurm -------------------------------------------------------------------------------


def test_sbatch_dry_run(toy, tmp_path):
    rc, out, err = toy("sbatch", toy.recipe, "data.count=3", "--nodes", "4",
                       "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00:00:00",
                       "--account", "proj", "--store", tmp_path / "shared", "--dry-run")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [l for l in lines if l.startswith("#SBATCH")] == [
        "#SBATCH --job-name=toy", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
        "#SBATCH --time=1-00:00:00", "#SBATCH --account=proj"]
    assert f"export RECIPE_STORE={tmp_path / 'shared'}" in lines
    assert 'export NNODES="$SLURM_JOB_NUM_NODES"' in lines
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert 'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"' in lines
    srun = out[out.index("srun "):]
    assert srun.startswith('srun --nodes="$NNODES" --ntasks-per-node=1')
    assert "--kill-on-bad-exit=1" in srun
    assert "export NODE_RANK=\"$SLURM_NODEID\"; exec \"$@\"" in srun
    assert srun.rstrip().endswith(f"-m recipe_engine.cli run {Path(toy.recipe).resolve()} data.count=3")
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    assert not (tmp_path / "shared").exists()  # a dry run writes nothing

    rc, out, err = toy("sbatch", toy.recipe, "--nodes", "2", "--partition", "a b", "--dry-run")
    assert rc == 2 and "--partition 'a b'" in err
    rc, out, err = toy("sbatch", toy.recipe, "no_such_group.x=1", "--nodes", "2", "--dry-run")
    assert rc == 1  # the recipe is validated before a script is written
    rc, out, err = toy("sbatch", toy.recipe, "--nodes", "2", "-o", tmp_path / "job.sbatch")
    assert rc == 0 and (tmp_path / "job.sbatch").read_text().startswith("#!/bin/bash")


def test_sbatch_script_runs_one_node_with_faked_slurm(tmp_path):
    """The written script, run by bash with ``srun`` and ``scontrol`` faked (srun starts its
    command once, as node 0 of one), runs the recipe with the variables set."""
    from recipe_engine.cli import sbatch_script

    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"t{i}.txt").write_text(f"some text number {i}\n" * 5)
    recipe = tmp_path / "one.yaml"
    recipe.write_text("name: one\nexecutor: {name: serial}\nstages:\n  source:\n"
                      "    component: files_source\n"
                      f"    params: {{root: {tmp_path / 'texts'}, include: ['*.txt']}}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'nodeA\\nnodeB\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'echo "srun $*" > "$FAKE_LOG"\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        "export SLURM_NODEID=0\n"
        'env | grep -E "^(NNODES|NODE_RANK|MASTER_ADDR|MASTER_PORT)=" | sort >> "$FAKE_LOG" || true\n'
        'exec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(str(recipe), ["++stages.source.params.docs_per_part=2"],
                                    nodes=1, gpus_per_node=0, store=tmp_path / "store",
                                    job_name="one", workdir=tmp_path))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RECIPE_STORE")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[A-B]", SLURM_CPUS_ON_NODE="2",
               FAKE_LOG=str(tmp_path / "srun.log"))
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "srun.log").read_text().splitlines()
    assert log[0].startswith("srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=2")
    assert log[1:] == ["MASTER_ADDR=nodeA", "MASTER_PORT=24242", "NNODES=1"]
    summary = json.loads(next((tmp_path / "store" / "runs").glob("*-one.json")).read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("source", "ran")]
