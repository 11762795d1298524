"""Writing (and reading back) a Hugging Face ``LlamaForCausalLM`` directory.

The conversions live beside what they convert: the model component's ``to_hf`` gives the
transformers model (``plugins/models/hf.py`` for ``llama``), the runtime tokenizer's
``hf_tokenizer`` the fast tokenizer with the same ids (``recipe_engine/tokenizer.py`` for
SentencePiece, ``hf_byte_bpe``'s module for its format). The ``lm_eval`` stage scores the
same two objects with lm-eval's ``HFLM``; this stage saves them and checks what it saved.

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
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from recipe_engine import ModelConfig, StageContext, StageError
from recipe_engine.artifacts import (EXPORT_NATIVE_DIR, checkpoint_weights_path, load_tokenizer,
                                     read_model_spec)

NATIVE_DIR = EXPORT_NATIVE_DIR


def hf_tokenizer(tokenizer_dir: Path, max_length: int) -> Any:
    """The ``PreTrainedTokenizerFast`` of a tokenizer artifact (its runtime's
    ``hf_tokenizer``)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        return tokenizer.hf_tokenizer(max_length)
    except NotImplementedError as e:
        raise StageError(f"hf_export: {e}") from e


def model_config(spec: dict[str, Any], build: Callable[[Any, Any], Any] | None = None
                 ) -> ModelConfig:
    """The model component of a model spec (``model.json``). ``build``: a stage's
    ``ctx.build``; by default the installed plugins' registry."""
    if build is None:
        from recipe_engine import PluginManager

        build = PluginManager().registry.build
    return build(ModelConfig, {"name": spec["name"], **spec["params"]})


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
    from transformers import GenerationConfig

    ckpt, tok_art = ctx.inputs["checkpoint"], ctx.inputs["tokenizer"]
    out = Path(ctx.output)
    spec = read_model_spec(ckpt.path)
    cfg = model_config(spec, ctx.build)
    model = cfg.build(spec["vocab_size"], spec["max_seq_len"])
    load_weights(model, str(checkpoint_weights_path(ckpt.path)))
    model.eval()
    tokenizer = load_tokenizer(tok_art.path)
    if spec["vocab_size"] < tokenizer.vocab_size:
        raise StageError(
            f"hf_export: the checkpoint's vocab_size={spec['vocab_size']} is smaller than the "
            f"tokenizer's vocab_size={tokenizer.vocab_size}; was the model trained with this "
            "tokenizer?")
    try:
        hf = cfg.to_hf(model, spec["vocab_size"], spec["max_seq_len"], bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, dtype=dtype,
                       device="cpu")
        tok_hf = tokenizer.hf_tokenizer(spec["max_seq_len"])
    except (NotImplementedError, ValueError) as e:
        raise StageError(f"hf_export: {e}") from e

    config = hf.config
    hf.save_pretrained(out)  # config.json, model.safetensors
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; this is for sharing
    chat_end = ckpt.meta.get("chat_end_id")  # a chat model's turn ends at <|im_end|>
    eos = [config.eos_token_id, int(chat_end)] if isinstance(chat_end, int) else config.eos_token_id
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(out)
    num_params = sum(p.numel() for p in hf.parameters())  # a tied head counted once
    del hf
    ctx.progress(1, 3, "parts")

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
    """Our model and runtime tokenizer from an export directory (its HF weights, through the
    model component's ``from_hf``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec = read_model_spec(directory / NATIVE_DIR)
    state = load_file(str(directory / "model.safetensors"))
    model = model_config(spec, build).from_hf(state, spec["vocab_size"], spec["max_seq_len"])
    return model, load_tokenizer(directory / NATIVE_DIR)
