"""Runs a validated recipe: fingerprints, store lookups, stage execution, atomic commits."""
from __future__ import annotations

import errno
import logging
import platform
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from . import __version__
from .component import Artifact, Executor, StageContext
from .errors import RecipeError, StageError
from .plugins import PluginManager
from .progress import Progress
from .redact import redact, redact_text
from .store import Store, content_digest, fingerprint
from .validate import Recipe, StageSpec

log = logging.getLogger("recipe_engine.runner")


class StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException, summary: dict[str, Any]):
        self.stage, self.error, self.summary = stage, error, summary
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")


@dataclass
class PlannedStage:
    name: str
    spec: StageSpec
    fingerprint: str
    status: str  # cached | stale | new  (stale: this stage had another fingerprint before)
    estimates: dict[str, Any]


def compute_fingerprints(recipe: Recipe, pm: PluginManager,
                         extras: dict[str, Any] | None = None) -> dict[str, str]:
    """Each stage's fingerprint; ``extras`` (when given) receives each stage's
    ``fingerprint_extra()`` (redacted), what it was made from besides the recipe."""
    fps: dict[str, str] = {}
    for name, spec in recipe.stages.items():
        stage = spec.instantiate(pm.registry)
        extra = redact(stage.fingerprint_extra())
        if extras is not None:
            extras[name] = extra
        fps[name] = fingerprint({
            "component": spec.component.name,
            "versions": spec.versions,
            "params": spec.recorded_params,
            "inputs": {slot: _per_input(up, fps.__getitem__)
                       for slot, up in sorted(spec.inputs.items())},
            "extra": extra,
        })
    return fps


def plan(recipe: Recipe, pm: PluginManager, store: Store) -> list[PlannedStage]:
    fps = compute_fingerprints(recipe, pm)
    index = store.index(recipe.name)
    metas: dict[str, dict[str, Any]] = {}
    out = []
    for name, spec in recipe.stages.items():
        fp = fps[name]
        found = store.lookup(fp)
        if found:
            status = "cached"
            metas[name] = found.meta
        else:
            status = "stale" if name in index else "new"
        inputs_meta = {slot: _per_input(up, lambda u: metas.get(u, {}))
                       for slot, up in spec.inputs.items()}
        try:
            estimates = spec.instantiate(pm.registry).describe_plan(inputs_meta) or {}
        except Exception as e:  # an estimate must never break planning
            estimates = {"error": f"{type(e).__name__}: {e}"}
        metas.setdefault(name, estimates.get("meta", {}))
        out.append(PlannedStage(name, spec, fp, status, estimates))
    return out


def _summary_entry(name: str, spec: StageSpec, fp: str, status: str, seconds: float,
                   artifact: Artifact) -> dict[str, Any]:
    return {
        "name": name,
        "component": spec.component.name,
        "fingerprint": fp,
        "status": status,
        "seconds": round(seconds, 3),
        "artifact": str(artifact.path),
        "metrics": artifact.manifest.get("metrics", {}),
    }


def run(
    recipe: Recipe,
    pm: PluginManager,
    store: Store,
    force: set[str] | None = None,
    until: str | None = None,
    progress: Progress | None = None,
    fresh: set[str] | None = None,
    invocation: str | None = None,
) -> dict[str, Any]:
    """Run the recipe; returns the summary. Raises StageFailed (summary so far attached).

    ``force``: stages recomputed (with their descendants), from empty scratch. ``fresh``:
    stages that, if they run, start from empty scratch instead of resuming. ``invocation``:
    an id shared by the jobs of one command (a multirun), recorded in the summary."""
    force, fresh = set(force or ()), set(fresh or ())
    unknown = [s for s in force | fresh | ({until} if until else set())
               if s != "*" and s not in recipe.stages]
    if unknown:
        raise RecipeError("; ".join(f"no stage named {s!r} (stages: {', '.join(recipe.stages)})"
                                    for s in unknown))
    selected = list(recipe.stages)
    if until:
        wanted = recipe.upstream(until)
        selected = [s for s in selected if s in wanted]
    forced = recipe.downstream(set(recipe.stages) if "*" in force else force)
    fresh = forced | (set(recipe.stages) if "*" in fresh else fresh)
    extras: dict[str, Any] = {}
    fps = compute_fingerprints(recipe, pm, extras)
    invocation = invocation or uuid.uuid4().hex[:16]
    live = store.begin_run(recipe.name, fps.values(), invocation)  # before any lookup: gc
    progress = progress or Progress(len(selected))
    progress.total = len(selected)
    hook = pm.hook
    hook.recipe_run_started(recipe_name=recipe.name, stages=selected, store=str(store.root))
    summary: dict[str, Any] = {"recipe": recipe.name, "store": str(store.root),
                               "invocation": invocation, "stages": []}
    artifacts: dict[str, Artifact] = {}
    for name in selected:
        spec, fp = recipe.stages[name], fps[name]
        t0 = time.monotonic()
        found = None if name in forced else store.find(fp)
        if found is not None:
            store.tidy(fp)  # a run killed just after committing fp left its work dir
            artifacts[name] = found
            entry = _summary_entry(name, spec, fp, "cached", time.monotonic() - t0, found)
            summary["stages"].append(entry)
            progress.stage_finished(name, "cached", entry["seconds"])
            hook.recipe_stage_finished(stage=name, result=entry)
            continue
        with store.lock(fp):
            # a concurrent job may have committed while we waited for the lock
            found = None if name in forced else store.lookup(fp)
            status = "cached"
            if found is None:
                status = "ran"
                try:
                    found = _run_stage(recipe, pm, store, spec, fp, fps, artifacts, progress,
                                       fresh=name in fresh, extra=extras[name])
                except BaseException as e:
                    progress.stage_failed(name, e)
                    hook.recipe_stage_failed(stage=name, error=e)
                    summary["stages"].append({"name": name, "component": spec.component.name,
                                              "fingerprint": fp, "status": "failed",
                                              "seconds": round(time.monotonic() - t0, 3),
                                              "error": redact_text(f"{type(e).__name__}: {e}")})
                    try:
                        store.save_run(summary, live)
                    except OSError as save_error:  # a full disk: report the stage's error
                        log.warning("could not save the run summary: %s", save_error)
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    raise StageFailed(name, e, summary) from e
                store.record(recipe.name, name, fp)
        artifacts[name] = found
        entry = _summary_entry(name, spec, fp, status, time.monotonic() - t0, found)
        summary["stages"].append(entry)
        progress.stage_finished(name, status, entry["seconds"], _headline(entry["metrics"]))
        hook.recipe_stage_finished(stage=name, result=entry)
    store.save_run(summary, live)
    hook.recipe_run_finished(summary=summary)
    return summary


