"""Checkpoints load without an unrestricted unpickle (plugins/training/safe_load.py).

A payload is a pickled call (``os.system`` or ``exec``) that creates a marker file when
unpickled; each test first checks its payload is live (an unrestricted ``torch.load`` of the
same file creates the marker) where that is cheap, and every refusal test checks the marker
was not created. Real checkpoints come from tiny runs of the training stage and from
Composer's own ``Trainer.save_checkpoint``.
"""
from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recipe_engine import Artifact, StageError
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage

VOCAB, SEQ_LEN, N_TRAIN, N_VAL, BATCH = 64, 32, 64, 16, 8
MODEL = {"name": "llama", "dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32}
PARAMS = {"model": MODEL, "optimizer": {"name": "adamw", "lr": 1e-2}, "global_batch_size": BATCH,
          "max_duration": "6ba", "save_interval": "2ba", "num_checkpoints_to_keep": -1,
          "device": "cpu", "log_interval": 2, "eval_interval": "2ba", "eval_batches": 1}
# (evaluated at every checkpoint: the checkpoints hold computed eval metrics too)


class Payload:
    """Unpickles as a call that creates ``marker``."""

    def __init__(self, marker: Path, kind: str = "system"):
        self.marker, self.kind = str(marker), kind

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        if self.kind == "system":
            return os.system, (f"touch {self.marker}",)
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def refused_global(kind: str) -> str:
    return {"system": "posix.system", "exec": "builtins.exec"}[kind]


def make_shards(root: Path) -> Artifact:
    import numpy as np
    from streaming import MDSWriter

    rng = np.random.default_rng(5)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        rows = rng.integers(3, VOCAB, size=(n, SEQ_LEN)).astype(np.uint16)
        rows[:, 0] = 1
        with MDSWriter(out=str(root / split), columns={"tokens": "ndarray:uint16"}) as writer:
            for row in rows:
                writer.write({"tokens": row})
    meta = {"seq_len": SEQ_LEN, "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2, "pad_id": 0,
            "num_train_samples": N_TRAIN, "num_train_tokens": N_TRAIN * SEQ_LEN,
            "num_val_samples": N_VAL}
    return Artifact(kind="shards", path=root, manifest={"meta": meta})


def stage(**overrides: Any):
    from recipe_engine_plugins.training import ComposerTrain

    return instantiate(ComposerTrain, {**PARAMS, **overrides}, PluginManager().registry.build)


def safe_read(path: Path) -> dict[str, Any]:
    """A checkpoint of ours, read the guarded way (to be altered by a test)."""
    import torch

    from recipe_engine_plugins.training.safe_load import allowlist

    with torch.serialization.safe_globals(allowlist()):
        return torch.load(path, map_location="cpu", weights_only=True)


def tiny_trainer(**kwargs: Any):
    import torch
    from composer import Trainer
    from composer.models import ComposerClassifier

    torch.manual_seed(0)
    return Trainer(model=ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2),
                   device="cpu", progress_bar=False, log_to_console=False, loggers=[], **kwargs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Artifact:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shards) -> dict[str, Any]:
    """An uninterrupted 6-batch run keeping its checkpoints at batches 2, 4 and 6."""
    from recipe_engine_plugins.training.safe_load import guard_checkpoint_loads

    guard_checkpoint_loads()  # whether or not the stage calls it: this run's resume is guarded
    root = tmp_path_factory.mktemp("full") / "run"
    art = run_stage(stage(), root, {"shards": shards})
    ckpts = root / "work" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("ep*-ba*-rank0.pt")) == [
        "ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"]
    return {"root": root, "artifact": art, "checkpoints": ckpts}


