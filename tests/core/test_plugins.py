"""Plugin discovery, registration checks, the hook contract, and the promises about the
core's surface. Plugins come in through the public ``fake_entry_point`` and
``make_plugin_manager``, as a plugin author's tests would do it."""
import importlib.metadata
import inspect
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import recipe_engine
from recipe_engine import Component, Executor, RecipeError, Stage, StageContext, hookimpl, hookspecs
from recipe_engine.artifacts import iter_documents
from recipe_engine.plugins import REGISTRATION_HOOKS, PluginManager
from recipe_engine.testing import fake_entry_point, make_plugin_manager

HOOKS = sorted(n for n, f in vars(hookspecs).items() if n.startswith("recipe_") and callable(f))


def _module(name, **hooks):
    """A plugin module with the given hookimpls."""
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


# -- components and an artifact kind that plugins in these tests add ---------------------------


@dataclass(kw_only=True)
class ToyCount(Stage, name="toy_count", inputs={"documents": "documents"}, output="toy_counts"):
    """Count the characters of some documents (a stage producing a plugin's artifact kind)."""

    def run(self, ctx: StageContext) -> None:
        n = sum(len(d["text"]) for d in iter_documents(ctx.inputs["documents"].path))
        (ctx.output / "count.txt").write_text(str(n))
        ctx.metrics["chars"] = n


@dataclass(kw_only=True)
class Misspelt(Stage, name="misspelt_kind", inputs={"documents": "documnets"}, output="documents"):
    """A stage whose input kind is misspelt."""


@dataclass(kw_only=True)
class OtherMarker(Component, kind="toy_marker"):
    """A second base class for the kind ``toy_marker`` (the toy plugin's marker is not one)."""


class Recorder:
    """Implements every hook spec and records each call: the meta-test runs it."""

    def __init__(self):
        self.calls = []

    def _record(self, hook, **kwargs):
        self.calls.append((hook, kwargs))

    @hookimpl
    def recipe_components(self):
        self._record("recipe_components")
        return [ToyCount]

    @hookimpl
    def recipe_config_dirs(self):
        self._record("recipe_config_dirs")
        return []

    @hookimpl
    def recipe_artifact_kinds(self):
        self._record("recipe_artifact_kinds")
        return {"toy_counts": "a number of characters in count.txt"}

    @hookimpl
    def recipe_default_executor(self):
        self._record("recipe_default_executor")
        return {"name": "serial"}

    @hookimpl
    def recipe_run_started(self, recipe_name, stages, store):
        self._record("recipe_run_started", recipe_name=recipe_name, stages=stages, store=store)

    @hookimpl
    def recipe_stage_started(self, stage, component, fingerprint):
        self._record("recipe_stage_started", stage=stage, component=component,
                     fingerprint=fingerprint)

    @hookimpl
    def recipe_stage_finished(self, stage, result):
        self._record("recipe_stage_finished", stage=stage, status=result["status"])

    @hookimpl
    def recipe_stage_failed(self, stage, error):
        self._record("recipe_stage_failed", stage=stage, error=error)

    @hookimpl
    def recipe_run_finished(self, summary):
        self._record("recipe_run_finished", recipe=summary["recipe"])

    def called(self, hook):
        return [kw for h, kw in self.calls if h == hook]


@pytest.fixture
def recorder(toy, monkeypatch):
    """The toy CLI with a Recorder plugin installed beside the toy plugin."""
    rec = Recorder()
    fake_entry_point(monkeypatch, "recorder", rec, "recorder-tests")
    return rec


# -- discovery and listing ---------------------------------------------------------------------


def test_fake_entry_point_looks_installed_and_is_undone(monkeypatch):
    with monkeypatch.context() as mp:
        fake_entry_point(mp, "toy", "toy_plugin", "toy-tests", version="1.2.3")
        assert importlib.metadata.version("toy-tests") == "1.2.3"
        eps = importlib.metadata.entry_points(group="recipe_engine.plugins")
        assert ("toy", "toy_plugin") in {(ep.name, ep.value) for ep in eps}
        pm = PluginManager()
        assert pm.packages["toy"] == "toy-tests"
        assert pm.distributions["toy-tests"].location == str(Path(__file__).parents[1])
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("toy-tests")
    assert PluginManager().registry.find("stage", "toy_numbers") is None


