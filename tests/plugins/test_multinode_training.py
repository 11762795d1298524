"""Two nodes of two processes each, simulated on this machine: two ``recipe run`` processes
on one store, NNODES=2, NODE_RANK 0 and 1, MASTER_ADDR=127.0.0.1 and a free port, a tiny
recipe (stdlib files -> BPE tokenizer -> MDS shards -> ``composer_train`` with gloo DDP, two
processes per node). Node 0 runs the data stages and commits; node 1 waits for them, then
launches its two ranks into the same training run.

One machine is not two: streaming names its shared memory by a prefix number, which each
node's ranks choose by looking at the machine's shared memory before any of them creates
one, so two "nodes" on one machine would pick the same prefix. Each simulated node gets its
own TMPDIR (as each real node has its own /tmp), in which placeholder lock files (named as
streaming names them) take the other node's prefixes: node 0 uses the even ones, node 1 the
odd ones. Nothing of streaming is patched.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RECIPE = """\
name: two_nodes
executor: {name: serial}
stages:
  source:
    component: files_source
    params:
      root: ${stdlib:}
      include: [json/*.py, csv.py, textwrap.py, shlex.py, email/mime/*.py]
      source_name: stdlib
  tokenizer:
    component: sentencepiece_bpe
    inputs: {documents: source}
    params: {vocab_size: 600, num_threads: 1}
  shards:
    component: mds_shards
    inputs: {documents: source, tokenizer: tokenizer}
    params: {seq_len: 32, val_fraction: 0.1}
  train:
    component: composer_train
    inputs: {shards: shards}
    params:
      model: {name: llama, dim: 32, n_layers: 1, n_heads: 2, multiple_of: 32}
      optimizer: {name: adamw, lr: 0.01}
      parallelism: {name: ddp, num_processes: 2}
      global_batch_size: 8
      max_duration: 4ba
      save_interval: 2ba
      log_interval: 1
      device: cpu
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_tmpdir(root: Path, rank: int, nnodes: int) -> Path:
    """This node's TMPDIR, holding placeholders for the other nodes' streaming prefixes."""
    from streaming.base.constant import BARRIER_FILELOCK
    from streaming.base.shared.prefix import _get_path

    d = root / f"tmp-node{rank}"
    d.mkdir()
    for prefix in range(64):
        if prefix % nnodes != rank:
            (d / _get_path(prefix, BARRIER_FILELOCK)).touch()
    return d


def run_nodes(run: Callable[[int], subprocess.Popen], timeout: int,
              nnodes: int = 2) -> tuple[dict[int, subprocess.Popen], dict[int, tuple[int, str, str]]]:
    """Start one ``recipe run`` per simulated node (``run(rank)``; the followers first: they
    wait for node 0's commits), wait for all, and assert each exited 0. Returns the
    processes and, per rank, ``(returncode, stdout, stderr)``."""
    procs = {rank: run(rank) for rank in reversed(range(nnodes))}
    results = {}
    for rank in range(nnodes):
        try:
            out, err = procs[rank].communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        results[rank] = (procs[rank].returncode, out, err)
    for rank, (rc, out, err) in results.items():
        assert rc == 0, f"node {rank}:\n{err[-6000:]}"
    return procs, results


def test_two_nodes_of_two_processes(tmp_path):
    recipe = tmp_path / "two_nodes.yaml"
    recipe.write_text(RECIPE)
    store = tmp_path / "store"
    port = str(free_port())

    def node(rank: int) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RECIPE_STORE=str(store), OMP_NUM_THREADS="1",
                   TMPDIR=str(node_tmpdir(tmp_path, rank, 2)))
        return subprocess.Popen(
            [sys.executable, "-m", "recipe_engine.cli", "run", str(recipe), "--json"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs, results = run_nodes(node, timeout=900)
    s0, s1 = (json.loads(results[r][1]) for r in (0, 1))
    err1 = results[1][2]

    # data stages ran on node 0 only; node 1 found them committed and joined training
    assert {s["name"]: s["status"] for s in s0["stages"]} == {
        "source": "ran", "tokenizer": "ran", "shards": "ran", "train": "ran"}
    assert {s["name"]: s["status"] for s in s1["stages"]} == {
        "source": "cached", "tokenizer": "cached", "shards": "cached", "train": "joined"}
    assert "node 1 of 2, ranks 2-3 of 4: launching 2 processes" in err1
    assert "--world_size 4 --node_rank 1 --master_addr 127.0.0.1" in err1

    # committed once: one artifact per stage, node 0's run summary only, nothing replaced
    train = next(s for s in s0["stages"] if s["name"] == "train")
    assert len(list((store / "artifacts").iterdir())) == 4
    assert len(list((store / "runs").glob("*.json"))) == 1
    assert not (store / "trash").exists() or not list((store / "trash").iterdir())
    manifest = json.loads((Path(train["artifact"]) / "manifest.json").read_text())
    meta = manifest["meta"]
    assert meta["world_size"] == 4 and meta["num_nodes"] == 2
    # each node launched its two local ranks, from its own `recipe run`
    assert [(n["node_rank"], n["ranks"], n["local_ranks"], n["launcher_pid"])
            for n in meta["launch"]] == [(0, [0, 1], [0, 1], procs[0].pid),
                                         (1, [2, 3], [0, 1], procs[1].pid)]
    assert meta["steps"] == 4 and meta["tokens_trained"] == 4 * 8 * 32

    # the checkpoint loads
    from recipe_engine_plugins.models import load_model

    import torch

    model = load_model(Path(train["artifact"]))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]]))
    assert logits.shape == (1, 4, meta["vocab_size"]) and torch.isfinite(logits).all()
