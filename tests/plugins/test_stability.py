"""composer_train's stability guard: a NaN and a loss spike are injected into a real (tiny)
Composer run; the step is skipped with the weights untouched, and the batch is recorded, also
across a resume."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from recipe_engine import StageError
from recipe_engine.testing import run_stage
from recipe_engine_plugins.training import objectives

from test_resume import make_shards, stage

CONSTANT = {"name": "constant_warmup", "warmup": "1ba"}  # the same lr whatever the run length


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), seed=5)


def inject(monkeypatch, at: set[int], how: str) -> None:
    """Make the training loss of the listed batches (1-based) NaN, or 100 times larger."""
    real = objectives.CausalLM.loss
    calls = {"n": 0}

    def loss(self, outputs, batch, *args, **kwargs):
        value = real(self, outputs, batch, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in at:
                return value * float("nan") if how == "nan" else value * 100.0
        return value

    monkeypatch.setattr(objectives.CausalLM, "loss", loss)


def weights(art) -> str:
    return hashlib.sha256((Path(art.path) / "model.safetensors").read_bytes()).hexdigest()


def train(root, shards, **params):
    params = {"scheduler": CONSTANT, "save_interval": "100ba", **params}
    return run_stage(stage(**params), root, inputs={"shards": shards})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """Three clean batches: what the weights must be when a fourth batch is skipped."""
    return weights(train(tmp_path_factory.mktemp("ref"), shards, max_duration="3ba"))


def test_a_nan_step_is_skipped_and_recorded(tmp_path, shards, reference, monkeypatch):
    inject(monkeypatch, {4}, "nan")
    art = train(tmp_path, shards, max_duration="4ba")
    assert weights(art) == reference  # the NaN batch changed nothing
    [skip] = art.manifest["meta"]["skipped_batches"]
    assert skip["reason"] == "nonfinite_loss" and skip["step"] == 4
    assert skip["samples_in_epoch"] == [48, 64] and skip["epoch"] == 0
    assert math.isfinite(art.manifest["metrics"]["train_loss"])


def test_without_the_guard_a_nan_reaches_the_weights(tmp_path, shards, reference, monkeypatch):
    inject(monkeypatch, {4}, "nan")
    art = train(tmp_path, shards, max_duration="4ba", skip_nonfinite=False)
    assert weights(art) != reference
    assert "skipped_batches" not in art.manifest["meta"]


def test_a_loss_spike_is_skipped_and_recorded(tmp_path, shards, reference, monkeypatch):
    inject(monkeypatch, {4}, "spike")
    art = train(tmp_path, shards, max_duration="4ba", spike_threshold=4.0, spike_warmup=2)
    assert weights(art) == reference
    [skip] = art.manifest["meta"]["skipped_batches"]
    assert skip["reason"] == "loss_spike" and skip["step"] == 4 and skip["loss"] > 100


def test_skipped_batches_survive_a_resume(tmp_path, shards, monkeypatch):
    inject(monkeypatch, {2}, "nan")
    first = train(tmp_path, shards, max_duration="4ba", save_interval="4ba")
    assert [s["step"] for s in first.manifest["meta"]["skipped_batches"]] == [2]
    monkeypatch.undo()
    again = train(tmp_path, shards, max_duration="6ba", save_interval="2ba")  # resumes at 4
    assert again.manifest["meta"]["resumed_from_step"] == 4
    assert [s["step"] for s in again.manifest["meta"]["skipped_batches"]] == [2]


def test_too_many_skips_fail_the_stage(tmp_path, shards, monkeypatch):
    inject(monkeypatch, {2, 3}, "nan")
    with pytest.raises(StageError, match="2 batches skipped"):
        train(tmp_path, shards, max_duration="4ba", max_skipped_batches=1)


def test_curves_are_committed_and_a_resume_gives_the_same_file(tmp_path, shards):
    """metrics.jsonl: one line per logged step (loss, lr) with the validation loss merged in;
    a run resumed from a checkpoint commits the same training curve as an uninterrupted one
    (the first run here ends at batch 4, so it also measured a validation loss there)."""
    whole = train(tmp_path / "whole", shards, max_duration="6ba", log_interval=2)
    lines = [json.loads(x) for x in (Path(whole.path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in lines)
    assert "val_loss" in lines[-1] and lines[-1]["tokens"] == 6 * 16 * 32
    train(tmp_path / "split", shards, max_duration="4ba", save_interval="4ba", log_interval=2)
    resumed = train(tmp_path / "split", shards, max_duration="6ba", log_interval=2)
    assert resumed.manifest["meta"]["resumed_from_step"] == 4
    again = [json.loads(x) for x in (Path(resumed.path) / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "val_loss"} for r in again] == \
        [{k: v for k, v in r.items() if k != "val_loss"} for r in lines]
    assert again[-1]["val_loss"] == lines[-1]["val_loss"]
