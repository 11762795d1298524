"""Built-in tokenizer components: ``sentencepiece_bpe`` (train a tokenizer for code) and
``mds_shards`` (tokenize, pack and write mosaicml-streaming shards).

Other stages load the tokenizer artifact with ``recipe_engine.artifacts.load_tokenizer``.
Nothing heavy is imported here: sentencepiece, numpy and streaming load inside ``run``.
"""
from recipe_engine import hookimpl

from . import hf_bpe
from .shards import MDSShards
from .train import SentencePieceBPE


@hookimpl
def recipe_components():
    return [SentencePieceBPE, MDSShards, *hf_bpe.COMPONENTS]
