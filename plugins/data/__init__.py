"""Built-in data components."""
from recipe_engine import hookimpl


@hookimpl
def recipe_components():
    return []
