"""Model architectures (kind ``model``). A model component is a config: its fields are the
recipe's ``model:`` group; ``build(vocab_size)`` makes the ``nn.Module`` (torch imported
late). The vocabulary size is never written in a recipe: it flows from the tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from recipe_engine import Component, RecipeError, hookimpl


@dataclass(kw_only=True)
class ModelConfig(Component):
    """Base for architectures: what the trainer, planner and exporter ask of a model."""

    kind: ClassVar[str] = "model"

    def build(self, vocab_size: int, max_seq_len: int) -> Any:
        raise NotImplementedError

    def num_params(self, vocab_size: int, embeddings: bool = True) -> int:
        raise NotImplementedError

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward)."""
        raise NotImplementedError


@dataclass(kw_only=True)
class Llama(ModelConfig):
    """Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, causal SDPA."""

    name: ClassVar[str] = "llama"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "Llama-style decoder (RoPE, RMSNorm, SwiGLU, GQA)"

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

    def __post_init__(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append("dim / n_heads must be even for rotary embeddings")
        if self.n_heads % kv:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        if problems:
            raise RecipeError("; ".join(problems))

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
    """Write ``model.safetensors`` and ``model.json`` (architecture name + full params)."""
    from safetensors.torch import save_model as save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(module, str(directory / "model.safetensors"))
    spec = {"name": config.name, "params": config.params(), "vocab_size": vocab_size,
            "max_seq_len": max_seq_len}
    (directory / "model.json").write_text(json.dumps(spec, indent=2))


def load_model(directory: Path, registry: Any = None) -> Any:
    """Rebuild the module a checkpoint artifact holds (eval mode, fp32, CPU)."""
    from safetensors.torch import load_model as load_weights

    directory = Path(directory)
    spec = json.loads((directory / "model.json").read_text())
    if registry is None:
        from recipe_engine.plugins import PluginManager

        registry = PluginManager().registry
    config = registry.build("model", {"name": spec["name"], **spec["params"]})
    module = config.build(spec["vocab_size"], spec["max_seq_len"])
    load_weights(module, str(directory / "model.safetensors"))
    return module.eval()


@hookimpl
def recipe_components():
    return [Llama]
