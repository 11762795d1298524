"""Benchmark: `recipe run recipes/micro_code.yaml` from an empty store.

Measures wall time per stage and in total, and the model's held-out bits per byte beside
its peers on the very same held-out documents, each compressed on its own: zstd -19 (from
the evaluate stage) and xz -9e (computed here). Prints a markdown table for
docs/benchmarks.md and the raw JSON.

    .venv/bin/python bench/micro_code.py [extra overrides...]
"""
from __future__ import annotations

import json
import lzma
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
        cmd = [str(ROOT / ".venv" / "bin" / "recipe"), "run", str(ROOT / "recipes" / "micro_code.yaml"),
               "--json", *overrides]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        summary = json.loads(proc.stdout)
        stages = {s["name"]: s for s in summary["stages"]}
        shards = Path(stages["shards"]["artifact"])
        sys.path.insert(0, str(ROOT))
        from recipe_engine.artifacts import iter_documents

        raw = xz = 0
        for doc in iter_documents(shards / "val_documents"):
            b = doc["text"].encode("utf-8")
            raw += len(b)
            xz += len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))
    ev = stages["evaluate"]["metrics"]
    train = stages["train"]["metrics"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": " ".join(["recipe run recipes/micro_code.yaml", *overrides]),
        "wall_seconds": round(wall, 1),
        "stage_seconds": {n: s["seconds"] for n, s in stages.items()},
        "bits_per_byte": ev["bits_per_byte"],
        "zstd_bits_per_byte": ev["zstd_bits_per_byte"],
        "xz_bits_per_byte": 8 * xz / raw,
        "heldout_documents": ev["num_documents"],
        "heldout_bytes": ev["num_bytes"],
        "train_tokens_per_second": train.get("tokens_per_second"),
        "lm_eval": {k: v for k, v in stages["lm_eval"]["metrics"].items() if k.endswith("/acc")},
    }
    print(json.dumps(result, indent=2))
    print()
    print("| measure | value |\n|---|---|")
    print(f"| wall time, empty store | {wall / 60:.1f} min |")
    for name, s in stages.items():
        print(f"| stage {name} | {s['seconds']:.1f} s |")
    print(f"| model bits/byte (held-out, {ev['num_documents']} docs, {ev['num_bytes']:,} bytes) | {ev['bits_per_byte']:.3f} |")
    print(f"| zstd -19 per document, same docs | {ev['zstd_bits_per_byte']:.3f} |")
    print(f"| xz -9e per document, same docs | {8 * xz / raw:.3f} |")


if __name__ == "__main__":
    main()
