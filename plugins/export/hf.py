"""Writing (and reading back) a Hugging Face ``LlamaForCausalLM`` directory.

Our Llama uses HF's conventions (rotate-half RoPE, KV heads repeated contiguously), so the
weights only change names. The tokenizer is exported for both built-in tokenizer formats so
that ``AutoTokenizer`` gives the ids our runtime ``Tokenizer`` gives:

* ``sentencepiece`` (``sentencepiece_bpe``, BPE or unigram): the fast (``tokenizers``)
  version transformers derives from ``tokenizer.model``, given the same escape of U+2581 /
  U+E000 our runtime applies, digit splitting when the model splits digits; declared special
  tokens (SentencePiece user-defined symbols) become added tokens matched in the text.
* ``hf_tokenizers`` (``hf_byte_bpe``): the artifact's own ``hf_tokenizer.json``, with a
  post-processor that prepends ``<s>``.

Layout of an export::

    config.json  generation_config.json  model.safetensors      <- AutoModelForCausalLM
    tokenizer.json  tokenizer_config.json  special_tokens_map.json  [tokenizer.model]
                                                                 <- AutoTokenizer
    README.md                                                    <- model card
    samples.json                                                 <- greedy generations
    recipe_engine/  model.json  + the tokenizer artifact's files <- our own code
                                                                    (load_export)
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from recipe_engine import ModelConfig, StageContext, StageError
from recipe_engine.artifacts import (EXPORT_NATIVE_DIR, checkpoint_weights_path, load_tokenizer,
                                     read_model_spec)
from recipe_engine.tokenizer import ESC  # the runtime tokenizer's escape character
from recipe_engine.tokenizer import SPACE_SYMBOL as SPACE  # SentencePiece's visible space

NATIVE_DIR = EXPORT_NATIVE_DIR
_PLACEHOLDER = "\ue001\ue002\ue003"  # scratch text inside the decoder chain (escaped ESC)

_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")


def to_hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_KEY.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    raise StageError(f"no Hugging Face name for weight {name!r}")


def from_hf_name(name: str) -> str:
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.weight$", name)
    inverse = {v: k for k, v in _LAYER.items()}
    if m and m.group(2) in inverse:
        return f"layers.{m.group(1)}.{inverse[m.group(2)]}.weight"
    raise ValueError(f"not a LlamaForCausalLM weight: {name!r}")


def hf_config(spec: dict[str, Any], tokenizer: Any, dtype: str, model_cfg: Any = None) -> Any:
    """``LlamaConfig`` for a checkpoint's ``model.json`` (architecture ``llama``);
    ``model_cfg``: the built model component (its RoPE scaling, its MLP width)."""
    from transformers import LlamaConfig

    p = spec["params"]
    rope_scaling = model_cfg.hf_rope_scaling() if hasattr(model_cfg, "hf_rope_scaling") else None
    hidden = int(model_cfg.hidden_dim) if hasattr(model_cfg, "hidden_dim") else _hidden_dim(p)
    n_heads = p["n_heads"]
    return LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=p["dim"],
        intermediate_size=hidden, num_hidden_layers=p["n_layers"],
        num_attention_heads=n_heads, num_key_value_heads=p.get("n_kv_heads") or n_heads,
        head_dim=p["dim"] // n_heads, hidden_act="silu",
        max_position_embeddings=spec["max_seq_len"], initializer_range=p.get("init_std", 0.02),
        rms_norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
        rope_scaling=rope_scaling, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=bool(p.get("tie_embeddings", True)),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else None,
        torch_dtype=dtype, architectures=["LlamaForCausalLM"],
    )


def _hidden_dim(p: dict[str, Any]) -> int:
    if p.get("ffn_hidden_dim"):
        return int(p["ffn_hidden_dim"])
    multiple = p.get("multiple_of", 256)
    hidden = int(2 * 4 * p["dim"] / 3)
    return multiple * ((hidden + multiple - 1) // multiple)


def hf_state_dict(model: torch.nn.Module, tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "output.weight":
            continue  # transformers ties lm_head to embed_tokens itself
        out[to_hf_name(name)] = tensor.detach().to(dtype=dtype, device="cpu").contiguous().clone()
    return out


def hf_tokenizer(tokenizer_dir: Path, max_length: int) -> Any:
    """A ``PreTrainedTokenizerFast`` giving the same ids as our runtime Tokenizer, for a
    tokenizer artifact of either built-in format."""
    info_file = Path(tokenizer_dir) / "tokenizer.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    fmt = info.get("format", "sentencepiece")
    if fmt == "sentencepiece":
        return sentencepiece_hf_tokenizer(tokenizer_dir, max_length)
    if fmt == "hf_tokenizers":
        return byte_level_hf_tokenizer(tokenizer_dir, info, max_length)
    raise StageError(f"hf_export: no Hugging Face tokenizer for the tokenizer format {fmt!r} "
                     f"({info_file}); known: sentencepiece, hf_tokenizers")


def byte_level_hf_tokenizer(tokenizer_dir: Path, info: dict[str, Any], max_length: int) -> Any:
    """The ``hf_byte_bpe`` artifact's own ``tokenizers`` file, with ``<s>`` prepended by a
    post-processor (as in training: every document started with bos) and bos/eos/pad/unk in
    the text kept as text (``split_special_tokens``), as our runtime does. Declared special
    tokens are added tokens that are not "special": matched in the text, kept on decode."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = Backend.from_file(str(Path(tokenizer_dir) / info.get("tokenizer_file",
                                                                   "hf_tokenizer.json")))
    names = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>",
             **info.get("special_token_names", {})}
    bos = names["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, info["bos_id"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, padding_side="right",
        clean_up_tokenization_spaces=False, split_special_tokens=True,
        **{f"{k}_token": v for k, v in names.items() if info.get(f"{k}_id", -1) >= 0})