def test_discovery_through_a_faked_entry_point(toy):
    rc, out, _ = toy("plugins", "--json")
    assert rc == 0
    listing = json.loads(out)
    packages = {p["name"]: p for p in listing["packages"]}
    toy_pkg = packages["toy-tests"]
    assert toy_pkg["version"] == "0.0.0" and toy_pkg["plugins"] == ["toy"]
    assert {c["name"] for c in toy_pkg["components"]} >= {"toy_numbers", "toy_upper", "bang"}
    assert toy_pkg["config_groups"] == {"opt": ["fast", "slow"]}
    assert toy_pkg["hooks"] == [] and toy_pkg["artifact_kinds"] == {}
    # the format before per-package listing stays: components with their package, config dirs
    rows = {r["name"]: r for r in listing["components"]}
    assert rows["toy_numbers"]["package"] == "toy-tests"
    assert rows["bang"]["version"] == "1" and rows["bang"]["kind"] == "toy_marker"
    assert any(d.endswith("toy_groups") for d in listing["config_dirs"])

    rc, out, _ = toy("plugins")
    assert rc == 0
    assert "toy-tests 0.0.0" in out and "toy_numbers" in out and "opt: fast, slow" in out


def test_the_core_package_lists_its_groups_kinds_and_hooks():
    packages = {p["name"]: p for p in PluginManager().describe()["packages"]}
    core = packages["recipe-engine"]
    assert core["version"] == recipe_engine.__version__
    assert Path(core["location"]).is_dir()
    assert set(core["artifact_kinds"]) >= {"documents", "tokenizer", "shards", "checkpoint"}
    assert "micro_3m" in core["config_groups"]["model"]
    assert {"filter", "files_source", "local", "serial"} <= {c["name"] for c in core["components"]}
    assert not set(core["hooks"]) & set(REGISTRATION_HOOKS)
    assert set(core["hooks"]) <= set(HOOKS)


def test_plugin_config_dirs_are_on_the_search_path(toy):
    # toy.yaml's defaults list names opt/slow, which lives in the toy plugin's config dir
    summary = toy.run_json("opt=fast")
    assert summary["stages"][2]["metrics"]["score"] == pytest.approx(0.5 * 25)


# -- registration --------------------------------------------------------------------------


def test_a_broken_plugin_is_named(monkeypatch, toy):
    fake_entry_point(monkeypatch, "broken", "recipe_plugin_missing_module", "recipe-plugin-broken")
    with pytest.raises(RecipeError) as e:
        PluginManager()
    message = str(e.value)
    assert "'broken'" in message and "recipe-plugin-broken" in message
    assert "ModuleNotFoundError" in message and "recipe_plugin_missing_module" in message
    rc, _, err = toy("plugins")
    assert rc == 1 and "recipe-plugin-broken" in err and "Traceback" not in err


def test_a_hook_with_a_wrong_argument_is_named(monkeypatch):
    bad = _module("bad_args", recipe_stage_finished=lambda stage, outcome: None)
    fake_entry_point(monkeypatch, "bad_args", bad, "recipe-plugin-bad-args")
    with pytest.raises(RecipeError) as e:
        PluginManager()
    assert "'bad_args'" in str(e.value) and "recipe-plugin-bad-args" in str(e.value)
    assert "outcome" in str(e.value)


def test_misspelt_hook_fails_loudly():
    pm = PluginManager(load_entry_points=False)
    bad = _module("bad_plugin", recipe_component=lambda: [])  # missing the final "s"
    with pytest.raises(RecipeError, match="recipe_component"):
        pm.register(bad, "bad", "bad-package")
    assert not pm.pm.has_plugin("bad")  # the manager stays usable


def test_registering_an_installed_plugin_again_is_harmless(toy):
    import toy_plugin

    pm = make_plugin_manager(toy_plugin, entry_points=True)  # also installed (faked) as "toy"
    assert pm.registry.get("stage", "toy_numbers").package == "toy-tests"
    pm.register(toy_plugin, "toy_again", "another-name")
    assert pm.pm.get_name(toy_plugin) == "toy"
    with pytest.raises(RecipeError, match="'toy' is taken by toy-tests"):
        pm.register(_module("other"), "toy", "other-package")


