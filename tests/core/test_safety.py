"""A recipe is data (no file can make Hydra run code), names that become paths are checked,
and the store survives a corrupt manifest, syncs data before commit and reports lock waits."""
import json
import logging
import os
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, statuses
from recipe_engine import safety
from recipe_engine.store import Store

STAGES = """
    name: t
    stages:
      numbers: {component: toy_numbers, params: {count: 3}}
"""

ATTACK = """\
name: evil
stages:
  numbers: {component: toy_numbers, params: {count: 3}}
hydra:
  callbacks:
    evil:
      _target_: builtins.open
      _args_: ["VICTIM", "w"]
"""


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim"
    v.write_text("precious")
    return v


def test_hydra_callbacks_attack_is_refused_before_anything_runs(toy, tmp_path, victim):
    recipe = write(tmp_path.resolve() / "recipes" / "evil.yaml",
                   ATTACK.replace("VICTIM", str(victim)))
    rc, out, err = toy("validate", recipe)
    assert rc == 1
    assert f"{recipe}:5: hydra.callbacks: a recipe may not configure Hydra" in err
    assert f"{recipe}:7: hydra.callbacks.evil._target_:" in err
    assert f"{recipe}:8: hydra.callbacks.evil._args_:" in err
    assert "hydra/launcher=joblib" in err and "Traceback" not in err
    for args in (["-m", "stages.numbers.params.count=2,3"], []):
        rc, out, err = toy("run", recipe, "--store", tmp_path / "store", "-q", *args)
        assert rc == 1, err
        assert "hydra.callbacks" in err
        assert victim.read_text() == "precious"
    assert not (tmp_path / "store" / "multirun").exists()


def test_target_nested_in_a_list_in_a_config_group(toy, tmp_path):
    d = tmp_path / "recipes"
    recipe = write(d / "r.yaml", "defaults:\n  - grp: ok\n  - _self_\n" + textwrap.dedent(STAGES))
    write(d / "grp" / "ok.yaml", "x: 1\n")
    bad = write(d / "grp" / "sub" / "bad.yaml", """\
        items:
          - plain
          - nested:
              deeper: [1, {_partial_: true}]
              _target_: os.system
        """)
    rc, out, err = toy("validate", recipe)
    assert rc == 1
    assert "2 problems" in err
    assert f"{bad}:4: items[1].nested.deeper[1]._partial_:" in err
    assert f"{bad}:5: items[1].nested._target_:" in err


def test_plugin_config_dirs_are_checked(toy, tmp_path, monkeypatch):
    bad = write(tmp_path / "plugin_conf" / "opt" / "evil.yaml", "_target_: os.system\n")
    recipe = write(tmp_path / "recipes" / "r.yaml", STAGES)
    from recipe_engine.plugins import PluginManager

    real = PluginManager.config_dirs
    monkeypatch.setattr(PluginManager, "config_dirs",
                        lambda self: real(self) + [str(tmp_path / "plugin_conf")])
    rc, out, err = toy("validate", recipe)
    assert rc == 1 and f"{bad}:1: _target_:" in err


def test_hydra_groups_in_defaults_lists(toy, tmp_path):
    recipe = write(tmp_path / "recipes" / "r.yaml", textwrap.dedent("""\
        defaults:
          - override hydra/launcher: joblib
          - /hydra/callbacks/x
          - _self_
        """) + textwrap.dedent(STAGES))
    rc, out, err = toy("validate", recipe)
    assert rc == 1
    assert f"{recipe}:2: defaults[0]: 'override hydra/launcher': a defaults list may not" in err
    assert f"{recipe}:3: defaults[1]:" in err


def test_sibling_recipes_are_checked_only_when_composed(toy, tmp_path):
    d = tmp_path / "recipes"
    write(d / "other.yaml", "hydra: {searchpath: [file:///tmp]}\n")  # another (bad) recipe
    good = write(d / "good.yaml", STAGES)
    rc, out, err = toy("validate", good)
    assert rc == 0, err
    uses = write(d / "uses.yaml", "defaults:\n  - other\n  - _self_\n" + textwrap.dedent(STAGES))
    rc, out, err = toy("validate", uses)
    assert rc == 1 and f"{d / 'other.yaml'}:1: hydra.searchpath:" in err


@pytest.mark.parametrize("override, key", [
    ("+hydra.callbacks.evil._target_=builtins.open", "hydra.callbacks.evil._target_"),
    ("+hydra.callbacks.evil={}", "hydra.callbacks.evil"),
    ("hydra.searchpath=[file:///tmp]", "hydra.searchpath"),
    ("hydra.launcher._target_=builtins.print", "hydra.launcher._target_"),
])
def test_command_line_instantiation_points_are_refused(toy, override, key):
    rc, out, err = toy("validate", toy.recipe, override)
    assert rc == 1
    assert f"command line: {key}: override {override!r}" in err


def test_command_line_launcher_and_sweeper_stay_allowed(toy):
    rc, out, err = toy("validate", toy.recipe, "hydra/launcher=basic", "hydra.sweep.dir=x",
                       "hydra.sweeper.max_batch_size=2")
    assert rc == 0, err


@pytest.mark.parametrize("recipe", sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
                         + sorted(str(p) for p in (TESTS / "recipes").glob("*.yaml")))
def test_shipped_recipes_still_validate(toy, recipe):
    rc, out, err = toy("validate", recipe)
    assert rc == 0, err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_name_is_an_error_not_a_traceback(toy, command):
    rc, out, err = toy(command, toy.recipe, "name=../../x")
    assert rc == 1
    assert "name: '../../x' is not a valid name" in err and "Traceback" not in err


