"""Metrics loggers for the training stages (kind ``logger``), chosen in the recipe as
``composer_train``'s ``loggers: [{name: ...}]``. Each builds one of Composer's
``LoggerDestination``s; Composer and the logging libraries are imported inside ``build``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_engine import Component


@dataclass(kw_only=True)
class MetricsLogger(Component, kind="logger"):
    """Where a training run's metrics also go (beside the stage's own ``metrics.jsonl``)."""

    def build(self, run_dir: Path, run_name: str) -> Any:
        """A ``composer.loggers.LoggerDestination``; ``run_dir`` is the stage's work
        directory (for offline files), ``run_name`` the stage's label."""
        raise NotImplementedError


COMPONENTS: list[type] = []