def _headline(metrics: dict[str, Any], n: int = 3) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:n]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def _per_input(upstream: str | list[str], fn: Callable[[str], Any]) -> Any:
    """``fn`` of a slot's upstream stage, or the list of ``fn`` of a list slot's stages."""
    return fn(upstream) if isinstance(upstream, str) else [fn(u) for u in upstream]


def _run_stage(recipe: Recipe, pm: PluginManager, store: Store, spec: StageSpec, fp: str,
               fps: dict[str, str], artifacts: dict[str, Artifact], progress: Progress,
               fresh: bool = False, extra: Any = None) -> Artifact:
    registry = pm.registry
    stage = spec.instantiate(registry)
    executor = registry.build(Executor, spec.executor)
    # scratch is stamped with its inputs' contents: made from other bytes, it is not resumed
    stamp = {"inputs": {slot: _per_input(up, lambda u: {
        "fingerprint": fps[u], "content": content_digest(artifacts[u].manifest)})
        for slot, up in sorted(spec.inputs.items())}}
    out, scratch = store.begin(fp, stamp=stamp, fresh=fresh, name=spec.name)
    resumed = store.scratch_exists(fp)
    ctx = StageContext(
        stage=spec.name,
        fingerprint=fp,
        inputs={slot: artifacts[up if isinstance(up, str) else up[0]]
                for slot, up in spec.inputs.items()},
        input_lists={slot: [artifacts[u] for u in ([up] if isinstance(up, str) else up)]
                     for slot, up in spec.inputs.items()},
        output=out,
        work=scratch,
        executor=executor,
        build=registry.build,
        progress=progress.update,
        max_skip_fraction=recipe.max_skip_fraction,
    )
    progress.stage_started(spec.name, spec.component.name)
    if resumed:
        ctx.log("resuming: found state of an earlier attempt")
    pm.hook.recipe_stage_started(stage=spec.name, component=spec.component.name, fingerprint=fp)
    started = time.time()
    t0 = time.monotonic()
    try:
        stage.run(ctx)
    finally:
        executor.close()
    seconds = time.monotonic() - t0
    # what the stage reads from outside the store (a source's files) must still be what the
    # fingerprint was made from: else the artifact holds other data than its fingerprint says
    extra_now = redact(stage.fingerprint_extra())
    if extra_now != extra:
        raise StageError(f"what {spec.component.name!r} reads from outside the store changed "
                         "since this run fingerprinted it (its fingerprint_extra differs: "
                         "files edited meanwhile?); nothing was committed; rerun")
    if "seconds" not in ctx.metrics:
        ctx.metrics["seconds"] = round(seconds, 3)
    reg = registry.find("stage", spec.component.name)
    manifest = {
        "fingerprint": fp,
        "recipe": recipe.name,
        "stage": spec.name,
        "component": spec.component.name,
        "version": spec.component.version,
        "versions": spec.versions,
        "package": reg.package if reg else "?",
        "kind": spec.component.output,
        "params": spec.recorded_params,
        "inputs": {slot: _per_input(up, lambda u: {"stage": u, "fingerprint": fps[u]})
                   for slot, up in spec.inputs.items()},
        "extra": extra_now,
        "meta": ctx.meta,
        "metrics": ctx.metrics,
        "counts": dict(sorted(ctx.counts.items())),
        "resumed": resumed,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(seconds, 3),
        "host": socket.gethostname(),
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "recipe_engine": __version__},
    }
    return store.commit(fp, out, manifest)


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


DISK_FULL_HINT = ("the disk is full: free some space (`recipe gc`), then rerun; finished stages "
                  "stay committed")


def format_error(e: BaseException) -> str:
    if isinstance(e, StageFailed):
        err = e.error
        if isinstance(err, (StageError, RecipeError)):
            return redact_text(f"stage {e.stage!r} failed: {err}")
        if disk_full(err):
            return redact_text(f"stage {e.stage!r} failed: {err} ({DISK_FULL_HINT})")
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-6:])
        return redact_text(f"stage {e.stage!r} failed: {type(err).__name__}: {err}\n{tb}")
    return redact_text(str(e))
