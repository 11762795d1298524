"""Benchmark: tokenize-and-shard throughput of ``mds_shards`` beside raw SentencePiece encoding.

The corpus is micro_code's: the standard library's ``**/*.py`` without its test directories.
One tokenizer (``sentencepiece_bpe``, micro_code's settings: BPE, 8192 pieces) serves both
sides. Measured, each in a fresh process pinned with ``taskset`` to as many cores as it may
use, interleaved, ``--repeats`` times (median reported):

* ``stage, N workers``: ``mds_shards`` (seq_len 256, val_fraction 0.05) run through
  ``recipe_engine.testing.run_stage`` with ``LocalExecutor(num_workers=N)``: reading the
  documents, tokenizing, packing, writing zstd MDS shards with sha1/xxh64 digests, the
  validation documents, the data digest. Imports (``streaming`` pulls in torch and
  transformers) happen before the clock starts, and so does the start of the pool's workers
  (spawn, imports, tokenizer load), timed on its own and reported beside: a fixed cost per
  stage run, like the raw processes' start, which is not timed either.
* ``raw, N threads``: ``SentencePieceProcessor.encode(texts, num_threads=N)`` on the same
  texts, already in memory.
* ``raw, N processes``: N forked processes, each encoding its share with one thread.

Throughput is reported per wall-clock second and per CPU second (user + system of the
process and its children): the machine may be shared, and CPU seconds are what a busy
neighbour disturbs least. The ratio the issue targets is stage / raw per worker (1 worker
vs 1 thread; 2 workers vs 2 processes).

    .venv/bin/python bench/tokenize_shards.py [--repeats 3] [--tokenizer DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
NUM_PARTS = 8
SEQ_LEN = 256


def stdlib_documents() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if EXCLUDE_DIRS & set(rel.parts[:-1]):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append({"id": str(rel), "text": text, "source": "python-stdlib", "path": str(p)})
    return docs


def prepare(work: Path, tokenizer_dir: str | None) -> dict:
    """Documents artifact (NUM_PARTS parts of about equal bytes) and the tokenizer."""
    sys.path.insert(0, str(ROOT))
    from recipe_engine.artifacts import part_name, write_documents

    docs = stdlib_documents()
    total = sum(len(d["text"].encode()) for d in docs)
    parts: list[list[dict]] = [[] for _ in range(NUM_PARTS)]
    done = 0
    for d in docs:  # in order, cut at equal byte counts
        parts[min(NUM_PARTS - 1, done * NUM_PARTS // total)].append(d)
        done += len(d["text"].encode())
    (work / "docs").mkdir()
    for k, part in enumerate(parts):
        write_documents(work / "docs" / part_name(k), part)
    if tokenizer_dir is None:
        from recipe_engine import Artifact
        from recipe_engine.testing import run_stage
        from recipe_engine_plugins.tokenizers.train import SentencePieceBPE

        art = Artifact(kind="documents", path=work / "docs", manifest={"meta": {}})
        tok = run_stage(SentencePieceBPE(vocab_size=8192, model_type="bpe",
                                         max_training_bytes=20_000_000),
                        work / "tok", inputs={"documents": art})
        tokenizer_dir = str(tok.path)
    nonempty = [d["text"] for d in docs if d["text"]]
    return {"docs": str(work / "docs"), "tokenizer": tokenizer_dir,
            "num_documents": len(nonempty),
            "bytes": sum(len(t.encode()) for t in nonempty)}


# -- one measurement, in its own process ----------------------------------------------------


def _cpu() -> float:
    """CPU seconds of this process and its children, live ones (pool workers) included."""
    import psutil

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            live += t.user + t.system
        except psutil.Error:  # exited in between: counted in RUSAGE_CHILDREN soon enough
            pass
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + live


def _texts(docs_dir: str) -> list[str]:
    from recipe_engine.artifacts import iter_documents

    return [d["text"] for d in iter_documents(docs_dir) if d["text"]]


def measure_stage(setup: dict, workers: int, out: str) -> dict:
    import streaming  # noqa: F401  (imported before the clock: torch, transformers)

    from recipe_engine import Artifact
    from recipe_engine.artifacts import load_tokenizer
    from recipe_engine.testing import run_stage
    from recipe_engine_plugins.executors import LocalExecutor
    from recipe_engine_plugins.tokenizers.shards import MDSShards

    tok_dir = Path(setup["tokenizer"])
    inputs = {"documents": Artifact(kind="documents", path=Path(setup["docs"]),
                                    manifest={"meta": {}}),
              "tokenizer": Artifact(kind="tokenizer", path=tok_dir, manifest={
                  "meta": json.loads((tok_dir / "manifest.json").read_text())["meta"]
                  if (tok_dir / "manifest.json").exists() else {}})}
    from recipe_engine_plugins.tokenizers import shards

    from recipe_engine.plugins import PluginManager

    pm = PluginManager()  # a recipe run has its plugin manager before any stage runs
    shards._tokenizer(str(tok_dir))  # loaded before the clock, as the raw runs' model
    executor = LocalExecutor(num_workers=workers)
    start_wall, start_cpu = time.perf_counter(), _cpu()
    if workers > 1:  # start the pool and its imports before the clock; timed on their own
        list(executor.map(_warm_worker, [str(tok_dir)] * workers))
    pool_wall, pool_cpu = time.perf_counter() - start_wall, _cpu() - start_cpu
    cpu, t0 = _cpu(), time.perf_counter()
    art = run_stage(MDSShards(seq_len=SEQ_LEN, val_fraction=0.05), Path(out), inputs=inputs,
                    executor=executor, pm=pm)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu
    executor.close()
    tokens = sum(json.loads(p.read_text())["tokens"]
                 for p in (Path(out) / "work" / "tokens").glob("part-*.json"))
    docs = art.meta["num_train_documents"] + art.meta["num_val_documents"]
    return {"wall": wall, "cpu": cpu, "tokens": tokens - 2 * docs, "documents": docs,
            "pool_start_wall": pool_wall, "pool_start_cpu": pool_cpu}


def _warm_worker(tokenizer_dir: str) -> int:
    """In a pool worker: what its first part would import and load."""
    import time

    import numpy  # noqa: F401

    from recipe_engine_plugins.tokenizers import shards

    shards._tokenizer(tokenizer_dir)
    time.sleep(0.5)  # keep this worker busy so that the other task starts the other one
    return 0


def measure_raw(setup: dict, threads: int, processes: int) -> dict:
    import sentencepiece as spm

    from recipe_engine.artifacts import load_tokenizer

    tok = load_tokenizer(setup["tokenizer"])
    model = tok.info.get("model_file", "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(Path(setup["tokenizer"]) / model))
    texts = _texts(setup["docs"])
    if processes <= 1:
        cpu, t0 = _cpu(), time.perf_counter()
        tokens = sum(len(ids) for ids in sp.encode(texts, num_threads=threads))
        return {"wall": time.perf_counter() - t0, "cpu": _cpu() - cpu, "tokens": tokens,
                "documents": len(texts)}
    import multiprocessing as mp

    total = sum(len(t) for t in texts)
    shares, acc, cur = [], 0, []  # contiguous shares of about equal characters
    for t in texts:
        cur.append(t)
        acc += len(t)
        if acc >= total * (len(shares) + 1) / processes and len(shares) < processes - 1:
            shares.append(cur)
            cur = []
    shares.append(cur)
    ctx = mp.get_context("fork")
    global _SP
    _SP = sp
    with ctx.Pool(processes) as pool:
        pool.map(_noop, range(processes))  # workers started before the clock
        cpu, t0 = _cpu(), time.perf_counter()
        tokens = sum(pool.map(_encode_share, shares, chunksize=1))
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu
    return {"wall": wall, "cpu": cpu, "tokens": tokens, "documents": len(texts)}


_SP = None


def _noop(_: int) -> None:
    return None


def _encode_share(texts: list[str]) -> int:
    return sum(len(ids) for ids in _SP.encode(texts, num_threads=1))  # type: ignore[union-attr]


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    setup = json.loads(Path(args.setup).read_text())
    kind, n = args.child.split(":")
    if kind == "stage":
        out = tempfile.mkdtemp(prefix="bench-shards-", dir=args.work)
        try:
            result = measure_stage(setup, int(n), out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    elif kind == "threads":
        result = measure_raw(setup, int(n), 1)
    else:
        result = measure_raw(setup, 1, int(n))
    print(json.dumps(result))


# -- driver ---------------------------------------------------------------------------------

CONFIGS = [  # (name, child spec, cores)
    ("stage, 1 worker", "stage:1", 1),
    ("raw encode, 1 thread", "threads:1", 1),
    ("stage, 2 workers", "stage:2", 2),
    ("raw encode, 2 threads", "threads:2", 2),
    ("raw encode, 2 processes", "procs:2", 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", help="a sentencepiece_bpe artifact directory to reuse")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-tokshards-") as work:
        t0 = time.time()
        setup = prepare(Path(work), args.tokenizer)
        print(f"prepared in {time.time() - t0:.0f} s: {setup['num_documents']} documents, "
              f"{setup['bytes'] / 1e6:.2f} MB", file=sys.stderr)
        setup_file = Path(work) / "setup.json"
        setup_file.write_text(json.dumps(setup))
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
        for rep in range(args.repeats):
            for name, spec, ncores in CONFIGS:  # interleaved: one of each per repetition
                pin = ",".join(str(c) for c in cores[:ncores])
                load = os.getloadavg()[0]
                cmd = ["taskset", "-c", pin, sys.executable, __file__, "--child", spec,
                       "--setup", str(setup_file), "--work", work]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["load_before"] = load
                runs[name].append(r)
                print(f"rep {rep + 1} {name}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s cpu, "
                      f"load {load:.2f}", file=sys.stderr)

    mb = setup["bytes"] / 1e6
    rows = {}
    for name, results in runs.items():
        wall = statistics.median(r["wall"] for r in results)
        cpu = statistics.median(r["cpu"] for r in results)
        tokens = results[0]["tokens"]
        rows[name] = {"wall_s": wall, "cpu_s": cpu, "mb_per_s": mb / wall,
                      "tokens_per_s": tokens / wall, "mb_per_cpu_s": mb / cpu,
                      "tokens": tokens, "walls": [r["wall"] for r in results]}
    ratios = {
        "1 worker / 1 thread (wall)":
            rows["stage, 1 worker"]["mb_per_s"] / rows["raw encode, 1 thread"]["mb_per_s"],
        "2 workers / 2 processes (wall)":
            rows["stage, 2 workers"]["mb_per_s"] / rows["raw encode, 2 processes"]["mb_per_s"],
        "2 workers / 2 threads (wall)":
            rows["stage, 2 workers"]["mb_per_s"] / rows["raw encode, 2 threads"]["mb_per_s"],
        "1 worker / 1 thread (cpu)":
            rows["stage, 1 worker"]["mb_per_cpu_s"] / rows["raw encode, 1 thread"]["mb_per_cpu_s"],
        "2 workers / 2 processes (cpu)":
            rows["stage, 2 workers"]["mb_per_cpu_s"]
            / rows["raw encode, 2 processes"]["mb_per_cpu_s"],
    }
    loads = [r["load_before"] for results in runs.values() for r in results]
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "bench/tokenize_shards.py " + " ".join(sys.argv[1:]),
        "machine": {"nproc": os.cpu_count(), "usable_cores": len(cores), "cpu": cpu_model,
                    "python": platform.python_version(),
                    "sentencepiece": version("sentencepiece"),
                    "mosaicml-streaming": version("mosaicml-streaming"),
                    "numpy": version("numpy")},
        "corpus": {"documents": setup["num_documents"], "mb": round(mb, 3),
                   "tokens": rows["raw encode, 1 thread"]["tokens"]},
        "repeats": args.repeats,
        "load_average_1min": {"min": min(loads), "median": statistics.median(loads),
                              "max": max(loads)},
        "rows": rows, "ratios": ratios,
    }
    print(f"| run | wall s (median of {args.repeats}) | MB/s | tokens/s | MB per CPU s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['mb_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['mb_per_cpu_s']:.2f} |")
    pool = runs["stage, 2 workers"]
    pool_wall = statistics.median(r["pool_start_wall"] for r in pool)
    pool_cpu = statistics.median(r["pool_start_cpu"] for r in pool)
    result["pool_start"] = {"wall_s": pool_wall, "cpu_s": pool_cpu}
    print(f"\nstarting the 2 workers (spawn, imports, tokenizer): {pool_wall:.2f} s wall, "
          f"{pool_cpu:.2f} CPU s (median), once per stage run, not in the figures above")
    with_start = mb / (rows["stage, 2 workers"]["wall_s"] + pool_wall)
    print(f"stage, 2 workers with the start: {with_start:.2f} MB/s")
    result["stage_2_workers_mb_per_s_with_pool_start"] = with_start
    print()
    for name, v in ratios.items():
        print(f"- stage / raw, {name}: {100 * v:.0f}%")
    print()
    print(json.dumps({k: result[k] for k in ("date", "command", "machine", "corpus",
                                             "load_average_1min")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
