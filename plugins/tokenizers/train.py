"""``sentencepiece_bpe``: train a SentencePiece tokenizer for code on a documents artifact.

The training text is a deterministic sample: every document gets a key
``blake2b(seed, id)``; documents are taken in key order, first a small held-aside set (for the
``bytes_per_token`` metric), then training documents up to ``max_training_bytes``. The sample
depends neither on the order of the parts nor on the number of workers.

Documents are fed whole (long ones cut at line ends), so newlines, tabs and runs of spaces
are ordinary characters and may be merged into pieces (``":\\n"``, eight spaces of indent).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import list_parts, read_documents

SENTENCE_BYTES = 1 << 16  # documents longer than this are cut at line ends for the trainer
HELDOUT_BYTES = 1_000_000  # at most this much text held aside for bytes_per_token
HELDOUT_FRACTION = 0.05  # ... and at most this fraction of the corpus
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def sample_key(seed: int, doc_id: str) -> int:
    """Position of a document in the training sample's order."""
    digest = hashlib.blake2b(f"tokenizer-sample:{seed}:{doc_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def _scan_part(task: tuple[str, int, int, int]) -> dict[str, Any]:
    """Worker: keys and sizes of one part's documents, keeping only the smallest keys whose
    sizes add up to ``budget`` (the global sample can take no more than that from one part)."""
    path, part_index, seed, budget = task
    rows: list[tuple[int, int, int, int]] = []  # key, part, line, bytes
    seen = total = empty = 0
    for line, doc in enumerate(read_documents(Path(path))):
        seen += 1
        text = doc.get("text")
        if not isinstance(text, str) or not text:
            empty += 1
            continue
        size = len(text.encode("utf-8"))
        total += size
        rows.append((sample_key(seed, str(doc.get("id", text))), part_index, line, size))
    rows.sort()
    kept, acc = [], 0
    for row in rows:
        if acc >= budget:
            break
        kept.append(row)
        acc += row[3]
    return {"seen": seen, "empty": empty, "bytes": total, "rows": kept}


def _read_texts(task: tuple[str, dict[int, int]]) -> dict[int, str]:
    """Worker: texts of the chosen lines of one part, each cut to its byte allowance."""
    path, take = task
    out: dict[int, str] = {}
    for line, doc in enumerate(read_documents(Path(path))):
        if line in take:
            text = doc["text"]
            if len(text.encode("utf-8")) > take[line]:
                text = text.encode("utf-8")[: take[line]].decode("utf-8", "ignore")
            out[line] = text
    return out


def training_sentences(texts: list[str], limit: int = SENTENCE_BYTES):
    """Yield ``texts`` whole, or cut at line ends into pieces of at most ``limit`` bytes."""
    for text in texts:
        if len(text) * 4 <= limit or len(text.encode("utf-8")) <= limit:
            yield text
            continue
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > limit and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            if n > limit:
                step = limit // 4
                for i in range(0, len(line), step):
                    yield line[i : i + step]
                continue
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


def _printable_piece(piece: str) -> str:
    return piece.encode("unicode_escape").decode("ascii") if not piece.isprintable() else piece


@dataclass(kw_only=True)
class SentencePieceBPE(Stage,
                       name="sentencepiece_bpe",
                       version="1",
                       description="SentencePiece BPE/unigram for code: whitespace and newlines kept, byte fallback, "
        "decode(encode(t)) == t",
                       inputs={"documents": "documents"},
                       output="tokenizer"):
    """Byte-fallback SentencePiece (BPE or unigram) that round-trips code exactly."""

    vocab_size: int = 8192
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9999
    byte_fallback: bool = True
    max_training_bytes: int = 20_000_000
    max_piece_length: int = 16
    num_threads: int = 0  # 0: os.cpu_count()
    seed: int = 0

    def check(self, problems: Problems) -> None:
        minimum = len(SPECIAL_IDS) + (256 if self.byte_fallback else 0) + 1
        problems.require(self.vocab_size >= minimum, "vocab_size",
                         f"{self.vocab_size} is too small: the special and byte-fallback pieces "
                         f"alone take {minimum - 1}")
        problems.require(0 < self.character_coverage <= 1, "character_coverage",
                         f"must be in (0, 1], got {self.character_coverage}")
        problems.require(self.max_training_bytes > 0, "max_training_bytes", "must be positive")
        problems.require(1 <= self.max_piece_length <= 512, "max_piece_length",
                         "must be between 1 and 512")
        problems.require(self.num_threads >= 0, "num_threads",
                         "must be >= 0 (0: one per CPU core)")

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"meta": {"vocab_size": self.vocab_size}}

    def run(self, ctx: StageContext) -> None:
        from recipe_engine.tokenizer import (INFO_FILE, MODEL_FILE, VOCAB_FILE,
                                             SentencePieceTokenizer, escape)

        start = time.perf_counter()
        parts = list_parts(ctx.inputs["documents"].path)
        if not parts:
            raise StageError(f"no document parts in {ctx.inputs['documents'].path}")

        # 1. keys and sizes, part by part (in parallel); keep each part's smallest keys
        budget = self.max_training_bytes + HELDOUT_BYTES
        tasks = [(str(p), i, self.seed, budget) for i, p in enumerate(parts)]
        rows: list[tuple[int, int, int, int]] = []
        seen = total = 0
        for done, res in enumerate(ctx.executor.map(_scan_part, tasks), 1):
            seen += res["seen"]
            total += res["bytes"]
            if res["empty"]:
                ctx.skip("empty_text", res["empty"])
            rows += res["rows"]
            ctx.progress(done, len(parts), "parts scanned")
        ctx.count("documents", seen)
        ctx.check_skips(seen)
        rows.sort()
        if not rows:
            raise StageError("the documents artifact holds no text to train a tokenizer on")

        # 2. held-aside documents first, then the training sample, both in key order
        heldout_target = min(HELDOUT_BYTES, HELDOUT_FRACTION * total)
        heldout, train = [], []
        acc = 0
        i = 0
        while i < len(rows) - 1 and acc < heldout_target:  # always leave one to train on
            heldout.append(rows[i])
            acc += rows[i][3]
            i += 1
        acc = 0
        take: dict[tuple[int, int], int] = {}
        for row in rows[i:]:
            if acc >= self.max_training_bytes:
                break
            train.append(row)
            take[(row[1], row[2])] = min(row[3], self.max_training_bytes - acc)
            acc += row[3]
        for row in heldout:
            take[(row[1], row[2])] = row[3]

        by_part: dict[int, dict[int, int]] = {}
        for (part, line), n in take.items():
            by_part.setdefault(part, {})[line] = n
        wanted = sorted(by_part)
        read_tasks = [(str(parts[p]), by_part[p]) for p in wanted]
        texts: dict[tuple[int, int], str] = {}
        for part, got in zip(wanted, ctx.executor.map(_read_texts, read_tasks)):
            texts.update({(part, line): t for line, t in got.items()})
        train_texts = [texts[(r[1], r[2])] for r in train]
        heldout_texts = [texts[(r[1], r[2])] for r in heldout]
        training_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
        ctx.count("training_documents", len(train_texts))
        ctx.count("heldout_documents", len(heldout_texts))
        ctx.log(f"training on {len(train_texts)} documents ({training_bytes / 1e6:.1f} MB of "
                f"{total / 1e6:.1f} MB), {len(heldout_texts)} held aside")

        # 3. train
        import sentencepiece as spm

        spm.set_random_generator_seed(self.seed)
        model = io.BytesIO()
        t0 = time.perf_counter()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_sentences([escape(t) for t in train_texts]),
                model_writer=model,
                vocab_size=self.vocab_size,
                model_type=self.model_type,
                character_coverage=self.character_coverage,
                byte_fallback=self.byte_fallback,
                max_sentencepiece_length=self.max_piece_length,
                num_threads=self.num_threads or os.cpu_count() or 1,
                # code: keep every character and every space exactly as written
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_by_whitespace=True,
                allow_whitespace_only_pieces=True,
                max_sentence_length=SENTENCE_BYTES,
                input_sentence_size=0,
                hard_vocab_limit=False,
                **SPECIAL_IDS,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise StageError(f"sentencepiece training failed: {e}") from e
        train_seconds = time.perf_counter() - t0
        ctx.progress(1, 1, "tokenizer trained")

        out = Path(ctx.output)
        (out / MODEL_FILE).write_bytes(model.getvalue())
        tok = SentencePieceTokenizer.from_bytes(model.getvalue(), {"escape": True})
        with open(out / VOCAB_FILE, "w", encoding="utf-8") as f:
            for i in range(tok.vocab_size):
                f.write(f"{_printable_piece(tok.sp.id_to_piece(i))}\t{tok.sp.get_score(i)}\n")
        if tok.vocab_size != self.vocab_size:
            ctx.log(f"the training text supports only {tok.vocab_size} pieces, not the "
                    f"{self.vocab_size} asked for")
        if not self.byte_fallback:
            ctx.log("byte_fallback is off: characters outside the vocabulary decode as "
                    "unk, so decode(encode(text)) == text no longer holds for them")

        info = {
            "format": "sentencepiece",
            "model_file": MODEL_FILE,
            "model_type": self.model_type,
            "vocab_size": tok.vocab_size,
            **{k: getattr(tok, k) for k in SPECIAL_IDS},
            "byte_fallback": self.byte_fallback,
            "add_bos": False,
            "add_eos": False,
            "newline": "literal: trained on whole documents with identity normalization; "
                       "'\\n', '\\r', '\\t' and runs of spaces are ordinary characters",
            "escape": True,
            "escape_rule": "before encoding, U+E000 -> U+E000 U+E000 and U+2581 -> U+E000 '_' "
                           "(SentencePiece decodes every U+2581 as a space); undone on decode",
            "runtime": "recipe_engine.artifacts.load_tokenizer",
        }
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

        # 4. bytes per token on the held-aside documents
        measured = heldout_texts
        if not measured:
            ctx.log("too few documents to hold any aside; bytes_per_token is measured on the "
                    "training text")
            measured = train_texts
        ids = tok.encode_batch(measured)
        num_tokens = sum(map(len, ids))
        num_bytes = sum(len(t.encode("utf-8")) for t in measured)

        ctx.meta.update({"vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                         "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id,
                         "model_type": self.model_type})
        ctx.metrics.update({
            "training_bytes": training_bytes,
            "training_documents": len(train_texts),
            "seconds": round(time.perf_counter() - start, 3),
            "train_seconds": round(train_seconds, 3),
            "heldout_bytes": num_bytes if heldout_texts else 0,
            "bytes_per_token": round(num_bytes / max(num_tokens, 1), 4),
        })
        ctx.log(f"vocab {tok.vocab_size}, {ctx.metrics['bytes_per_token']} bytes/token on "
                f"{'held-aside' if heldout_texts else 'training'} text, "
                f"trained in {train_seconds:.1f}s")
