"""Bounded memory: a 1 GB JSONL line, zstd and gzip bombs, and two million small documents.

Each stage runs in a fresh Python process (``recipe_engine.testing.run_stage``, ``serial``
executor, so all its work is in that one process) that resets its peak resident set size to
its present size just before the stage (``/proc/self/clear_refs``) and reads the peak
(``VmHWM``) after it; the bound is on the difference, the memory the stage itself took.
(``ru_maxrss`` would not do: it keeps the peak of the forked pytest process.) The bounds,
and the figures measured when they were set (2 shared CPU cores, Python 3.11), are stated
beside each test and in docs/components.md and docs/reliability.md.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from recipe_engine.artifacts import iter_documents, list_parts

MB = 1 << 20

CHILD = """\
import importlib, json, sys, threading, time
from pathlib import Path


def status(key):  # kB, from the kernel's account of this process's memory
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


spec = json.loads(sys.argv[1])
for module in spec["preload"]:  # the stage's own libraries count in the baseline
    importlib.import_module(module)
from recipe_engine import Artifact
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage

pm = PluginManager()
stage = pm.registry.build("stage", {"name": spec["stage"], **spec["params"]})
inputs = {slot: Artifact(kind="documents", path=Path(p),
                         manifest=json.loads((Path(p) / "manifest.json").read_text()))
          for slot, p in spec["inputs"].items()}
executor = pm.registry.build("executor", {"name": "serial"})
try:  # reset the peak to the present size (Linux 4.0 and later)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before, anon_before = status("VmRSS"), status("RssAnon")
anon_peak, running = [anon_before], [True]


def sample():  # the peak of anonymous memory (what the OOM killer counts), every 5 ms
    while running[0]:
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.005)


sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
art = run_stage(stage, Path(spec["root"]), inputs, executor=executor, pm=pm,
                max_skip_fraction=spec["max_skip_fraction"])
running[0] = False
sampler.join()
after = status("VmHWM")
print(json.dumps({"stage_mb": (after - before) / 1024, "peak_mb": after / 1024,
                  "anon_mb": (max(anon_peak[0], status("RssAnon")) - anon_before) / 1024,
                  "counts": art.manifest["counts"], "meta": art.manifest["meta"],
                  "path": str(art.path)}))
