"""Per-part work shared by the data stages: resumable tasks and placing finished parts.

A data stage cuts its work into tasks (usually one per input part), runs them through the
stage's executor, and has each worker write its files into ``ctx.work``. When a task's worker
returns, its result is saved as ``ctx.work/<state>/<key>.json``: a rerun of the stage after a
crash (same fingerprint, so same scratch directory) finds those results and skips the task.
At the end the stage hard-links the finished files into ``ctx.output`` under contiguous part
names, so the scratch copy is still there if the stage dies before it commits.

**Orphaned workers.** A run killed with SIGKILL (the OOM killer, a lost terminal) cannot
clean up after itself, and its executor's workers may outlive it. Three rules keep them from
touching the next attempt's files:

1. *A local worker dies with its run.* Before a worker that is a child of the stage's process
   (the ``local`` pool) runs its first task, it asks the kernel for SIGKILL when that process
   dies (Linux ``PR_SET_PDEATHSIG``), then checks that its parent is still the stage's
   process; a worker whose run died before that exits at once.
2. *A task starts only while its attempt owns the scratch.* Every attempt of a stage claims
   ``ctx.work/.attempt`` with a fresh token before it submits a task, and each task checks,
   in its worker, that the token is still its attempt's before it runs; a task of an attempt
   that was superseded (queued in a dead run's pool, or on a cluster whose driver died)
   returns without running.
3. *What a task writes, it writes whole, under a name derived from its inputs.* Workers
   write through ``recipe_engine.fsutil``/``write_documents`` (a unique temporary file, then
   one rename), under a task key that digests what the task reads; only the stage's process
   records results. A task still running from an earlier attempt (rules 1 and 2 aside) can
   only replace a scratch file with the same bytes, and a file already linked into the
   output keeps its own inode.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import BrokenExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from recipe_engine import StageContext, StageError
from recipe_engine.artifacts import PART_GLOB, list_parts, part_name
from recipe_engine.fsutil import atomic_write_json, atomic_write_text

ATTEMPT = ".attempt"  # ctx.work/.attempt: the token of the attempt that owns the scratch


def task_key(index: int, *material: Any) -> str:
    """A task's name in the scratch directory: its position plus a digest of what it reads,
    so a scratch left by different inputs is never mistaken for this task's result."""
    digest = hashlib.sha1(json.dumps(material, default=str).encode("utf-8", "surrogateescape"))
    return f"{index:05d}-{digest.hexdigest()[:12]}"


def file_stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (path.name, st.st_size, st.st_mtime_ns)


