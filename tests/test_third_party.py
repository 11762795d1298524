"""The third-party package of docs/plugins.md, examples/recipe-plugin-tokstats: the docs show
its files verbatim, it registers and validates from source, and, pip-installed into a
temporary directory, it is listed by ``recipe plugins`` and its recipe runs end to end."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from recipe_engine.testing import fake_entry_point

EXAMPLE = ROOT / "examples" / "recipe-plugin-tokstats"
RECIPE = EXAMPLE / "recipes" / "tokstats.yaml"
DIST = "recipe-plugin-tokstats"
STAGES = ["source", "filter", "dedup", "tokenizer", "shards", "token_stats"]


def _example_files():
    skip = {"__pycache__", "build"}
    return sorted(p.relative_to(ROOT).as_posix() for p in EXAMPLE.rglob("*")
                  if p.is_file() and not skip & set(p.parts) and ".egg-info" not in str(p))


def test_the_docs_show_every_file_of_the_package_verbatim():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", doc, re.S)
    shown = {path: text for path, text in blocks}
    assert sorted(shown) == _example_files()
    for path, text in shown.items():
        assert text == (ROOT / path).read_text(), (
            f"docs/plugins.md shows an outdated {path}: paste the file into the docs again")


def test_registers_and_validates_from_source(monkeypatch, toy):
    # not installed: importable from its source tree, found through a faked entry point
    monkeypatch.syspath_prepend(str(EXAMPLE))
    fake_entry_point(monkeypatch, "tokstats", "recipe_plugin_tokstats", DIST, version="0.1.0")
    rc, out, err = toy("validate", RECIPE)
    assert rc == 0, err
    assert " -> ".join(STAGES) in out
    rc, _, err = toy("validate", RECIPE, "data.filters=[{name:no_todo,max_todo:3}]")
    assert rc == 1 and 'did you mean "max_todos"' in err
    rc, _, err = toy("validate", RECIPE, "tokstats.top_k=0")
    assert rc == 1 and "top_k" in err and "at least 1" in err


# -- installed with pip --------------------------------------------------------------------


def _offline_build_backend() -> bool:
    """Can setuptools in this environment build a wheel without downloading anything?"""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)  # bdist_wheel moved into setuptools in 70.1


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example pip-installed into a temporary directory (``site``), from a copy of its
    source (pip builds in the source tree); returns the directory holding both."""
    tmp = tmp_path_factory.mktemp("tokstats")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns(
        "__pycache__", "build", "*.egg-info"))
    # without an offline build backend, pip gets setuptools from the configured index
    isolation = ["--no-build-isolation"] if _offline_build_backend() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
         "--disable-pip-version-check", *isolation, "--target", str(tmp / "site"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip could not build the example:\n{proc.stdout}\n{proc.stderr}"
    return tmp


def _env(tmp, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TOKSTATS_LOG": str(tmp / "stages.jsonl"), "OMP_NUM_THREADS": "2"}
    env.pop("RECIPE_STORE", None)
    return env


def _recipe(tmp, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "recipe_engine.cli", *map(str, args)],
                          cwd=tmp, env=_env(tmp, tmp / "site"), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_installed_package_is_listed(installed):
    listing = json.loads(_recipe(installed, "plugins", "--json"))
    (pkg,) = [p for p in listing["packages"] if p["name"] == DIST]
    assert pkg["version"] == "0.1.0"
    assert Path(pkg["location"]) == (installed / "site").resolve()
    assert pkg["plugins"] == ["tokstats"]
    assert {(c["kind"], c["name"]) for c in pkg["components"]} == {
        ("document_filter", "no_todo"), ("stage", "token_stats")}
    descriptions = {c["name"]: c["description"] for c in pkg["components"]}
    assert descriptions["no_todo"] == "Drop documents with more than max_todos TODO/FIXME markers."
    assert pkg["config_groups"] == {"tokstats": ["default"]}
    assert pkg["hooks"] == ["recipe_stage_finished"]
    assert pkg["artifact_kinds"] == {}
    text = _recipe(installed, "plugins")
    assert f"{DIST} 0.1.0" in text and "tokstats: default" in text


@pytest.mark.slow
def test_installed_recipe_runs_end_to_end(installed):
    store = installed / "store"
    summary = json.loads(_recipe(installed, "run", RECIPE, "--json", "--store", store))
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert {s["status"] for s in summary["stages"]} == {"ran"}
    metrics = {s["name"]: s["metrics"] for s in summary["stages"]}
    stats = metrics["token_stats"]
    assert stats["train_tokens"] > 1000 and stats["val_tokens"] > 0
    assert 100 < stats["distinct_tokens"] <= 600 and 0 < stats["vocab_used_fraction"] <= 1
    assert 0 < stats["top_token_fraction"] < 0.5

    artifact = Path(summary["stages"][-1]["artifact"])
    report = json.loads((artifact / "report.json").read_text())
    assert len(report["top_tokens"]) == 10 and all(t["text"] for t in report["top_tokens"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["package"] == DIST and manifest["kind"] == "eval_report"
    filter_manifest = json.loads((Path(summary["stages"][1]["artifact"]) / "manifest.json").read_text())
    assert filter_manifest["counts"]["no_todo.kept"] > 0  # the plugin's filter ran in the stage

    # the lifecycle hook logged every stage
    lines = [json.loads(line) for line in (installed / "stages.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["status"]) for line in lines] == [(s, "ran") for s in STAGES]
    assert lines[-1]["metrics"]["distinct_tokens"] == stats["distinct_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["installed", "from_source"])
def test_the_plugins_own_tests_pass(installed, how):
    """The testing helpers work whether or not the plugin is installed."""
    path = installed / "site" if how == "installed" else installed / "src"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(installed / "src" / "tests")],
        cwd=installed, env=_env(installed, path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout
