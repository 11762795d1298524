"""Helpers for testing components without a recipe or a store (for plugin authors too)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .component import Artifact, Executor, Stage, StageContext
from .plugins import PluginManager


def run_stage(
    stage: Stage,
    root: Path,
    inputs: dict[str, Artifact] | None = None,
    executor: Executor | None = None,
    pm: PluginManager | None = None,
    max_skip_fraction: float = 0.05,
) -> Artifact:
    """Run one stage component into ``root/out`` (scratch in ``root/work``) and return its
    artifact with a manifest shaped like the runner's (``meta``, ``metrics``, ``counts``)."""
    pm = pm or PluginManager()
    if executor is None:
        executor = pm.registry.build("executor", {"name": "serial"})  # type: ignore[assignment]
    root = Path(root)
    out, work = root / "out", root / "work"
    if out.exists():  # like the runner: every attempt starts from an empty output
        shutil.rmtree(out)
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        stage=stage.name,
        fingerprint="test",
        inputs=dict(inputs or {}),
        output=out,
        work=work,
        executor=executor,  # type: ignore[arg-type]
        build_fn=pm.registry.build,
        max_skip_fraction=max_skip_fraction,
    )
    stage.run(ctx)
    manifest: dict[str, Any] = {
        "component": stage.name,
        "version": stage.version,
        "kind": stage.output,
        "params": stage.params(),
        "meta": ctx.meta,
        "metrics": ctx.metrics,
        "counts": ctx.counts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return Artifact(kind=stage.output, path=out, manifest=manifest)
