"""The docs' code runs: the example plugin in docs/plugins.md works as documented."""
import re
import textwrap
import types

from conftest import ROOT

from recipe_engine.plugins import PluginManager


def _blocks(path, lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / path).read_text(), re.S)


def test_plugin_example_registers_validates_and_filters(tmp_path):
    module = types.ModuleType("recipe_plugin_todo")
    exec(compile(_blocks("docs/plugins.md", "python")[0], "recipe_plugin_todo.py", "exec"),
         module.__dict__)
    pm = PluginManager()
    pm.register(module, "todo", "recipe-plugin-todo")
    ns = {"recipe_plugin_todo": module}
    exec(_blocks("docs/plugins.md", "python")[1], ns)  # the "testing a plugin" snippet
    reg = pm.registry.get("document_filter", "too_many_todos")
    assert reg.package == "recipe-plugin-todo"

    # and a recipe can use it, with its parameters validated
    from recipe_engine import config
    from recipe_engine.errors import RecipeError
    from recipe_engine.validate import validate

    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        stages:
          src: {component: files_source, params: {root: /nonexistent}}
          filter:
            component: filter
            inputs: {documents: src}
            params: {filters: [{name: too_many_todos, max_todo: 3}]}
    """))
    try:
        validate(config.load(recipe, [], pm.config_dirs()), pm.registry)
    except RecipeError as e:
        assert 'did you mean "max_todos"' in str(e)
    else:
        raise AssertionError("a misspelt parameter must not validate")
