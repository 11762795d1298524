"""The artifact contract: the on-disk layout and ``meta`` keys of every built-in kind, with
readers and the few writers a producer needs. Stages, built-in or third-party, exchange
artifacts only through this contract (docs/artifacts.md has examples).

Importing this package imports neither torch nor mosaicml-streaming: only the standard library
and zstandard; numpy and sentencepiece are imported by the readers that need them.

Every committed artifact directory also holds ``manifest.json`` (written by the store, last):
``kind``, ``component``, ``params``, ``meta`` (facts for downstream stages, below),
``metrics`` (numbers for people), ``counts``. A stage sees ``meta`` as ``ctx.inputs[slot].meta``;
outside a run, ``read_manifest(dir)["meta"]``. Meta keys marked (opt) may be absent.

``documents``: text documents::

    part-00000.jsonl.zst  part-00001.jsonl.zst ...   zstd JSON Lines, one record a line:
        id (str, unique)  text (str)  source (str)  path (str | null)  + any other keys
        split (opt): "heldout" marks an evaluation document (``heldout_split``): no stage
        may learn from it (tokenizer training skips it, shards send it to val/); is_heldout(doc)
    meta: num_documents, num_bytes (UTF-8 bytes of text), source (opt, files_source),
          duplicate_examples (opt, exact_dedup: a few clusters of duplicate ids),
          heldout (opt, heldout_split: fraction, seed, max_documents, num_documents, num_bytes)
    read: iter_documents(dir), list_parts + read_documents(part)
    write: write_documents(dir / part_name(i), records)

``tokenizer``: a trained tokenizer (``sentencepiece_bpe``, ``hf_byte_bpe``)::

    tokenizer.json    ours, always: format ("sentencepiece" | "hf_tokenizers"), vocab_size,
                      unk_id, bos_id, eos_id, pad_id, add_bos/add_eos (false: encode adds
                      neither), special_tokens (opt: declared token -> id), split_digits (opt);
                      sentencepiece: model_file, model_type, byte_fallback, escape
                      (U+2581/U+E000 escaping, see recipe_engine.tokenizer);
                      hf_tokenizers: tokenizer_file, special_token_names
    tokenizer.model   sentencepiece: the SentencePiece model (BPE or unigram, byte fallback)
    tokenizer.vocab   sentencepiece: one "piece<TAB>score" line per id (\\u-escaped)
    hf_tokenizer.json hf_tokenizers: the Hugging Face ``tokenizers`` file (byte-level BPE)
    meta: vocab_size, bos_id, eos_id, pad_id, unk_id, model_type, special_tokens,
          report (bytes/words per token overall, per source and per language, byte-fallback
          rate, share of the vocabulary used; measured_on: evaluation | heldout | training)
    read: load_tokenizer(dir) -> Tokenizer (encode, encode_batch, decode, *_id, vocab_size)

``shards``: tokenized, packed sequences (``mds_shards``)::

    train/   mosaicml-streaming MDS (index.json + shard.NNNNN.mds.zstd), one column
             "tokens": ndarray:uint16 (vocab_size <= 65536) or ndarray:int32, each sample
             exactly seq_len ids; documents packed as [bos] + ids + [eos], concatenated in
             document order and cut into seq_len chunks (the incomplete tail dropped)
    val/     the same, from the validation documents (may hold no sample): every document
             marked split: heldout, plus those val_fraction picks among the others
    val_documents/   the validation documents themselves, a ``documents`` layout
             index.json lists each shard's sha1 and xxh64; bos appears only at a document's
             first token, so document starts are where bos is (document_boundaries: "bos")
    meta: seq_len, vocab_size, bos_id, eos_id, pad_id, dtype, num_train_samples,
          num_train_tokens, num_val_samples, num_val_tokens, num_train_documents,
          num_val_documents, num_heldout_documents, train_bytes, val_bytes,
          document_boundaries ("bos"), data_digest (sha256 of train/ then val/ index.json),
          remote (opt: where the shards were also uploaded)
    read: iter_token_sequences(dir, split="train"), read_shards_info(dir),
          document_starts(sequence, bos_id), data_digest(dir),
          iter_documents(dir / "val_documents"); MDS format: recipe_engine.artifacts.shards

``checkpoint``: trained weights and what built them (``composer_train``)::

    model.safetensors   fp32, unsharded, the module's state_dict names
    model.json          {"name": registered model component, "params": all its fields,
                         "vocab_size": int, "max_seq_len": int}
    metrics.jsonl (opt)  per-step curves: {"step", "tokens", "loss", "lr",
                         "tokens_per_second", "val_loss", ...} (docs/report.md)
    meta: vocab_size, seq_len, bos_id, eos_id, pad_id, num_params, tokens_trained, steps,
          resumed_from_step, streams (opt: per mixed stream, share, samples drawn, epochs)
    read: read_model_spec(dir), checkpoint_weights_path(dir)
    write: write_model_spec(dir, name, params, vocab_size, max_seq_len)

``eval_report``: evaluation metrics (``heldout_eval``, ``lm_eval``)::

    report.json    heldout_eval: {"metrics": {...}, "settings": {window, stride, zstd_level,
                   scored}, "documents": [{id, bytes, tokens, model_bits, zstd_bits}]}
    results.json   lm_eval: lm-eval's results (results, groups, configs, versions, n-shot,
                   higher_is_better, n-samples, config)
    meta: flat metric name -> number. heldout_eval: bits_per_byte, zstd_bits_per_byte,
          loss, num_documents, num_bytes, num_tokens, bytes_per_token. lm_eval:
          "<task>/<metric>" (a filter other than "none" as a suffix: "<task>/<metric>/<filter>")
          and "<task>/num_samples"
    read: read_eval_report(dir) -> {"metrics": ..., "report" | "results": ...}

``export``: a self-contained model directory (``hf_export``)::

    config.json  generation_config.json  model.safetensors   transformers LlamaForCausalLM
    tokenizer.json  tokenizer_config.json  special_tokens_map.json  tokenizer.model
                                                             transformers fast tokenizer
    README.md                                                model card
    samples.json     {"settings": {...}, "samples": [{"prompt", "completion"}]}: greedy
                     generations by the exported model (docs/report.md shows them)
    recipe_engine/   model.json + the tokenizer artifact's tokenizer.* files
    meta: format ("huggingface"), architecture, dtype, num_params, vocab_size, max_seq_len,
          verified (transformers' logits vs the trained model's: max_abs_logit_diff,
          tolerance, tokens)
    read: transformers' Auto classes on dir; read_model_spec(dir / EXPORT_NATIVE_DIR),
          load_tokenizer(dir / EXPORT_NATIVE_DIR)
"""
from __future__ import annotations