def rewound_copy(full_run: dict[str, Any], into: Path, batch: int) -> Path:
    """A copy of the full run's stage root as if it had been killed after ``batch``."""
    shutil.copytree(full_run["root"], into, symlinks=True)
    ckpts = into / "work" / "checkpoints"
    for p in ckpts.glob("ep*-ba*-rank0.pt"):
        if int(p.name.split("-ba")[1].split("-")[0]) > batch:
            p.unlink()
    latest = ckpts / "latest-rank0.pt"
    latest.unlink()
    latest.symlink_to(f"ep0-ba{batch}-rank0.pt")
    return ckpts / f"ep0-ba{batch}-rank0.pt"


# -- installation ----------------------------------------------------------------------------


def test_guard_installs_once_and_replaces_every_binding():
    import composer.callbacks.load_checkpoint as callback_module
    import composer.checkpoint.load as new_load
    import composer.utils as composer_utils
    from composer.utils import checkpoint as ckpt

    from recipe_engine_plugins.training import safe_load

    safe_load.guard_checkpoint_loads()
    assert safe_load.is_guarded()
    first = (ckpt.load_checkpoint, ckpt._torch_load_with_validation,
             ckpt.FileSystemReaderWithValidation.read_data,
             ckpt.FileSystemReaderWithValidation.read_metadata)
    safe_load.guard_checkpoint_loads()  # a second call changes nothing
    assert (ckpt.load_checkpoint, ckpt._torch_load_with_validation,
            ckpt.FileSystemReaderWithValidation.read_data,
            ckpt.FileSystemReaderWithValidation.read_metadata) == first
    load, read_data = first[0], first[2]
    assert load.__recipe_engine_guarded__ and read_data.__recipe_engine_guarded__
    # wrapped once: the wrapped function is Composer's own
    assert not hasattr(load.__wrapped__, "__recipe_engine_guarded__")
    assert not hasattr(read_data.__wrapped__, "__recipe_engine_guarded__")
    assert load.__wrapped__.__module__ == "composer.utils.checkpoint"
    # every module that had bound a replaced function by name now holds the replacement
    assert composer_utils.load_checkpoint is load and callback_module.load_checkpoint is load
    assert new_load._torch_load_with_validation is ckpt._torch_load_with_validation
    assert ckpt._torch_load_with_validation.__module__.endswith("safe_load")
    with pytest.raises(StageError, match="unrestricted pickle.load"):
        new_load.load_resumption_checkpoint(None, "/nonexistent")
    # the scope leaves the environment as it found it
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_every_unpickler_call_in_composer_is_one_the_guard_replaces():
    """If a Composer upgrade adds a torch.load or pickle.load anywhere, this fails (and
    guard_checkpoint_loads refuses to install when it is in the load path)."""
    import composer

    from recipe_engine_plugins.training.safe_load import REPLACED, unpickler_calls

    root = Path(composer.__file__).parent
    found = set()
    for f in sorted(root.rglob("*.py")):
        module = "composer." + ".".join(f.relative_to(root).with_suffix("").parts)
        found |= {(module, where) for where, _ in unpickler_calls(f.read_text())}
    assert found == {(m, fn) for m, fns in REPLACED.items() for fn in fns}


def test_install_fails_loudly_when_the_load_path_is_not_the_known_one(monkeypatch):
    from composer.utils import checkpoint as ckpt

    from recipe_engine_plugins.training import safe_load

    monkeypatch.setattr(safe_load, "REPLACED", {"composer.checkpoint.load": {
        "load_resumption_checkpoint"}})
    with pytest.raises(RuntimeError, match=r"composer\.utils\.checkpoint\._torch_load_with_"
                                           r"validation calls torch\.load"):
        safe_load._audit()
    monkeypatch.undo()
    monkeypatch.delattr(ckpt, "_ensure_valid_checkpoint")
    with pytest.raises(RuntimeError, match="_ensure_valid_checkpoint is gone"):
        safe_load._audit()
    monkeypatch.undo()
    safe_load._audit()  # as installed