def test_make_plugin_manager_registers_exactly_the_given_plugins():
    import toy_plugin

    pm = make_plugin_manager(toy_plugin)
    assert pm.registry.names("stage") == ["toy_concat", "toy_needs_tokenizer", "toy_numbers", "toy_report",
                                          "toy_scratch", "toy_token_count", "toy_upper"]
    assert pm.packages == {"toy_plugin": "toy_plugin"}


def test_same_component_twice_names_both_packages():
    import toy_plugin

    pm = PluginManager(load_entry_points=False)
    pm.register(toy_plugin, "toy", "toy-tests")

    @dataclass(kw_only=True)
    class Twin(toy_plugin.ToyNumbers, name="toy_numbers"):
        pass

    pm.register(_module("clone", recipe_components=lambda: [Twin]), "clone", "clone-package")
    with pytest.raises(RecipeError, match="toy-tests and by clone-package"):
        pm.registry


def test_declaration_problems_name_the_package_and_class():
    @dataclass(kw_only=True)
    class Nameless(Stage, output="documents"):
        pass

    class NotADataclass(Stage, name="not_a_dataclass", output="documents"):
        pass

    pm = make_plugin_manager()
    pm.register(_module("sloppy", recipe_components=lambda: [Nameless, NotADataclass, int]),
                "sloppy", "recipe-plugin-sloppy")
    with pytest.raises(RecipeError) as e:
        pm.registry
    message = str(e.value)
    assert message.count("recipe-plugin-sloppy") == len(e.value.problems) >= 3
    assert "Nameless has no name" in message and "NotADataclass is not a dataclass" in message
    assert "int" in message


def test_registry_build_takes_a_kind_or_a_base_class(toy):
    import toy_plugin

    registry = PluginManager().registry
    marker = registry.build(toy_plugin.ToyMarker, {"name": "bang", "times": 3})
    assert isinstance(marker, toy_plugin.ToyMarker) and marker.times == 3
    assert registry.build("toy_marker", "bang").times == 1
    assert registry.build(toy_plugin.ToyMarker, marker) is marker
    serial = registry.build(Executor, {"name": "serial"})
    assert isinstance(serial, Executor) and list(serial.map(abs, [-1, 2])) == [1, 2]
    with pytest.raises(RecipeError, match="not a OtherMarker"):
        registry.build(OtherMarker, "bang")
    with pytest.raises(RecipeError, match='did you mean "bang"'):
        registry.build("toy_marker", "bnag")


# -- artifact kinds ----------------------------------------------------------------------------


def test_a_plugin_artifact_kind_is_usable(recorder, toy):
    summary = toy.run_json("+stages.count={component:toy_count,inputs:{documents:numbers}}")
    count = next(s for s in summary["stages"] if s["name"] == "count")
    assert count["metrics"]["chars"] == sum(len(f"doc {i}") for i in range(5))
    assert recorder.called("recipe_artifact_kinds")
    listing = json.loads(toy("plugins", "--json")[1])
    rec = next(p for p in listing["packages"] if p["name"] == "recorder-tests")
    assert rec["artifact_kinds"] == {"toy_counts": "a number of characters in count.txt"}


def test_an_unregistered_artifact_kind_fails_at_registration(toy, monkeypatch):
    # without the recorder plugin, toy_count's output kind is unknown; misspelt names a kind
    sloppy = _module("sloppy", recipe_components=lambda: [ToyCount, Misspelt])
    fake_entry_point(monkeypatch, "sloppy", sloppy, "recipe-plugin-sloppy")
    with pytest.raises(RecipeError) as e:
        PluginManager().registry
    problems = [str(p) for p in e.value.problems]
    assert len(problems) == 2 and all("recipe-plugin-sloppy" in p for p in problems)
    assert "stage 'toy_count'" in problems[0] and "output of kind 'toy_counts'" in problems[0]
    assert "stage 'misspelt_kind'" in problems[1] and 'did you mean "documents"' in problems[1]
    rc, _, err = toy("validate", toy.recipe)
    assert rc == 1 and "toy_counts" in err


