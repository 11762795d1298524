"""composer_train's resume, checked sample by sample.

With ``RECIPE_TRACE_SAMPLES=PATH`` the trainer appends one JSON line per device batch to
``PATH``: the batch's index in the run, its epoch, the process's rank and the indices in the
train split of the sequences it trains on (plugins/training/callbacks.py, ``SampleTrace``).
An uninterrupted run's trace is the reference. A run is killed with SIGKILL after its first
checkpoint; copies of what it left are resumed, in one process and in two (gloo DDP on the
CPU), and the batches the killed run had checkpointed followed by the resumed run's batches
must be the reference's, sample for sample, in order.

The shards: 256 distinct sequences, 16 batches of 16 per epoch; checkpoints every 5 batches,
so every checkpoint falls inside an epoch; 24 batches in all, so a resumed run crosses into
the second epoch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from recipe_engine import Artifact, StageError
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage

VOCAB, SEQ_LEN, N_TRAIN, BATCH = 64, 32, 256, 16
BATCHES, SAVE_EVERY = 24, 5
MODEL = {"name": "llama", "dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32}
PARAMS = {"model": MODEL, "optimizer": {"name": "adamw", "lr": 1e-2}, "global_batch_size": BATCH,
          "max_duration": f"{BATCHES}ba", "save_interval": f"{SAVE_EVERY}ba", "device": "cpu",
          "log_interval": 10}
TRACE_ENV = "RECIPE_TRACE_SAMPLES"


def make_shards(root: Path, seed: int, compression: str | None = None) -> Artifact:
    """Packed random documents, like mds_shards writes them; every train sequence distinct."""
    import numpy as np
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", 32)):
        tokens: list[int] = []
        while len(tokens) < n * SEQ_LEN:
            tokens += [1] + rng.integers(3, VOCAB, size=int(rng.integers(8, 40))).tolist() + [2]
        rows = np.array(tokens[: n * SEQ_LEN], dtype=np.uint16).reshape(n, SEQ_LEN)
        assert len({r.tobytes() for r in rows}) == n
        with MDSWriter(out=str(root / split), columns={"tokens": "ndarray:uint16"},
                       compression=compression, size_limit=1 << 12) as writer:  # several shards
            for row in rows:
                writer.write({"tokens": row})
    meta = {"seq_len": SEQ_LEN, "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2, "pad_id": 0,
            "num_train_samples": N_TRAIN, "num_train_tokens": N_TRAIN * SEQ_LEN,
            "num_val_samples": 32}
    return Artifact(kind="shards", path=root, manifest={"meta": meta})


def stage(**overrides: Any):
    from recipe_engine_plugins.training import ComposerTrain

    return instantiate(ComposerTrain, {**PARAMS, **overrides}, PluginManager().registry.build)


@contextlib.contextmanager
def traced(path: Path) -> Iterator[Path]:
    """Runs (and the processes they launch) inside append their sample trace to ``path``."""
    old = os.environ.get(TRACE_ENV)
    os.environ[TRACE_ENV] = str(path)
    try:
        yield path
    finally:
        if old is None:
            del os.environ[TRACE_ENV]
        else:
            os.environ[TRACE_ENV] = old


def global_batches(trace: Path) -> dict[int, list[int]]:
    """Batch index -> the global batch's sample indices, in streaming's global order, which
    deals a global batch out to the ranks in turn: its sample ``i`` is sample ``i // world``
    of rank ``i % world``'s device batch. Every batch must have been traced once by every
    rank of its world."""
    per_batch: dict[int, dict[int, list[int]]] = {}
    sizes: dict[int, int] = {}
    for line in trace.read_text().splitlines():
        entry = json.loads(line)
        ranks = per_batch.setdefault(entry["batch"], {})
        assert entry["rank"] not in ranks, f"batch {entry['batch']} traced twice by one rank"
        ranks[entry["rank"]] = entry["samples"]
        sizes[entry["batch"]] = entry["world_size"]
    for b, ranks in per_batch.items():
        assert sorted(ranks) == list(range(sizes[b])), f"batch {b}: ranks {sorted(ranks)}"
    return {b: [ranks[i % len(ranks)][i // len(ranks)]
                for i in range(sum(len(v) for v in ranks.values()))]
            for b, ranks in sorted(per_batch.items())}


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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Artifact:
    return make_shards(tmp_path_factory.mktemp("shards"), seed=3)


@pytest.fixture(scope="module")
def full(tmp_path_factory, shards) -> dict[str, Any]:
    """The uninterrupted run: its artifact and its trace."""
    root = tmp_path_factory.mktemp("full")
    with traced(root / "trace.jsonl") as trace:
        art = run_stage(stage(), root / "run", {"shards": shards})
    return {"artifact": art, "batches": global_batches(trace)}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, shards) -> dict[str, Any]:
    """A run SIGKILLed once its first checkpoint is whole: its stage root and its trace."""
    base = tmp_path_factory.mktemp("killed")
    root = base / "run"
    spec = {"params": PARAMS, "root": str(root), "shards": str(shards.path),
            "manifest": shards.manifest}
    env = dict(os.environ, **{TRACE_ENV: str(base / "trace.jsonl")})
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, json.dumps(spec)], env=env)
    latest = root / "work" / "checkpoints" / "latest-rank0.pt"  # made once a checkpoint is whole
    deadline = time.monotonic() + 180
    try:
        while not latest.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (root / "out" / "model.safetensors").exists()
    return {"root": root, "batches": global_batches(base / "trace.jsonl")}


def resume(killed: dict[str, Any], into: Path, shards: Artifact, **overrides: Any) -> dict[str, Any]:
    """Resume a copy of the killed run in ``into``; the killed run's checkpointed batches
    followed by the resumed run's, and what resumed."""
    shutil.copytree(killed["root"], into, symlinks=True)
    with traced(into.parent / f"{into.name}.trace.jsonl") as trace:
        art = run_stage(stage(**overrides), into, {"shards": shards})
    step = art.manifest["meta"]["resumed_from_step"]
    resumed = global_batches(trace)
    assert min(resumed) == step, "the resumed run did not start at its checkpoint's batch"
    before = {b: s for b, s in killed["batches"].items() if b < step}
    assert sorted(before) == list(range(step)), "the killed run's trace misses batches"
    return {"artifact": art, "step": step, "batches": {**before, **resumed}}


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_mid_epoch_at_the_next_sample(tmp_path, shards, full, killed):
    import torch
    from safetensors.torch import load_file

    from recipe_engine_plugins.training.data import data_fingerprint

    reference = full["batches"]
    assert sorted(reference) == list(range(BATCHES))
    epoch0 = [s for b in range(N_TRAIN // BATCH) for s in reference[b]]
    assert sorted(epoch0) == list(range(N_TRAIN))  # an epoch: every sample once, none repeated

    # the checkpoint holds the dataset's position inside the epoch and the data fingerprint
    latest = killed["root"] / "work" / "checkpoints" / "latest-rank0.pt"
    ckpt = torch.load(latest, map_location="cpu", weights_only=False)["state"]
    step = int(os.readlink(latest).split("-ba")[1].split("-")[0])  # ep0-ba5-rank0.pt
    assert 0 < step < BATCHES and step % SAVE_EVERY == 0 and step % (N_TRAIN // BATCH) != 0
    assert ckpt["dataset_state"]["train"] == {
        "epoch": 0, "sample_in_epoch": step * BATCH, "num_canonical_nodes": 1,
        "shuffle_seed": 17, "initial_physical_nodes": 1}
    assert ckpt["callbacks"]["DataFingerprint"] == {
        "data_fingerprint": data_fingerprint(shards.path, shards.manifest)}

    out = resume(killed, tmp_path / "exact", shards)
    assert out["step"] == step
    assert out["artifact"].manifest["meta"]["steps"] == BATCHES
    stitched = out["batches"]
    assert sorted(stitched) == list(range(BATCHES))
    for b in range(BATCHES):  # no sample missing, none repeated, same order
        assert stitched[b] == reference[b], f"batch {b} differs"
    # and therefore the same weights, bit for bit
    a = load_file(full["artifact"].path / "model.safetensors")
    b = load_file(out["artifact"].path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_run_started_on_one_process_resumes_on_two_in_the_same_order(tmp_path, shards, full,
                                                                     killed):
    out = resume(killed, tmp_path / "elastic", shards,
                 parallelism={"name": "ddp", "num_processes": 2})
    assert 0 < out["step"] < BATCHES
    assert out["artifact"].manifest["meta"]["steps"] == BATCHES
    launched = (tmp_path / "elastic.trace.jsonl").read_text().splitlines()
    assert {json.loads(line)["world_size"] for line in launched} == {2}
    assert len(launched) == 2 * (BATCHES - out["step"])  # every batch, on both ranks
    stitched, reference = out["batches"], full["batches"]
    assert sorted(stitched) == list(range(BATCHES))
    for b in range(BATCHES):  # the same global batches, the same global order
        assert stitched[b] == reference[b], f"batch {b} differs"


def test_data_fingerprint_follows_the_content_not_the_path(tmp_path, shards):
    from recipe_engine_plugins.training.data import data_fingerprint

    fp = data_fingerprint(shards.path, {})
    copy = tmp_path / "copy"
    shutil.copytree(shards.path, copy)
    assert data_fingerprint(copy, {}) == fp
    # a store-managed artifact's manifest lists each file's sha256: used instead of reading
    listed = {str(p.relative_to(copy)): {"bytes": p.stat().st_size,
                                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
              for p in copy.rglob("*") if p.is_file()}
    assert data_fingerprint(copy, {"files": listed}) == fp
    shutil.rmtree(copy / "val")  # the validation split is not the training stream
    assert data_fingerprint(copy, {}) == fp
    shard = sorted((copy / "train").glob("shard.*.mds"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert data_fingerprint(copy, {}) != fp
    assert data_fingerprint(copy, {"files": listed}) == fp  # the manifest is trusted as it is


def test_resuming_on_other_shards_fails_naming_both_fingerprints(tmp_path, shards):
    from recipe_engine_plugins.training.data import data_fingerprint

    params = {"max_duration": "4ba", "save_interval": "2ba", "eval_batches": 1}
    root = tmp_path / "run"
    run_stage(stage(**params), root, {"shards": shards})
    other = make_shards(tmp_path / "other", seed=4)
    ours, theirs = (data_fingerprint(s.path, {}) for s in (shards, other))
    assert ours != theirs
    with pytest.raises(StageError) as e:
        run_stage(stage(**params), root, {"shards": other})
    message = str(e.value)
    assert f"made from other training data (data fingerprint {ours[:16]})" in message
    assert f"the shards at {other.path} (data fingerprint {theirs[:16]})" in message
    assert "--fresh composer_train" in message
    assert not (root / "out" / "model.safetensors").exists()
    # on its own shards the stage resumes (here: finds the run complete)
    again = run_stage(stage(**params), root, {"shards": shards})
    assert again.manifest["meta"]["resumed_from_step"] == 4
