"""Plugin discovery, hook contract, and the promises about the core's surface."""
import inspect
import json
import subprocess
import sys
import types

import pytest

from recipe_engine import RecipeError, hookimpl, hookspecs
from recipe_engine.plugins import PluginManager


def test_discovery_through_a_faked_entry_point(toy):
    rc, out, _ = toy("plugins", "--json")
    assert rc == 0
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)["components"]}
    assert rows[("source", "toy_numbers")]["package"] == "toy-tests"
    assert rows[("toy_marker", "bang")]["version"] == "1"
    rc, out, _ = toy("plugins")
    assert "toy_numbers" in out and "toy-tests" in out and out.startswith("KIND")


def test_plugin_config_dirs_are_on_the_search_path(toy):
    # toy.yaml's defaults list names opt/slow, which lives in the toy plugin's config dir
    summary = toy.run_json("opt=fast")
    assert summary["stages"][2]["metrics"]["score"] == pytest.approx(0.5 * 25)


def test_misspelt_hook_fails_loudly():
    pm = PluginManager(load_entry_points=False)
    bad = types.ModuleType("bad_plugin")

    @hookimpl
    def recipe_component():  # missing the final "s"
        return []

    bad.recipe_component = recipe_component
    with pytest.raises(RecipeError, match="recipe_component"):
        pm.register(bad, "bad", "bad-package")


def test_same_component_twice_names_both_packages():
    import toy_plugin

    pm = PluginManager(load_entry_points=False)
    pm.register(toy_plugin, "toy", "toy-tests")
    clone = types.ModuleType("clone")

    @hookimpl
    def recipe_components():
        return [type("Twin", (toy_plugin.ToyNumbers,), {})]

    clone.recipe_components = recipe_components
    pm.register(clone, "clone", "clone-package")
    with pytest.raises(RecipeError, match="toy-tests and by clone-package"):
        pm.registry


def test_lifecycle_hooks_are_called(toy, monkeypatch):
    import recipe_engine.plugins as plugins_mod

    events = []
    watcher = types.ModuleType("watcher")
    watcher.recipe_stage_started = hookimpl(lambda stage: events.append(("started", stage)))
    watcher.recipe_stage_finished = hookimpl(
        lambda stage, result: events.append(("finished", stage, result["status"])))
    watcher.recipe_run_finished = hookimpl(lambda summary: events.append(("done", summary["recipe"])))
    real_init = plugins_mod.PluginManager.__init__

    def init(self, load_entry_points=True):
        real_init(self, load_entry_points)
        self.register(watcher, "watcher", "watcher-tests")

    monkeypatch.setattr(plugins_mod.PluginManager, "__init__", init)
    toy.run_json()
    assert events[:2] == [("started", "numbers"), ("finished", "numbers", "ran")]
    assert events[-1] == ("done", "toy")
    events.clear()
    toy.run_json()
    assert ("finished", "upper", "cached") in events and not [e for e in events if e[0] == "started"]


def test_every_hook_is_documented():
    specs = [f for n, f in vars(hookspecs).items() if n.startswith("recipe_") and callable(f)]
    assert len(specs) >= 8
    for f in specs:
        assert (f.__doc__ or "").strip(), f"{f.__name__} has no docstring"
        assert inspect.signature(f).return_annotation is not inspect.Signature.empty


@pytest.mark.parametrize("args", [["--help"], ["plugins"],
                                  ["validate", "recipes/micro_code.yaml"],
                                  ["plan", "recipes/7b_code.yaml"]])
def test_core_commands_import_no_ml_framework(args):
    code = (
        "import sys; from recipe_engine.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('RC', rc, file=sys.stderr)\n"
        "heavy = sorted(m for m in ('torch', 'composer', 'streaming', 'lm_eval', 'transformers',"
        " 'sentencepiece', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "RECIPE_STORE": "/nonexistent-store"})
    assert "RC 0" in proc.stderr, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]


def test_cli_surface_is_frozen():
    from recipe_engine.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    surface = {name: sorted(o for a in sp._actions for o in a.option_strings)
               for name, sp in sub.choices.items()}
    assert surface == {
        "run": ["--force", "--help", "--json", "--multirun", "--quiet", "--store", "--until", "-h", "-m", "-q"],
        "validate": ["--help", "-h"],
        "plan": ["--help", "--json", "--store", "-h"],
        "plugins": ["--help", "--json", "-h"],
    }
