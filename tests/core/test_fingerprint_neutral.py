"""Observational parameters (``observational=(...)`` on a stage class): parameters that do
not change a stage's output stay out of its fingerprint, so changing them reuses the
committed artifact, while the manifest still records the values of the run that made it.

A small plugin defined here: ``fpn_copy`` copies its input's documents with a ``suffix``
(output-changing) and writes a line to side logs, ``notes``, which with ``log_every`` and a
sub-component, ``tag``, are declared observational.
"""
import json
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recipe_engine import Stage, StageContext, hookimpl, runner
from recipe_engine.artifacts import iter_documents, part_name, write_documents
from recipe_engine.component import check_declaration
from recipe_engine.progress import Progress
from toy_plugin import ToyMarker

RUNS: list[str] = []  # one entry per fpn_copy run


@dataclass(kw_only=True)
class FpnCopy(Stage, name="fpn_copy", inputs={"documents": "documents"}, output="documents",
              observational=("notes", "log_every", "tag")):
    suffix: str = ""
    notes: list[str] = field(default_factory=list)  # side logs: files outside the artifact
    log_every: int = 10
    tag: ToyMarker | None = None

    def run(self, ctx: StageContext) -> None:
        RUNS.append(ctx.stage)
        docs = [{**d, "text": d["text"] + self.suffix}
                for d in iter_documents(ctx.inputs["documents"].path)]
        write_documents(ctx.output / part_name(0), docs)
        for note in self.notes:
            with open(note, "a") as f:
                f.write(f"{ctx.stage}: {len(docs)} documents\n")
        ctx.metrics["documents"] = len(docs)


@dataclass(kw_only=True)
class FpnCopyAgain(FpnCopy, name="fpn_copy_again"):
    """Inherits the declaration."""


class FpnPlugin:
    @staticmethod
    @hookimpl
    def recipe_components():
        return [FpnCopy, FpnCopyAgain]


RECIPE = """\
name: fpn
executor: {name: serial}
stages:
  source: {component: toy_numbers, params: {count: 3}}
  copy:
    component: fpn_copy
    inputs: {documents: source}
    params: {suffix: "!"}
  after:
    component: toy_upper
    inputs: {documents: copy}
"""


@pytest.fixture
def fpn(tmp_path):
    """Validate and run the recipe above in-process, with overrides."""
    import toy_plugin
    from recipe_engine import config
    from recipe_engine.store import Store
    from recipe_engine.testing import make_plugin_manager
    from recipe_engine.validate import validate

    RUNS.clear()
    (tmp_path / "fpn.yaml").write_text(RECIPE)
    pm = make_plugin_manager(FpnPlugin(), toy_plugin, entry_points=True)
    store = Store(tmp_path / "store")

    class Fpn:
        root = tmp_path

        @staticmethod
        def recipe(*overrides):
            loaded = config.load(str(tmp_path / "fpn.yaml"), list(overrides), pm.config_dirs())
            return validate(loaded, pm.registry, pm.hook.recipe_default_executor())

        def fingerprints(self, *overrides):
            return runner.compute_fingerprints(self.recipe(*overrides), pm)

        def run(self, *overrides, force=None):
            summary = runner.run(self.recipe(*overrides), pm, store, force=force,
                                 progress=Progress(3, enabled=False))
            return {s["name"]: s for s in summary["stages"]}

    return Fpn()


def manifest(entry):
    return json.loads((Path(entry["artifact"]) / "manifest.json").read_text())


def test_an_observational_parameter_does_not_change_the_fingerprint(fpn):
    base = fpn.fingerprints()
    assert fpn.fingerprints("++stages.copy.params.log_every=3") == base
    assert fpn.fingerprints(f"++stages.copy.params.notes=[{fpn.root / 'a.log'}]") == base
    assert fpn.fingerprints("++stages.copy.params.tag={name: bang, times: 3}") == base
    # the default written out, too
    assert fpn.fingerprints("++stages.copy.params.log_every=10") == base


