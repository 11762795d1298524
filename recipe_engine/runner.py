"""Runs a validated recipe: fingerprints, store lookups, stage execution, atomic commits.

Multi-node jobs run one ``recipe run`` per node, each with the torchrun-style variables
``NNODES`` (the number of nodes), ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, on one
store every node mounts (:class:`Nodes`). Node 0 runs the recipe as a single node would:
every stage, under its lock, committed by it; a stage declared ``distributed`` gets
``ctx.num_nodes`` and starts its share of the processes. Every other node (a follower,
:func:`follow`) runs no stage of its own: it waits for node 0's commits of the inputs of each
distributed stage, joins that stage with ``run_follower`` once node 0 has started it (no
lock, no commit), and leaves every later stage to node 0. It learns how node 0 is doing from
node 0's record in the store (``store.py``, "Nodes").
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from . import __version__
from .component import REQUIRED, Artifact, Executor, StageContext, as_spec
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


@dataclass(frozen=True)
class Nodes:
    """Where one ``recipe run`` stands in a multi-node job (:meth:`from_env`)."""

    count: int = 1  # NNODES
    rank: int = 0  # NODE_RANK
    master: str = ""  # MASTER_ADDR:MASTER_PORT, shared by the job's nodes
    timeout: float = 600.0  # RECIPE_NODE_TIMEOUT: a follower's patience with a silent node 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Nodes:
        """Read ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (torchrun's
        names) and ``RECIPE_NODE_TIMEOUT``. ``WORLD_SIZE`` is not read: each distributed
        stage computes its world size (``NNODES`` x its processes per node)."""
        env = os.environ if env is None else env
        if env.get("LOCAL_RANK", "") != "":
            raise RecipeError(
                "LOCAL_RANK is set: this `recipe run` was started as one process of a "
                "distributed launcher (torchrun, composer, srun with one task per GPU). Start "
                "one `recipe run` per node instead, with NNODES, NODE_RANK, MASTER_ADDR and "
                "MASTER_PORT set; its distributed stages start their processes themselves")
        timeout = _number(env, "RECIPE_NODE_TIMEOUT", "600", float)
        if timeout <= 0:
            raise RecipeError(f"RECIPE_NODE_TIMEOUT={timeout:g}: give a positive number of "
                              "seconds")
        if env.get("NNODES", "") == "":
            if _number(env, "WORLD_SIZE", "1", int) > 1:
                raise RecipeError(
                    f"WORLD_SIZE={env['WORLD_SIZE']} is set but NNODES is not: `recipe run` "
                    "takes the number of nodes (NNODES, as torchrun does) and gives each "
                    "distributed stage NNODES x its processes per node; set NNODES (and "
                    "NODE_RANK, MASTER_ADDR, MASTER_PORT) or unset WORLD_SIZE")
            if _number(env, "NODE_RANK", "0", int) != 0:
                raise RecipeError(f"NODE_RANK={env['NODE_RANK']} is set but NNODES is not: "
                                  "set NNODES, the number of nodes of the job")
            return cls(timeout=timeout)
        count = _number(env, "NNODES", "1", int)
        rank = _number(env, "NODE_RANK", "0", int)
        if count < 1 or not 0 <= rank < count:
            raise RecipeError(f"NNODES={count}, NODE_RANK={rank}: NNODES must be >= 1 and "
                              "NODE_RANK one of 0 .. NNODES-1")
        master = ""
        if count > 1:
            addr = env.get("MASTER_ADDR", "")
            port = _number(env, "MASTER_PORT", "0", int)
            if not addr or not 0 < port < 65536:
                raise RecipeError(f"NNODES={count}: set MASTER_ADDR (node 0's address) and "
                                  "MASTER_PORT (a free port there), the same on every node")
            master = f"{addr}:{port}"
        if env.get("WORLD_SIZE", "") != "" or env.get("RANK", "") != "":
            log.warning("WORLD_SIZE / RANK in the environment are not read: `recipe run` "
                        "takes NNODES and NODE_RANK, and gives each distributed stage's "
                        "processes their own")
        return cls(count=count, rank=rank, master=master, timeout=timeout)

    def job(self, recipe: str) -> str:
        """What names this job in the store: the same on every node of it."""
        return hashlib.sha256(f"{recipe}|{self.count}|{self.master}".encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"node {self.rank} of {self.count}"


def _number(env: Mapping[str, str], name: str, default: str, kind: type) -> Any:
    text = env.get(name, "") or default
    try:
        return kind(text)
    except ValueError:
        raise RecipeError(f"{name}={text!r} is not a{'n integer' if kind is int else ' number'}"
                          ) from None


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
            "versions": spec.versions if spec.fingerprint_versions is None
            else spec.fingerprint_versions,
            "params": fingerprinted_params(spec),
            "inputs": {slot: _per_input(up, fps.__getitem__)
                       for slot, up in sorted(spec.inputs.items())},
            "extra": extra,
        })
    return fps


def fingerprinted_params(spec: StageSpec) -> dict[str, Any]:
    """The stage's parameters as its fingerprint sees them: ``spec.recorded_params`` with
    each ``observational`` parameter of its component at its default (left out when it has
    none). Changing one of those reuses the artifact; and a stage that leaves them at their
    defaults keeps the fingerprint it had before the component declared them."""
    neutral = spec.component.observational
    if not neutral:
        return spec.recorded_params
    out = {k: v for k, v in spec.recorded_params.items() if k not in neutral}
    for pname in neutral:
        default = _default_spec(spec, pname)
        if pname in spec.recorded_params and default is not REQUIRED:
            out[pname] = default
    return out


def _default_spec(spec: StageSpec, pname: str) -> Any:
    """Parameter ``pname``'s default as a recipe would write it, or REQUIRED."""
    default = spec.component.params_spec().get(pname, (None, REQUIRED))[1]
    return default if default is REQUIRED else as_spec(default)


