"""``hf_byte_bpe``: a byte-level BPE tokenizer trained with Hugging Face ``tokenizers``, and
its runtime (format ``"hf_tokenizers"``).

Byte-level: the text's UTF-8 bytes are mapped to 256 visible characters (GPT-2's
``ByteLevel`` pre-tokenizer, no prefix space) and BPE merges those, so there is no unknown
character and ``decode(encode(t)) == t`` for every string. The GPT-2 split rule keeps runs
of spaces, tabs and newlines as their own words, so code indentation becomes a few pieces.

Ids: unk 0, bos 1, eos 2, pad 3 (as ``sentencepiece_bpe``), then the declared special tokens
in order, then the 256 byte characters and the merges. bos/eos/pad/unk written in the text
are text (``encode_special_tokens``); declared tokens are one id wherever they occur and
decode to their text, as SentencePiece's user-defined symbols do.

The sample and the report are ``sampling``'s, the same as ``sentencepiece_bpe``'s.
``tokenizers`` is imported inside functions; ``HFByteBPETokenizer`` is defined at import,
which is how ``recipe_engine.artifacts.load_tokenizer`` finds the format in any process.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.tokenizer import INFO_FILE, Tokenizer

from .sampling import (RESERVED_TOKENS, check_special_tokens, measured_on, publish_report, select_sample,
                       tokenizer_report)

HF_FILE = "hf_tokenizer.json"  # the tokenizers library's own file (INFO_FILE is ours)
FORMAT = "hf_tokenizers"


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> visible character table (the ``ByteLevel`` alphabet): printable
    Latin-1 bytes stand for themselves, the others for U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _int_list(ids: Sequence[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # type: ignore


class HFByteBPETokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` file plus the ids recorded in ``tokenizer.json``."""

    format = FORMAT

    def __init__(self, backend: Any, info: dict[str, Any]):
        backend.encode_special_tokens = True  # "<s>" in the text is text
        self.backend = backend
        self.info = info
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (
            int(info.get(k, -1)) for k in ("unk_id", "bos_id", "eos_id", "pad_id"))
        self.special_tokens = {str(k): int(v) for k, v in info.get("special_tokens", {}).items()}

    @classmethod
    def from_directory(cls, path: Path, info: dict[str, Any]) -> HFByteBPETokenizer:
        from tokenizers import Tokenizer as Backend

        directory = path if path.is_dir() else path.parent
        return cls(Backend.from_file(str(directory / info.get("tokenizer_file", HF_FILE))), info)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """``encode`` over many texts; in the library's thread pool unless ``num_threads`` is
        1 (a pool worker: the processes parallelize already)."""
        texts = list(texts)
        if num_threads == 1:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(_int_list(ids), skip_special_tokens=True)

    def hf_tokenizer(self, max_length: int | None = None) -> Any:
        """This tokenizer's own ``tokenizers`` model, with ``<s>`` prepended by a
        post-processor (as in training: every document started with bos) and bos/eos/pad/unk
        in the text kept as text (``split_special_tokens``), as ``encode`` does. Declared
        special tokens are added tokens that are not "special": matched in the text, kept on
        decode."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast

        backend = Backend.from_str(self.backend.to_str())  # a copy: ours stays as it is
        names = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>",
                 **self.info.get("special_token_names", {})}
        bos = names["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, padding_side="right", clean_up_tokenization_spaces=False,
            split_special_tokens=True,
            **({"model_max_length": max_length} if max_length else {}),
            **{f"{k}_token": v for k, v in names.items() if self.info.get(f"{k}_id", -1) >= 0})

    def byte_ids(self) -> set[int]:
        """Ids of the single bytes that are not a whole character (0x80-0xFF): the byte-level
        counterpart of SentencePiece's byte-fallback pieces."""
        vocab = self.backend.get_vocab(with_added_tokens=False)
        return {vocab[c] for b, c in byte_level_chars().items() if b >= 0x80 and c in vocab}


