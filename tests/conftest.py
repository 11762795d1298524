import json
import os
import sys
from pathlib import Path

import pytest

from recipe_engine.testing import fake_entry_point  # noqa: F401  (tests import it from here)

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