def _check_reused(spec: StageSpec, found: Artifact) -> None:
    """Warn when an artifact is reused that was made with other ``observational``
    parameters than this recipe gives (other loggers, say): those did not take effect."""
    made = found.manifest.get("params") or {}
    differ = {}
    for pname in spec.component.observational:
        if pname not in spec.recorded_params:
            continue
        theirs = _as_json(made[pname] if pname in made else _default_spec(spec, pname))
        if theirs != _as_json(spec.recorded_params[pname]):
            differ[pname] = theirs
    if differ:
        log.warning(
            "stage %r is reused from the store (%s), made with other %s (%s): these do not "
            "change its output, so it did not run again and the recipe's took no effect; "
            "`--force %s` runs it with them", spec.name, found.path, ", ".join(differ),
            "; ".join(f"{k}={v}" for k, v in differ.items()), spec.name)


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


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
        except RecipeError:  # a plan the stage refuses (e.g. over the declared device memory)
            raise
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
    nodes: Nodes | None = None,
) -> dict[str, Any]:
    """Run the recipe; returns the summary. Raises StageFailed (summary so far attached).

    ``force``: stages recomputed (with their descendants), from empty scratch. ``fresh``:
    stages that, if they run, start from empty scratch instead of resuming. ``invocation``:
    an id shared by the jobs of one command (a multirun), recorded in the summary.
    ``nodes``: this run's place in a multi-node job (default: a single node); a node other
    than node 0 follows (:func:`follow`)."""
    nodes = nodes or Nodes()
    if nodes.rank > 0:
        return follow(recipe, pm, store, nodes, force=force, until=until, progress=progress,
                      invocation=invocation)
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
    record = _NodeRecord(store, recipe.name, nodes, fps, invocation) if nodes.count > 1 else None
    try:
        _run_selected(recipe, pm, store, selected, fps, extras, forced, fresh, progress,
                      summary, live, nodes, record)
        store.save_run(summary, live)
    except BaseException as e:
        if record is not None:
            err = e.error if isinstance(e, StageFailed) else e
            record.finish("failed", e.stage if isinstance(e, StageFailed) else None,
                          redact_text(f"{type(err).__name__}: {err}"))
        raise
    if record is not None:
        record.finish("finished")
    hook.recipe_run_finished(summary=summary)
    return summary


def _run_selected(recipe: Recipe, pm: PluginManager, store: Store, selected: list[str],
                  fps: dict[str, str], extras: dict[str, Any], forced: set[str],
                  fresh: set[str], progress: Progress, summary: dict[str, Any], live: Path,
                  nodes: Nodes, record: _NodeRecord | None) -> None:
    hook = pm.hook
    artifacts: dict[str, Artifact] = {}
    for name in selected:
        spec, fp = recipe.stages[name], fps[name]
        t0 = time.monotonic()
        found = None if name in forced else store.find(fp)
        if found is not None:
            store.tidy(fp)  # a run killed just after committing fp left its work dir
            _check_reused(spec, found)
            artifacts[name] = found
            entry = _summary_entry(name, spec, fp, "cached", time.monotonic() - t0, found)
            summary["stages"].append(entry)
            progress.stage_finished(name, "cached", entry["seconds"])
            hook.recipe_stage_finished(stage=name, result=entry)
            if record is not None:
                record.stage(name, "cached")
            continue
        with store.lock(fp):
            # a concurrent job may have committed while we waited for the lock
            found = None if name in forced else store.lookup(fp)
            status = "cached"
            if found is None:
                status = "ran"
                try:
                    found = _run_stage(
                        recipe, pm, store, spec, fp, fps, artifacts, progress,
                        fresh=name in fresh, extra=extras[name],
                        nodes=nodes if spec.component.distributed else Nodes(),
                        started=(lambda n=name: record.stage(n, "running")) if record else None)
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
            else:
                _check_reused(spec, found)
        artifacts[name] = found
        if record is not None:
            record.stage(name, status)
        entry = _summary_entry(name, spec, fp, status, time.monotonic() - t0, found)
        summary["stages"].append(entry)
        progress.stage_finished(name, status, entry["seconds"], _headline(entry["metrics"]))
        hook.recipe_stage_finished(stage=name, result=entry)


