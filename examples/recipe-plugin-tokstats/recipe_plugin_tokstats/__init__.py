"""recipe-plugin-tokstats: an example third-party plugin for recipe-engine.

It adds a document filter (``no_todo``), a stage (``token_stats``), a config group
(``tokstats``) and a lifecycle hook that logs every finished stage to the file named by
``$TOKSTATS_LOG``. Nothing heavy is imported here: ``recipe plugins`` imports this module.
"""
import json
import os
from pathlib import Path

from recipe_engine import hookimpl

from .filters import NoTodo
from .stats import TokenStats

__all__ = ["NoTodo", "TokenStats"]


@hookimpl
def recipe_components():
    return [NoTodo, TokenStats]


@hookimpl
def recipe_config_dirs():
    return [str(Path(__file__).parent / "conf")]


@hookimpl
def recipe_stage_finished(stage, result):
    log = os.environ.get("TOKSTATS_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": stage, "status": result["status"],
                                "metrics": result["metrics"]}) + "\n")
