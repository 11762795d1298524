"""Dataset loaders for the task YAMLs shipped in ``tasks/`` (lm-eval's ``custom_dataset``).

Reading the JSONL ourselves keeps lm-eval away from the Hub and from the ``datasets`` cache, and
lets a YAML name its data relative to the tasks directory, so the same directory works from a
recipe and from ``lm_eval --include_path plugins/evaluation/tasks``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"


def load_jsonl_splits(data_files: dict[str, str], **_: Any) -> dict[str, Any]:
    """``{split: path}`` -> ``{split: datasets.Dataset}``; relative paths are under ``TASKS_DIR``.

    lm-eval also passes the task's metadata as keyword arguments; they are ignored."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else TASKS_DIR / name
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows, split=split)
    return splits
