"""composer_train and its sub-components, on tiny MDS shards written here.

The shards follow the ``mds_shards`` contract: train/ and val/ MDS datasets, column
``tokens`` (``ndarray:uint16``), every sample exactly ``seq_len`` tokens of packed
``[bos] doc [eos]``; documents repeat a short random pattern, so a tiny model learns fast.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import pytest

from recipe_engine import Artifact, RecipeError
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage

VOCAB, SEQ_LEN = 64, 32
MODEL = {"name": "llama", "dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32}


def make_shards(root: Path, compression: str | None, n_train: int = 256, n_val: int = 32,
                seed: int = 0) -> Artifact:
    import numpy as np
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    bos, eos, pad = 1, 2, 0

    def packed(n: int) -> "np.ndarray":
        tokens: list[int] = []
        while len(tokens) < n * SEQ_LEN:
            pattern = rng.integers(3, VOCAB, size=int(rng.integers(2, 5)))
            length = int(rng.integers(8, 40))
            tokens += [bos] + [int(pattern[i % len(pattern)]) for i in range(length)] + [eos]
        return np.array(tokens[: n * SEQ_LEN], dtype=np.uint16).reshape(n, SEQ_LEN)

    for split, n in (("train", n_train), ("val", n_val)):
        with MDSWriter(out=str(root / split), columns={"tokens": "ndarray:uint16"},
                       compression=compression) as writer:
            for row in packed(n):
                writer.write({"tokens": row})
    meta = {"seq_len": SEQ_LEN, "vocab_size": VOCAB, "bos_id": bos, "eos_id": eos, "pad_id": pad,
            "num_train_samples": n_train, "num_train_tokens": n_train * SEQ_LEN,
            "num_val_samples": n_val}
    return Artifact(kind="shards", path=root, manifest={"meta": meta})


@pytest.fixture(scope="module")
def zstd_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards_zstd"), "zstd")


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards_raw"), None)


def stage(**params):
    from recipe_engine_plugins.training import ComposerTrain

    base = {"model": MODEL, "optimizer": {"name": "adamw", "lr": 1e-2}, "global_batch_size": 16,
            "log_interval": 5, "device": "cpu"}
    return instantiate(ComposerTrain, {**base, **params}, PluginManager().registry.build)


def files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


# -- components, cheap -----------------------------------------------------------------------


def test_components_are_registered():
    reg = PluginManager().registry
    assert reg.find("stage", "composer_train") is not None
    assert {"adamw"} <= set(reg.names("optimizer"))
    assert {"cosine_warmup"} <= set(reg.names("scheduler"))
    assert {"single", "ddp", "fsdp"} <= set(reg.names("parallelism"))


def test_duration_is_exactly_one_of_max_duration_and_tokens_per_param():
    with pytest.raises(RecipeError, match="exactly one of max_duration"):
        stage()
    with pytest.raises(RecipeError, match="exactly one of max_duration"):
        stage(max_duration="10ba", tokens_per_param=20)
    with pytest.raises(RecipeError, match="not a Composer time string"):
        stage(max_duration="10 batches")
    with pytest.raises(RecipeError, match="save_interval"):
        stage(max_duration="10ba", save_interval="often")
    stage(max_duration="2000000tok")
    stage(tokens_per_param=20)


RECIPE = """
name: t
stages:
  shards: {component: fake_shards}
  train:
    component: composer_train
    inputs: {shards: shards}
    params:
      model: {name: llama, dim: 64, n_layers: 2, n_heads: 4}
      optimizer: {name: adamw, lr: -1}
      parallelism: {name: fdsp}
      save_interval: 1.5ba
