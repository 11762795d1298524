"""Benchmark: `recipe run recipes/micro_code_chat.yaml` from an empty store.

Measures wall time per stage and in total, and the post-training figures: SFT held-out
loss on assistant tokens before and after, DPO reward accuracy and margin on its held-out
pairs (and on the training pairs at the end), pass@k of the pretrained, SFT and DPO
checkpoints on sandboxed stdlib doctest problems, and held-out bits per byte of the
pretrained and the DPO model. Prints a markdown table for docs/benchmarks.md and the raw
JSON (also written to bench/results/micro_code_chat.json).

    .venv/bin/python bench/micro_code_chat.py [extra overrides...]
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store:
        env = {**os.environ, "RECIPE_STORE": store}
        cmd = [str(ROOT / ".venv" / "bin" / "recipe"), "run",
               str(ROOT / "recipes" / "micro_code_chat.yaml"), "--json", *overrides]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        summary = json.loads(proc.stdout)
    stages = {s["name"]: s for s in summary["stages"]}
    m = {n: s.get("metrics") or {} for n, s in stages.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_before": os.getloadavg()[0],
        "command": " ".join(["recipe run recipes/micro_code_chat.yaml", *overrides]),
        "wall_seconds": round(wall, 1),
        "stage_seconds": {n: s["seconds"] for n, s in stages.items()},
        "metrics": {n: m[n] for n in ("train", "evaluate", "sft", "dpo", "code_exec_base",
                                      "code_exec_sft", "code_exec_dpo", "evaluate_dpo",
                                      "export_dpo", "lm_eval") if n in m},
    }
    out = ROOT / "bench" / "results" / "micro_code_chat.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print("| measure | value |\n|---|---|")
    print(f"| wall time, empty store | {wall / 60:.1f} min |")
    for name, s in stages.items():
        print(f"| stage {name} | {s['seconds']:.1f} s |")
    for name in ("sft", "dpo"):
        for key, value in sorted(m.get(name, {}).items()):
            if isinstance(value, (int, float)):
                print(f"| {name} {key} | {value:.4g} |")
    for name in ("code_exec_base", "code_exec_sft", "code_exec_dpo"):
        row = m.get(name, {})
        keys = sorted(k for k in row if k.startswith("pass@") or k.startswith("outcome/"))
        print(f"| {name} | " + ", ".join(f"{k} {row[k]:.3g}" for k in keys) + " |")
    for name in ("evaluate", "evaluate_dpo"):
        if name in m:
            print(f"| {name} bits/byte | {m[name]['bits_per_byte']:.3f} |")


if __name__ == "__main__":
    main()
