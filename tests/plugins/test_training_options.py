"""composer_train with the model options that need the trainer's help: document masking
(the shards' bos id reaches the model) and mixture of experts (the load-balancing loss
reaches the training loss)."""
from __future__ import annotations

import math

import pytest

from recipe_engine import Artifact, StageError
from recipe_engine.testing import run_stage

from test_resume import MODEL, make_shards, stage


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), seed=7)


def with_meta(art: Artifact, **meta) -> Artifact:
    return Artifact(kind="shards", path=art.path, manifest={**art.manifest, "meta": {**art.meta, **meta}})


def test_document_masking_needs_bos_boundaries(tmp_path, shards):
    masked = {**MODEL, "document_masking": True}
    with pytest.raises(StageError, match="document_masking needs shards"):
        run_stage(stage(model=masked, max_duration="2ba"), tmp_path / "a", inputs={"shards": shards})
    art = run_stage(stage(model=masked, max_duration="2ba"), tmp_path / "b",
                    inputs={"shards": with_meta(shards, document_boundaries="bos")})
    plain = run_stage(stage(max_duration="2ba"), tmp_path / "c", inputs={"shards": shards})
    # the same data and seed: masking changes what the model attends to, so the losses differ
    assert art.manifest["metrics"]["train_loss"] != plain.manifest["metrics"]["train_loss"]


def test_moe_trains_with_its_balancing_loss(tmp_path, shards, monkeypatch):
    from recipe_engine_plugins.training import objectives

    seen = []
    real = objectives.CausalLM.loss

    def loss(self, outputs, batch, *args, **kwargs):
        value = real(self, outputs, batch, *args, **kwargs)
        seen.append(float(getattr(self.model, "aux_loss", 0.0) or 0.0))
        return value

    monkeypatch.setattr(objectives.CausalLM, "loss", loss)
    moe = {**MODEL, "name": "llama_moe", "num_experts": 4, "top_k": 2}
    art = run_stage(stage(model=moe, max_duration="3ba"), tmp_path / "moe", inputs={"shards": shards})
    assert math.isfinite(art.manifest["metrics"]["train_loss"])
    assert seen and all(a > 0 for a in seen)  # the balancing loss was there to add
