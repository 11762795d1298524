"""recipe-engine: one declarative recipe from raw text to an evaluated, exported model.

The core (this package) resolves recipes, validates them against registered components,
fingerprints and caches stages, and runs them. It imports no ML framework.

The public API for plugin authors is what this module exports, plus the artifact readers
and writers in ``recipe_engine.artifacts`` and the helpers in ``recipe_engine.testing``.
"""
from .component import (REQUIRED, Artifact, Component, Executor, Problems, Stage, StageContext,
                        check_declaration)
from .errors import Problem, RecipeError, RecipeWarning, StageError, warn
from .kinds import DocumentFilter, ModelConfig
from .plugins import hookimpl
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "REQUIRED", "Artifact", "Component", "DocumentFilter", "Executor", "ModelConfig", "Problem",
    "Problems", "RecipeError", "RecipeWarning", "Stage", "StageContext", "StageError",
    "Tokenizer", "check_declaration", "hookimpl", "warn", "__version__",
]
