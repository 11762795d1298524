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

* Registration hooks run once per plugin manager, the first time their answer is needed, and
  must be cheap: no ML framework imports (``recipe --help``, ``recipe plugins`` and ``recipe
  validate`` call them). ``recipe plugins`` shows each package's answers.
* Lifecycle hooks run during ``recipe run``, in the runner's process, in stage order. They
  observe; what they return is ignored, and an exception raised in one stops the run.

Unless a spec says ``firstresult``, every implementation is called (the most recently
registered first) and the results are collected.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("recipe_engine")


# -- registration -------------------------------------------------------------------------


@hookspec
def recipe_components() -> list[type]:
    """Return the component classes this plugin provides.

    Each is a ``@dataclass(kw_only=True)`` subclass of a component base (``Stage``,
    ``DocumentFilter``, ``ModelConfig``, ``Executor``...) declaring its metadata with class
    keywords (``name=``, ``version=``, and on stages ``inputs=`` / ``output=``). Checked at
    registration (``recipe_engine.component.check_declaration``); every problem is a
    ``RecipeError`` naming the package and the class. A stage's ``inputs`` and ``output``
    must be registered artifact kinds (see ``recipe_artifact_kinds``). Two plugins
    registering the same (kind, name) is an error naming both packages.

    :return: a list of classes (not instances).
    """


@hookspec
def recipe_config_dirs() -> list[str]:
    """Return directories of Hydra config groups to put on the config search path, after
    the recipe's own directory.

    A directory holds one subdirectory per group (``model/``, ``optim/``...) with one YAML file
    per option (``model/micro_3m.yaml``); a recipe chooses an option in its ``defaults`` list
    or on the command line (``model=micro_10m``). A group file may not carry ``_target_`` or
    ``hydra`` keys: recipes are data.

    :return: absolute paths or ``pkg://`` URLs, in search order.
    """


@hookspec
def recipe_artifact_kinds() -> dict[str, str]:
    """Return new artifact kinds this plugin's stages produce or accept.

    The core's kinds (``recipe_engine.artifacts.ARTIFACT_KINDS``: documents, tokenizer,
    shards, checkpoint, eval_report, export) need no declaring. A stage whose ``inputs`` or
    ``output`` names a kind nobody registered is a ``RecipeError`` at registration.

    :return: ``{kind: one-line description of its layout}``.
    """


@hookspec(firstresult=True)
def recipe_default_executor() -> dict | None:
    """Return the executor that runs the data stages of a recipe that names none.

    ``firstresult``: the first implementation to return something other than ``None`` wins
    (the most recently registered plugin is asked first); the built-in plugins answer
    ``{"name": "local"}`` (a process pool).

    :return: ``{"name": <registered executor>, **params}``, or ``None`` to let others answer.
    """


# -- lifecycle (during ``recipe run``) ----------------------------------------------------------


@hookspec
def recipe_run_started(recipe_name: str, stages: list[str], store: str) -> None:
    """Called once per run, after validation, before the first stage.

    :param recipe_name: the recipe's ``name`` (its file name unless it sets one).
    :param stages: the names of the stages this run will visit, in run order (``--until``
        leaves out the others).
    :param store: the store root directory.
    """


@hookspec
def recipe_stage_started(stage: str, component: str, fingerprint: str) -> None:
    """Called when a stage is about to run; not for stages reused from the store.

    :param stage: the stage's name in the recipe.
    :param component: the registered name of its component.
    :param fingerprint: the fingerprint its artifact will be committed under.
    """


@hookspec
def recipe_stage_finished(stage: str, result: dict) -> None:
    """Called after a stage committed, or was found in the store.

    :param stage: the stage's name in the recipe.
    :param result: the stage's entry of the run summary: ``name``, ``component``,
        ``fingerprint``, ``status`` (``"ran"`` or ``"cached"``), ``seconds``, ``artifact``
        (the committed directory) and ``metrics``.
    """


@hookspec
def recipe_stage_failed(stage: str, error: BaseException) -> None:
    """Called when a stage raised; nothing of it was committed. The run stops after this
    hook, and ``recipe_run_finished`` is not called.

    :param stage: the stage's name in the recipe.
    :param error: what it raised (a ``StageError`` for a reported failure, anything else
        for a bug; ``KeyboardInterrupt`` too).
    """


@hookspec
def recipe_run_finished(summary: dict) -> None:
    """Called once, after every stage of the run finished.

    :param summary: the run summary, the object ``recipe run --json`` prints: ``recipe``,
        ``store`` and ``stages`` (each as in ``recipe_stage_finished``).
    """
