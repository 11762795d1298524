"""Built-in components of recipe-engine. Each subpackage is an ordinary plugin registered
through the ``recipe_engine.plugins`` entry-point group, exactly as third-party ones are."""