"""


def test_recipe_validation_reports_every_training_mistake(tmp_path, fake_shards_pm):
    from recipe_engine.config import load
    from recipe_engine.validate import validate

    pm = fake_shards_pm
    (tmp_path / "t.yaml").write_text(RECIPE)
    with pytest.raises(RecipeError) as e:
        validate(load(tmp_path / "t.yaml", [], pm.config_dirs()), pm.registry)
    text = str(e.value)
    assert "stages.train.params.optimizer.lr: must be > 0" in text
    assert "unknown parallelism component 'fdsp'" in text and 'did you mean "fsdp"' in text
    # the stage's own checks run once its sub-components are valid
    (tmp_path / "t.yaml").write_text(RECIPE.replace("lr: -1", "lr: 0.001").replace("fdsp", "fsdp"))
    with pytest.raises(RecipeError) as e:
        validate(load(tmp_path / "t.yaml", [], pm.config_dirs()), pm.registry)
    assert "exactly one of max_duration" in str(e.value)
    assert "params.save_interval: '1.5ba': Composer counts ba in whole numbers" in str(e.value)


def test_degenerate_budgets_and_cpu_precision_fail_validation():
    with pytest.raises(RecipeError, match="max_duration: '0ba' is zero"):
        stage(max_duration="0ba")
    with pytest.raises(RecipeError, match="save_interval: '0ba' is zero"):
        stage(max_duration="10ba", save_interval="0ba")
    with pytest.raises(RecipeError, match="precision: amp_bf16 needs a GPU"):
        stage(max_duration="10ba", precision="amp_bf16")
    with pytest.raises(RecipeError, match="device_microbatch_size: 5 does not divide"):
        stage(max_duration="10ba", device_microbatch_size=5)


def test_duration_in_batches():
    tokens_per_batch = 16 * SEQ_LEN
    assert stage(max_duration="30ba").total_batches(1000, SEQ_LEN, 16) == 30
    assert stage(max_duration="2ep").total_batches(1000, SEQ_LEN, 16) == 32
    assert stage(max_duration="0.5ep").total_batches(1000, SEQ_LEN, 16) == 8
    assert stage(max_duration="100sp").total_batches(1000, SEQ_LEN, 16) == 7
    assert stage(max_duration=f"{3 * tokens_per_batch}tok").total_batches(1000, SEQ_LEN, 16) == 3
    assert stage(max_duration="2e6tok").total_batches(1000, SEQ_LEN, 16) == math.ceil(2e6 / tokens_per_batch)
    # Chinchilla: 20 tokens per parameter, all parameters counted
    assert stage(tokens_per_param=20).total_batches(110_912, SEQ_LEN, 16) == \
        math.ceil(20 * 110_912 / tokens_per_batch)


def test_adamw_skips_decay_on_norms_and_embeddings():
    from recipe_engine_plugins.models import Llama
    from recipe_engine_plugins.training import AdamW

    module = Llama(dim=32, n_layers=1, n_heads=2, multiple_of=32).build(VOCAB, SEQ_LEN)
    opt = AdamW(lr=1e-3, weight_decay=0.1).build(module.named_parameters(), ["tok_embeddings.weight"])
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert any(p is module.tok_embeddings.weight for p in plain["params"])
    assert sum(p.ndim == 1 for p in plain["params"]) == 3  # two block norms + final norm
    with pytest.raises(RecipeError):
        AdamW(betas=[0.9])


def test_parallelism_components():
    from recipe_engine_plugins.models import Llama
    from recipe_engine_plugins.training import DDP, FSDP, SingleDevice

    assert SingleDevice().num_processes_per_node() == 1 and SingleDevice().trainer_kwargs() == {}
    assert DDP(num_processes=8).num_processes_per_node() == 8
    fsdp = FSDP(num_processes=4, activation_checkpointing=True)
    cfg = fsdp.trainer_kwargs()["parallelism_config"]["fsdp"]
    assert cfg["sharding_strategy"] == "FULL_SHARD" and cfg["mixed_precision"] == "PURE"
    assert cfg["activation_checkpointing"] and cfg["state_dict_type"] == "sharded"
    module = Llama(dim=32, n_layers=2, n_heads=2, multiple_of=32).build(VOCAB, SEQ_LEN)
    # marks the blocks for either version (version 1 itself needs CUDA to go further)
    FSDP(num_processes=4, activation_checkpointing=True, fsdp_version=2).prepare(module)
    wrapped = [m for m in module.modules() if module.fsdp_wrap_fn(m)]
    assert wrapped == list(module.layers)
    assert all(module.activation_checkpointing_fn(m) for m in module.layers)


# -- training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_loss_goes_down_and_checkpoint_loads(tmp_path, zstd_shards):
    import torch

    from recipe_engine_plugins.models import load_model

    before = files(zstd_shards.path)
    art = run_stage(stage(max_duration="30ba", save_interval="10ba"), tmp_path,
                    {"shards": zstd_shards})
    meta, metrics = art.manifest["meta"], art.manifest["metrics"]
    reg = PluginManager().registry
    num_params = reg.build("model", MODEL).num_params(VOCAB)
    assert meta == {"vocab_size": VOCAB, "seq_len": SEQ_LEN, "bos_id": 1, "eos_id": 2, "pad_id": 0,
                    "num_params": num_params, "tokens_trained": 30 * 16 * SEQ_LEN, "steps": 30,
                    "resumed_from_step": 0, "world_size": 1, "num_nodes": 1}
    assert {"train_loss", "val_loss", "tokens_per_second", "seconds", "flops_per_token",
            "model_flops"} <= set(metrics)
    assert "mfu" not in metrics  # CPU
    uniform = math.log(VOCAB)  # the loss of a model that knows nothing
    assert metrics["train_loss"] < uniform - 0.4
    assert metrics["val_loss"] < uniform - 0.4
    assert metrics["model_flops"] == pytest.approx(metrics["flops_per_token"] * 30 * 16 * SEQ_LEN)
    assert files(zstd_shards.path) == before  # compressed shards were read, not unpacked in place

    # the artifact's fp32 weights are the trained ones: same logits as Composer's last checkpoint
    exported = load_model(art.path)
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    ckpt = torch.load(tmp_path / "work" / "checkpoints" / "latest-rank0.pt", map_location="cpu",
                      weights_only=False)
    trained = reg.build("model", MODEL).build(VOCAB, SEQ_LEN)
    trained.load_state_dict({k.removeprefix("model."): v
                             for k, v in ckpt["state"]["model"].items()})
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN))
    with torch.no_grad():
        assert torch.equal(exported(tokens), trained.eval()(tokens))
    assert json.loads((art.path / "model.json").read_text())["vocab_size"] == VOCAB


CRASHING_RUN = """
import json, sys, time
from pathlib import Path
from recipe_engine import Artifact
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.training import ComposerTrain, callbacks

