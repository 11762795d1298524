"""End to end: the real micro_docs recipe on this environment's package READMEs, every stage
real, training shrunk by overrides to a tiny model and a few steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, statuses

RECIPE = str(ROOT / "recipes" / "micro_docs.yaml")
TINY = [
    "tokenizer.vocab_size=1000",
    "shards.seq_len=64",
    "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "train.global_batch_size=8", "train.max_duration=5ba", "train.save_interval=5ba",
    "++eval.heldout.max_documents=3",
    "++executor.num_workers=2",
]
DATA = ["docs_source", "docs_extract", "docs_language", "docs_filter", "docs_pii", "docs_dedup"]
STAGES = [*DATA, "tokenizer", "shards", "train", "evaluate", "export"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    env = {**os.environ, "RECIPE_STORE": str(store), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "recipe_engine.cli", "run", RECIPE, "--json",
                           *TINY], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    manifests = {s["name"]: json.loads((Path(s["artifact"]) / "manifest.json").read_text())
                 for s in summary["stages"]}
    return summary, manifests


@pytest.mark.slow
def test_every_stage_commits(run):
    summary, manifests = run
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert set(statuses(summary).values()) == {"ran"}
    for s in summary["stages"]:
        assert manifests[s["name"]]["fingerprint"] == s["fingerprint"]
    metrics = {s["name"]: s["metrics"] for s in summary["stages"]}
    assert metrics["evaluate"]["bits_per_byte"] > 0 and metrics["evaluate"]["zstd_bits_per_byte"] > 0
    export = Path(summary["stages"][-1]["artifact"])
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_funnel_is_sane(run):
    _, manifests = run
    docs = [manifests[name]["meta"]["num_documents"] for name in DATA]
    assert docs[0] > docs[-1] > 0  # documents in > documents out > 0
    assert all(a >= b for a, b in zip(docs, docs[1:]))  # no stage adds documents
    source = manifests["docs_source"]
    assert source["counts"]["records_in"] >= docs[0]
    assert sum(source["meta"]["formats"].values()) == docs[0]
    extract = manifests["docs_extract"]  # markup removed: fewer bytes out than in
    assert 0 < extract["metrics"]["bytes_kept_fraction"] < 1
    assert list(manifests["docs_language"]["meta"]["languages"]) == ["en"]
    assert manifests["docs_filter"]["counts"]["documents_out"] < \
        manifests["docs_filter"]["counts"]["documents_in"]
    pii = manifests["docs_pii"]["counts"]
    assert {"pii.email", "pii.ip_address", "pii.phone"} <= set(pii)
    assert "lsh" in manifests["docs_dedup"]["meta"]
