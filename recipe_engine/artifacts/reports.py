"""Reading what a committed artifact says about itself, and the ``eval_report`` kind."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"  # written by the store (and recipe_engine.testing.run_stage)
REPORT_FILES = ("report.json", "results.json")  # heldout_eval, lm_eval


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """An artifact directory's ``manifest.json`` (``kind``, ``component``, ``params``,
    ``meta``, ``metrics``, ``counts``, ...), or ``{}`` for a directory without one."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a manifest is a JSON object, not a {type(manifest).__name__}")
    return manifest


def read_eval_report(directory: str | Path) -> dict[str, Any]:
    """An ``eval_report`` artifact: ``{"metrics": {name: number}}`` (the producer's ``meta``,
    flat: ``bits_per_byte`` or ``<task>/<metric>``), plus the producer's own file parsed, under
    ``"report"`` (``heldout_eval``'s ``report.json``) or ``"results"`` (``lm_eval``'s
    ``results.json``)."""
    directory = Path(directory)
    out: dict[str, Any] = {"metrics": dict(read_manifest(directory).get("meta", {}))}
    for name in REPORT_FILES:
        path = directory / name
        if path.is_file():
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    if not out["metrics"] and isinstance(out.get("report"), dict):
        out["metrics"] = dict(out["report"].get("metrics", {}))
    return out
