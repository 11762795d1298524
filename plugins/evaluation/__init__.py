"""Built-in evaluation stages (output kind ``eval_report``).

* ``heldout_eval``: loss and bits per byte of the trained model on the held-out documents the
  ``mds_shards`` stage set aside, beside zstd's bits per byte on the same documents.
* ``lm_eval``: lm-evaluation-harness tasks (the shipped ones under ``tasks/`` and lm-eval's
  own), run by lm-eval's own ``HFLM`` on the checkpoint's Hugging Face form (the model
  component's ``to_hf``, the tokenizer's ``hf_tokenizer``: what ``hf_export`` saves), so it
  scores what ``lm_eval --model hf`` scores on the export. ``lm_eval_runner.make_lm`` does
  the same for a module in memory.

``heldout_eval`` scores our own module (``heldout.py``): its strided sliding windows are not
lm-eval's (disjoint windows), and it works for every architecture, not only those a
transformers class holds.

torch and lm_eval are imported inside ``run``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe_engine import Problems, Stage, StageContext, StageError, hookimpl, warn

TASKS_DIR = Path(__file__).parent / "tasks"


def tasks_fingerprint() -> str:
    """A digest of lm-eval's version and the shipped task files (what task scores depend on
    besides the task spec)."""
    import hashlib
    import importlib.metadata

    digest = hashlib.sha256(importlib.metadata.version("lm_eval").encode())
    for path in sorted(TASKS_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".jsonl", ".json", ".py"):
            digest.update(str(path.relative_to(TASKS_DIR)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(kw_only=True)
class HeldoutEval(Stage,
                  name="heldout_eval",
                  version="1",
                  description="held-out loss and bits per byte, with zstd's bits per byte",
                  inputs={
        "checkpoint": "checkpoint", "shards": "shards", "tokenizer": "tokenizer"},
                  output="eval_report"):
    """Validation loss and bits per byte on held-out documents, next to zstd -19's."""

    stride: int = 0  # sliding-window stride for long documents; 0: max_seq_len // 2
    batch_size: int = 16  # windows per forward pass
    max_documents: int = 0  # 0: all; else the first N documents by id
    zstd_level: int = 19

    def check(self, problems: Problems) -> None:
        problems.require(self.stride >= 0, "stride", f"{self.stride} must be >= 0 (0: half the context)")
        problems.require(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
        problems.require(self.max_documents >= 0, "max_documents",
                         f"{self.max_documents} must be >= 0 (0: all)")
        problems.require(1 <= self.zstd_level <= 22, "zstd_level",
                         f"{self.zstd_level} must be between 1 and 22")

    def run(self, ctx: StageContext) -> None:
        import zstandard

        from recipe_engine.artifacts import iter_documents

        from .heldout import score_documents
        from .runtime import check_vocab, load_checkpoint, load_tokenizer, pick_device

        val_dir = ctx.inputs["shards"].path / "val_documents"
        if not val_dir.is_dir():
            raise StageError(f"the shards artifact has no val_documents/ directory ({val_dir})")
        docs, seen = [], 0
        for doc in iter_documents(val_dir):
            seen += 1
            if isinstance(doc.get("text"), str) and isinstance(doc.get("id"), str):
                docs.append(doc)
            else:
                ctx.skip("no_text_or_id")
        ctx.check_skips(seen)
        docs.sort(key=lambda d: d["id"])
        if self.max_documents:
            docs = docs[:self.max_documents]
        if not docs:
            raise StageError(f"no held-out documents in {val_dir}")

        tokenizer = load_tokenizer(ctx.inputs["tokenizer"].path)
        shards_meta = ctx.inputs["shards"].meta
        for key in ("bos_id", "eos_id"):
            if key in shards_meta and shards_meta[key] != getattr(tokenizer, key):
                raise StageError(
                    f"the shards were made with {key}={shards_meta[key]} but the tokenizer "
                    f"has {key}={getattr(tokenizer, key)}: inputs from different tokenizers")
        model, spec = load_checkpoint(ctx.inputs["checkpoint"].path, ctx.build)
        check_vocab(spec, tokenizer, "heldout_eval")
        window = spec["max_seq_len"]
        stride = self.stride or max(1, window // 2)
        if stride > window:
            warn(f"{ctx.stage}: stride={stride} is longer than the model's context of {window} "
                 f"tokens; using stride={window}")
            stride = window
        device = pick_device()
        model.to(device)

        texts = [d["text"] for d in docs]
        encoded = (tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch")
                   else [tokenizer.encode(t) for t in texts])
        ids = [[tokenizer.bos_id, *e, tokenizer.eos_id] for e in encoded]
        ctx.log(f"scoring {len(docs)} documents, {sum(len(x) - 1 for x in ids)} tokens, "
                f"window {window}, stride {stride}, on {device}")
        nll = score_documents(model, ids, window, stride, self.batch_size, device,
                              progress=lambda done, total: ctx.progress(done, total, "tok"))

        compressor = zstandard.ZstdCompressor(level=self.zstd_level)
        rows = []
        for doc, doc_ids, doc_nll in zip(docs, ids, nll):
            data = doc["text"].encode("utf-8")
            rows.append({
                "id": doc["id"], "bytes": len(data), "tokens": len(doc_ids) - 1,
                "model_bits": doc_nll / math.log(2),
                "zstd_bits": 8 * len(compressor.compress(data)),
            })
        num_bytes = sum(r["bytes"] for r in rows)
        num_tokens = sum(r["tokens"] for r in rows)
        total_nll = sum(nll)
        if num_bytes == 0:
            raise StageError(f"the held-out documents in {val_dir} are all empty")
        metrics = {
            "bits_per_byte": total_nll / math.log(2) / num_bytes,
            "zstd_bits_per_byte": sum(r["zstd_bits"] for r in rows) / num_bytes,
            "loss": total_nll / num_tokens,
            "num_documents": len(rows),
            "num_bytes": num_bytes,
            "num_tokens": num_tokens,
            "bytes_per_token": num_bytes / num_tokens,
        }
        ctx.metrics.update(metrics)
        ctx.meta.update(metrics)
        report = {
            "metrics": metrics,
            "settings": {"window": window, "stride": stride, "zstd_level": self.zstd_level,
                         "scored": "every token after bos, eos included; one zstd frame per "
                                   "document"},
            "documents": rows,
        }
        (ctx.output / "report.json").write_text(json.dumps(report, indent=1))
        ctx.count("documents", len(rows))
        ctx.log(f"bits/byte {metrics['bits_per_byte']:.4f} (zstd -{self.zstd_level}: "
                f"{metrics['zstd_bits_per_byte']:.4f}), loss {metrics['loss']:.4f}")


@dataclass(kw_only=True)
class LmEvalTaskSpec:
    """The lm-eval task spec shared by the ``lm_eval`` stage and the ``lm_eval_tasks``
    evaluator (in-loop evaluation): the same parameters, defaults and checks."""

    tasks: list[str] = field(default_factory=lambda: ["python_basics"])
    num_fewshot: int = 0
    limit: int = 0  # 0: every item; else the first N items of each task
    batch_size: int = 16
    seed: int = 1234
    bootstrap_iters: int = 1000  # for the stderr of metrics that are not plain means

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.tasks), "tasks", "is empty; name at least one lm-eval task")
        for key in ("num_fewshot", "limit", "bootstrap_iters"):
            problems.require(getattr(self, key) >= 0, key, f"{getattr(self, key)} must be >= 0")
        problems.require(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")


@dataclass(kw_only=True)
class LmEval(LmEvalTaskSpec, Stage,
             name="lm_eval",
             version="2",
             description="lm-evaluation-harness tasks (shipped: python_basics)",
             inputs={"checkpoint": "checkpoint", "tokenizer": "tokenizer"},
             output="eval_report"):
    """lm-evaluation-harness tasks on the trained model, offline (parameters and checks:
    ``LmEvalTaskSpec``)."""

    def fingerprint_extra(self) -> str:
        """The shipped task files and lm-eval's version: editing a task reruns the stage."""
        return tasks_fingerprint()

    def run(self, ctx: StageContext) -> None:
        from .lm_eval_runner import run_lm_eval

        results = run_lm_eval(self, ctx)
        (ctx.output / "results.json").write_text(json.dumps(results, indent=1, default=str))


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"results": {task: {"acc,none": x}}}`` -> ``{"task/acc": x}``; a filter other
    than ``none`` becomes a suffix (``task/exact_match/strict-match``)."""
    flat: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
            flat[name] = float(value)
    for task, counts in results.get("n-samples", {}).items():
        flat[f"{task}/num_samples"] = counts.get("effective", counts.get("original", 0))
    return flat


@hookimpl
def recipe_components():
    from .code_exec import CodeExecEval  # stdlib only: sandbox, problems, pass@k
    from .inloop import LmEvalTasks  # light: lm_eval is imported inside evaluate

    return [HeldoutEval, LmEval, CodeExecEval, LmEvalTasks]
