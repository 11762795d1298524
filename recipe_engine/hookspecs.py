"""Hook specifications: the public contract between recipe-engine and its plugins.

A plugin is a module (or object) with functions named like the specs below, each decorated
with ``recipe_engine.hookimpl``, registered through the entry-point group
``recipe_engine.plugins``::

    [project.entry-points."recipe_engine.plugins"]
    foo = "recipe_plugin_foo"

An implementation names only the arguments it uses; pluggy passes just those, so arguments
may be added to a spec later without breaking plugins. A misspelt ``recipe_*`` function in a
plugin is an error at start-up (``check_pending``).

Two phases:

* Registration hooks run once, when the plugin manager starts, and must be cheap: no ML
  framework imports (``recipe --help`` and ``recipe validate`` call them).
* Lifecycle hooks run during ``recipe run``, in the runner's process, in stage order.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("recipe_engine")


# -- registration -------------------------------------------------------------------------


@hookspec
def recipe_components() -> list[type]:
    """Return the component classes this plugin provides.

    Each is a ``recipe_engine.Component`` subclass with ``kind``, ``name`` and ``version``.
    Two plugins registering the same (kind, name) is an error naming both packages.
    Called once per plugin manager; results from all plugins are collected.
    """


@hookspec
def recipe_config_dirs() -> list[str]:
    """Return directories of Hydra config groups (``model/``, ``optim/``...) to put on the
    config search path, after the recipe's own directory. Absolute paths or ``pkg://`` URLs."""


@hookspec
def recipe_artifact_kinds() -> dict[str, str]:
    """Return new artifact kinds this plugin's stages produce or accept: ``{name: description}``.
    The built-in kinds are in ``recipe_engine.artifacts.ARTIFACT_KINDS``."""


# -- lifecycle (during ``recipe run``) ----------------------------------------------------------


@hookspec
def recipe_run_started(recipe_name: str, stages: list[str], store: str) -> None:
    """Called after validation, before the first stage, with the stage names in run order."""


@hookspec
def recipe_stage_started(stage: str, component: str, fingerprint: str) -> None:
    """Called when a stage is about to run (not for stages reused from the store)."""


@hookspec
def recipe_stage_finished(stage: str, result: dict) -> None:
    """Called after a stage committed or was found in the store.

    ``result`` is the stage's entry of the run summary: name, component, fingerprint,
    status ("ran" or "cached"), seconds, artifact path and metrics.
    """


@hookspec
def recipe_stage_failed(stage: str, error: BaseException) -> None:
    """Called when a stage raised; nothing of it was committed. The run stops after this."""


@hookspec
def recipe_run_finished(summary: dict) -> None:
    """Called with the run summary (the object ``recipe run --json`` prints)."""
