"""Multi-process training: one process per device, started by Composer's launcher.

The stage (``launch``) writes a spec file into its work directory and runs::

    python -m composer.cli -n N --world_size N*NODES --node_rank R [--master_addr A
        --master_port P] --stdout .../rank{rank}.stdout.txt -m \\
        recipe_engine_plugins.training.worker spec.json

Every flag is explicit: the launcher's environment is cleared of RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK and BASE_RANK, so what a cluster or an outer
launcher left there cannot change the world. ``NODES`` and ``R`` are the context's
``num_nodes`` and ``node_rank``: the runner gives a distributed stage the job's nodes
(``NNODES``, ``NODE_RANK``), and ``MASTER_ADDR`` / ``MASTER_PORT`` come from the environment
on a multi-node job (on one node Composer picks a free port). Node 0 (``launch`` from
``run``) launches into ``launch/``; another node (from ``run_follower``) into
``launch-node<R>/`` beside it, and expects no result: global rank 0, on node 0, writes the
artifact. Composer's launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT for every process. Each worker rebuilds the stage from the registry and runs
``trainer.train``; rank 0 prints progress and log lines to stdout behind a marker, which the
stage forwards to its context, and writes the run's meta and metrics to a result file, with
``world_size``, ``num_nodes`` and ``launch`` (each node's host, launching process and ranks,
gathered from every rank) in the meta.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe_engine import Artifact, Executor, StageContext, StageError, instantiate

if TYPE_CHECKING:
    from . import ComposerTrain

MARK = "@@recipe-engine@@ "


# -- the stage's side ------------------------------------------------------------------------


# set per process by Composer's launcher; inherited values must not reach it
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "BASE_RANK")


def launch_command(nproc: int, num_nodes: int, node_rank: int, launch_dir: Path,
                   spec_path: Path, env: dict[str, str]) -> list[str]:
    """Composer's launcher command line for this node's ``nproc`` processes."""
    cmd = [sys.executable, "-m", "composer.cli", "-n", str(nproc),
           "--world_size", str(nproc * num_nodes), "--node_rank", str(node_rank)]
    if num_nodes > 1:
        addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
        if not addr or not port.isdigit():
            raise StageError(f"a job of {num_nodes} nodes needs MASTER_ADDR and MASTER_PORT "
                             "(node 0's address and a free port there) in the environment")
        cmd += ["--master_addr", addr, "--master_port", port]
    return cmd + ["--stdout", str(launch_dir / "rank{rank}.stdout.txt"),
                  "--stderr", str(launch_dir / "rank{rank}.stderr.txt"),
                  "-m", "recipe_engine_plugins.training.worker", str(spec_path)]


def launch(stage: "ComposerTrain", ctx: StageContext, nproc: int) -> None:
    """Run this node's ``nproc`` training processes of a job of ``ctx.num_nodes`` nodes
    and wait for them. On node 0 they produce the stage's result (meta, metrics); on
    another node they only take part."""
    import shutil

    num_nodes, node_rank = ctx.num_nodes, ctx.node_rank
    leader = node_rank == 0
    launch_dir = Path(ctx.work) / ("launch" if leader else f"launch-node{node_rank}")
    launch_dir.mkdir(parents=True, exist_ok=True)
    if leader:  # earlier attempts' caches (a follower's ranks start after node 0's do this)
        shutil.rmtree(Path(ctx.work) / "stream_cache", ignore_errors=True)
    result = launch_dir / "result.json"
    result.unlink(missing_ok=True)
    spec = {
        "stage": stage.name,
        "params": stage.params(),
        "label": ctx.stage,
        "fingerprint": ctx.fingerprint,
        "inputs": {slot: {"kind": a.kind, "path": str(a.path), "manifest": a.manifest}
                   for slot, a in ctx.inputs.items()},
        "input_lists": {slot: [{"kind": a.kind, "path": str(a.path), "manifest": a.manifest}
                               for a in arts] for slot, arts in ctx.input_lists.items()},
        "output": str(ctx.output),
        "work": str(ctx.work),
        "cache_tag": uuid.uuid4().hex[:12],
        "result": str(result),
        "max_skip_fraction": ctx.max_skip_fraction,
        "parent_pid": os.getpid(),
        "host": socket.gethostname(),
    }
    spec_path = launch_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = launch_command(nproc, num_nodes, node_rank, launch_dir, spec_path, env)
    # CPU runs: share the cores between the processes instead of oversubscribing them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    world = nproc * num_nodes
    where = "" if num_nodes == 1 else \
        f"node {node_rank} of {num_nodes}, ranks {node_rank * nproc}-{node_rank * nproc + nproc - 1} of {world}: "
    ctx.log(f"{where}launching {nproc} processes: {' '.join(cmd[1:])} (logs in {launch_dir})")
    tail: deque[str] = deque(maxlen=60)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1)
    try:
        with open(launch_dir / "launcher.log", "a") as log_file:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(MARK):
                    _forward(ctx, json.loads(line[len(MARK):]))
                else:
                    tail.append(line)
                    log_file.write(line)
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # the launcher stops its workers on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0 or (leader and not result.exists()):
        raise StageError(f"the {nproc} training processes{' of ' + where.rstrip(': ') if where else ''} "
                         f"failed (launcher exit code {rc}); per-rank logs in {launch_dir}; "
                         f"last output:\n{''.join(tail)}")
    if not leader:
        return
    out = json.loads(result.read_text())
    ctx.meta.update(out["meta"])
    ctx.metrics.update(out["metrics"])
    ctx.counts.update(out.get("counts", {}))  # records in / skipped, as counted by rank 0


def _forward(ctx: StageContext, msg: dict[str, Any]) -> None:
    if "progress" in msg:
        ctx.progress(*msg["progress"])
    elif "log" in msg:
        ctx.log(msg["log"])


def run_share(stage: Any, ctx: StageContext) -> None:
    """A training stage's share of its run on this node, for its ``run`` (node 0) and its
    ``run_follower`` (the other nodes): this node's processes launched (``launch``) when the
    parallelism asks for more than one or the job has more than one node; else one process,
    this one (``trainer.train``, which hands ``sft`` / ``dpo`` to their body), with
    ``world_size`` and ``num_nodes`` 1 in the meta as a launched run records them."""
    nproc = stage.parallelism.num_processes_per_node()
    if nproc > 1 or ctx.num_nodes > 1:
        launch(stage, ctx, nproc)
    else:
        from .trainer import train

        train(stage, ctx)
        ctx.meta.update(world_size=1, num_nodes=1)


# -- the worker's side -----------------------------------------------------------------------


def _emit(msg: dict[str, Any]) -> None:
    print(MARK + json.dumps(msg), flush=True)


class _EmitHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _emit({"log": record.getMessage()})


def _exit_with_parent(pid: int, every: float = 5.0) -> None:
    """End this worker when the stage's process is gone (killed with SIGKILL, say), so that
    no orphan keeps writing checkpoints that the stage's next attempt resumes from."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    from recipe_engine import PluginManager

    from .trainer import train

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m recipe_engine_plugins.training.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("parent_pid"):
        _exit_with_parent(int(spec["parent_pid"]))
    registry = PluginManager().registry
    stage = instantiate(registry.get("stage", spec["stage"]).cls, spec["params"], registry.build)
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("recipe_engine")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if rank == 0:  # the stage's process prints rank 0's lines under the stage's name
        logger.addHandler(_EmitHandler())
    ctx = StageContext(
        stage=spec["label"],
        fingerprint=spec["fingerprint"],
        inputs={slot: Artifact(kind=a["kind"], path=Path(a["path"]), manifest=a["manifest"])
                for slot, a in spec["inputs"].items()},
        input_lists={slot: [Artifact(kind=a["kind"], path=Path(a["path"]), manifest=a["manifest"])
                            for a in arts] for slot, arts in spec.get("input_lists", {}).items()}
        or None,
        output=Path(spec["output"]),
        work=Path(spec["work"]),
        executor=registry.build(Executor, "serial"),
        build=registry.build,
        progress=(lambda st, done, total, unit: _emit({"progress": [done, total, unit]}))
        if rank == 0 else None,
        max_skip_fraction=float(spec.get("max_skip_fraction", 0.05)),
    )
    out = train(stage, ctx, cache_tag=spec["cache_tag"])
    launch_meta = _gather_launch(spec)
    if rank == 0:
        out["meta"].update(launch_meta)
        out["counts"] = dict(ctx.counts)
        result = Path(spec["result"])
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=str))
        os.replace(tmp, result)
    return 0


