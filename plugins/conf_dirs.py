"""Puts the built-in config groups (``conf/``: model sizes, optimizers, pipelines...) and the
built-in recipes (``recipes/``, so that any recipe can extend one with
``defaults: [micro_code, _self_]``) on the Hydra search path of every recipe."""
from pathlib import Path

from recipe_engine import hookimpl


@hookimpl
def recipe_config_dirs():
    import recipe_engine_conf
    import recipe_engine_recipes

    return [str(Path(recipe_engine_conf.__file__).resolve().parent),
            str(Path(recipe_engine_recipes.__file__).resolve().parent)]
