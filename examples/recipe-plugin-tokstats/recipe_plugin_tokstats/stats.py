"""A stage that reads the core's artifacts through the public readers only."""
import json
from collections import Counter
from dataclasses import dataclass, field

from recipe_engine import Problems, Stage, StageContext
from recipe_engine.artifacts import iter_token_sequences, load_tokenizer


@dataclass(kw_only=True)
class TokenStats(Stage, name="token_stats", version="1",
                 inputs={"tokenizer": "tokenizer", "shards": "shards"}, output="eval_report"):
    """Count tokens per split of a shards artifact and the most frequent tokens."""

    top_k: int = 10
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def check(self, problems: Problems) -> None:
        problems.require(self.top_k >= 1, "top_k", f"must be at least 1, got {self.top_k}")
        for split in self.splits:
            problems.require(split in ("train", "val"), "splits",
                             f"{split!r} is not a split of a shards artifact (train, val)")

    def run(self, ctx: StageContext) -> None:
        tokenizer = load_tokenizer(ctx.inputs["tokenizer"].path)
        shards = ctx.inputs["shards"]
        special = {shards.meta.get(k) for k in ("bos_id", "eos_id", "pad_id")}
        counts: Counter[int] = Counter()
        per_split = {}
        for split in self.splits:
            sequences = tokens = 0
            for seq in iter_token_sequences(shards.path, split=split):
                ids = [int(t) for t in seq]
                counts.update(i for i in ids if i not in special)
                sequences += 1
                tokens += len(ids)
            per_split[split] = {"sequences": sequences, "tokens": tokens}
            ctx.metrics[f"{split}_tokens"] = tokens
            ctx.progress(len(per_split), len(self.splits), "splits")

        total = sum(counts.values())
        top = [{"id": i, "text": tokenizer.decode([i]), "count": n,
                "fraction": round(n / total, 6)} for i, n in counts.most_common(self.top_k)]
        vocab_size = int(shards.meta.get("vocab_size") or 0)
        report = {"splits": per_split, "distinct_tokens": len(counts),
                  "vocab_size": vocab_size, "top_tokens": top}
        (ctx.output / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        ctx.metrics["distinct_tokens"] = len(counts)
        if vocab_size:
            ctx.metrics["vocab_used_fraction"] = round(len(counts) / vocab_size, 4)
        if top:
            ctx.metrics["top_token_fraction"] = top[0]["fraction"]
        ctx.meta["num_tokens"] = sum(s["tokens"] for s in per_split.values())
        ctx.log(f"{len(counts)} distinct tokens; most frequent: "
                + ", ".join(repr(t["text"]) for t in top[:5]))
