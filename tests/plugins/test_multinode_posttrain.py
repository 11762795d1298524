"""``sft`` on two nodes of one process each, simulated on this machine the way
test_multinode_training.py simulates pretraining (its helpers: a free port, a TMPDIR per
node): two ``recipe run`` processes on one store, NNODES=2, NODE_RANK 0 and 1,
MASTER_ADDR=127.0.0.1, gloo on the CPU.

A first, single-node ``recipe run --until train`` makes the tokenizer (with the chat
tokens) and a tiny pretrained checkpoint, so that the two-node job finds them committed and
only the chat data and ``sft`` run: node 0 makes the conversations and commits them, node 1
waits for that commit, then launches its rank into node 0's ``sft`` run.

The fast tests check the declaration and what every node checks before it launches.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_engine import StageContext, StageError, check_declaration
from recipe_engine.testing import InlineExecutor
from recipe_engine_plugins.training.posttrain import DPO, SFT
from test_multinode_training import free_port, node_tmpdir, run_nodes
from test_posttrain import MODEL, base_ckpt, conversations, sft, tok, tok_art, tokenizer_stage  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """\
name: two_nodes_sft
executor: {name: serial}
stages:
  source:
    component: files_source
    params:
      root: ${stdlib:}
      include: [json/*.py, csv.py, textwrap.py, shlex.py]
      source_name: stdlib
  tokenizer:
    component: sentencepiece_bpe
    inputs: {documents: source}
    params: {vocab_size: 600, num_threads: 1, special_tokens: ["<|im_start|>", "<|im_end|>"]}
  shards:
    component: mds_shards
    inputs: {documents: source, tokenizer: tokenizer}
    params: {seq_len: 128, val_fraction: 0.1}
  train:
    component: composer_train
    inputs: {shards: shards}
    params:
      model: @MODEL@
      global_batch_size: 4
      max_duration: 1ba
      device: cpu
  chat:
    component: stdlib_instructions
    params: {modules: [textwrap, shlex]}
  sft:
    component: sft
    inputs: {checkpoint: train, tokenizer: tokenizer, documents: chat}
    params:
      optimizer: {name: adamw, lr: 0.01, weight_decay: 0.0}
      parallelism: {name: ddp, num_processes: 1, num_nodes: 2}
      global_batch_size: 4
      max_duration: 2ba
      save_interval: 1ba
      log_interval: 1
      device: cpu
""".replace("@MODEL@", json.dumps(MODEL))


def test_sft_and_dpo_run_on_every_node():
    for cls in (SFT, DPO):
        assert cls.distributed and check_declaration(cls) == []


def follower_ctx(tmp_path, inputs):
    """What the runner gives node 1 of 2 (``runner._join_stage``)."""
    from recipe_engine.plugins import PluginManager

    return StageContext(stage="sft", fingerprint="test", inputs=inputs, output=tmp_path / "out",
                        work=tmp_path / "work", executor=InlineExecutor(),
                        build=PluginManager().registry.build, num_nodes=2, node_rank=1)


def test_every_node_checks_before_it_launches(tmp_path, base_ckpt, tok_art, conversations):
    """Problems every rank would meet after the launch stop the stage on each node first,
    before any process starts."""
    inputs = {"checkpoint": base_ckpt, "tokenizer": tok_art, "documents": conversations}
    ddp = {"name": "ddp", "num_processes": 1}
    stage = sft(parallelism=ddp, global_batch_size=3)
    with pytest.raises(StageError, match=r"global_batch_size=3 is not divisible by the run's 2 "
                                         r"processes \(2 node\(s\) x 1\)"):
        stage.run_follower(follower_ctx(tmp_path, inputs))
    plain = tokenizer_stage(tmp_path / "plain", ["<|fim_prefix|>"])
    with pytest.raises(StageError, match=r"declares no <\|im_start\|>"):
        sft(parallelism=ddp).run_follower(follower_ctx(tmp_path, {**inputs, "tokenizer": plain}))
    with pytest.raises(StageError, match="longer than the checkpoint's context"):
        sft(parallelism=ddp, max_seq_len=10_000).run(follower_ctx(tmp_path, inputs))
    assert not (tmp_path / "work").exists()  # nothing was launched


def recipe_run(recipe: Path, env: dict, *args: str) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items()
            if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NNODES", "NODE_RANK")}
    return subprocess.Popen([sys.executable, "-m", "recipe_engine.cli", "run", str(recipe),
                             "--json", *args], cwd=ROOT, env={**base, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_on_two_nodes(tmp_path):
    recipe = tmp_path / "two_nodes_sft.yaml"
    recipe.write_text(RECIPE)
    store = tmp_path / "store"
    first = recipe_run(recipe, {"RECIPE_STORE": str(store)}, "--until", "train")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-6000:]

    port = str(free_port())
    procs, results = run_nodes(lambda rank: recipe_run(recipe, dict(
        NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        RECIPE_STORE=str(store), TMPDIR=str(node_tmpdir(tmp_path, rank, 2)))), timeout=300)
    s0, s1 = (json.loads(results[r][1]) for r in (0, 1))

    # node 0 made the conversations and ran sft; node 1 waited for them and joined sft
    upstream = {"source": "cached", "tokenizer": "cached", "shards": "cached", "train": "cached"}
    status = [{s["name"]: s["status"] for s in summary["stages"]} for summary in (s0, s1)]
    assert status[0] == {**upstream, "chat": "ran", "sft": "ran"}
    assert status[1] == {**upstream, "chat": "cached", "sft": "joined"}
    assert "--world_size 2 --node_rank 1 --master_addr 127.0.0.1" in results[1][2]

    # committed once, by node 0: one artifact per stage, no run summary from node 1
    assert len(list((store / "artifacts").iterdir())) == 6
    assert len(list((store / "runs").glob("*.json"))) == 2  # the --until run's and node 0's
    sft = next(s for s in s0["stages"] if s["name"] == "sft")
    manifest = json.loads((Path(sft["artifact"]) / "manifest.json").read_text())
    meta = manifest["meta"]
    assert meta["world_size"] == 2 and meta["num_nodes"] == 2
    assert [(n["node_rank"], n["ranks"], n["local_ranks"], n["launcher_pid"])
            for n in meta["launch"]] == [(0, [0], [0], procs[0].pid), (1, [1], [0], procs[1].pid)]
    assert meta["posttraining"] == "sft" and meta["steps"] == 2
    assert meta["chat_format"] == "chatml"
    # rank 0's record counts come back through the launcher, as an in-process run keeps them
    assert manifest["counts"]["records_in"] == 11

    # the checkpoint loads, and training moved it away from the pretrained one
    import torch
    from safetensors.torch import load_file

    from recipe_engine.artifacts import checkpoint_weights_path
    from recipe_engine_plugins.models import load_model

    model = load_model(Path(sft["artifact"]))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]]))
    assert logits.shape == (1, 4, meta["vocab_size"]) and torch.isfinite(logits).all()
    train = next(s for s in s0["stages"] if s["name"] == "train")
    before = load_file(str(checkpoint_weights_path(Path(train["artifact"]))))
    after = load_file(str(checkpoint_weights_path(Path(sft["artifact"]))))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