def sentencepiece_hf_tokenizer(tokenizer_dir: Path, max_length: int) -> Any:
    """A ``PreTrainedTokenizerFast`` giving the same ids as our SentencePiece runtime.

    transformers' Llama converter turns the SentencePiece BPE model into a ``tokenizers`` BPE
    (byte fallback, " " -> U+2581, no dummy prefix with ``add_prefix_space=False``). Our
    runtime escapes U+E000 and U+2581 before encoding; the same replacements go first in the
    normalizer, and their inverse last in the decoder. ``<s>`` is added in front, as in
    training (every document started with bos); nothing at the end. Special tokens written
    in the text ("<s>") are plain text, as SentencePiece treats them; declared ones
    (user-defined symbols) are added tokens the converter marks not special: one id each,
    matched in the text. A model trained with ``split_digits`` gets a pre-tokenizer that
    isolates every digit, as SentencePiece does (the converter leaves that out).
    """
    import sentencepiece as spm
    from tokenizers import decoders, normalizers, pre_tokenizers
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    model_file = Path(tokenizer_dir) / "tokenizer.model"
    info_file = Path(tokenizer_dir) / "tokenizer.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    specials = dict(bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                    unk_token=piece(sp.unk_id()), pad_token=piece(sp.pad_id()))
    slow_to_fast = LlamaTokenizerFast(
        vocab_file=str(model_file), from_slow=True, legacy=True, add_prefix_space=False,
        add_bos_token=True, add_eos_token=False, **specials)
    backend = slow_to_fast.backend_tokenizer
    if info.get("model_type") == "unigram":
        backend = _unigram_without_control_pieces(backend, sp)
    if info.get("escape", True):
        backend.normalizer = normalizers.Sequence([
            normalizers.Replace(ESC, ESC + ESC), normalizers.Replace(SPACE, ESC + "_"),
            *([backend.normalizer] if backend.normalizer is not None else []),
        ])
        backend.decoder = decoders.Sequence([
            backend.decoder,  # Replace(U+2581 -> " "), ByteFallback, Fuse: one string now
            decoders.Replace(ESC + ESC, _PLACEHOLDER), decoders.Replace(ESC + "_", SPACE),
            decoders.Replace(_PLACEHOLDER, ESC),
        ])
    if info.get("split_digits"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = (digits if backend.pre_tokenizer is None else
                                 pre_tokenizers.Sequence([digits, backend.pre_tokenizer]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, padding_side="right",
        clean_up_tokenization_spaces=False, add_bos_token=True, add_eos_token=False,
        split_special_tokens=True,  # "<s>" in text is text, as for SentencePiece
        **{k: v for k, v in specials.items() if v is not None})


CONTROL_SCORE = -1000.0  # far below any path of ordinary pieces; see below


def _unigram_without_control_pieces(backend: Any, sp: Any) -> Any:
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


def build_model(spec: dict[str, Any], build: Callable[[Any, Any], Any] | None = None
                ) -> torch.nn.Module:
    """A fresh module for a model spec (``model.json``), from the registered model component.
    ``build``: a stage's ``ctx.build``; by default the installed plugins' registry."""
    if build is None:
        from recipe_engine import PluginManager

        build = PluginManager().registry.build
    config = build(ModelConfig, {"name": spec["name"], **spec["params"]})
    return config.build(spec["vocab_size"], spec["max_seq_len"])


VERIFY_TEXT = ("def greet(name):\n    \"\"\"Say hello.\"\"\"\n    return f'Hello, {name}!'\n\n"
               "print(greet('world'))  # the exported model's logits are checked on this\n")
LOGIT_TOLERANCE = 1e-4  # max |logit difference|, both models in fp32 on the same weights


def verify_export(model: torch.nn.Module, out: Path, tokenizer: Any, dtype: str,
                  max_seq_len: int) -> dict[str, Any]:
    """Load the export with transformers and compare its logits with our model's on a fixed
    batch (``VERIFY_TEXT``), both in fp32 on the exported weights (a bf16/fp16 export: our
    weights rounded the same way). Raises StageError past ``LOGIT_TOLERANCE``."""
    import copy

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = model
    if dtype != "float32":
        ours = copy.deepcopy(model).to(getattr(torch, dtype)).float().eval()
    ids = [tokenizer.bos_id] + tokenizer.encode(VERIFY_TEXT)
    batch = torch.tensor([ids[:max_seq_len]])
    with torch.no_grad():
        a = ours(batch).float()
        b = hf(batch).logits.float()
    diff = float((a - b).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise StageError(f"hf_export: the exported model's logits differ from the trained "
                         f"model's by up to {diff:.3g} (tolerance {LOGIT_TOLERANCE:g}) on a fixed "
                         "batch: the conversion is wrong for this checkpoint")
    return {"tokens": int(batch.numel()), "max_abs_logit_diff": diff,
            "tolerance": LOGIT_TOLERANCE}


def generation_samples(out: Path, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` by the exported model, through transformers'
    ``generate`` and the exported tokenizer (what a user of the directory gets)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    samples = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=hf.config.pad_token_id)
        completion = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": completion})
    return {"settings": {"do_sample": False, "max_new_tokens": max_new_tokens,
                         "library": "transformers"}, "samples": samples}


def export_hf(ctx: StageContext, dtype: str = "float32", verify: bool = True,
              sample_prompts: list[str] | None = None, sample_max_new_tokens: int = 48) -> None:
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    ckpt, tok_art = ctx.inputs["checkpoint"], ctx.inputs["tokenizer"]
    out = Path(ctx.output)
    spec = read_model_spec(ckpt.path)
    model_cfg = ctx.build(ModelConfig, {"name": spec["name"], **spec["params"]})
    why = model_cfg.hf_unsupported() if hasattr(model_cfg, "hf_unsupported") else \
        [f"hf_export knows the llama family only, not {spec['name']!r}"]
    if why:
        raise StageError("hf_export: LlamaForCausalLM cannot hold this model: " + "; ".join(why))
    model = build_model(spec, ctx.build)
    load_weights(model, str(checkpoint_weights_path(ckpt.path)))
    model.eval()
    tokenizer = load_tokenizer(tok_art.path)
    if spec["vocab_size"] < tokenizer.vocab_size:
        raise StageError(
            f"hf_export: the checkpoint's vocab_size={spec['vocab_size']} is smaller than the "
            f"tokenizer's vocab_size={tokenizer.vocab_size}; was the model trained with this "
            "tokenizer?")

    config = hf_config(spec, tokenizer, dtype, model_cfg)
    config.save_pretrained(out)
    chat_end = ckpt.meta.get("chat_end_id")  # a chat model's turn ends at <|im_end|>
    eos = [config.eos_token_id, int(chat_end)] if isinstance(chat_end, int) else config.eos_token_id
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(out)
    weights = hf_state_dict(model, config.tie_word_embeddings, getattr(torch, dtype))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; this is for sharing
    ctx.progress(1, 3, "parts")

    tok_hf = hf_tokenizer(tok_art.path, spec["max_seq_len"])
    template = ckpt.meta.get("chat_template")  # a post-trained (sft/dpo) checkpoint's
    if isinstance(template, str) and template:
        tok_hf.chat_template = template  # -> tokenizer_config.json: apply_chat_template
    tok_hf.save_pretrained(out)
    info = getattr(tokenizer, "info", {})
    if info.get("format", "sentencepiece") == "sentencepiece":
        if info.get("model_type", "bpe") != "bpe":
            ctx.log("the tokenizer is a SentencePiece unigram model: the Hugging Face "
                    "tokenizer can split a few runs of equal-score pieces (long whitespace) "
                    "differently")
        shutil.copy2(Path(tok_art.path) / "tokenizer.model", out / "tokenizer.model")
    native = out / NATIVE_DIR
    native.mkdir()
    shutil.copy2(Path(ckpt.path) / "model.json", native / "model.json")
    own_files = {info.get("model_file"), info.get("tokenizer_file")}  # named in tokenizer.json
    for f in sorted(Path(tok_art.path).iterdir()):
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in own_files):
            shutil.copy2(f, native / f.name)
    ctx.progress(2, 3, "parts")

    if verify:
        ctx.meta["verified"] = verify_export(model, out, tokenizer, dtype, spec["max_seq_len"])
        ctx.log(f"verified: transformers' logits equal ours within "
                f"{ctx.meta['verified']['max_abs_logit_diff']:.2g} on a fixed batch")
    if sample_prompts:
        samples = generation_samples(out, sample_prompts, sample_max_new_tokens)
        (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    num_params = sum(t.numel() for t in weights.values())
    (out / "README.md").write_text(model_card(spec, config, num_params, dtype, ckpt, tok_art))
    ctx.progress(3, 3, "parts")
    ctx.metrics.update({"num_params": num_params,
                        "num_bytes": (out / "model.safetensors").stat().st_size})
    ctx.metrics.update({f"training/{k}": v for k, v in sorted(_facts(ckpt, run=True).items())})
    ctx.meta.update({"format": "huggingface", "architecture": "LlamaForCausalLM",
                     "dtype": dtype, "num_params": num_params,
                     "vocab_size": spec["vocab_size"], "max_seq_len": spec["max_seq_len"]})
    ctx.log(f"LlamaForCausalLM, {num_params / 1e6:.2f}M parameters ({dtype}) -> {out}")


# facts of one training attempt, not of the model: they stay out of the card (the same
# fingerprint gives the same bytes), in the export's manifest metrics instead
RUN_FACTS = ("seconds", "tokens_per_second", "mfu", "peak_tflops", "resumed_from_step")


def _run_fact(key: str) -> bool:
    return key in RUN_FACTS or key.endswith(("_seconds", "_per_second"))


def _facts(artifact: Any, run: bool = False) -> dict[str, Any]:
    """The checkpoint's numbers (manifest metrics, then meta): those of the model, or with
    ``run`` those of the attempt that trained it (timings, speed, where it resumed)."""
    facts = {}
    for group in (artifact.manifest.get("metrics", {}), artifact.meta):
        for key, value in group.items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) \
                    and _run_fact(key) == run:
                facts.setdefault(key, value)
    return facts


def model_card(spec: dict[str, Any], config: Any, num_params: int, dtype: str,
               ckpt: Any, tok: Any) -> str:
    p = spec["params"]
    rows = [("parameters", f"{num_params:,}"), ("layers", p["n_layers"]),
            ("hidden size", p["dim"]), ("attention heads", p["n_heads"]),
            ("key/value heads", config.num_key_value_heads),
            ("feed-forward size", config.intermediate_size), ("vocabulary", spec["vocab_size"]),
            ("context", spec["max_seq_len"]), ("tied embeddings", config.tie_word_embeddings),
            ("rope theta", config.rope_theta), ("dtype", dtype)]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [recipe-engine, llama, code]", "---", "",
             "# Llama-style model trained with recipe-engine", "",
             "A decoder-only model (RoPE, RMSNorm, SwiGLU, grouped-query attention) trained from",
             "scratch by a recipe-engine recipe; a `LlamaForCausalLM` for transformers.", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    training = _facts(ckpt)
    if training:
        lines += ["## Training", "", "From the checkpoint's manifest:", "", "| | |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in sorted(training.items())], ""]
    lines += [
        "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)  # prepends <s>, as in training",
        "model = AutoModelForCausalLM.from_pretrained(path)", "```", "",
        "```", "lm_eval --model hf --model_args pretrained=PATH --tasks ...", "```", "",
        _tokenizer_sentence(tok),
        "Unicode text round-trip exactly. `recipe_engine/` holds the recipe-engine model config",
        "and tokenizer files (`recipe_engine_plugins.export.hf.load_export(path)`).", "",
    ]
    return "\n".join(lines)


def _tokenizer_sentence(tok: Any) -> str:
    info = {}
    info_file = Path(tok.path) / "tokenizer.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
    if info.get("format") == "hf_tokenizers":
        return "The tokenizer is byte-level BPE (Hugging Face tokenizers); whitespace, newlines and any"
    kind = "unigram" if info.get("model_type") == "unigram" else "BPE"
    return f"The tokenizer is SentencePiece {kind} with byte fallback; whitespace, newlines and any"


def load_export(directory: Path, build: Callable[[Any, Any], Any] | None = None
                ) -> tuple[torch.nn.Module, Any]:
    """Our model and runtime tokenizer from an export directory (HF weights, renamed back)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec = read_model_spec(directory / NATIVE_DIR)
    model = build_model(spec, build)
    state = {from_hf_name(k): v.float() for k, v in
             load_file(str(directory / "model.safetensors")).items()}
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval(), load_tokenizer(directory / NATIVE_DIR)
