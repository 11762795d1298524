"""Kept for existing imports: the SentencePiece runtime now lives in the core.

Use ``recipe_engine.artifacts.load_tokenizer(dir)`` (or ``recipe_engine.tokenizer``);
``Tokenizer`` here is the core's ``Tokenizer`` base, whose ``load`` returns a
``SentencePieceTokenizer`` for the artifacts ``sentencepiece_bpe`` writes.
"""
from recipe_engine.tokenizer import (ESC, INFO_FILE, MODEL_FILE, SPACE_SYMBOL, VOCAB_FILE,
                                     SentencePieceTokenizer, Tokenizer, escape, unescape)

__all__ = ["ESC", "INFO_FILE", "MODEL_FILE", "SPACE_SYMBOL", "VOCAB_FILE",
           "SentencePieceTokenizer", "Tokenizer", "escape", "unescape"]