def _gather_launch(spec: dict[str, Any]) -> dict[str, Any]:
    """``world_size``, ``num_nodes`` and ``launch``: per node, its host, the pid of the
    process that launched its ranks, and those ranks (global and local), gathered from every
    rank (a collective: every rank calls it)."""
    from composer.utils import dist

    mine = {"rank": dist.get_global_rank(), "local_rank": dist.get_local_rank(),
            "node_rank": dist.get_node_rank(), "host": spec.get("host") or socket.gethostname(),
            "launcher_pid": spec.get("parent_pid")}
    world = dist.get_world_size()
    ranks = dist.all_gather_object(mine) if world > 1 else [mine]
    nodes: dict[int, dict[str, Any]] = {}
    for r in sorted(ranks, key=lambda r: r["rank"]):
        node = nodes.setdefault(r["node_rank"], {"node_rank": r["node_rank"], "host": r["host"],
                                                 "launcher_pid": r["launcher_pid"], "ranks": [],
                                                 "local_ranks": []})
        node["ranks"].append(r["rank"])
        node["local_ranks"].append(r["local_rank"])
    return {"world_size": world, "num_nodes": len(nodes),
            "launch": [nodes[k] for k in sorted(nodes)]}


if __name__ == "__main__":
    sys.exit(main())
