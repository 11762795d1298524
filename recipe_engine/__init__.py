"""recipe-engine: one declarative recipe from raw text to an evaluated, exported model.

The core (this package) resolves recipes, validates them against registered components,
fingerprints and caches stages, and runs them. It imports no ML framework.
"""
from .component import REQUIRED, Artifact, Component, Executor, Stage, StageContext
from .errors import Problem, RecipeError, RecipeWarning, StageError
from .plugins import hookimpl

__version__ = "0.1.0"
__all__ = [
    "REQUIRED", "Artifact", "Component", "Executor", "Problem", "RecipeError", "RecipeWarning",
    "Stage", "StageContext", "StageError", "hookimpl", "__version__",
]
