"""Multi-process training: one process per device, started by Composer's launcher.

The stage (``launch``) writes a spec file into its work directory and runs::

    python -m composer.cli -n N --stdout .../rank{rank}.stdout -m \\
        recipe_engine_plugins.training.worker spec.json

Composer's launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for
every process (and honours WORLD_SIZE, NODE_RANK, MASTER_ADDR from the environment on a
multi-node job). Each worker rebuilds the stage from the registry and runs
``trainer.train``; rank 0 prints progress and log lines to stdout behind a marker, which the
stage forwards to its context, and writes the run's meta and metrics to a result file.
"""
from __future__ import annotations

import json
import logging
import os
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


def launch(stage: "ComposerTrain", ctx: StageContext, nproc: int) -> None:
    """Run ``nproc`` training processes on this node and wait for them."""
    import shutil

    launch_dir = Path(ctx.work) / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(Path(ctx.work) / "stream_cache", ignore_errors=True)  # earlier attempts'
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
        "parent_pid": os.getpid(),
    }
    spec_path = launch_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    cmd = [sys.executable, "-m", "composer.cli", "-n", str(nproc),
           "--stdout", str(launch_dir / "rank{rank}.stdout.txt"),
           "--stderr", str(launch_dir / "rank{rank}.stderr.txt"),
           "-m", "recipe_engine_plugins.training.worker", str(spec_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # CPU runs: share the cores between the processes instead of oversubscribing them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    ctx.log(f"launching {nproc} processes: {' '.join(cmd[1:6])} ... (logs in {launch_dir})")
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
    if rc != 0 or not result.exists():
        raise StageError(f"the {nproc} training processes failed (launcher exit code {rc}); "
                         f"per-rank logs in {launch_dir}; last output:\n{''.join(tail)}")
    out = json.loads(result.read_text())
    ctx.meta.update(out["meta"])
    ctx.metrics.update(out["metrics"])


def _forward(ctx: StageContext, msg: dict[str, Any]) -> None:
    if "progress" in msg:
        ctx.progress(*msg["progress"])
    elif "log" in msg:
        ctx.log(msg["log"])


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
    )
    out = train(stage, ctx, cache_tag=spec["cache_tag"])
    if rank == 0:
        result = Path(spec["result"])
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=str))
        os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