spec = json.loads(sys.argv[1])
step = callbacks.StageLog.batch_end
def slow_batch_end(self, state, logger):  # leave the test time to kill us mid-run
    step(self, state, logger)
    time.sleep(0.1)
callbacks.StageLog.batch_end = slow_batch_end
shards = Artifact(kind="shards", path=Path(spec["shards"]), manifest=spec["manifest"])
stage = instantiate(ComposerTrain, spec["params"], PluginManager().registry.build)
run_stage(stage, Path(spec["root"]), {"shards": shards})
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, raw_shards):
    import torch
    from safetensors.torch import load_file

    params = {"model": MODEL, "optimizer": {"name": "adamw", "lr": 1e-2},
              "global_batch_size": 16, "max_duration": "40ba", "save_interval": "6ba",
              "device": "cpu", "log_interval": 10}
    full = run_stage(stage(**params), tmp_path / "full", {"shards": raw_shards})

    root = tmp_path / "crash"
    spec = {"params": params, "root": str(root), "shards": str(raw_shards.path),
            "manifest": raw_shards.manifest}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, json.dumps(spec)])
    latest = root / "work" / "checkpoints" / "latest-rank0.pt"  # made once a checkpoint is whole
    deadline = time.monotonic() + 120
    try:
        while not latest.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (root / "out" / "model.safetensors").exists()

    resumed = run_stage(stage(**params), root, {"shards": raw_shards})
    step = resumed.manifest["meta"]["resumed_from_step"]
    assert 0 < step < 40 and step % 6 == 0
    assert resumed.manifest["meta"]["steps"] == 40
    a = load_file(full.path / "model.safetensors")
    b = load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: same data, same order, same state
    for key in ("train_loss", "val_loss"):
        assert resumed.manifest["metrics"][key] == full.manifest["metrics"][key]

    # killed after its last checkpoint, a run trains no further and gives the same artifact
    again = run_stage(stage(**params), root, {"shards": raw_shards})
    assert again.manifest["meta"]["resumed_from_step"] == 40
    c = load_file(again.path / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert again.manifest["metrics"]["val_loss"] == full.manifest["metrics"]["val_loss"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_on_cpu(tmp_path, zstd_shards):
    art = run_stage(stage(max_duration="12ba", save_interval="6ba",
                          parallelism={"name": "ddp", "num_processes": 2}),
                    tmp_path, {"shards": zstd_shards})
    meta = art.manifest["meta"]
    assert meta["steps"] == 12 and meta["tokens_trained"] == 12 * 16 * SEQ_LEN
    assert art.manifest["metrics"]["val_loss"] < math.log(VOCAB)
    assert (art.path / "model.safetensors").exists()
    assert (tmp_path / "work" / "launch" / "result.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_fsdp_on_cpu_resumes_from_its_sharded_checkpoint(tmp_path, zstd_shards):
    """FSDP version 2 (torch's fully_shard) over two gloo processes: the run finishes, its
    sharded checkpoint (one file per rank) loads through the safe loader on a rerun, and the
    gathered weights equal the full model's."""
    import torch
    from safetensors.torch import load_file

    params = dict(max_duration="6ba", save_interval="3ba",
                  parallelism={"name": "fsdp", "num_processes": 2, "fsdp_version": 2})
    art = run_stage(stage(**params), tmp_path, {"shards": zstd_shards})
    meta = art.manifest["meta"]
    assert meta["steps"] == 6 and meta["world_size"] == 2
    assert art.manifest["metrics"]["val_loss"] < math.log(VOCAB)
    # one file per rank (torch.distributed.checkpoint's __<rank>_<n>.distcp)
    ranks = {p.name.split("_")[2] for p in (tmp_path / "work" / "checkpoints" / "ep0-ba6")
             .glob("*.distcp")}
    assert ranks == {"0", "1"}
    weights = load_file(art.path / "model.safetensors")
    n = sum(t.numel() for t in weights.values())
    assert n == stage(**params).model.num_params(VOCAB, embeddings=True)
    # a rerun in the same work folder resumes from the batch-6 sharded checkpoint
    import shutil
    shutil.rmtree(art.path)
    again = run_stage(stage(**params), tmp_path, {"shards": zstd_shards})
    assert again.manifest["meta"]["resumed_from_step"] == 6
    b = load_file(again.path / "model.safetensors")
    assert all(torch.equal(weights[k], b[k]) for k in weights)


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_on_cpu_trains_as_fsdp_alone_does(tmp_path, zstd_shards):
    """Four gloo processes: FSDP over 2 x tensor parallelism over 2 (each block's
    projections split in two, both ranks of a pair reading the same batch) against FSDP
    over 2 alone, same seed, data and global batch: the same samples in the same order
    (tokens counted once, not per tensor-parallel rank) and the same weights up to
    floating-point summation order."""
    import torch
    from safetensors.torch import load_file

    common = dict(max_duration="4ba", save_interval="2ba",
                  optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.0})
    fsdp = {"name": "fsdp", "num_processes": 2, "fsdp_version": 2}
    alone = run_stage(stage(parallelism=fsdp, **common), tmp_path / "fsdp", {"shards": zstd_shards})
    tp = run_stage(stage(parallelism={**fsdp, "num_processes": 4, "tensor_parallel_degree": 2},
                         **common), tmp_path / "tp", {"shards": zstd_shards})
    assert tp.manifest["meta"]["world_size"] == 4
    assert tp.manifest["meta"]["tokens_trained"] == alone.manifest["meta"]["tokens_trained"] \
        == 4 * 16 * SEQ_LEN
    a, b = load_file(alone.path / "model.safetensors"), load_file(tp.path / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert tp.manifest["metrics"]["val_loss"] == pytest.approx(
        alone.manifest["metrics"]["val_loss"], rel=1e-4)


def test_repair_checkpoints_before_autoresume(tmp_path):
    """A damaged or missing latest checkpoint is removed and ``latest`` re-pointed at the
    newest whole one kept; with none whole, every checkpoint goes (training starts afresh).
    Only zip integrity is checked: nothing is unpickled."""
    import zipfile

    from recipe_engine_plugins.training.checkpoints import checkpoint_damage, repair_checkpoints

    def checkpoint(name: str) -> Path:
        with zipfile.ZipFile(tmp_path / name, "w") as z:  # torch.save's format: a zip
            z.writestr("archive/data.pkl", b"\x80\x04N." + bytes(range(256)) * 40)
        return tmp_path / name

    def point_latest(name: str) -> None:
        (tmp_path / "latest-rank0.pt").unlink(missing_ok=True)
        (tmp_path / "latest-rank0.pt").symlink_to(name)

    assert repair_checkpoints(tmp_path) == ""  # nothing to resume
    a, b, c = (checkpoint(f"ep{i}-ba{4 * i}-rank0.pt") for i in (1, 2, 3))
    point_latest(c.name)
    assert repair_checkpoints(tmp_path) == "" and checkpoint_damage(c) == ""

    c.write_bytes(c.read_bytes()[:-100])  # cut short
    assert repair_checkpoints(tmp_path) == (
        "the latest checkpoint ep3-ba12-rank0.pt is damaged (not a complete zip archive "
        "(truncated?)); removed it and resuming from ep2-ba8-rank0.pt instead")
    assert os.readlink(tmp_path / "latest-rank0.pt") == b.name and not c.exists()

    b.unlink()  # latest names a file that is gone
    assert repair_checkpoints(tmp_path) == (
        "the latest checkpoint ep2-ba8-rank0.pt is damaged (missing); removed it and "
        "resuming from ep1-ba4-rank0.pt instead")

    data = bytearray(a.read_bytes())  # bytes flipped inside the pickle: a CRC mismatch
    data[200:210] = bytes(x ^ 0xFF for x in data[200:210])
    a.write_bytes(bytes(data))
    assert "member archive/data.pkl does not match its checksum" in checkpoint_damage(a)
    assert repair_checkpoints(tmp_path).endswith(
        "and no earlier whole checkpoint was kept; training this stage afresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
