"""Data mixing: several ``shards`` artifacts (one per data stream) trained on with proportions.

``composer_train`` takes ``inputs: {shards: [code_shards, docs_shards]}`` and
``proportions: [0.8, 0.2]`` (relative weights, in the inputs' order; empty: each stream in
proportion to its size, every sample once per epoch). They map onto mosaicml-streaming's
``Stream(proportion=...)``: an epoch holds as many samples as all streams together, each
stream contributing its share of them, a small stream repeated (upsampled) and a large one
subsampled, with the same elastic determinism and mid-epoch resume as one stream.

All streams must come from the same tokenizer (checked by its fingerprint in each shards
manifest) and have the same ``seq_len``; validation sequences come from the first stream
(the one the held-out evaluation reads).

``plan_streams`` gives ``recipe plan`` each stream's share of the run's tokens and how many
times it is repeated (epochs); ``MANY_EPOCHS`` repeats and more are flagged: Muennighoff et
al. (2023, "Scaling Data-Constrained Language Models") found that up to about 4 epochs of
repeated data cost little, and returns fall quickly past that.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from recipe_engine import Artifact, Problems, StageError

MANY_EPOCHS = 4.0
SAME = ("seq_len", "vocab_size", "bos_id", "eos_id", "pad_id", "dtype")


def check_proportions(proportions: Sequence[float], problems: Problems) -> None:
    for i, p in enumerate(proportions):
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not p > 0 or math.isinf(p):
            problems.add("proportions", f"[{i}] = {p!r}: each proportion must be a positive "
                                        "number (relative weights, normalised to sum to 1)")


def weights(num_streams: int, proportions: Sequence[float]) -> list[float] | None:
    """The normalised proportion of each stream, or None (no proportions: by size)."""
    if not proportions:
        return None
    if len(proportions) != num_streams:
        raise StageError(
            f"proportions has {len(proportions)} values for {num_streams} shards input(s); "
            f"give one per stream, in the order of inputs.shards")
    total = float(sum(proportions))
    return [p / total for p in proportions]


def tokenizer_fingerprint(art: Artifact) -> str | None:
    tok = (art.manifest.get("inputs") or {}).get("tokenizer")
    return tok.get("fingerprint") if isinstance(tok, dict) else None


def check_streams(arts: Sequence[Artifact]) -> None:
    """Streams mix only when they hold the same kind of sequences: same tokenizer, seq_len,
    vocabulary, special ids and dtype."""
    first = arts[0]
    for art in arts[1:]:
        diff = [k for k in SAME if art.meta.get(k) != first.meta.get(k)]
        if diff:
            raise StageError(
                f"shards {art.path} cannot be mixed with {first.path}: they differ in "
                + ", ".join(f"{k} ({art.meta.get(k)!r} vs {first.meta.get(k)!r})" for k in diff))
        a, b = tokenizer_fingerprint(art), tokenizer_fingerprint(first)
        if a and b and a != b:
            raise StageError(
                f"shards {art.path} were tokenized by another tokenizer ({a[:12]}) than "
                f"{first.path} ({b[:12]}); mix streams made with one tokenizer stage")
    for art in arts:
        if not art.meta.get("num_train_samples"):
            raise StageError(f"shards {art.path} hold no training sequence: a stream with "
                             "nothing to draw from cannot be mixed")


def plan_streams(metas: Sequence[dict[str, Any]], proportions: Sequence[float],
                 run_samples: int) -> list[dict[str, Any]]:
    """Per stream: its training samples, share of the run, samples drawn over the run and the
    epochs (repeats) that makes. Raises StageError on a proportions/streams mismatch."""
    samples = [int(m.get("num_train_samples", 0) or 0) for m in metas]
    shares = weights(len(metas), proportions) or [s / max(sum(samples), 1) for s in samples]
    out = []
    for i, (n, share) in enumerate(zip(samples, shares)):
        drawn = share * run_samples
        row: dict[str, Any] = {"stream": i, "train_samples": n, "share": round(share, 4),
                               "samples_drawn": int(round(drawn))}
        if n:
            row["epochs"] = round(drawn / n, 3)
            if drawn / n >= MANY_EPOCHS:
                row["warning"] = (f"repeated {drawn / n:.1f} times: past ~{MANY_EPOCHS:g} "
                                  "epochs repeated data is worth much less than new data")
        else:
            row["error"] = "no training samples (not yet planned, or an empty stream)"
        out.append(row)
    return out
