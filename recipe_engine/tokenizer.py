"""The runtime side of a ``tokenizer`` artifact: load it, encode, decode.

    from recipe_engine.artifacts import load_tokenizer
    tok = load_tokenizer(artifact_dir)
    ids = tok.encode("def f(x):\\n\\treturn x\\n")   # no bos / eos
    assert tok.decode(ids) == "def f(x):\\n\\treturn x\\n"

``Tokenizer`` is the interface every tokenizer implementation follows (and the base class a
plugin's own tokenizer subclasses); ``SentencePieceTokenizer`` is the built-in one, for the
artifacts the ``sentencepiece_bpe`` stage writes. ``Tokenizer.load(dir)`` reads
``tokenizer.json`` and returns the implementation its ``"format"`` names. A plugin's format
(say ``"hf_tokenizers"``, from the built-in ``hf_byte_bpe`` stage) is a ``Tokenizer``
subclass defined at the top level of a module its plugin's entry point imports: when a
format is not known yet, ``load`` loads the installed plugins once (as ``recipe`` does) and
looks again, so any process (a training worker, an evaluation, an export) can load any
installed tokenizer kind without importing its plugin first.

For the SentencePiece tokenizer ``decode(encode(t)) == t`` for every string ``t`` (byte
fallback covers characters the vocabulary lacks). Two details make that hold for code, and
the class hides both:

* The model is trained on whole documents with identity normalization, no dummy prefix and no
  whitespace collapsing, so ``\\n``, ``\\t``, ``\\r`` and runs of spaces are ordinary characters.
* SentencePiece writes a space as U+2581 ("▁") and turns every U+2581 back into a space on
  decode, so a literal "▁" in the text is escaped before encoding: ``ESC`` (U+E000, private
  use) becomes ``ESC ESC`` and "▁" becomes ``ESC _``; decode undoes it. Decoding a slice of
  ids that cuts such a pair in two gives the escape characters themselves. The rule is
  written once, in ``ESCAPES``: ``escape``/``unescape`` apply it in Python, and
  ``SentencePieceTokenizer.hf_tokenizer`` puts the same pairs into the Hugging Face
  tokenizer's normalizer and decoder.

``Tokenizer.hf_tokenizer()`` gives a ``transformers`` fast tokenizer with the same ids (for
``hf_export`` and lm-eval's ``HFLM``); a format without one raises ``NotImplementedError``.

Standard library only at import time; sentencepiece is imported when a model is loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
INFO_FILE = "tokenizer.json"

ESC = "\ue000"
SPACE_SYMBOL = "\u2581"  # SentencePiece's visible space
# the escape rule: (character, what it becomes), applied in this order before encoding
ESCAPES = ((ESC, ESC + ESC), (SPACE_SYMBOL, ESC + "_"))
_UNESCAPE = re.compile("\ue000(.)", re.S)
_UNESCAPED = {rep[1]: char for char, rep in ESCAPES}  # the character after ESC -> original


def escape(text: str) -> str:
    """Make ``text`` safe for SentencePiece: no literal U+2581 left (bijective, see module)."""
    for char, replacement in ESCAPES:
        if char in text:
            text = text.replace(char, replacement)
    return text


def unescape(text: str) -> str:
    """Inverse of :func:`escape` (a lone trailing ``ESC`` is kept as it is)."""
    if ESC not in text:
        return text
    return _UNESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), text)


def _int_list(ids: Sequence[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # type: ignore


class Tokenizer:
    """What every stage may ask of a tokenizer artifact's runtime.

    A subclass sets ``format`` (the ``"format"`` its artifacts' ``tokenizer.json`` records),
    implements ``from_directory``, ``encode`` and ``decode``, and sets the attributes below.
    Special ids are ``-1`` when the tokenizer has no such token. ``encode`` never adds bos
    or eos: a consumer adds them where its format wants them.
    """

    format: ClassVar[str] = ""
    _formats: ClassVar[dict[str, type[Tokenizer]]] = {}
    _hf_converters: ClassVar[dict[str, Callable[[Any, int | None], Any]]] = {}

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    info: dict[str, Any]  # the artifact's tokenizer.json
    # tokens declared in the recipe (chat roles, fill-in-the-middle...): name -> id; each is
    # one id wherever its text occurs, and decodes to its text
    special_tokens: dict[str, int] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.format:
            Tokenizer._formats.setdefault(cls.format, cls)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer artifact directory (or, for SentencePiece, its model file).

        On ``Tokenizer`` itself this picks the implementation ``tokenizer.json`` names (a
        plugin's own format is known once its module is imported); on a subclass it loads
        with that subclass."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        info_file = directory / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        if cls is not Tokenizer:
            return cls.from_directory(path, info)
        fmt = info.get("format", SentencePieceTokenizer.format)
        impl = Tokenizer._formats.get(fmt)
        if impl is None:
            _load_installed_plugins()
            impl = Tokenizer._formats.get(fmt)
        if impl is None:
            raise ValueError(
                f"{info_file}: tokenizer format {fmt!r} is unknown; known: "
                f"{sorted(Tokenizer._formats)} (install the plugin that provides it, or import the "
                "plugin's module that defines it first)")
        return impl.from_directory(path, info)

    @classmethod
    def from_directory(cls, path: Path, info: dict[str, Any]) -> Tokenizer:
        """Build from an artifact directory (or model file) and its parsed ``tokenizer.json``."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos / eos."""
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """``encode`` over many texts (an implementation may parallelize)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (a list or a numpy array); bos, eos and pad decode to nothing."""
        raise NotImplementedError

    @staticmethod
    def register_hf_converter(fmt: str, convert: Callable[[Any, int | None], Any]) -> None:
        """Register ``convert(tokenizer, max_length)`` as ``hf_tokenizer`` of the format
        ``fmt`` (a plugin does, on import: the conversion needs transformers, which the core
        never imports)."""
        Tokenizer._hf_converters.setdefault(fmt, convert)

    def hf_tokenizer(self, max_length: int | None = None) -> Any:
        """A ``transformers`` fast tokenizer that gives this tokenizer's ids: ``encode`` with
        ``add_special_tokens=False`` equals ``encode``, and the default adds ``bos`` in front
        (every training document started with it); bos/eos/pad/unk written in the text are
        text; declared special tokens are one id each. ``max_length``: its
        ``model_max_length``. A subclass overrides it, or a plugin registers the format's
        converter (``register_hf_converter``; SentencePiece's is the tokenizers plugin's)."""
        convert = Tokenizer._hf_converters.get(self.format)
        if convert is None:
            _load_installed_plugins()
            convert = Tokenizer._hf_converters.get(self.format)
        if convert is not None:
            return convert(self, max_length)
        raise NotImplementedError(
            f"the tokenizer format {self.format!r} has no Hugging Face form (its runtime "
            f"{type(self).__name__} does not implement hf_tokenizer)")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


_plugins_loaded = False


def _load_installed_plugins() -> None:
    """Import every installed plugin (entry-point group ``recipe_engine.plugins``), once per
    process: a plugin's ``Tokenizer`` subclasses register their formats on import."""
    global _plugins_loaded
    if not _plugins_loaded:
        from .plugins import PluginManager

        PluginManager()
        _plugins_loaded = True


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the special ids recorded in ``tokenizer.json``."""

    format = "sentencepiece"

    def __init__(self, processor: Any, info: dict[str, Any]):
        self.sp = processor
        self.info = info
        self.vocab_size = int(processor.get_piece_size())
        self.bos_id = int(processor.bos_id())
        self.eos_id = int(processor.eos_id())
        self.pad_id = int(processor.pad_id())
        self.unk_id = int(processor.unk_id())
        self.special_tokens = {str(k): int(v) for k, v in info.get("special_tokens", {}).items()}
        self._escape = bool(info.get("escape", True))

    @classmethod
    def from_directory(cls, path: Path, info: dict[str, Any]) -> SentencePieceTokenizer:
        import sentencepiece as spm

        model = path / info.get("model_file", MODEL_FILE) if path.is_dir() else path
        return cls(spm.SentencePieceProcessor(model_file=str(model)), info)

    @classmethod
    def from_bytes(cls, model: bytes, info: dict[str, Any] | None = None
                   ) -> SentencePieceTokenizer:
        """From a serialized ``tokenizer.model`` (a trainer's output, before it is written)."""
        import sentencepiece as spm

        return cls(spm.SentencePieceProcessor(model_proto=model), info or {})

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(escape(text) if self._escape else text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """``encode`` over many texts, in SentencePiece's thread pool (-1: all cores)."""
        texts = [escape(t) for t in texts] if self._escape else list(texts)
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.sp.decode(_int_list(ids))
        return unescape(text) if self._escape else text


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The runtime tokenizer of a ``tokenizer`` artifact directory."""
    return Tokenizer.load(directory)
