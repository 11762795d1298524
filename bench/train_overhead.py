"""Benchmark: the training stage's tokens/s against a minimal PyTorch loop, same model.

Both sides train micro_code's model (conf/model/micro_3m.yaml: llama, dim 192, 4 layers,
vocabulary 8,000) on batches of 16 x 256 random tokens with AdamW (lr 3e-3, weight decay
0.1, no decay on norms and embeddings), gradient clipping at 1.0 and fp32 on the CPU:

* recipe: the ``composer_train`` stage, run in-process (``recipe_engine.testing.run_stage``)
  on MDS shards of random tokens; its reported ``tokens_per_second`` (data loading and
  steps, checkpointing excluded);
* plain: a ``for`` loop of forward, cross-entropy, backward, clip, step and zero_grad over
  tensors already in memory, timed the same way.

They alternate (plain, recipe, plain, recipe, ...) so a change in machine load hits both;
the ratio of medians is the figure. MFU is given against a measured fp32 matmul peak on
the same machine (the best of square matmuls of 512..2048, 2*n^3 FLOPs each), with the
architecture's own FLOPs per token (``flops_per_token``: 6N plus attention).

    .venv/bin/python bench/train_overhead.py [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH = 8000, 256, 16
MODEL = {"name": "llama", "dim": 192, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
         "multiple_of": 64, "tie_embeddings": True}


def matmul_peak_gflops() -> float:
    import torch

    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps = max(3, int(2e10 / (2 * n ** 3)))
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def make_shards(root: Path, n_train: int) -> object:
    import numpy as np
    from streaming import MDSWriter

    from recipe_engine import Artifact

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", BATCH)):
        with MDSWriter(out=str(root / split), columns={"tokens": "ndarray:uint16"}) as writer:
            for row in rng.integers(3, VOCAB, size=(n, SEQ), dtype=np.uint16):
                writer.write({"tokens": row})
    meta = {"seq_len": SEQ, "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2, "pad_id": 0,
            "num_train_samples": n_train, "num_train_tokens": n_train * SEQ,
            "num_val_samples": BATCH}
    return Artifact(kind="shards", path=root, manifest={"meta": meta})


def run_recipe(shards: object, steps: int) -> float:
    from recipe_engine import PluginManager, instantiate
    from recipe_engine.testing import run_stage
    from recipe_engine_plugins.training import ComposerTrain

    pm = PluginManager()
    stage = instantiate(ComposerTrain, {
        "model": MODEL, "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
        "global_batch_size": BATCH, "max_duration": f"{steps}ba", "device": "cpu",
        "precision": "fp32", "save_interval": f"{steps}ba", "eval_batches": 1,
        "log_interval": 1000}, pm.registry.build)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        art = run_stage(stage, Path(tmp), inputs={"shards": shards}, pm=pm)
        return float(art.manifest["metrics"]["tokens_per_second"])


def run_plain(steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from recipe_engine import PluginManager, instantiate
    from recipe_engine import ModelConfig

    torch.manual_seed(17)
    cfg = PluginManager().registry.build(ModelConfig, dict(MODEL))
    model = cfg.build(VOCAB, SEQ)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=3e-3)
    data = torch.randint(3, VOCAB, (steps, BATCH, SEQ))
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        x = data[i]
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * SEQ / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from recipe_engine import ModelConfig, PluginManager

    cfg = PluginManager().registry.build(ModelConfig, dict(MODEL))
    flops_per_token = cfg.flops_per_token(VOCAB, SEQ)
    peak = matmul_peak_gflops()
    plain, recipe = [], []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        shards = make_shards(Path(tmp), args.steps * BATCH)
        for _ in range(args.repeats):
            plain.append(run_plain(args.steps))
            recipe.append(run_recipe(shards, args.steps))
            print(f"plain {plain[-1]:,.0f} tok/s, recipe {recipe[-1]:,.0f} tok/s", flush=True)
    p, r = statistics.median(plain), statistics.median(recipe)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": f"bench/train_overhead.py --steps {args.steps} --repeats {args.repeats}",
        "load_before": os.getloadavg()[0],
        "plain_tokens_per_second": plain, "recipe_tokens_per_second": recipe,
        "ratio_of_medians": r / p,
        "flops_per_token": flops_per_token,
        "matmul_peak_gflops": peak,
        "mfu_recipe": r * flops_per_token / (peak * 1e9),
        "mfu_plain": p * flops_per_token / (peak * 1e9),
    }
    out = ROOT / "bench" / "results" / "train_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("\n| measure | plain loop | recipe stage |\n|---|---|---|")
    print(f"| tokens/s (median of {args.repeats}) | {p:,.0f} | {r:,.0f} |")
    print(f"| ratio | 1 | {r / p:.3f} |")
    print(f"| MFU vs measured fp32 matmul peak ({peak:,.0f} GFLOP/s) | {result['mfu_plain']:.1%} | "
          f"{result['mfu_recipe']:.1%} |")


if __name__ == "__main__":
    main()