def run_tasks(ctx: StageContext, fn: Callable[[Any], dict[str, Any]],
              tasks: Sequence[tuple[str, Any]], state: str, unit: str = "parts",
              weights: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Run ``fn(arg)`` for every ``(key, arg)`` through ``ctx.executor``; return the results in
    task order. ``fn`` is a top-level function returning a JSON-able dict; the paths in its
    ``"files"`` entry (relative to ``ctx.work``) must exist for a saved result to be reused."""
    state_dir = ctx.work / state
    state_dir.mkdir(parents=True, exist_ok=True)
    weights = list(weights) if weights is not None else [1.0] * len(tasks)
    total = float(sum(weights))
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    todo: list[int] = []
    for i, (key, _) in enumerate(tasks):
        saved = _load_json(state_dir / f"{key}.json")
        if saved is not None and all((ctx.work / f).is_file() for f in saved.get("files", [])):
            results[i] = saved
        else:
            todo.append(i)
    done = sum(weights[i] for i, r in enumerate(results) if r is not None)
    attempt = Attempt(fn, claim(ctx), str(ctx.work / ATTEMPT), os.getpid())
    if len(todo) < len(tasks):
        ctx.log(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} {state} tasks already done")
        ctx.metrics[f"{state}_tasks_resumed"] = len(tasks) - len(todo)
    ctx.progress(done, total, unit)
    finished = 0
    try:
        items = [(attempt, tasks[i][1]) for i in todo]
        for i, result in zip(todo, ctx.executor.map(run_task, items)):
            if isinstance(result, dict) and result.get(STALE):
                raise StageError(f"another attempt of stage {ctx.stage!r} took over its "
                                 f"scratch directory {ctx.work} while {state} task "
                                 f"{tasks[i][0]} ran; rerun")
            atomic_write_json(state_dir / f"{tasks[i][0]}.json", result)
            results[i] = result
            finished += 1
            done += weights[i]
            ctx.progress(done, total, unit)
    except BrokenExecutor as e:  # a worker process died: killed, out of memory, os._exit
        key = tasks[todo[finished]][0]
        kept = len(tasks) - len(todo) + finished
        executor = ctx.executor.name or type(ctx.executor).__name__
        raise StageError(
            f"a worker process of the {executor!r} executor died abruptly (killed, or out of "
            f"memory?) while {state} task {key} was not finished: {e}; the {kept} of "
            f"{len(tasks)} tasks finished are kept, and a rerun resumes from them") from e
    return results  # type: ignore[return-value]


STALE = "_superseded_attempt"  # what a task of a superseded attempt returns, unrun


def claim(ctx: StageContext) -> str:
    """This attempt's token, written to ``ctx.work/.attempt`` the first time (rule 2 of the
    module docstring): from then on, tasks of earlier attempts no longer start."""
    token = getattr(ctx, "_attempt_token", None)
    if token is None:
        token = uuid.uuid4().hex
        ctx.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.work / ATTEMPT, token)
        ctx._attempt_token = token  # type: ignore[attr-defined]
    return token


def run_task(item: tuple[Attempt, Any]) -> dict[str, Any]:
    """Worker: run one task of an attempt (a plain top-level function, so that every executor
    can ship it: a process pool pickles it, Ray wants a function)."""
    attempt, arg = item
    return attempt(arg)


class Attempt:
    """A task function bound to one attempt of a stage. Called in the executor's worker, it
    ties a local worker's life to the stage's process, and runs the task only while the
    attempt still owns the scratch (rules 1 and 2 of the module docstring). Picklable when
    ``fn`` is (a top-level function)."""

    def __init__(self, fn: Callable[[Any], dict[str, Any]], token: str, owner: str,
                 stage_pid: int):
        self.fn, self.token, self.owner, self.stage_pid = fn, token, owner, stage_pid

    def __call__(self, arg: Any) -> dict[str, Any]:
        if os.getpid() != self.stage_pid:
            die_with_parent(self.stage_pid)
        if not self.owns():
            return {STALE: True}
        return self.fn(arg)

    def owns(self) -> bool:
        try:
            with open(self.owner) as f:
                return f.read() == self.token
        except OSError:  # the scratch is gone: discarded, or committed by another attempt
            return False


_DEATH_SIGNAL_SET = False


def die_with_parent(stage_pid: int) -> None:
    """In a worker process that the stage's process started (a ``local`` pool's): have the
    kernel kill it with SIGKILL when that process dies, and exit at once when it is dead
    already. Does nothing in other processes (Ray workers: Ray ends a dead driver's tasks)
    or off Linux. Once per process."""
    global _DEATH_SIGNAL_SET
    if _DEATH_SIGNAL_SET:
        return
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None or parent.pid != stage_pid:
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
            _DEATH_SIGNAL_SET = True
    if os.getppid() != stage_pid:  # the stage's process died before the signal was set
        os._exit(1)


def clear_parts(directory: Path) -> None:
    """Remove part files an earlier attempt left in an output directory."""
    for p in Path(directory).glob(PART_GLOB):
        p.unlink()


def place_parts(work: Path, files: Sequence[str], directory: Path) -> list[str]:
    """Link (or copy) scratch files into ``directory`` as part-00000, part-00001, ..."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index, rel in enumerate(files):
        dst = directory / part_name(index)
        if dst.exists():
            dst.unlink()
        try:
            os.link(work / rel, dst)
        except OSError:  # another file system, or links not supported
            shutil.copy2(work / rel, dst)
        names.append(dst.name)
    return names


def run_part_stage(ctx: StageContext, fn: Callable[[Any], dict[str, Any]],
                   options: dict[str, Any], *material: Any, label: str) -> dict[str, int]:
    """The body of a stage that maps each part of its ``documents`` input through the worker
    ``fn`` (one task per part, keyed by the part, its stamp, ``material`` and ``options``):
    runs the tasks, moves the non-empty parts into the output, merges the workers' counts,
    and records the documents and bytes in and out (counts, meta, metrics). ``fn`` returns
    ``files``, ``counts``, ``documents_in``, ``documents_out``, ``bytes`` and optionally
    ``bytes_in``. Returns the totals."""
    parts = list_parts(ctx.inputs["documents"].path)
    tasks = []
    for i, part in enumerate(parts):
        key = task_key(i, file_stamp(part), *material, options)
        tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                            "options": options}))
    results = run_tasks(ctx, fn, tasks, label)
    clear_parts(ctx.output)
    place_parts(ctx.work, [r["files"][0] for r in results if r["documents_out"]], ctx.output)
    ctx.count("dropped.no_text", 0)
    for r in results:
        merge_counts(ctx, r["counts"])
    totals = {key: sum(r.get(key, 0) for r in results)
              for key in ("documents_in", "documents_out", "bytes", "bytes_in")}
    docs_in, docs_out = totals["documents_in"], totals["documents_out"]
    ctx.count("documents_in", docs_in)
    ctx.count("documents_out", docs_out)
    ctx.check_skips(docs_in)
    ctx.meta.update({"num_documents": docs_out, "num_bytes": totals["bytes"]})
    ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                        "kept_fraction": round(docs_out / docs_in, 4) if docs_in else 0.0})
    if any("bytes_in" in r for r in results):
        ctx.metrics["bytes_kept_fraction"] = \
            round(totals["bytes"] / totals["bytes_in"], 4) if totals["bytes_in"] else 0.0
    return totals


def merge_counts(ctx: StageContext, counts: dict[str, int]) -> None:
    for key, n in counts.items():
        ctx.count(key, n)


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


