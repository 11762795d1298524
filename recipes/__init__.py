"""The built-in recipes, on every recipe's config search path so that a recipe can extend
one: ``defaults: [micro_code, _self_]`` (docs/recipes.md)."""