"""


def run_measured(tmp_path: Path, name: str, stage: str, params: dict,
                 inputs: dict | None = None, preload: tuple[str, ...] = (),
                 max_skip_fraction: float = 0.05) -> dict:
    """Run ``stage`` in a fresh process; its counts, meta, artifact path, ``stage_mb`` (the
    growth of the process's peak RSS while the stage ran, MB) and ``anon_mb`` (the same for
    anonymous memory alone, sampled: RSS also counts the pages of files a stage reads
    through a memory map, page cache that the kernel reclaims under pressure)."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    spec = {"stage": stage, "params": params, "root": str(tmp_path / name),
            "inputs": {k: str(v["path"]) for k, v in (inputs or {}).items()},
            "preload": list(preload), "max_skip_fraction": max_skip_fraction}
    done = subprocess.run([sys.executable, str(child), json.dumps(spec)], capture_output=True,
                          text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def report(name: str, result: dict) -> None:
    print(f"{name}: the stage took {result['stage_mb']:.0f} MB of RSS, "
          f"{result['anon_mb']:.0f} MB of it anonymous (peak RSS {result['peak_mb']:.0f} MB)")


def texts(result: dict) -> list[str]:
    return [d["text"] for d in iter_documents(Path(result["path"]))]


# -- a 1 GB line, and decompression bombs --------------------------------------------------------

LINE_BOUND_MB = 150  # measured: 17 MB (a line is held up to max_line_bytes, then skipped)


@pytest.mark.slow  # writes and reads 1 GB: about 20 s
def test_a_1gb_jsonl_line_is_dropped_in_bounded_memory(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    with open(root / "big.jsonl", "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        block = b"y" * (16 * MB)
        for _ in range(64):  # one line of 1 GiB
            f.write(block)
        f.write(b'"}\n{"text": "after"}\n')
    assert (root / "big.jsonl").stat().st_size > 1 << 30
    result = run_measured(tmp_path, "run", "files_source",
                          {"root": str(root), "include": ["*.jsonl"]}, max_skip_fraction=0.5)
    report("1 GB line", result)
    assert texts(result) == ["before", "after"]
    assert result["counts"]["dropped.too_large"] == 1
    assert result["stage_mb"] < LINE_BOUND_MB, result


BOMB_BOUND_MB = 150  # measured: 77 MB (zstd: 1 KB in inflates to tens of MB), 19 MB (gzip)


def zero_bomb(path: Path, suffix: str, size: int) -> None:
    """``size`` zero bytes (one line without an end), compressed as ``suffix`` says: one
    64 MiB frame (zstd) or member (gzip) of zeros, written again and again, which readers
    take as one stream."""
    block = bytes(64 * MB)
    frame = zstandard.ZstdCompressor(level=19).compress(block) if suffix == ".zst" \
        else gzip.compress(block, compresslevel=9)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(frame)


@pytest.mark.slow  # decompresses 512 MB per bomb: about 10 s
@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_a_decompression_bomb_is_capped_in_bounded_memory(tmp_path, suffix):
    root = tmp_path / "corpus"
    root.mkdir()
    bomb = root / f"bomb.jsonl{suffix}"
    zero_bomb(bomb, suffix, 2 << 30)  # 2 GiB of zeros
    assert bomb.stat().st_size < (3 * MB if suffix == ".gz" else 200_000)
    (root / "fine.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n"
                                             for i in range(3)))
    result = run_measured(tmp_path, "run", "files_source",
                          {"root": str(root), "include": ["*.jsonl*"],
                           "max_decompressed_bytes": 512 * MB}, max_skip_fraction=0.5)
    report(f"{suffix} bomb", result)
    assert result["counts"]["skipped.decompressed_too_large"] == 1
    assert texts(result) == ["doc 0", "doc 1", "doc 2"]
    assert result["stage_mb"] < BOMB_BOUND_MB, result


# -- exact_dedup, sharded: the same answer as one pass in document order --------------------------


def reference_dedup(parts: list[list]) -> tuple[list[str], list[list[str]]]:
    """Texts kept, and the duplicate examples, as a single in-memory pass would give them."""
    from recipe_engine_plugins.data.dedup import MAX_EXAMPLES, normalize

    first: dict[str, str] = {}
    kept, clusters = [], {}
    for i, texts_ in enumerate(parts):
        for j, t in enumerate(texts_):
            if not isinstance(t, str):
                continue
            k = normalize(t, "whitespace")
            if k in first:
                if k in clusters:
                    if len(clusters[k]) < MAX_EXAMPLES:
                        clusters[k].append(f"d{i}-{j}")
                elif len(clusters) < MAX_EXAMPLES:
                    clusters[k] = [first[k], f"d{i}-{j}"]
            else:
                first[k] = f"d{i}-{j}"
                kept.append(t)
    return kept, list(clusters.values())


@pytest.mark.parametrize("per_shard", [1_000_000, 7, 1])
def test_sharded_exact_dedup_matches_one_pass_in_document_order(tmp_path, monkeypatch,
                                                                per_shard):
    import random

    from recipe_engine import Artifact
    from recipe_engine.artifacts import write_documents
    from recipe_engine.testing import run_stage
    from recipe_engine_plugins.data import dedup

    monkeypatch.setattr(dedup, "DIGESTS_PER_SHARD", per_shard)
    rng = random.Random(per_shard)
    pool = [f"doc {k}\n" + "x" * rng.randint(0, 3) for k in range(40)]
    parts = [[rng.choice(pool) + rng.choice(["", "  ", "\r\n"])
              for _ in range(rng.randint(0, 30))] for _ in range(6)]
    parts[2] = []  # an empty part
    parts[3].insert(1, None)  # a document without text
    inp = tmp_path / "in"
    inp.mkdir()
    for i, texts_ in enumerate(parts):
        write_documents(inp / f"part-{i:05d}.jsonl.zst", [
            {"id": f"d{i}-{j}", "source": "t", "path": None, **({"text": t} if t else {})}
            for j, t in enumerate(texts_)])
    art = run_stage(dedup.ExactDedup(), tmp_path / "run", max_skip_fraction=0.5,
                    inputs={"documents": Artifact(kind="documents", path=inp, manifest={})})
    kept, examples = reference_dedup(parts)
    assert [d["text"] for d in iter_documents(art.path)] == kept
    assert art.manifest["meta"]["duplicate_examples"] == examples
    assert art.manifest["counts"]["skipped.missing_text"] == 1
    assert art.manifest["metrics"]["shards"] == min(dedup.MAX_SHARDS,
                                                    -(-sum(map(len, parts)) // per_shard))


# -- two million small documents ------------------------------------------------------------------

NUM_DOCS = 2_000_000
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta")
# growth of the peak of anonymous memory allowed per stage, MB; measured on 2,000,000
# documents in brackets. One Python object per document would be about 100 bytes each: 200 MB.
# (minhash_dedup reads signatures through memory maps: its RSS also holds up to 500 MB of
# page cache, which the kernel reclaims under pressure.)
BOUNDS_MB = {
    "files_source": 60,  # [26]: one part of 20,000 documents at a time
    "exact_dedup": 150,  # [76]: one shard of 1,000,000 digests (24 bytes each, and the sort)
    "minhash_dedup": 160,  # [81; RSS 488 with the mapped signatures]: one band of every doc
    "line_dedup": 260,  # [131]: one shard of up to 4,000,000 (document, unit) pairs
    "sentencepiece_bpe": 180,  # [91]: a heap of budget / smallest document rows, the trainer
}


def small_corpus(path: Path, n: int) -> None:
    """``n`` JSONL documents of about 30 bytes; every fourth repeats the one three before."""
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            lines = []
            for i in range(start, min(n, start + 100_000)):
                j = i - 3 if i % 4 == 3 else i
                words = " ".join(WORDS[(j // 10 ** k) % 10] for k in range(4))
                lines.append(f'{{"text": "{words} {j:07d}"}}\n')
            f.write("".join(lines))


@pytest.mark.slow  # two million documents through five stages: 14 minutes on 2 cores
def test_millions_of_small_documents_in_bounded_memory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    small_corpus(corpus / "docs.jsonl", NUM_DOCS)
    seen = {}
    src = run_measured(tmp_path, "source", "files_source",
                       {"root": str(corpus), "include": ["*.jsonl"], "docs_per_part": 20_000})
    seen["files_source"] = src
    assert src["counts"]["documents_out"] == NUM_DOCS
    exact = run_measured(tmp_path, "exact", "exact_dedup", {}, {"documents": src},
                         preload=("numpy",))
    seen["exact_dedup"] = exact
    assert exact["counts"]["duplicates_removed"] == NUM_DOCS // 4
    assert exact["meta"]["num_documents"] == NUM_DOCS - NUM_DOCS // 4
    near = run_measured(tmp_path, "near", "minhash_dedup", {}, {"documents": exact},
                        preload=("numpy", "datasketch"))
    seen["minhash_dedup"] = near
    lines = run_measured(tmp_path, "lines", "line_dedup", {"min_chars": 10},
                         {"documents": near}, preload=("numpy",))
    seen["line_dedup"] = lines
    tok = run_measured(tmp_path, "tok", "sentencepiece_bpe",
                       {"vocab_size": 300, "max_training_bytes": 2_000_000, "num_threads": 1},
                       {"documents": lines}, preload=("numpy", "sentencepiece"))
    seen["sentencepiece_bpe"] = tok
    for stage, result in seen.items():
        report(stage, result)
    over = {s: round(r["anon_mb"]) for s, r in seen.items() if r["anon_mb"] >= BOUNDS_MB[s]}
    assert not over, f"peak memory growth (MB) over the bound: {over}; bounds {BOUNDS_MB}"
    assert len(list_parts(Path(exact["path"]))) == NUM_DOCS // 20_000