def test_check_names():
    assert safety.check_names({"name": "micro_code-2.b", "stages": {"a": {}, "b.c": {}}}) == []
    problems = safety.check_names({"name": "a/b", "stages": {"ok": {}, "..": {}, "-x": {},
                                                             "x" * 129: {}}})
    assert [p.key for p in problems] == ["name", "stages...", "stages.-x", f"stages.{'x' * 129}"]
    assert safety.check_names({}, default_name="my recipe")[0].message.endswith(
        "set `name:` in the recipe)")
    assert safety.check_names({"name": "a..b"})


# -- store ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff"])
def test_corrupt_manifest_is_absent_and_reported(tmp_path, caplog, content):
    store = Store(tmp_path)
    d = store.artifact_dir("ab" * 32)
    d.mkdir(parents=True)
    (d / "manifest.json").write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="recipe_engine.store"):
        assert store.lookup("ab" * 32) is None
    assert "corrupt manifest" in caplog.text and str(d / "manifest.json") in caplog.text


def test_corrupt_manifest_reruns_only_that_stage(toy):
    first = toy.run_json()
    numbers = next(s for s in first["stages"] if s["name"] == "numbers")
    Path(numbers["artifact"], "manifest.json").write_text("{truncated")
    second = toy.run_json()
    assert statuses(second) == {"numbers": "ran", "upper": "cached", "report": "cached"}
    assert json.loads(Path(numbers["artifact"], "manifest.json").read_text())["fingerprint"]


def test_commit_syncs_data_files_and_directories(tmp_path, monkeypatch):
    store = Store(tmp_path)
    out, _ = store.begin("cd" * 32)
    (out / "sub").mkdir()
    (out / "a.bin").write_bytes(b"a")
    (out / "sub" / "b.bin").write_bytes(b"b")
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    art = store.commit("cd" * 32, out, {"kind": "documents"})
    for p in (out / "a.bin", out / "sub" / "b.bin", out / "sub", out):
        assert str(p) in synced
    assert synced.index(str(out / "a.bin")) < synced.index(str(out / "manifest.json.tmp"))
    assert set(art.manifest["files"]) == {"a.bin", "sub/b.bin"}


def test_waiting_on_a_lock_says_so(tmp_path, caplog):
    store = Store(tmp_path)
    fp = "ef" * 32
    acquired = threading.Event()
    with caplog.at_level(logging.WARNING, logger="recipe_engine.store"):
        with store.lock(fp):
            def other():
                with store.lock(fp):
                    acquired.set()

            t = threading.Thread(target=other)
            t.start()
            deadline = time.monotonic() + 10
            while "waiting for another run" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not acquired.is_set()
        t.join(10)
    assert acquired.is_set()
    assert f"waiting for another run holding the lock on {fp[:12]} ({tmp_path / 'locks'}" \
        in caplog.text


# -- credentials never land in manifests, fingerprints, summaries or logs ---------------------


def test_redact_text_masks_userinfo_and_query_values():
    from recipe_engine.redact import redact_text

    assert redact_text("s3://AKIA:secret@bucket/x?sig=abc&v=1 and https://h/p") == \
        "s3://***@bucket/x?sig=***&v=*** and https://h/p"
    assert redact_text("no url here") == "no url here"


def test_env_values_and_url_credentials_are_not_recorded(toy, tmp_path, monkeypatch):
    import json
    import textwrap

    recipe = tmp_path / "cred.yaml"
    recipe.write_text(textwrap.dedent("""
        name: cred
        stages:
          numbers: {component: toy_numbers, params: {count: 2, prefix: "${oc.env:TOY_TOKEN}"}}
          upper:
            component: toy_upper
            inputs: {documents: numbers}
            params: {suffix: "s3://AKIAEXAMPLE:hunter2@bucket/x?sig=abc"}
    """))
    monkeypatch.setenv("TOY_TOKEN", "tok-one")
    rc, out, err = toy("run", str(recipe), "--json")
    assert rc == 0, err
    first = json.loads(out)
    store_text = "".join(p.read_text(errors="replace") for p in toy.store.rglob("*.json"))
    assert "tok-one" not in store_text and "hunter2" not in store_text and "sig=abc" not in store_text
    manifest = json.loads((toy.store / "artifacts" / first["stages"][0]["fingerprint"] /
                           "manifest.json").read_text())
    assert manifest["params"]["prefix"] == "${oc.env:TOY_TOKEN}"
    # the stage itself got the real value
    from recipe_engine.artifacts import iter_documents

    docs = list(iter_documents(first["stages"][0]["artifact"]))
    assert docs[0]["text"].startswith("tok-one")
    # a rotated token does not change the fingerprint
    monkeypatch.setenv("TOY_TOKEN", "tok-two")
    rc, out, err = toy("run", str(recipe), "--json")
    assert [s["status"] for s in json.loads(out)["stages"]] == ["cached", "cached"]


def test_requires_pins_warn_on_mismatch(toy, tmp_path):
    import textwrap

    import pytest

    from recipe_engine import RecipeWarning, config
    from recipe_engine.plugins import PluginManager
    from recipe_engine.validate import validate

    recipe = tmp_path / "pinned.yaml"
    recipe.write_text(textwrap.dedent("""
        stages:
          numbers: {component: toy_numbers, params: {count: 2}}
        requires: {recipe-engine: ">=0.1", toy-tests: ">=9", not-a-package: "==1"}
    """))
    pm = PluginManager()
    with pytest.warns(RecipeWarning) as caught:
        validate(config.load(recipe, [], pm.config_dirs()), pm.registry, {"name": "serial"})
    messages = " | ".join(str(w.message) for w in caught)
    assert "written for toy-tests >=9; installed: 0.0.0" in messages
    assert "not-a-package ==1, which is not installed" in messages
    assert "recipe-engine" not in messages  # satisfied