from ..tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from .checkpoint import (EXPORT_NATIVE_DIR, MODEL_SPEC_FILE, WEIGHTS_FILE,
                         checkpoint_weights_path, read_model_spec, write_model_spec)
from .documents import (CHAT_ROLES, HELDOUT, PART_GLOB, SPLIT_FIELD, chat_kind,
                        chat_record_problem, is_heldout, iter_documents, list_parts, part_name,
                        read_documents, write_documents)
from .reports import MANIFEST_FILE, read_eval_report, read_manifest
from .shards import (BOUNDARIES_BOS, data_digest, document_starts, iter_mds_samples,
                     iter_token_sequences, read_shards_info)

ARTIFACT_KINDS: dict[str, str] = {
    "documents": "text documents as JSONL.zst parts (id, text, source, path)",
    "tokenizer": "a trained tokenizer model and its vocabulary size",
    "shards": "tokenized, packed sequences as mosaicml-streaming MDS shards (train/ and val/)",
    "checkpoint": "trained model weights with the model config that built them",
    "eval_report": "evaluation metrics, per task",
    "export": "a self-contained model directory a user can load",
}

__all__ = [
    "ARTIFACT_KINDS", "EXPORT_NATIVE_DIR", "HELDOUT", "MANIFEST_FILE", "MODEL_SPEC_FILE", "PART_GLOB",
    "SPLIT_FIELD", "SentencePieceTokenizer", "Tokenizer", "WEIGHTS_FILE", "checkpoint_weights_path",
    "is_heldout", "iter_documents", "iter_mds_samples", "iter_token_sequences", "list_parts",
    "load_tokenizer", "part_name", "read_documents", "read_eval_report", "read_manifest",
    "read_model_spec", "read_shards_info", "write_documents", "write_model_spec",
    # shards: document boundaries and the data digest
    "BOUNDARIES_BOS", "data_digest", "document_starts",
    # documents: the chat records of post-training
    "CHAT_ROLES", "chat_kind", "chat_record_problem",
]
