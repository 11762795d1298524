"""Built-in tokenizer components: ``sentencepiece_bpe`` (train a tokenizer for code) and
``mds_shards`` (tokenize, pack and write mosaicml-streaming shards).

Other stages load the tokenizer artifact with ``recipe_engine.artifacts.load_tokenizer``.
Nothing heavy is imported here: sentencepiece, numpy and streaming load inside ``run``.
"""
from recipe_engine import hookimpl

from recipe_engine.tokenizer import SentencePieceTokenizer, Tokenizer

from . import hf_bpe
from .hf_convert import sentencepiece_hf_tokenizer
from .shards import MDSShards
from .train import SentencePieceBPE


@hookimpl
def recipe_components():
    return [SentencePieceBPE, MDSShards, *hf_bpe.COMPONENTS]

# the core's SentencePiece runtime gets its Hugging Face form here (transformers stays out of
# the core); imported late, inside the converter
Tokenizer.register_hf_converter(SentencePieceTokenizer.format, sentencepiece_hf_tokenizer)
