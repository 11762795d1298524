"""recipe-engine: one declarative recipe from raw text to an evaluated, exported model.

The core (this package) resolves recipes, validates them against registered components,
fingerprints and caches stages, and runs them. It imports no ML framework.

The public API for plugin authors is what this module exports, plus the modules
``recipe_engine.artifacts`` (artifact layouts, readers and writers), ``recipe_engine.tokenizer``
(the runtime tokenizer), ``recipe_engine.fsutil`` (atomic writes) and ``recipe_engine.testing``
(helpers for plugin tests). Everything else is internal and may change.
"""
from .component import (REQUIRED, Artifact, Component, Executor, Problems, Stage, StageContext,
                        check_declaration, instantiate)
from .errors import Problem, RecipeError, RecipeWarning, StageError, did_you_mean, warn
from .kinds import DocumentFilter, Evaluator, ModelConfig
from .plugins import PluginManager, hookimpl
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "REQUIRED", "Artifact", "Component", "DocumentFilter", "Evaluator", "Executor", "ModelConfig", "Problem",
    "PluginManager", "Problems", "RecipeError", "RecipeWarning", "Stage", "StageContext", "StageError",
    "Tokenizer", "check_declaration", "did_you_mean", "hookimpl", "instantiate", "warn", "__version__",
]
