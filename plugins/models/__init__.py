"""Model architectures (kind ``model``). A model component is a config: its fields are the
recipe's ``model:`` group; ``build(vocab_size)`` makes the ``nn.Module`` (torch imported
late). The vocabulary size is never written in a recipe: it flows from the tokenizer.

``save_model`` / ``load_model`` write and read a ``checkpoint`` artifact with torch (the
layout is ``recipe_engine.artifacts``'; other plugins read it through that module).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from recipe_engine import ModelConfig, Problems, hookimpl
from recipe_engine.artifacts import (WEIGHTS_FILE, checkpoint_weights_path, read_model_spec,
                                     write_model_spec)


@dataclass(kw_only=True)
class Llama(ModelConfig,
            name="llama",
            version="1",
            description="Llama-style decoder (RoPE, RMSNorm, SwiGLU, GQA)"):
    """Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, causal SDPA."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention)
    ffn_hidden_dim: int = 0  # 0: Llama's rule, 8/3 * dim rounded up to multiple_of
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def check(self, problems: Problems) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            problems.add("dim", f"{self.dim} is not divisible by n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.add("dim", f"dim / n_heads = {self.dim // self.n_heads} must be even for "
                         "rotary embeddings")
        if self.n_heads % kv:
            problems.add("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def args(self, vocab_size: int, max_seq_len: int) -> dict[str, Any]:
        return dict(
            vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.kv_heads, ffn_hidden_dim=self.hidden_dim, norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, max_seq_len=max_seq_len,
            tie_embeddings=self.tie_embeddings, init_std=self.init_std,
        )

    def build(self, vocab_size: int, max_seq_len: int) -> Any:
        from .llama_model import LlamaArgs, LlamaModel

        return LlamaModel(LlamaArgs(**self.args(vocab_size, max_seq_len)))

    def num_params(self, vocab_size: int, embeddings: bool = True) -> int:
        head_dim = self.dim // self.n_heads
        attn = self.dim * head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        body = self.n_layers * per_layer + self.dim
        if not embeddings:
            return body
        emb = vocab_size * self.dim
        return body + (emb if self.tie_embeddings else 2 * emb)

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        # 6 * (non-embedding params + LM head) + attention scores (PaLM appendix B)
        matmul_params = self.num_params(vocab_size, embeddings=False) + vocab_size * self.dim
        return 6.0 * matmul_params + 6.0 * self.n_layers * self.dim * seq_len


def save_model(module: Any, config: ModelConfig, vocab_size: int, max_seq_len: int,
               directory: Path) -> None:
    """Write a ``checkpoint`` artifact: ``model.safetensors`` and ``model.json`` (the layout
    in ``recipe_engine.artifacts``)."""
    from safetensors.torch import save_model as save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(module, str(directory / WEIGHTS_FILE))
    write_model_spec(directory, config.name, config.params(), vocab_size, max_seq_len)


def load_model(directory: Path, build: Callable[[Any, Any], Any] | None = None) -> Any:
    """Rebuild the module a checkpoint artifact holds (eval mode, fp32, CPU). ``build``: a
    stage's ``ctx.build``; by default the installed plugins' registry."""
    from safetensors.torch import load_model as load_weights

    spec = read_model_spec(directory)
    if build is None:
        from recipe_engine import PluginManager

        build = PluginManager().registry.build
    config = build(ModelConfig, {"name": spec["name"], **spec["params"]})
    module = config.build(spec["vocab_size"], spec["max_seq_len"])
    load_weights(module, str(checkpoint_weights_path(directory)))
    return module.eval()


@hookimpl
def recipe_components():
    return [Llama]