def test_an_observational_sub_component_is_recorded_not_fingerprinted(fpn):
    spec = fpn.recipe("++stages.copy.params.tag=bang").stages["copy"]
    assert spec.recorded_params["tag"] == {"name": "bang", "times": 1}
    assert "toy_marker/bang" in spec.versions  # the manifest records its version
    assert "toy_marker/bang" not in spec.fingerprint_versions
    assert runner.fingerprinted_params(spec)["tag"] is None


def test_any_other_parameter_still_does(fpn):
    base = fpn.fingerprints()
    changed = fpn.fingerprints("stages.copy.params.suffix=?")
    assert changed["copy"] != base["copy"] and changed["after"] != base["after"]
    assert changed["source"] == base["source"]


def test_a_stage_with_defaults_keeps_its_fingerprint_from_before_the_declaration(fpn):
    """The fingerprint sees observational parameters at their defaults, so declaring them
    does not invalidate artifacts made with the defaults."""
    from recipe_engine.store import fingerprint

    spec = fpn.recipe().stages["copy"]
    assert spec.recorded_params == {"suffix": "!", "notes": [], "log_every": 10, "tag": None}
    assert runner.fingerprinted_params(spec) == spec.recorded_params
    spec = fpn.recipe("++stages.copy.params.log_every=2").stages["copy"]
    assert spec.recorded_params["log_every"] == 2
    assert runner.fingerprinted_params(spec) == {"suffix": "!", "notes": [], "log_every": 10,
                                                 "tag": None}
    assert fingerprint({"p": runner.fingerprinted_params(spec)}) != \
        fingerprint({"p": spec.recorded_params})


def test_a_rerun_with_a_log_added_is_served_from_the_cache(fpn, caplog):
    first = fpn.run()
    assert [e["status"] for e in first.values()] == ["ran", "ran", "ran"] and RUNS == ["copy"]
    log = fpn.root / "side.log"
    caplog.set_level(logging.WARNING, logger="recipe_engine")
    second = fpn.run(f"++stages.copy.params.notes=[{log}]", "++stages.copy.params.log_every=2")
    assert {n: e["status"] for n, e in second.items()} == \
        {"source": "cached", "copy": "cached", "after": "cached"}
    assert RUNS == ["copy"] and not log.exists()  # it did not run again
    assert second["copy"]["artifact"] == first["copy"]["artifact"]
    # the user is told the new values took no effect, and how to rerun with them
    assert "stage 'copy' is reused from the store" in caplog.text
    assert "notes, log_every" in caplog.text and "--force copy" in caplog.text
    # the manifest records the values of the run that made the artifact
    assert manifest(second["copy"])["params"] == {"suffix": "!", "notes": [], "log_every": 10,
                                                  "tag": None}
    caplog.clear()
    assert fpn.run()["copy"]["status"] == "cached"  # the same values: nothing to say
    assert "reused from the store" not in caplog.text


def test_the_manifest_records_the_observational_values_that_ran(fpn):
    log = fpn.root / "side.log"
    out = fpn.run(f"++stages.copy.params.notes=[{log}]", "++stages.copy.params.log_every=4",
                  force={"copy"})
    assert out["copy"]["status"] == "ran" and log.read_text() == "copy: 3 documents\n"
    params = manifest(out["copy"])["params"]
    assert params == {"suffix": "!", "notes": [str(log)], "log_every": 4,
                      "tag": None}
    # downstream stages keep their fingerprints: the copy's did not change
    assert out["after"]["fingerprint"] == fpn.fingerprints()["after"]


def test_subclasses_inherit_the_declaration_and_may_replace_it():
    assert FpnCopyAgain.observational == ("notes", "log_every", "tag")
    assert check_declaration(FpnCopyAgain) == []

    @dataclass(kw_only=True)
    class Narrower(FpnCopy, name="fpn_narrower", observational=("log_every",)):
        pass

    assert Narrower.observational == ("log_every",)
    assert FpnCopy.observational == ("notes", "log_every", "tag")
    assert Stage.observational == ()


