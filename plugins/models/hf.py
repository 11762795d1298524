"""The ``llama`` module as a Hugging Face ``LlamaForCausalLM``, and back.

Our Llama uses HF's conventions (rotate-half RoPE, KV heads repeated contiguously), so the
weights only change names. ``Llama.to_hf`` / ``Llama.from_hf`` call ``to_hf`` / ``from_hf``
here; ``hf_export`` saves what ``to_hf`` gives, and ``lm_eval`` scores it with lm-eval's
``HFLM``. Imported inside those methods (it imports torch and transformers).
"""
from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from . import Llama

_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_OURS = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_THEIRS = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def to_hf_name(name: str) -> str:
    """Our weight name -> ``LlamaForCausalLM``'s."""
    if name in _TOP:
        return _TOP[name]
    m = _OURS.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    raise ValueError(f"no Hugging Face name for weight {name!r}")


def from_hf_name(name: str) -> str:
    """``LlamaForCausalLM``'s weight name -> ours."""
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    m = _THEIRS.match(name)
    inverse = {v: k for k, v in _LAYER.items()}
    if m and m.group(2) in inverse:
        return f"layers.{m.group(1)}.{inverse[m.group(2)]}.weight"
    raise ValueError(f"not a LlamaForCausalLM weight: {name!r}")


def hf_config(cfg: Llama, vocab_size: int, max_seq_len: int, bos_id: int, eos_id: int,
              pad_id: int, dtype: str) -> Any:
    """The ``LlamaConfig`` of the module ``cfg.build(vocab_size, max_seq_len)`` makes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=max_seq_len, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.hf_rope_scaling(), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id if bos_id >= 0 else None, eos_token_id=eos_id if eos_id >= 0 else None,
        pad_token_id=pad_id if pad_id >= 0 else None,
        torch_dtype=dtype, architectures=["LlamaForCausalLM"],
    )


def hf_state_dict(module: torch.nn.Module, tied: bool, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Our module's weights under ``LlamaForCausalLM``'s names, as ``dtype`` on ``device``
    (a tied output head is left out: transformers ties ``lm_head`` to ``embed_tokens``)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if tied and name == "output.weight":
            continue
        out[to_hf_name(name)] = tensor.detach().to(dtype=dtype, device=device).contiguous()
    return out


def _skipped_init() -> Any:
    """transformers' context that skips the random initialisation of a model whose every
    weight is loaded next (its location moved between releases); else none."""
    for where in ("transformers.modeling_utils", "transformers.initialization"):
        try:
            module = __import__(where, fromlist=["no_init_weights"])
            return module.no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def to_hf(cfg: Llama, module: torch.nn.Module, vocab_size: int, max_seq_len: int, *,
          bos_id: int = -1, eos_id: int = -1, pad_id: int = -1, dtype: str = "float32",
          device: Any = None) -> Any:
    """A ``LlamaForCausalLM`` (eval mode) holding a copy of ``module``'s weights."""
    from transformers import LlamaForCausalLM

    why = cfg.hf_unsupported()
    if why:
        raise ValueError("LlamaForCausalLM cannot hold this model: " + "; ".join(why))
    if device is None:
        device = next(module.parameters()).device
    config = hf_config(cfg, vocab_size, max_seq_len, bos_id, eos_id, pad_id, dtype)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device), _skipped_init():
        hf = LlamaForCausalLM(config)
    hf.to(torch_dtype)
    state = hf_state_dict(module, config.tie_word_embeddings, torch_dtype, device)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied_head = ["lm_head.weight"] if config.tie_word_embeddings else []
    if unexpected or sorted(missing) != tied_head:
        raise ValueError(f"LlamaForCausalLM does not match the module: missing {missing}, "
                         f"unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def from_hf(cfg: Llama, state: dict[str, torch.Tensor], vocab_size: int, max_seq_len: int
            ) -> torch.nn.Module:
    """Our module (fp32, eval mode) from a ``LlamaForCausalLM`` state dict."""
    module = cfg.build(vocab_size, max_seq_len)
    ours = {from_hf_name(k): v.float() for k, v in state.items()}
    if "output.weight" not in ours and cfg.tie_embeddings:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    module.load_state_dict(ours, strict=True)
    return module.eval()
