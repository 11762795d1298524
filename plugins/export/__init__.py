"""Built-in export components."""
from recipe_engine import hookimpl


@hookimpl
def recipe_components():
    return []
