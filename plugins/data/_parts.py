"""Per-part work shared by the data stages: resumable tasks and placing finished parts.

A data stage cuts its work into tasks (usually one per input part), runs them through the
stage's executor, and has each worker write its files into ``ctx.work``. When a task's worker
returns, its result is saved as ``ctx.work/<state>/<key>.json``: a rerun of the stage after a
crash (same fingerprint, so same scratch directory) finds those results and skips the task.
At the end the stage hard-links the finished files into ``ctx.output`` under contiguous part
names, so the scratch copy is still there if the stage dies before it commits.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import BrokenExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from recipe_engine import StageContext, StageError
from recipe_engine.artifacts import PART_GLOB, part_name
from recipe_engine.fsutil import atomic_write_json


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
    if len(todo) < len(tasks):
        ctx.log(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} {state} tasks already done")
        ctx.metrics[f"{state}_tasks_resumed"] = len(tasks) - len(todo)
    ctx.progress(done, total, unit)
    finished = 0
    try:
        for i, result in zip(todo, ctx.executor.map(fn, [tasks[i][1] for i in todo])):
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


def merge_counts(ctx: StageContext, counts: dict[str, int]) -> None:
    for key, n in counts.items():
        ctx.count(key, n)


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