# -- Composer's own load path ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["system", "exec"])
def test_composer_trainer_refuses_a_checkpoint_carrying_a_payload(tmp_path, kind):
    import torch

    from recipe_engine_plugins.training.safe_load import (UnsafeCheckpointError,
                                                          guard_checkpoint_loads)

    guard_checkpoint_loads()
    good = Path(tiny_trainer().save_checkpoint(str(tmp_path / "good.pt")))
    # a real Composer checkpoint loads through the guard, whole and weights only
    assert int(tiny_trainer(load_path=str(good)).state.timestamp.batch) == 0
    tiny_trainer(load_path=str(good), load_weights_only=True)

    marker = tmp_path / "payload-ran"
    ckpt = safe_read(good)
    ckpt["state"]["callbacks"] = {"Anything": {"value": Payload(marker, kind)}}
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    latest = tmp_path / "latest-rank0.pt"
    latest.symlink_to(bad.name)
    for path in (bad, latest):
        with pytest.raises(UnsafeCheckpointError) as e:
            tiny_trainer(load_path=str(path))
        assert not marker.exists(), "the payload ran"
        message = str(e.value)
        assert message.startswith(f"refused to load the checkpoint {path}")
        assert refused_global(kind) in message and e.value.disallowed == [refused_global(kind)]
        assert "--fresh <stage>" in message and str(tmp_path) in message
    assert f"{latest} (-> {bad})" in message  # the link and the file it names
    with pytest.raises(UnsafeCheckpointError):  # weights only: the same load, the same refusal
        tiny_trainer(load_path=str(bad), load_weights_only=True)
    assert not marker.exists()

    # the file is a live payload: an unrestricted load runs it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_tar_checkpoints_are_refused(tmp_path):
    from recipe_engine_plugins.training.safe_load import guard_checkpoint_loads

    guard_checkpoint_loads()
    (tmp_path / "ckpt.tar").write_bytes(b"")
    with pytest.raises(StageError, match="without a path filter"):
        tiny_trainer(load_path=str(tmp_path / "ckpt.tar"))


def test_sharded_checkpoint_metadata_and_items_are_read_weights_only(tmp_path):
    """torch.distributed.checkpoint, as Composer reads it: the .metadata file through the
    restricted unpickler, the non-tensor items weights-only."""
    import datetime
    import pickle
    import random

    import numpy as np
    import torch
    import torch.distributed.checkpoint as dcp
    from composer.utils import checkpoint as ckpt

    from recipe_engine_plugins.training.safe_load import (UnsafeCheckpointError,
                                                          guard_checkpoint_loads)

    guard_checkpoint_loads()
    marker = tmp_path / "payload-ran"

    def state(extra: Any) -> dict[str, Any]:
        return {"state": {"model": {"w": torch.arange(3.0)}, "run_name": "train", "extra": extra,
                          "timestamp": {"total_wct": datetime.timedelta(seconds=5)}},
                "rng": [{"numpy": np.random.get_state(), "python": random.getstate(),
                         "torch": torch.get_rng_state()}]}

    dcp.save(state(7), checkpoint_id=str(tmp_path / "good"))
    dcp.save(state(Payload(marker, "exec")), checkpoint_id=str(tmp_path / "bad_item"))
    target = state(0)
    target["state"]["model"]["w"] = torch.zeros(3)
    ckpt.dist_cp_load(target, ckpt.FileSystemReaderWithValidation(str(tmp_path / "good")))
    assert target["state"]["extra"] == 7 and torch.equal(target["state"]["model"]["w"],
                                                         torch.arange(3.0))
    assert target["state"]["timestamp"]["total_wct"] == datetime.timedelta(seconds=5)

    with pytest.raises(BaseException) as e:  # torch wraps it in a CheckpointException
        ckpt.dist_cp_load(state(0), ckpt.FileSystemReaderWithValidation(str(tmp_path / "bad_item")))
    assert "Unsupported global: GLOBAL exec" in str(e.value)
    assert not marker.exists()

    bad_meta = tmp_path / "bad_meta"
    shutil.copytree(tmp_path / "good", bad_meta)
    (bad_meta / ".metadata").write_bytes(pickle.dumps(Payload(marker, "system")))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system.*in its \.metadata"):
        ckpt.FileSystemReaderWithValidation(str(bad_meta)).read_metadata()
    assert not marker.exists()


