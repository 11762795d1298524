"""``sentencepiece_bpe``: train a SentencePiece tokenizer for code on a documents artifact.

The training text is a deterministic sample (``sampling.select_sample``): every document
gets a key ``blake2b(seed, id)``; documents are taken in key order, first a small
held-aside set (for the tokenizer report), then training documents up to
``max_training_bytes``. The sample depends neither on the order of the parts nor on the
number of workers, and memory stays bounded by the budget, not the corpus.

Documents are fed whole (long ones cut at line ends), so newlines, tabs and runs of spaces
are ordinary characters and may be merged into pieces (``":\\n"``, eight spaces of indent).
Declared special tokens are SentencePiece user-defined symbols: one id each, never split,
matched wherever they occur in the text, recorded by name in ``tokenizer.json``.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recipe_engine import Problems, Stage, StageContext, StageError

from .sampling import (HELDOUT_BYTES, HELDOUT_FRACTION, SENTENCE_BYTES, _read_texts,  # noqa: F401
                       _scan_part, check_special_tokens, measured_on, publish_report, sample_key,
                       select_sample, tokenizer_report, training_sentences)

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def _printable_piece(piece: str) -> str:
    return piece.encode("unicode_escape").decode("ascii") if not piece.isprintable() else piece


@dataclass(kw_only=True)
class SentencePieceBPE(Stage,
                       name="sentencepiece_bpe",
                       version="1",
                       description="SentencePiece BPE/unigram for code: whitespace and newlines kept, byte fallback, "
        "decode(encode(t)) == t",
                       inputs={"documents": ["documents"]},
                       output="tokenizer"):
    """Byte-fallback SentencePiece (BPE or unigram) that round-trips code exactly."""

    vocab_size: int = 8192
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9999
    byte_fallback: bool = True
    split_digits: bool = False
    special_tokens: list[str] = field(default_factory=list)
    max_training_bytes: int = 20_000_000
    max_piece_length: int = 16
    num_threads: int = 0  # 0: os.cpu_count()
    seed: int = 0

    def check(self, problems: Problems) -> None:
        minimum = (len(SPECIAL_IDS) + (256 if self.byte_fallback else 0)
                   + len(self.special_tokens) + 1)
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
        check_special_tokens(self.special_tokens, problems)

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"meta": {"vocab_size": self.vocab_size}}

    def run(self, ctx: StageContext) -> None:
        from recipe_engine.tokenizer import (INFO_FILE, MODEL_FILE, VOCAB_FILE,
                                             SentencePieceTokenizer, escape)

        start = time.perf_counter()
        sample = select_sample(ctx, self.seed, self.max_training_bytes)
        train_texts = sample.train

        # train
        import sentencepiece as spm

        options: dict[str, Any] = {}  # only what differs from the defaults: same model bytes
        if self.split_digits:
            options["split_digits"] = True
        if self.special_tokens:
            options["user_defined_symbols"] = list(self.special_tokens)
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
                **options,
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
        special = {t: int(tok.sp.piece_to_id(t)) for t in self.special_tokens}

        info = {
            "format": "sentencepiece",
            "model_file": MODEL_FILE,
            "model_type": self.model_type,
            "vocab_size": tok.vocab_size,
            **{k: getattr(tok, k) for k in SPECIAL_IDS},
            "byte_fallback": self.byte_fallback,
            # written only when used, so the default artifact's bytes stay as they were
            **({"split_digits": True} if self.split_digits else {}),
            **({"special_tokens": special} if special else {}),
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

        # report on the held-aside documents
        measured = sample.heldout
        if not measured:
            ctx.log("too few documents to hold any aside; the report is measured on the "
                    "training text")
            measured = [(t, "training", None) for t in train_texts]
        byte_ids = {i for i in range(tok.vocab_size) if tok.sp.is_byte(i)}
        report = tokenizer_report(tok.encode_batch, measured, tok.vocab_size, byte_ids)
        publish_report(ctx, report, measured_on(sample))

        ctx.meta.update({"vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                         "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id,
                         "model_type": self.model_type, "special_tokens": special})
        ctx.metrics.update({
            "training_bytes": sample.training_bytes,
            "training_documents": len(train_texts),
            "seconds": round(time.perf_counter() - start, 3),
            "train_seconds": round(train_seconds, 3),
            "heldout_bytes": report["bytes"] if sample.heldout else 0,
        })
        ctx.log(f"vocab {tok.vocab_size}, {report['bytes_per_token']} bytes/token, "
                f"byte fallback {report['byte_fallback_rate']:.2%} of tokens on "
                f"{'held-aside' if sample.heldout else 'training'} text, "
                f"trained in {train_seconds:.1f}s")