# -- multi-node jobs ---------------------------------------------------------------------


class _NodeRecord:
    """Node 0's record of its run in a multi-node job (``store.py``, "Nodes"), rewritten at
    every change and every ``BEAT`` seconds (``beat`` counts the writes)."""

    BEAT = 5.0

    def __init__(self, store: Store, recipe: str, nodes: Nodes, fps: dict[str, str],
                 invocation: str):
        self.store = store
        self.path = store.node_record_path(recipe, nodes.job(recipe))
        self.data: dict[str, Any] = {
            "recipe": recipe, "invocation": invocation, "host": socket.gethostname(),
            "pid": os.getpid(), "started": time.time(), "nodes": nodes.count,
            "master": nodes.master, "fingerprints": fps, "state": "running", "beat": 0,
            "stages": {}}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="node-record", daemon=True)
        self._thread.start()

    def _write(self, change: Callable[[dict[str, Any]], None] | None = None) -> None:
        with self._lock:  # the heartbeat thread writes too
            if change is not None:
                change(self.data)
            self.data["beat"] += 1
            self.data["time"] = time.time()
            try:
                self.store.write_node_record(self.path, self.data)
            except OSError as e:  # the run goes on; followers time out with a message
                log.warning("could not write the node record %s: %s", self.path, e)

    def _beat(self) -> None:
        while not self._stop.wait(self.BEAT):
            self._write()

    def stage(self, name: str, status: str) -> None:
        self._write(lambda d: d["stages"].__setitem__(name, status))

    def finish(self, state: str, stage: str | None = None, error: str | None = None) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()

        def change(d: dict[str, Any]) -> None:
            d["state"] = state
            if stage is not None:
                d["stages"][stage] = "failed"
            if error is not None:
                d["failed"] = {"stage": stage, "error": error}

        self._write(change)