def test_a_name_that_is_not_a_parameter_is_an_error_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"Bad: observational names 'loggerz', not a "
                                        r"parameter of Bad \(did you mean \"loggers\"\?\)"):
        @dataclass(kw_only=True)
        class Bad(Stage, name="fpn_bad", output="documents", observational=("loggerz",)):
            loggers: list[str] = field(default_factory=list)

    with pytest.raises(TypeError, match="not a parameter"):  # a class variable is not one
        @dataclass(kw_only=True)
        class Meta(Stage, name="fpn_meta", output="documents", observational=("output",)):
            pass

    with pytest.raises(TypeError, match="give a tuple of parameter names"):
        @dataclass(kw_only=True)
        class Bare(Stage, name="fpn_bare", output="documents", observational="loggers"):
            loggers: list[str] = field(default_factory=list)


def test_an_inherited_parameter_can_be_declared():
    @dataclass(kw_only=True)
    class Child(FpnCopy, name="fpn_child", observational=("notes", "suffix_note")):
        suffix_note: str = ""

    assert Child.observational == ("notes", "suffix_note")
    assert check_declaration(Child) == []


def test_registration_rechecks_against_the_dataclass_fields():
    """Past the class-definition check (names edited afterwards, a field that is not a
    parameter): ``check_declaration`` compares with the real parameters."""
    @dataclass(kw_only=True)
    class Late(Stage, name="fpn_late", output="documents"):
        level: int = 1

    Late.observational = ("level", "gone")
    assert check_declaration(Late) == [
        "declares observational=('level', 'gone'), but 'gone' is not one of its parameters"]


def test_observational_is_a_class_keyword_not_a_field():
    with pytest.raises(TypeError, match="must be declared as class keywords"):
        @dataclass(kw_only=True)
        class AsField(Stage, name="fpn_as_field", output="documents"):
            observational: tuple = ()


def test_composer_train_leaves_its_loggers_out_of_the_fingerprint(tmp_path):
    """The real training stage, validated and fingerprinted only (nothing trains): a logger
    added or a memory limit changed keeps its fingerprint; ``log_interval`` (which batches
    the artifact's ``metrics.jsonl`` samples) changes it."""
    from recipe_engine import PluginManager, config
    from recipe_engine.validate import validate

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text\n" * 20)
    (tmp_path / "train.yaml").write_text(textwrap.dedent(f"""\
        name: fpn_train
        executor: {{name: serial}}
        stages:
          source: {{component: files_source, params: {{root: "{tmp_path / 'docs'}",
                                                       include: ["*.txt"]}}}}
          tok: {{component: sentencepiece_bpe, inputs: {{documents: source}},
                 params: {{vocab_size: 300}}}}
          shards: {{component: mds_shards, inputs: {{documents: source, tokenizer: tok}},
                    params: {{seq_len: 32}}}}
          train:
            component: composer_train
            inputs: {{shards: shards}}
            params:
              model: {{name: llama, dim: 64, n_layers: 2, n_heads: 4, multiple_of: 32}}
              max_duration: 4ba
              global_batch_size: 4
              device: cpu
    """))
    pm = PluginManager()

    def fps(*overrides):
        loaded = config.load(str(tmp_path / "train.yaml"), list(overrides), pm.config_dirs())
        recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
        return runner.compute_fingerprints(recipe, pm)["train"], recipe

    base, _ = fps()
    logged, recipe = fps("++stages.train.params.loggers=[{name: tensorboard}]",
                         "++stages.train.params.device_memory_gb=80")
    assert logged == base
    train = recipe.stages["train"]
    assert train.recorded_params["loggers"] == [
        {"name": "tensorboard", "log_dir": "", "flush_interval": 100}]
    assert "logger/tensorboard" in train.versions
    assert "logger/tensorboard" not in train.fingerprint_versions
    assert fps("++stages.train.params.log_interval=5")[0] != base
    assert fps("++stages.train.params.seed=3")[0] != base
