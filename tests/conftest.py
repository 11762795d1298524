import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fake_entry_point(monkeypatch, name: str, value: str, dist_name: str = "toy-tests"):
    """Make ``importlib.metadata.entry_points`` also report a plugin, as if pip-installed."""
    real = importlib.metadata.entry_points
    ep = importlib.metadata.EntryPoint(name=name, value=value, group="recipe_engine.plugins")

    class _Dist:  # what EntryPoint.dist offers that we read
        def __init__(self, n):
            self.name = n

    object.__setattr__(ep, "dist", _Dist(dist_name)) if hasattr(ep, "dist") else None
    try:
        ep = ep._for(_Dist(dist_name))  # type: ignore[attr-defined]
    except Exception:
        pass

    def entry_points(**kw):
        eps = real(**kw)
        if kw.get("group") == "recipe_engine.plugins":
            return list(eps) + [ep]
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


@pytest.fixture
def toy(monkeypatch, tmp_path, capfd):
    """A CLI runner with the toy plugin installed through a faked entry point and a fresh store."""
    fake_entry_point(monkeypatch, "toy", "toy_plugin")
    monkeypatch.setenv("RECIPE_STORE", str(tmp_path / "store"))
    from recipe_engine.cli import main

    class Cli:
        store = tmp_path / "store"
        recipe = str(TESTS / "recipes" / "toy.yaml")

        def __call__(self, *args):
            capfd.readouterr()
            rc = main([str(a) for a in args])
            out, err = capfd.readouterr()
            return rc, out, err

        def run_json(self, *args):
            rc, out, err = self("run", self.recipe, "--json", *args)
            assert rc == 0, err
            return json.loads(out)

    return Cli()


def statuses(summary):
    return {s["name"]: s["status"] for s in summary["stages"]}
