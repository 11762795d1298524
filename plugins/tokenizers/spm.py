"""The runtime side of a ``sentencepiece_bpe`` tokenizer artifact: load it, encode, decode.

    tok = Tokenizer.load(artifact_dir)
    ids = tok.encode("def f(x):\\n\\treturn x\\n")   # no bos / eos
    assert tok.decode(ids) == "def f(x):\\n\\treturn x\\n"

``decode(encode(t)) == t`` for every string ``t`` (byte fallback covers characters the
vocabulary lacks). Two details make that hold for code, and this class hides both:

* The model is trained on whole documents with identity normalization, no dummy prefix and no
  whitespace collapsing, so ``\\n``, ``\\t``, ``\\r`` and runs of spaces are ordinary characters.
* SentencePiece writes a space as U+2581 ("▁") and turns every U+2581 back into a space on
  decode, so a literal "▁" in the text is escaped before encoding: ``ESC`` (U+E000, private
  use) becomes ``ESC ESC`` and "▁" becomes ``ESC _``; decode undoes it. Decoding a slice of
  ids that cuts such a pair in two gives the escape characters themselves.

sentencepiece is imported by ``load``, not at module level (plugin modules stay light).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
INFO_FILE = "tokenizer.json"

ESC = "\ue000"
SPACE_SYMBOL = "\u2581"  # SentencePiece's visible space
_UNESCAPE = re.compile("\ue000(.)", re.S)


def escape(text: str) -> str:
    """Make ``text`` safe for SentencePiece: no literal U+2581 left (bijective, see module)."""
    if ESC in text:
        text = text.replace(ESC, ESC + ESC)
    if SPACE_SYMBOL in text:
        text = text.replace(SPACE_SYMBOL, ESC + "_")
    return text


def unescape(text: str) -> str:
    """Inverse of :func:`escape` (a lone trailing ``ESC`` is kept as it is)."""
    if ESC not in text:
        return text
    return _UNESCAPE.sub(lambda m: SPACE_SYMBOL if m.group(1) == "_" else m.group(1), text)


class Tokenizer:
    """A SentencePiece model plus the special ids recorded in ``tokenizer.json``."""

    def __init__(self, processor: Any, info: dict[str, Any]):
        self.sp = processor
        self.info = info
        self.vocab_size: int = int(processor.get_piece_size())
        self.bos_id: int = int(processor.bos_id())
        self.eos_id: int = int(processor.eos_id())
        self.pad_id: int = int(processor.pad_id())
        self.unk_id: int = int(processor.unk_id())
        self._escape = bool(info.get("escape", True))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a tokenizer artifact directory (or its ``tokenizer.model`` file)."""
        import sentencepiece as spm

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        model = directory / MODEL_FILE if path.is_dir() else path
        info_file = directory / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        return cls(spm.SentencePieceProcessor(model_file=str(model)), info)

    @classmethod
    def from_bytes(cls, model: bytes, info: dict[str, Any] | None = None) -> "Tokenizer":
        import sentencepiece as spm

        return cls(spm.SentencePieceProcessor(model_proto=model), info or {})

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos / eos."""
        return self.sp.encode(escape(text) if self._escape else text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """``encode`` over many texts, in SentencePiece's thread pool (-1: all cores)."""
        texts = [escape(t) for t in texts] if self._escape else list(texts)
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; bos, eos and pad decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        text = self.sp.decode(ids)
        return unescape(text) if self._escape else text

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")
