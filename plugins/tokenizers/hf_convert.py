"""The Hugging Face (``transformers``) form of SentencePiece tokenizer artifacts, registered
with the core's runtime ``Tokenizer`` on import (``Tokenizer.register_hf_converter``), and the
escape scheme (``recipe_engine.tokenizer.ESCAPES``) as ``tokenizers`` steps. tokenizers and
transformers are imported inside the functions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipe_engine.tokenizer import ESCAPES, MODEL_FILE

_PLACEHOLDER = "\ue001\ue002\ue003"  # scratch text inside the HF decoder chain


def hf_escape_steps() -> tuple[list[Any], list[Any]]:
    """``ESCAPES`` as ``tokenizers`` steps: the normalizers that escape (to go first) and
    the decoders that unescape (to go last, on the decoded text). ``ESC ESC`` is set aside
    first so that the ``ESC _`` inside ``ESC ESC _`` is not mistaken for an escaped space."""
    from tokenizers import decoders, normalizers

    (esc, esc_rep), *others = ESCAPES
    escape_steps = [normalizers.Replace(char, rep) for char, rep in ESCAPES]
    unescape_steps = [decoders.Replace(esc_rep, _PLACEHOLDER),
                      *(decoders.Replace(rep, char) for char, rep in others),
                      decoders.Replace(_PLACEHOLDER, esc)]
    return escape_steps, unescape_steps


def sentencepiece_hf_tokenizer(tokenizer: Any, max_length: int | None = None) -> Any:
    """transformers' Llama converter turns the SentencePiece model into a ``tokenizers``
    model (byte fallback, " " -> U+2581, no dummy prefix with ``add_prefix_space=False``).
    ``ESCAPES`` go first in its normalizer and their inverse last in its decoder. Special
    tokens written in the text ("<s>") are plain text, as SentencePiece treats them;
    declared ones (user-defined symbols) are added tokens the converter marks not special:
    one id each, matched in the text. A model trained with ``split_digits`` gets a
    pre-tokenizer that isolates every digit, as SentencePiece does (the converter leaves
    that out). Unigram: control pieces are kept out of the text (``_no_control_pieces``)."""
    import tempfile

    from tokenizers import decoders, normalizers, pre_tokenizers
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    sp = tokenizer.sp
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    specials = dict(bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                    unk_token=piece(sp.unk_id()), pad_token=piece(sp.pad_id()))
    with tempfile.TemporaryDirectory() as tmp:  # the converter reads a model file
        model_file = Path(tmp) / MODEL_FILE
        model_file.write_bytes(sp.serialized_model_proto())
        backend = LlamaTokenizerFast(
            vocab_file=str(model_file), from_slow=True, legacy=True, add_prefix_space=False,
            add_bos_token=True, add_eos_token=False, **specials).backend_tokenizer
    if tokenizer.info.get("model_type") == "unigram":
        backend = _no_control_pieces(backend, sp)
    if tokenizer._escape:
        escape_steps, unescape_steps = hf_escape_steps()
        rest = [backend.normalizer] if backend.normalizer is not None else []
        backend.normalizer = normalizers.Sequence([*escape_steps, *rest])
        # the converter's decoder (U+2581 -> " ", byte fallback, fuse) gives one string
        backend.decoder = decoders.Sequence([backend.decoder, *unescape_steps])
    if tokenizer.info.get("split_digits"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = (digits if backend.pre_tokenizer is None else
                                 pre_tokenizers.Sequence([digits, backend.pre_tokenizer]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="right", clean_up_tokenization_spaces=False,
        add_bos_token=True, add_eos_token=False, split_special_tokens=True,
        **({"model_max_length": max_length} if max_length else {}),
        **{k: v for k, v in specials.items() if v is not None})


CONTROL_SCORE = -1000.0  # far below any path of ordinary pieces; see _no_control_pieces


def _no_control_pieces(backend: Any, sp: Any) -> Any:
    """SentencePiece never matches a control piece (``<s>``, ``</s>``, ``<pad>``) or
    ``<unk>`` in the text, but the converted ``tokenizers`` Unigram model holds them as
    ordinary pieces of score 0, the best there is, so "<s>" in the text would become bos.
    Their score is set far below any ordinary path instead. (The score of an unknown
    character derives from the lowest score; every path through that character pays it
    alike, so no segmentation changes.)"""
    from tokenizers import Tokenizer as Backend

    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab)):
        if sp.is_control(i) or sp.is_unknown(i):
            vocab[i][1] = CONTROL_SCORE
    return Backend.from_str(json.dumps(spec))
