"""Every validation error, reported all at once, with file and key."""
import textwrap

import pytest


def write(tmp_path, text, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


GOOD = """
    name: t
    stages:
      numbers: {component: toy_numbers, params: {count: 3}}
      upper: {component: toy_upper, inputs: {documents: numbers}}
"""


def test_valid_recipe_exits_zero(toy, tmp_path):
    rc, out, err = toy("validate", write(tmp_path, GOOD))
    assert rc == 0, err
    assert "valid" in out and "numbers -> upper" in out


@pytest.mark.parametrize("body, expected", [
    ("""
     stages:
       numbers: {component: toy_numbrs, params: {count: 3}}
     """, ['stages.numbers.component: unknown component \'toy_numbrs\' (did you mean "toy_numbers"?)']),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {cuont: 3}}
     """, ['stages.numbers.params.cuont: unknown parameter of stage \'toy_numbers\' (did you mean "count"?)',
           "stages.numbers.params.count: missing required parameter of stage 'toy_numbers' (int)"]),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: many}}
     """, ["stages.numbers.params.count: expected int, got str 'many'"]),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: 2}}
       up: {component: toy_upper, inputs: {documents: numbers}, params: {mode: uper}}
     """, ["stages.up.params.mode: 'uper' is not one of 'upper', 'lower' (did you mean \"upper\"?)"]),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: 2}}
       shards: {component: toy_needs_tokenizer, inputs: {tokenizer: numbers}}
     """, ["stages.shards.inputs.tokenizer: input 'tokenizer' needs a tokenizer artifact, but stage "
           "'numbers' produces documents"]),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: 2}}
       upper: {component: toy_upper, inputs: {documents: numbrs}}
     """, ['stages.upper.inputs.documents: no stage named \'numbrs\' (did you mean "numbers"?)']),
    ("""
     stages:
       a: {component: toy_upper, inputs: {documents: b}}
       b: {component: toy_upper, inputs: {documents: a}}
     """, ["the stages form a cycle: a -> b -> a"]),
    ("""
     stages:
       upper: {component: toy_upper}
     """, ["stages.upper.inputs.documents: missing input 'documents' (documents) of 'toy_upper'"]),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: 2}, inputz: {}}
     """, ['stages.numbers.inputz: unknown stage key (did you mean "inputs"?)']),
    ("""
     stages:
       m: {component: bang}
     """, ["'bang' is a toy_marker component, not a stage"]),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: 2}}
       upper: {component: toy_upper, inputs: numbers, params: {marker: {name: bnag}}}
     """, ['stages.upper.params.marker.name: unknown toy_marker component \'bnag\' (did you mean "bang"?)']),
    ("""
     stages:
       numbers: {component: toy_numbers, params: {count: "${nowhere.count}"}}
     """, ["stages.numbers.params.count", "nowhere"]),
])
def test_each_validation_error(toy, tmp_path, body, expected):
    path = write(tmp_path, body)
    rc, out, err = toy("validate", path)
    assert rc == 1
    for e in expected:
        assert e in err, err
    assert path in err  # the file is named


def test_all_errors_at_once_with_files(toy, tmp_path):
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "odd.yaml").write_text("lr: 0.1\nlearning_rate: 3\n")
    path = write(tmp_path, """
        defaults:
          - opt: odd
          - _self_
        stages:
          numbers: {component: toy_numbrs}
          upper: {component: toy_upper, inputs: {documents: nothing}}
          report: {component: toy_report, inputs: upper, params: "${opt}"}
    """)
    rc, out, err = toy("validate", path)
    assert rc == 1
    assert "3 problems" in err
    assert "toy_numbrs" in err and "'nothing'" in err
    # the unknown key lives in the group file, reached through ${opt}
    assert f"{tmp_path / 'opt' / 'odd.yaml'}: stages.report.params.learning_rate" in err


def test_override_errors_name_the_override(toy, tmp_path):
    rc, out, err = toy("validate", write(tmp_path, GOOD), "stages.numbers.params.count=x")
    assert rc == 1
    assert "command-line override 'stages.numbers.params.count=x'" in err


def test_missing_recipe_file(toy, tmp_path):
    rc, out, err = toy("validate", str(tmp_path / "nope.yaml"))
    assert rc == 1 and "no such recipe file" in err


def test_unknown_stage_for_until(toy):
    rc, out, err = toy("run", toy.recipe, "--until", "uper")
    assert rc == 1 and "no stage named 'uper'" in err


def test_override_of_a_missing_key_gets_did_you_mean(toy, tmp_path):
    rc, out, err = toy("validate", write(tmp_path, GOOD), "stages.numbers.params.cuont=4")
    assert rc == 1
    assert "command-line override 'stages.numbers.params.cuont=4'" in err
    assert 'did you mean "count"?' in err and "+stages.numbers.params.cuont=4" in err
    assert "bad.yaml" not in err  # the mistake is on the command line, not in the file


def test_a_recipe_extends_another_without_copying(toy, tmp_path):
    write(tmp_path, GOOD, name="parent.yaml")
    child = write(tmp_path, """
        defaults:
          - parent
          - _self_
        stages:
          numbers: {params: {count: 5}}
    """, name="child.yaml")
    from recipe_engine import config
    from recipe_engine.plugins import PluginManager
    from recipe_engine.validate import validate

    pm = PluginManager()
    recipe = validate(config.load(child, [], pm.config_dirs()), pm.registry, {"name": "serial"})
    assert recipe.name == "child"  # a name is never inherited: the parent's "t" is not ours
    assert list(recipe.stages) == ["numbers", "upper"]
    assert recipe.stages["numbers"].params["count"] == 5
    # a mistake in the child is attributed to the child's file
    bad = write(tmp_path, "defaults: [parent, _self_]\nstages:\n  numbers: {params: {cuont: 5}}\n",
                name="bad_child.yaml")
    rc, out, err = toy("validate", bad)
    assert rc == 1 and f"{bad}: stages.numbers.params.cuont" in err


def test_builtin_recipes_can_be_extended(toy, tmp_path):
    path = write(tmp_path, """
        defaults:
          - micro_code
          - override model: micro_10m
          - _self_
        train: {max_duration: 20ba}
    """, name="mine.yaml")
    rc, out, err = toy("validate", path)
    assert rc == 0, err
