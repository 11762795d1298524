"""Puts the built-in config groups (``conf/``: model sizes, optimizers, pipelines...) on
the Hydra search path of every recipe."""
from pathlib import Path

from recipe_engine import hookimpl


@hookimpl
def recipe_config_dirs():
    import recipe_engine_conf

    return [str(Path(recipe_engine_conf.__file__).resolve().parent)]
