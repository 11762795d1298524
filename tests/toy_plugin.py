"""A tiny plugin used by the core tests: stages that are cheap and observable."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from recipe_engine import Component, Stage, StageContext, StageError, hookimpl
from recipe_engine.artifacts import iter_documents, part_name, write_documents


@dataclass(kw_only=True)
class ToyNumbers(Stage,
                 name="toy_numbers",
                 description="documents 0..count-1",
                 output="documents"):
    count: int
    prefix: str = "doc"

    def run(self, ctx: StageContext) -> None:
        docs = [{"id": f"{self.prefix}{i}", "text": f"{self.prefix} {i}", "source": "toy",
                 "path": None} for i in range(self.count)]
        write_documents(ctx.output / part_name(0), docs)
        ctx.meta["num_documents"] = len(docs)
        ctx.metrics["documents"] = len(docs)


@dataclass(kw_only=True)
class ToyMarker(Component, kind="toy_marker", name="bang"):
    times: int = 1


@dataclass(kw_only=True)
class ToyUpper(Stage, name="toy_upper", inputs={"documents": "documents"}, output="documents"):
    suffix: str = ""
    mode: Literal["upper", "lower"] = "upper"
    marker: ToyMarker | None = None
    fail: bool = False

    def run(self, ctx: StageContext) -> None:
        if self.fail:
            (ctx.output / "partial.txt").write_text("half")
            raise StageError("toy failure requested")
        bang = "!" * self.marker.times if self.marker else ""
        docs = []
        for d in iter_documents(ctx.inputs["documents"].path):
            t = d["text"].upper() if self.mode == "upper" else d["text"].lower()
            docs.append({**d, "text": t + self.suffix + bang})
        write_documents(ctx.output / part_name(0), docs)
        ctx.metrics["documents"] = len(docs)


@dataclass(kw_only=True)
class ToyReport(Stage, name="toy_report", inputs={"documents": "documents"}, output="eval_report"):
    lr: float = 0.1

    def run(self, ctx: StageContext) -> None:
        n = sum(len(d["text"]) for d in iter_documents(ctx.inputs["documents"].path))
        ctx.metrics["score"] = n * self.lr
        (ctx.output / "report.json").write_text(json.dumps(ctx.metrics))


@dataclass(kw_only=True)
class ToyConcat(Stage, name="toy_concat", inputs={"streams": ["documents"]}, output="documents"):
    """A list slot: the documents of every upstream stage, in the recipe's order."""

    def run(self, ctx: StageContext) -> None:
        docs = [{**d, "id": f"{i}:{d['id']}"} for i, art in enumerate(ctx.input_lists["streams"])
                for d in iter_documents(art.path)]
        write_documents(ctx.output / part_name(0), docs)
        ctx.meta["first"] = ctx.inputs["streams"].manifest.get("stage")
        ctx.metrics["documents"] = len(docs)

    def describe_plan(self, inputs_meta):
        return {"streams": len(inputs_meta["streams"]),
                "documents": sum(m.get("num_documents", 0) for m in inputs_meta["streams"])}


@dataclass(kw_only=True)
class ToyTokenCount(Stage, name="toy_token_count", inputs={"shards": ["shards"]},
                    output="eval_report"):
    """Reads every stream of a mixture through the public readers only."""

    def run(self, ctx: StageContext) -> None:
        from recipe_engine.artifacts import iter_token_sequences, read_shards_info

        for i, art in enumerate(ctx.input_lists["shards"]):
            info = read_shards_info(art.path)
            seqs = list(iter_token_sequences(art.path, "train"))
            ctx.metrics[f"stream{i}/sequences"] = len(seqs)
            ctx.metrics[f"stream{i}/tokens"] = sum(len(s) for s in seqs)
            ctx.metrics[f"stream{i}/train_samples"] = info["splits"]["train"]["num_samples"]
        (ctx.output / "report.json").write_text(json.dumps(ctx.metrics))


@dataclass(kw_only=True)
class ToyNeedsTokenizer(Stage,
                        name="toy_needs_tokenizer",
                        inputs={"tokenizer": "tokenizer"},
                        output="shards"):
    def run(self, ctx: StageContext) -> None:  # never runs: validation rejects it
        raise AssertionError


@hookimpl
def recipe_components():
    return [ToyNumbers, ToyMarker, ToyUpper, ToyReport, ToyNeedsTokenizer, ToyScratch,
            ToyConcat, ToyTokenCount]


@hookimpl
def recipe_config_dirs():
    from pathlib import Path

    return [str(Path(__file__).parent / "recipes" / "toy_groups")]


@dataclass(kw_only=True)
class ToyScratch(Stage,
                 name="toy_scratch",
                 description="copies documents after `seconds`; shows the scratch it found",
                 inputs={"documents": "documents"},
                 output="documents"):
    """Observes resume state: writes ``scratch_seen.json`` (the files its scratch held when
    it started), leaves ``attempt.txt`` in scratch, and fails after that while the
    environment variable ``TOY_SCRATCH_FAIL`` is set (outside the fingerprint)."""

    seconds: float = 0.0

    def run(self, ctx: StageContext) -> None:
        import os
        import time

        seen = sorted(p.name for p in ctx.work.iterdir())
        (ctx.work / "attempt.txt").write_text("an earlier attempt")
        time.sleep(self.seconds)
        if os.environ.get("TOY_SCRATCH_FAIL"):
            raise StageError("toy failure requested (TOY_SCRATCH_FAIL)")
        docs = list(iter_documents(ctx.inputs["documents"].path))
        write_documents(ctx.output / part_name(0), docs)
        (ctx.output / "scratch_seen.json").write_text(json.dumps(seen))
        ctx.metrics["documents"] = len(docs)
