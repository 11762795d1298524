"""Fixtures every test may use (``toy``, the offline environment variables) and, below,
those the plugin tests share. One conftest for the whole tree: tests import ``ROOT`` and
``statuses`` from it as ``conftest``, which a second conftest module would shadow.

* ``one_thread``: torch on one thread for a module of tiny-model tests (opt in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``).
* ``moto_s3``: a local S3 stand-in (moto's server) and a boto3 client for it.
* ``stdlib_tokenizer``: a tiny SentencePiece tokenizer artifact trained on standard-library
  packages, made once per session for each set of packages.
* ``tiny_trainer``: a Composer ``Trainer`` on a tiny classifier, to feed callbacks and loggers.
* ``fake_shards_pm``: a plugin manager with a stand-in shards stage, to validate recipes;
  ``training_recipe_problems``: what validation says of a ``composer_train`` recipe.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from recipe_engine import Artifact, RecipeError, Stage, hookimpl
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


# -- shared by the plugin tests --------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: torch's thread pool only spins against other processes on 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def moto_s3(monkeypatch):
    """A local S3 stand-in (moto's server, in a thread), credentials for it only and its
    endpoint in ``S3_ENDPOINT_URL`` (what Composer's ``S3ObjectStore`` and Streaming's
    uploader read); yields a boto3 client. A test creates the buckets it needs."""
    server_mod = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed: pip install 'moto[server]' boto3")
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "S3_CANNED_ACL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "moto-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
        yield boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stdlib_tokenizer(tmp_path_factory) -> Callable[..., Artifact]:
    """``stdlib_tokenizer("json", ...)``: the committed artifact of a SentencePiece BPE
    tokenizer (vocabulary 400, one thread) trained on the ``.py`` files of those
    standard-library packages (document ids ``<package>/<file>``), made once per session
    for each tuple of packages. Shared: a test copies it before altering it."""
    from recipe_engine.artifacts import part_name, write_documents
    from recipe_engine.testing import run_stage
    from recipe_engine_plugins.tokenizers.train import SentencePieceBPE

    made: dict[tuple[str, ...], Artifact] = {}

    def make(*packages: str) -> Artifact:
        packages = packages or ("json",)
        if packages not in made:
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            docs = [{"id": f"{pkg}/{p.name}", "text": p.read_text(encoding="utf-8"),
                     "source": "stdlib", "path": str(p)}
                    for pkg in packages for p in sorted((stdlib / pkg).glob("*.py"))]
            root = tmp_path_factory.mktemp("tok-" + "-".join(packages))
            (root / "docs").mkdir()
            write_documents(root / "docs" / part_name(0), docs)
            documents = Artifact(kind="documents", path=root / "docs", manifest={"meta": {}})
            made[packages] = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1),
                                       root / "stage", inputs={"documents": documents})
        return made[packages]

    return make


@pytest.fixture
def tiny_trainer() -> Callable[..., Any]:
    """``tiny_trainer(**kwargs)``: a Composer ``Trainer`` on a linear classifier (8 features,
    2 classes; 64 random samples in batches of 8, torch seeded with 0 first), SGD at 0.1,
    on CPU, quiet, seed 17; ``kwargs`` go to ``Trainer`` and replace those defaults."""

    def make(**kwargs: Any) -> Any:
        import torch
        from composer import Trainer
        from composer.models import ComposerClassifier
        from torch.utils.data import DataLoader, TensorDataset

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        model = ComposerClassifier(torch.nn.Linear(8, 2), num_classes=2)
        defaults = {"model": model, "train_dataloader": DataLoader(data, batch_size=8),
                    "optimizers": torch.optim.SGD(model.parameters(), lr=0.1), "loggers": [],
                    "device": "cpu", "progress_bar": False, "log_to_console": False, "seed": 17}
        return Trainer(**{**defaults, **kwargs})

    return make


@dataclass(kw_only=True)
class FakeShards(Stage, name="fake_shards", output="shards"):
    """Stands in for a shards stage in validation tests."""


class FakeShardsPlugin:
    @hookimpl
    def recipe_components(self):
        return [FakeShards]


@pytest.fixture
def fake_shards_pm():
    """A ``PluginManager`` with the installed plugins and a ``fake_shards`` stage (output
    ``shards``), for validating recipes whose training stage needs a shards input."""
    from recipe_engine.plugins import PluginManager

    pm = PluginManager()
    pm.register(FakeShardsPlugin(), "fake")
    return pm


@pytest.fixture
def training_recipe_problems(tmp_path, fake_shards_pm) -> Callable[[dict[str, Any]], str]:
    """``training_recipe_problems(params)``: the message of the ``RecipeError`` that
    validating a recipe file raises whose stage ``train`` is ``composer_train`` with
    ``params`` over a ``fake_shards`` stage (the test fails if the recipe validates)."""
    from recipe_engine.config import load
    from recipe_engine.validate import validate

    def problems(params: dict[str, Any]) -> str:
        recipe = tmp_path / "t.yaml"
        recipe.write_text("name: t\nstages:\n  shards: {component: fake_shards}\n"
                          "  train:\n    component: composer_train\n"
                          "    inputs: {shards: shards}\n"
                          f"    params: {json.dumps(params)}\n")
        with pytest.raises(RecipeError) as e:
            validate(load(recipe, [], fake_shards_pm.config_dirs()), fake_shards_pm.registry)
        return str(e.value)

    return problems