class _Leader:
    """What a follower knows of node 0's run, from its record. A record counts as node 0's
    current one once it has changed while this follower watched and it lists the same
    fingerprints; silence for ``nodes.timeout`` seconds is an error."""

    POLL = 0.5

    def __init__(self, store: Store, recipe: str, nodes: Nodes, fps: dict[str, str]):
        self.store, self.nodes, self.fps = store, nodes, fps
        self.path = store.node_record_path(recipe, nodes.job(recipe))
        self.seen = store.read_node_record(self.path)
        self.changed_at = time.monotonic()
        self.invocation: str | None = None  # of the record confirmed as current

    def poll(self) -> dict[str, Any] | None:
        """Node 0's current record, or None while there is none yet."""
        rec = self.store.read_node_record(self.path)
        if rec is not None and rec != self.seen:
            self.seen, self.changed_at = rec, time.monotonic()
            if rec.get("fingerprints") == self.fps:
                self.invocation = rec.get("invocation")
        ok = rec is not None and rec.get("fingerprints") == self.fps
        return rec if ok and self.invocation == rec.get("invocation") else None

    def check(self, rec: dict[str, Any] | None, stage: str, doing: str) -> None:
        """Raise when node 0 failed or ended without ``stage``, or has been silent too long."""
        me = self.nodes.describe()
        if rec is not None and rec.get("state") == "failed":
            failed = rec.get("failed") or {}
            where = f"at stage {failed['stage']!r}" if failed.get("stage") else "before a stage"
            raise StageError(f"node 0 failed {where}: {failed.get('error')}; {me} stops too "
                             f"(it was waiting for node 0 to {doing} stage {stage!r})")
        if rec is not None and rec.get("state") == "finished":
            raise StageError(f"node 0 finished its run without stage {stage!r}, which {me} "
                             f"waited for it to {doing}: were the nodes given other options "
                             "(--until, --force)?")
        silent = time.monotonic() - self.changed_at
        if silent <= self.nodes.timeout:
            return
        why = [f"no sign of node 0 for {silent:.0f} s (RECIPE_NODE_TIMEOUT="
               f"{self.nodes.timeout:g}) while {me} waited for it to {doing} stage {stage!r}"]
        old = self.seen
        if old is None:
            why.append(f"node 0 keeps its record at {self.path} and none is there: is node 0 "
                       "running `recipe run` with the same recipe and overrides, on the same "
                       f"store ({self.store.root}), with NNODES={self.nodes.count} and "
                       f"MASTER_ADDR:MASTER_PORT={self.nodes.master}?")
        else:
            if old.get("fingerprints") != self.fps:
                theirs = old.get("fingerprints") or {}
                differ = sorted(n for n in set(theirs) | set(self.fps)
                                if theirs.get(n) != self.fps.get(n))
                why.append(f"the record there ({self.path}) has other fingerprints (stages "
                           f"{', '.join(differ)}): node 0 runs other overrides, or sees other "
                           "files")
            else:
                why.append(f"the record there ({self.path}) did not change: node 0 "
                           "(invocation {}) is gone".format(old.get("invocation")))
            if old.get("state") == "failed":
                failed = old.get("failed") or {}
                why.append(f"it says node 0 failed at stage {failed.get('stage')!r}: "
                           f"{failed.get('error')}")
        raise StageError("; ".join(why))

    def wait_for_commit(self, stage: str, fp: str, forced: bool) -> Artifact:
        """Node 0's committed artifact ``fp``. A ``forced`` stage's old artifact does not
        count: only once node 0's current run reports it ran."""
        found = self._wait(stage, fp, forced, "commit")
        assert found is not None  # only a wait "start" returns None
        return found

    def wait_for_start(self, stage: str, fp: str, forced: bool) -> Artifact | None:
        """None once node 0's current run has started ``stage`` (join it now), or the
        artifact when ``stage`` is committed already (nothing to join)."""
        return self._wait(stage, fp, forced, "start")

    def _wait(self, stage: str, fp: str, forced: bool,
              until: Literal["commit", "start"]) -> Artifact | None:
        """Poll until artifact ``fp`` is committed (one made before node 0's current run
        counts unless ``forced``), or, ``until="start"``, node 0's current run has started
        ``stage`` (None). Raises as :meth:`check` does."""
        said = False
        while True:
            if not forced:
                found = self.store.lookup(fp, report=False)
                if found is not None:
                    return found
            rec = self.poll()
            status = rec["stages"].get(stage) if rec is not None else None
            if until == "start" and status == "running":
                return None
            if status in ("ran", "cached"):
                found = self.store.lookup(fp, report=False)
                if found is not None:
                    return found
            self.check(rec, stage, until)
            if not said:
                log.info("%s: waiting for node 0 to %s stage %r", self.nodes.describe(), until,
                         stage)
                said = True
            time.sleep(self.POLL)