# -- the training stage ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_checkpoint_resumes_through_the_guard_to_the_same_weights(tmp_path, full_run,
                                                                         shards, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from recipe_engine_plugins.training.safe_load import allowlist

    # the allowlist is what a real checkpoint needs: all of it, and nothing else
    names = {f"{g.__module__}.{g.__qualname__}" for g in allowlist()}
    for path in sorted(full_run["checkpoints"].glob("ep*-ba*-rank0.pt")):
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) <= names
    sample = full_run["checkpoints"] / "ep0-ba4-rank0.pt"
    safe_read(sample)
    for g in allowlist():
        with torch.serialization.safe_globals([h for h in allowlist() if h is not g]):
            with pytest.raises(pickle_error()):
                torch.load(sample, map_location="cpu", weights_only=True)

    # killed after batch 4: resumes there, every torch.load weights-only, same final weights
    rewound_copy(full_run, tmp_path / "run", 4)
    calls: list[tuple[Any, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs.get("weights_only"), os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    resumed = run_stage(stage(), tmp_path / "run", {"shards": shards})
    monkeypatch.undo()
    assert resumed.manifest["meta"]["resumed_from_step"] == 4
    assert resumed.manifest["meta"]["steps"] == 6
    assert calls and all(wo is True or forced == "1" for wo, forced in calls), calls
    a = load_file(full_run["artifact"].path / "model.safetensors")
    b = load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pickle_error() -> type[Exception]:
    import pickle

    return pickle.UnpicklingError


REFUSED_RUN = """
import json, sys
from pathlib import Path
from recipe_engine import Artifact, StageError
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.training import ComposerTrain, safe_load

spec = json.loads(sys.argv[1])
shards = Artifact(kind="shards", path=Path(spec["shards"]), manifest=spec["manifest"])
stage = instantiate(ComposerTrain, spec["params"], PluginManager().registry.build)
result = {"guarded_before": safe_load.is_guarded(), "error": None}
try:
    run_stage(stage, Path(spec["root"]), {"shards": shards})
except StageError as e:
    result["error"] = str(e)
result["guarded_after"] = safe_load.is_guarded()
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_the_stage_refuses_a_checkpoint_carrying_a_payload(tmp_path, full_run, shards):
    """In a fresh process (so the guard is the stage's own doing): the latest checkpoint in
    the stage's work directory carries a payload; the stage fails naming the file and the
    global, the payload does not run, and nothing is committed."""
    import torch

    root = tmp_path / "run"
    target = rewound_copy(full_run, root, 4)
    marker = tmp_path / "payload-ran"
    ckpt = safe_read(target)
    ckpt["state"]["callbacks"]["DataFingerprint"]["data_fingerprint"] = Payload(marker, "system")
    torch.save(ckpt, target)  # a whole zip: repair_checkpoints leaves it in place
    spec = {"params": {**PARAMS, "max_duration": "8ba"}, "root": str(root),
            "shards": str(shards.path), "manifest": shards.manifest}
    proc = subprocess.run([sys.executable, "-c", REFUSED_RUN, json.dumps(spec)],
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert not marker.exists(), "the payload ran"
    assert not result["guarded_before"] and result["guarded_after"]
    latest = root / "work" / "checkpoints" / "latest-rank0.pt"
    error = result["error"] or ""
    assert error.startswith(f"refused to load the checkpoint {latest} (-> {target})"), error
    assert "posix.system" in error and "--fresh" in error
    assert not (root / "out" / "model.safetensors").exists()
