"""End to end: the real micro_code recipe with every stage real, shrunk by overrides to a
few stdlib files, a tiny model and a few steps."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, statuses

RECIPE = str(ROOT / "recipes" / "micro_code.yaml")
TINY = [
    "data.source.include=[json/*.py,email/mime/*.py,email/_*.py,csv.py,textwrap.py,shlex.py]",
    "tokenizer.vocab_size=600",
    "shards.seq_len=64",
    "data.holdout.fraction=0.2",
    "docs_data.source.include=[pip,setuptools,numpy,torch,requests,urllib3,packaging,jinja2]",
    "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "train.global_batch_size=8", "train.max_duration=6ba", "train.save_interval=3ba",
    "++eval.heldout.max_documents=3",
    "++eval.lm_eval.limit=8",
    "++executor.num_workers=2",
]
CODE = ["source", "filter", "dedup", "near_dedup", "pii", "holdout"]
DOCS = ["docs_source", "docs_extract", "docs_language", "docs_filter", "docs_pii", "docs_dedup"]
STAGES = [*CODE, *DOCS, "tokenizer", "shards", "docs_shards", "train", "evaluate", "lm_eval",
          "export"]


def recipe(*args, store, check=True, timeout=600):
    env = {**os.environ, "RECIPE_STORE": str(store), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "recipe_engine.cli", "run", RECIPE, "--json", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout) if proc.stdout.strip() else None, proc


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    summary, proc = recipe(*TINY, store=store)
    return store, summary


def test_every_stage_commits(first_run):
    store, summary = first_run
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert set(statuses(summary).values()) == {"ran"}
    for s in summary["stages"]:
        manifest = json.loads((Path(s["artifact"]) / "manifest.json").read_text())
        assert manifest["fingerprint"] == s["fingerprint"] and manifest["files"]
    metrics = {s["name"]: s["metrics"] for s in summary["stages"]}
    assert metrics["evaluate"]["bits_per_byte"] > 0 and metrics["evaluate"]["zstd_bits_per_byte"] > 0
    assert 0 <= metrics["lm_eval"]["python_basics/acc"] <= 1
    export = Path(summary["stages"][-1]["artifact"])
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()


def test_heldout_split_comes_before_the_tokenizer_and_streams_are_mixed(first_run):
    """The evaluation files are marked before anything learns: the tokenizer leaves them out,
    the shards send exactly them to val/; training mixes code and docs 90/10."""
    store, summary = first_run
    manifests = {s["name"]: json.loads((Path(s["artifact"]) / "manifest.json").read_text())
                 for s in summary["stages"]}
    heldout = manifests["holdout"]["meta"]["heldout"]["num_documents"]
    assert heldout >= 1
    assert manifests["tokenizer"]["counts"]["excluded_heldout"] == heldout
    assert manifests["tokenizer"]["meta"]["report"]["measured_on"] == "evaluation"
    assert manifests["shards"]["meta"]["num_val_documents"] == heldout
    assert manifests["evaluate"]["metrics"]["num_documents"] <= heldout
    streams = manifests["train"]["meta"]["streams"]
    assert [s["stage"] for s in streams] == ["shards", "docs_shards"]
    assert [s["share"] for s in streams] == [0.9, 0.1]


def test_second_run_is_all_cached(first_run):
    store, first = first_run
    again, _ = recipe(*TINY, store=store)
    assert set(statuses(again).values()) == {"cached"}
    assert [s["fingerprint"] for s in again["stages"]] == [s["fingerprint"] for s in first["stages"]]


def test_one_filter_parameter_reruns_exactly_its_descendants(first_run):
    store, _ = first_run
    changed, _ = recipe(*TINY, "data.quality.max_line_length=900", store=store)
    assert statuses(changed) == {
        "source": "cached", **{s: "ran" for s in CODE[1:]}, **{s: "cached" for s in DOCS},
        **{s: "ran" for s in STAGES[len(CODE) + len(DOCS):]}}


def test_multirun_over_learning_rate_shares_data_stages(first_run):
    store, _ = first_run
    result, _ = recipe(*TINY, "-m", "optim.lr=1e-3,2e-3", store=store)
    jobs = result["jobs"]
    assert [j["overrides"][-1] for j in jobs] == ["optim.lr=0.001", "optim.lr=0.002"]
    data = [*CODE, *DOCS, "tokenizer", "shards", "docs_shards"]
    second = statuses(jobs[1])
    assert all(second[s] == "cached" for s in data)
    assert all(second[s] == "ran" for s in ["train", "evaluate", "lm_eval", "export"])
    fps = [{s["name"]: s["fingerprint"] for s in j["stages"]} for j in jobs]
    assert all(fps[0][s] == fps[1][s] for s in data) and fps[0]["train"] != fps[1]["train"]


@pytest.mark.slow
def test_killed_training_resumes_and_finishes(tmp_path):
    """SIGKILL `recipe run` once training has checkpointed; the next run resumes from it."""
    store = tmp_path / "store"
    args = [*TINY, "train.max_duration=40ba", "train.save_interval=5ba"]
    env = {**os.environ, "RECIPE_STORE": str(store), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "recipe_engine.cli", "run", RECIPE, "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpts = list(store.glob("work/*/scratch/**/ep*-ba*-rank0.pt"))
        if ckpts:
            break
        assert proc.poll() is None, "run ended before training checkpointed"
        time.sleep(0.2)
    else:
        pytest.fail("no checkpoint appeared")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    summary, _ = recipe(*args, store=store)
    st = statuses(summary)
    assert st["shards"] == "cached" and st["train"] == "ran"
    train = next(s for s in summary["stages"] if s["name"] == "train")
    manifest = json.loads((Path(train["artifact"]) / "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["meta"]["resumed_from_step"] >= 5
    assert manifest["meta"]["steps"] == 40