def follow(recipe: Recipe, pm: PluginManager, store: Store, nodes: Nodes,
           force: set[str] | None = None, until: str | None = None,
           progress: Progress | None = None, invocation: str | None = None) -> dict[str, Any]:
    """A follower node's run (``nodes.rank`` > 0): for each ``distributed`` stage, wait for
    node 0 to commit its upstream stages, then run this node's share (``run_follower``)
    once node 0 has started it. No stage is computed, locked or committed here, no other
    stage is touched, and no run summary is saved (node 0's is the run's). Returns this
    node's summary; raises StageFailed when node 0 fails or this node's share does."""
    force = set(force or ())
    unknown = [s for s in force | ({until} if until else set())
               if s != "*" and s not in recipe.stages]
    if unknown:
        raise RecipeError("; ".join(f"no stage named {s!r} (stages: {', '.join(recipe.stages)})"
                                    for s in unknown))
    selected = list(recipe.upstream(until)) if until else list(recipe.stages)
    selected = [s for s in recipe.stages if s in selected]
    forced = recipe.downstream(set(recipe.stages) if "*" in force else force)
    distributed = [s for s in selected if recipe.stages[s].component.distributed]
    needed: set[str] = set().union(*(recipe.upstream(s) for s in distributed)) if distributed else set()
    todo = [s for s in selected if s in needed]
    fps = compute_fingerprints(recipe, pm)
    invocation = invocation or uuid.uuid4().hex[:16]
    summary: dict[str, Any] = {"recipe": recipe.name, "store": str(store.root),
                               "invocation": invocation, "node_rank": nodes.rank,
                               "num_nodes": nodes.count, "stages": []}
    if not todo:
        log.info("%s: no stage of %s runs on every node; nothing to do here", nodes.describe(),
                 recipe.name)
        return summary
    progress = progress or Progress(len(todo))
    progress.total = len(todo)
    live = store.begin_run(recipe.name, [fps[s] for s in todo], invocation)
    leader = _Leader(store, recipe.name, nodes, fps)
    artifacts: dict[str, Artifact] = {}
    try:
        for name in todo:
            spec, fp = recipe.stages[name], fps[name]
            t0 = time.monotonic()
            status = "cached"
            try:
                if name not in distributed:
                    found = leader.wait_for_commit(name, fp, name in forced)
                else:
                    for up in spec.upstreams():  # another distributed stage's, say
                        if up not in artifacts:
                            artifacts[up] = leader.wait_for_commit(up, fps[up], up in forced)
                    found = leader.wait_for_start(name, fp, name in forced)
                    if found is None:
                        status = "joined"
                        _join_stage(recipe, pm, store, spec, fp, artifacts, progress, nodes)
            except BaseException as e:
                progress.stage_failed(name, e)
                summary["stages"].append({"name": name, "component": spec.component.name,
                                          "fingerprint": fp, "status": "failed",
                                          "seconds": round(time.monotonic() - t0, 3),
                                          "error": redact_text(f"{type(e).__name__}: {e}")})
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise StageFailed(name, e, summary) from e
            entry = {"name": name, "component": spec.component.name, "fingerprint": fp,
                     "status": status, "seconds": round(time.monotonic() - t0, 3)}
            if found is not None:
                artifacts[name] = found
                entry.update(artifact=str(found.path),
                             metrics=found.manifest.get("metrics", {}))
            summary["stages"].append(entry)
            progress.stage_finished(name, status, entry["seconds"])
    finally:
        store.end_run(live)
    return summary


def _join_stage(recipe: Recipe, pm: PluginManager, store: Store, spec: StageSpec, fp: str,
                artifacts: dict[str, Artifact], progress: Progress, nodes: Nodes) -> None:
    """Run a follower's share of a distributed stage: ``run_follower`` on the work
    directory node 0 began (``store.begin`` is node 0's: it clears and stamps)."""
    registry = pm.registry
    stage = spec.instantiate(registry)
    executor = registry.build(Executor, spec.executor)
    out, scratch = store.work_paths(fp)
    ctx = StageContext(
        stage=spec.name,
        fingerprint=fp,
        **_slots(spec, artifacts),
        output=out.parent / f"out-node{nodes.rank}",  # node 0 commits; nothing is read here
        work=scratch,
        executor=executor,
        build=registry.build,
        progress=progress.update,
        max_skip_fraction=recipe.max_skip_fraction,
        num_nodes=nodes.count,
        node_rank=nodes.rank,
    )
    progress.stage_started(spec.name, spec.component.name)
    ctx.log(f"{nodes.describe()}: joining stage {spec.name!r}, which node 0 runs and commits")
    try:
        stage.run_follower(ctx)
    finally:
        executor.close()


def _headline(metrics: dict[str, Any], n: int = 3) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:n]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def _slots(spec: StageSpec, artifacts: dict[str, Artifact]) -> dict[str, Any]:
    """A stage context's ``inputs`` (each slot's first upstream artifact) and
    ``input_lists`` (every upstream artifact of each slot, in order)."""
    return {"inputs": {slot: artifacts[up if isinstance(up, str) else up[0]]
                       for slot, up in spec.inputs.items()},
            "input_lists": {slot: [artifacts[u] for u in ([up] if isinstance(up, str) else up)]
                            for slot, up in spec.inputs.items()}}


def _per_input(upstream: str | list[str], fn: Callable[[str], Any]) -> Any:
    """``fn`` of a slot's upstream stage, or the list of ``fn`` of a list slot's stages."""
    return fn(upstream) if isinstance(upstream, str) else [fn(u) for u in upstream]


def _run_stage(recipe: Recipe, pm: PluginManager, store: Store, spec: StageSpec, fp: str,
               fps: dict[str, str], artifacts: dict[str, Artifact], progress: Progress,
               fresh: bool = False, extra: Any = None, nodes: Nodes | None = None,
               started: Callable[[], None] | None = None) -> Artifact:
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
        **_slots(spec, artifacts),
        output=out,
        work=scratch,
        executor=executor,
        build=registry.build,
        progress=progress.update,
        max_skip_fraction=recipe.max_skip_fraction,
        num_nodes=nodes.count if nodes else 1,
    )
    progress.stage_started(spec.name, spec.component.name)
    if started is not None:  # the stage's work dir is begun: followers may join it now
        started()
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