# -- lifecycle hooks -----------------------------------------------------------------------


def test_lifecycle_hooks_are_called(recorder, toy):
    summary = toy.run_json()
    (started,) = recorder.called("recipe_run_started")
    assert started == {"recipe_name": "toy", "stages": ["numbers", "upper", "report"],
                       "store": summary["store"]}
    assert [c["stage"] for c in recorder.called("recipe_stage_started")] == ["numbers", "upper", "report"]
    assert recorder.called("recipe_stage_started")[0]["component"] == "toy_numbers"
    assert recorder.called("recipe_stage_finished")[0] == {"stage": "numbers", "status": "ran"}
    assert recorder.called("recipe_run_finished") == [{"recipe": "toy"}]
    hooks = [h for h, _ in recorder.calls if h.startswith(("recipe_run_", "recipe_stage_"))]
    assert hooks[0] == "recipe_run_started" and hooks[-1] == "recipe_run_finished"

    recorder.calls.clear()
    toy.run_json("--until", "upper")
    assert recorder.called("recipe_run_started")[0]["stages"] == ["numbers", "upper"]
    assert not recorder.called("recipe_stage_started")  # everything was cached
    assert {c["status"] for c in recorder.called("recipe_stage_finished")} == {"cached"}


def test_stage_failed_hook_gets_the_error(recorder, toy):
    rc, out, _ = toy("run", toy.recipe, "--json", "+stages.upper.params.fail=true")
    assert rc == 1 and json.loads(out)["stages"][-1]["status"] == "failed"
    (failed,) = recorder.called("recipe_stage_failed")
    assert failed["stage"] == "upper" and "toy failure requested" in str(failed["error"])
    assert [c["stage"] for c in recorder.called("recipe_stage_finished")] == ["numbers"]
    assert not recorder.called("recipe_run_finished")


def test_the_listing_shows_lifecycle_hooks(recorder, toy):
    listing = json.loads(toy("plugins", "--json")[1])
    rec = next(p for p in listing["packages"] if p["name"] == "recorder-tests")
    assert rec["hooks"] == sorted(set(HOOKS) - set(REGISTRATION_HOOKS))
    assert [c["name"] for c in rec["components"]] == ["toy_count"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_called_through_a_plugin(hook, recorder, toy):
    """Meta-test: a new hook spec fails here until a plugin implementing it is called."""
    implemented = {n for n, f in inspect.getmembers(Recorder) if n.startswith("recipe_")}
    assert hook in implemented, f"Recorder does not implement {hook}; add it and a test"
    toy.run_json("~executor")  # no executor named: the default comes from a hook
    toy("run", toy.recipe, "--json", "+stages.upper.params.fail=true")
    assert recorder.called(hook), f"{hook} was not called by a recipe run"


def test_every_hook_is_documented():
    assert len(HOOKS) >= 8
    for name in HOOKS:
        f = getattr(hookspecs, name)
        assert (f.__doc__ or "").strip(), f"{name} has no docstring"
        assert inspect.signature(f).return_annotation is not inspect.Signature.empty
        doc = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
        assert f"`{name}(" in doc, f"{name} is not in the hook table of docs/plugins.md"


# -- the core's surface --------------------------------------------------------------------


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
        "run": ["--force", "--fresh", "--help", "--json", "--multirun", "--quiet", "--store", "--until",
                "-h", "-m", "-q"],
        "verify": ["--all", "--help", "--json", "--store", "-h"],
        "ls": ["--help", "--json", "--store", "-h"],
        "gc": ["--dry-run", "--help", "--json", "--keep", "--keep-runs", "--store", "-h"],
        "validate": ["--help", "-h"],
        "plan": ["--help", "--json", "--store", "-h"],
        "show": ["--help", "--json", "--store", "-h"],
        "report": ["--help", "--json", "--metric", "--multirun", "--out", "--store", "-h", "-m"],
        "plugins": ["--help", "--json", "-h"],
        "sbatch": ["--account", "--dry-run", "--gpus-per-node", "--help", "--job-name", "--nodes",
                   "--out", "--partition", "--store", "--time", "-h", "-o"],
    }