@dataclass(kw_only=True)
class HFByteBPE(Stage,
                name="hf_byte_bpe",
                version="1",
                description="Byte-level BPE (Hugging Face tokenizers): no unknown characters, "
                            "decode(encode(t)) == t",
                inputs={"documents": ["documents"]},
                output="tokenizer"):
    """Byte-level BPE trained with Hugging Face ``tokenizers`` on a deterministic sample."""

    vocab_size: int = 8192
    min_frequency: int = 2
    split_digits: bool = False
    special_tokens: list[str] = field(default_factory=list)
    max_training_bytes: int = 20_000_000
    seed: int = 0

    def check(self, problems: Problems) -> None:
        minimum = len(RESERVED_TOKENS) + len(self.special_tokens) + 256 + 1
        problems.require(self.vocab_size >= minimum, "vocab_size",
                         f"{self.vocab_size} is too small: the special tokens and the 256 bytes "
                         f"alone take {minimum - 1}")
        problems.require(self.min_frequency >= 1, "min_frequency", "must be at least 1")
        problems.require(self.max_training_bytes > 0, "max_training_bytes", "must be positive")
        check_special_tokens(self.special_tokens, problems)
        for token in self.special_tokens:
            if isinstance(token, str) and not (token.isascii() and token.isprintable()):
                problems.add("special_tokens", f"{token!r}: byte-level special tokens must be "
                                               "printable ASCII (the byte decoder would garble "
                                               "other characters)")

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"meta": {"vocab_size": self.vocab_size}}

    def run(self, ctx: StageContext) -> None:
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        start = time.perf_counter()
        sample = select_sample(ctx, self.seed, self.max_training_bytes)

        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend = Backend(models.BPE())
        backend.pre_tokenizer = (pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
            if self.split_digits else byte_level)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size, min_frequency=self.min_frequency,
            special_tokens=[*RESERVED_TOKENS, *self.special_tokens],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        t0 = time.perf_counter()
        try:
            backend.train_from_iterator(sample.train, trainer, length=len(sample.train))
        except Exception as e:  # the library raises plain Exceptions
            raise StageError(f"tokenizers training failed: {e}") from e
        train_seconds = time.perf_counter() - t0
        ctx.progress(1, 1, "tokenizer trained")

        # declared tokens: matched in the text and decoded as text, like SentencePiece's
        # user-defined symbols (the trainer made them "special", which decode would skip)
        spec = json.loads(backend.to_str())
        declared = set(self.special_tokens)
        for added in spec["added_tokens"]:
            if added["content"] in declared:
                added["special"] = False
        hf_json = json.dumps(spec, ensure_ascii=False, indent=1, sort_keys=True) + "\n"
        backend = Backend.from_str(hf_json)

        ids = {name: backend.token_to_id(token)
               for name, token in zip(("unk_id", "bos_id", "eos_id", "pad_id"), RESERVED_TOKENS)}
        special = {t: backend.token_to_id(t) for t in self.special_tokens}
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if vocab_size != self.vocab_size:
            ctx.log(f"the training text supports only {vocab_size} tokens, not the "
                    f"{self.vocab_size} asked for")
        info = {
            "format": FORMAT,
            "tokenizer_file": HF_FILE,
            "model_type": "byte_level_bpe",
            "vocab_size": vocab_size,
            **ids,
            "special_tokens": special,
            "special_token_names": dict(zip(("unk", "bos", "eos", "pad"), RESERVED_TOKENS)),
            "split_digits": self.split_digits,
            "add_bos": False,
            "add_eos": False,
            "newline": "literal: the text's UTF-8 bytes, GPT-2 split rule, no prefix space",
            "runtime": "recipe_engine.artifacts.load_tokenizer",
        }
        out = Path(ctx.output)
        (out / HF_FILE).write_text(hf_json, encoding="utf-8")
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tok = HFByteBPETokenizer(backend, info)

        measured = sample.heldout
        if not measured:
            ctx.log("too few documents to hold any aside; the report is measured on the "
                    "training text")
            measured = [(t, "training", None) for t in sample.train]
        report = tokenizer_report(tok.encode_batch, measured, vocab_size, tok.byte_ids())
        publish_report(ctx, report, measured_on(sample))

        ctx.meta.update({"vocab_size": vocab_size, **ids, "model_type": "byte_level_bpe",
                         "special_tokens": special})
        ctx.metrics.update({
            "training_bytes": sample.training_bytes,
            "training_documents": len(sample.train),
            "seconds": round(time.perf_counter() - start, 3),
            "train_seconds": round(train_seconds, 3),
            "heldout_bytes": report["bytes"] if sample.heldout else 0,
        })
        ctx.log(f"vocab {vocab_size}, {report['bytes_per_token']} bytes/token on "
                f"{'held-aside' if sample.heldout else 'training'} text, "
                f"trained in {train_seconds:.1f}s")


COMPONENTS: list[type] = [HFByteBPE]
