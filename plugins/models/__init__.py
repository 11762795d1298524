"""Model architectures (kind ``model``). A model component is a config: its fields are the
recipe's ``model:`` group; ``build(vocab_size)`` makes the ``nn.Module`` (torch imported
late). The vocabulary size is never written in a recipe: it flows from the tokenizer.

``save_model`` / ``load_model`` write and read a ``checkpoint`` artifact with torch (the
layout is ``recipe_engine.artifacts``'; other plugins read it through that module).

Counting conventions (``num_params``, ``flops_per_token``), for the planner and MFU:

* ``num_params(vocab, embeddings=True)`` is exactly ``sum(p.numel() for p in
  module.parameters())`` of the built module (a tied output head counted once);
  ``embeddings=False`` leaves out the token embedding and the output head.
* ``flops_per_token(vocab, seq_len)`` = ``6 * N_active + 6 * n_layers * dim * seq_len``:
  ``N_active`` the weights every token multiplies (non-embedding parameters plus the output
  head, which is a matmul even when tied; for a mixture of experts the router and the
  ``top_k`` experts a token goes to, not all of them); 6 = 2 (multiply-add) x 3 (forward,
  and backward twice as expensive). The attention term is PaLM's ``12 * n_layers * dim *
  seq_len`` (Chowdhery et al. 2022, appendix B; Chinchilla's appendix F counts the same
  matmuls) halved, because causal attention needs only the lower triangle of the score and
  value products (what FlashAttention and the memory-efficient kernels compute). Norms,
  softmax, RoPE and routing arithmetic are left out, as in both papers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

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
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention); 1: multi-query
    ffn_hidden_dim: int = 0  # 0: 8/3 * dim (SwiGLU) or 4 * dim (GELU), rounded up to multiple_of
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    position_embedding: Literal["rope", "alibi"] = "rope"
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_seq_len: int = 8192
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    qk_norm: bool = False
    init: Literal["scaled_normal", "normal", "trunc_normal", "depth_scaled"] = "scaled_normal"
    document_masking: bool = False

    def check(self, problems: Problems) -> None:
        for key in ("dim", "n_layers", "n_heads"):
            problems.require(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")
        problems.require(self.n_kv_heads >= 0, "n_kv_heads",
                         f"must be >= 0 (0: as many as n_heads), got {self.n_kv_heads}")
        problems.require(self.ffn_hidden_dim >= 0, "ffn_hidden_dim",
                         f"must be >= 0 (0: the automatic width), got {self.ffn_hidden_dim}")
        problems.require(self.multiple_of >= 1, "multiple_of", f"must be at least 1, got {self.multiple_of}")
        problems.require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        problems.require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        if self.n_heads < 1 or self.n_kv_heads < 0:
            return
        kv = self.kv_heads
        if self.dim % self.n_heads:
            problems.add("dim", f"{self.dim} is not divisible by n_heads={self.n_heads}")
        elif self.position_embedding == "rope" and (self.dim // self.n_heads) % 2:
            problems.add("dim", f"dim / n_heads = {self.dim // self.n_heads} must be even for "
                         "rotary embeddings")
        if self.n_heads % kv:
            problems.add("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        self._check_positions(problems)

    def _check_positions(self, problems: Problems) -> None:
        problems.require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.position_embedding == "alibi":
            for key, default in (("rope_theta", 10000.0), ("rope_scaling", "none")):
                problems.require(getattr(self, key) == default, key,
                                 f"applies to RoPE only, not to position_embedding: alibi; "
                                 f"leave it at its default ({default})")
            return
        if self.rope_scaling == "none":
            problems.require(self.rope_scaling_factor == 1.0, "rope_scaling_factor",
                             "has no effect with rope_scaling: none; set rope_scaling: linear "
                             "or llama3, or leave the factor at 1.0")
            return
        problems.require(self.rope_scaling_factor >= 1.0, "rope_scaling_factor",
                         f"must be >= 1 (how many times the context is stretched), got "
                         f"{self.rope_scaling_factor}")
        if self.rope_scaling == "llama3":
            problems.require(self.rope_original_max_seq_len >= 1, "rope_original_max_seq_len",
                             f"must be at least 1, got {self.rope_original_max_seq_len}")
            problems.require(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                             "rope_low_freq_factor",
                             f"must be > 0 and below rope_high_freq_factor="
                             f"{self.rope_high_freq_factor}, got {self.rope_low_freq_factor}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = 4 * self.dim if self.mlp == "gelu" else int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def args(self, vocab_size: int, max_seq_len: int, bos_id: int | None = None) -> dict[str, Any]:
        return dict(
            vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.kv_heads, ffn_hidden_dim=self.hidden_dim, norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, max_seq_len=max_seq_len,
            tie_embeddings=self.tie_embeddings, init_std=self.init_std,
            position_embedding=self.position_embedding, rope_scaling=self.rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
            rope_original_max_seq_len=self.rope_original_max_seq_len,
            rope_low_freq_factor=self.rope_low_freq_factor,
            rope_high_freq_factor=self.rope_high_freq_factor, mlp=self.mlp, norm=self.norm,
            qk_norm=self.qk_norm, init=self.init, document_masking=self.document_masking,
            bos_id=bos_id,
        )

    def build(self, vocab_size: int, max_seq_len: int, bos_id: int | None = None) -> Any:
        """The module. ``bos_id``: the token that starts every document of the packed
        sequences (``document_masking`` needs it to find the documents; a module built
        without it attends causally over the whole sequence, which is the same for inputs
        holding one document from position 0, as evaluation feeds them)."""
        from .llama_model import LlamaArgs, LlamaModel

        return LlamaModel(LlamaArgs(**self.args(vocab_size, max_seq_len, bos_id)))

    # -- counting ---------------------------------------------------------------------------

    def _norm_params(self, dim: int) -> int:
        return dim * (2 if self.norm == "layernorm" else 1)

    def _attention_params(self) -> int:
        qk_norm = 2 * self._norm_params(self.head_dim) if self.qk_norm else 0
        return self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads) + qk_norm

    def _mlp_params(self) -> int:
        return (3 if self.mlp == "swiglu" else 2) * self.dim * self.hidden_dim

    def _ffn_params(self, active: bool) -> int:
        """Feed-forward weights of one layer (all of them, or those one token uses)."""
        return self._mlp_params()

    def _body_params(self, active: bool = False) -> int:
        per_layer = (self._attention_params() + self._ffn_params(active)
                     + 2 * self._norm_params(self.dim))
        return self.n_layers * per_layer + self._norm_params(self.dim)

    def num_params(self, vocab_size: int, embeddings: bool = True) -> int:
        body = self._body_params()
        if not embeddings:
            return body
        emb = vocab_size * self.dim
        return body + (emb if self.tie_embeddings else 2 * emb)

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (active non-embedding params + LM head) plus causal
        attention, ``6 * n_layers * dim * seq_len`` (the module docstring says why)."""
        matmul_params = self._body_params(active=True) + vocab_size * self.dim
        return 6.0 * matmul_params + 6.0 * self.n_layers * self.dim * seq_len

    # -- Hugging Face ------------------------------------------------------------------------

    def hf_unsupported(self) -> list[str]:
        """Why ``LlamaForCausalLM`` cannot hold this architecture (empty: it can). Untied
        embeddings, GQA/MQA, RoPE theta and scaling, the initialisation and document masking
        (a training-time mask; evaluation feeds one document at a time) all export."""
        out = []
        if self.position_embedding != "rope":
            out.append(f"position_embedding: {self.position_embedding} (LlamaForCausalLM has RoPE only)")
        if self.mlp != "swiglu":
            out.append(f"mlp: {self.mlp} (LlamaForCausalLM has a gated SiLU MLP only)")
        if self.norm != "rmsnorm":
            out.append(f"norm: {self.norm} (LlamaForCausalLM has RMSNorm only)")
        if self.qk_norm:
            out.append("qk_norm: true (LlamaForCausalLM has no query/key norm)")
        return out

    def to_hf(self, module: Any, vocab_size: int, max_seq_len: int, *, bos_id: int = -1,
              eos_id: int = -1, pad_id: int = -1, dtype: str = "float32",
              device: Any = None) -> Any:
        """A ``LlamaForCausalLM`` holding a copy of ``module``'s weights (``hf.py``); a
        ``ValueError`` with ``hf_unsupported``'s reasons when it cannot hold this model."""
        from .hf import to_hf

        return to_hf(self, module, vocab_size, max_seq_len, bos_id=bos_id, eos_id=eos_id,
                     pad_id=pad_id, dtype=dtype, device=device)

    def from_hf(self, state: dict[str, Any], vocab_size: int, max_seq_len: int) -> Any:
        from .hf import from_hf

        return from_hf(self, state, vocab_size, max_seq_len)

    def hf_rope_scaling(self) -> dict[str, Any] | None:
        """``LlamaConfig.rope_scaling`` for this model's RoPE scaling (``None``: none)."""
        if self.position_embedding != "rope" or self.rope_scaling == "none":
            return None
        if self.rope_scaling == "linear":
            return {"rope_type": "linear", "factor": float(self.rope_scaling_factor)}
        return {"rope_type": "llama3", "factor": float(self.rope_scaling_factor),
                "low_freq_factor": float(self.rope_low_freq_factor),
                "high_freq_factor": float(self.rope_high_freq_factor),
                "original_max_position_embeddings": int(self.rope_original_max_seq_len)}


@dataclass(kw_only=True)
class LlamaMoE(Llama,
               name="llama_moe",
               version="1",
               description="Llama-style decoder with mixture-of-experts feed-forward layers"):
    """The ``llama`` decoder with every feed-forward layer a mixture of experts: top-k
    routing and a load-balancing loss (Switch / Mixtral)."""

    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 0.0  # 0: dropless
    aux_loss_coef: float = 0.01

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.require(self.num_experts >= 2, "num_experts",
                         f"must be at least 2 (one expert is the dense llama), got {self.num_experts}")
        problems.require(1 <= self.top_k <= max(self.num_experts, 1), "top_k",
                         f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        problems.require(self.capacity_factor >= 0, "capacity_factor",
                         f"must be >= 0 (0: dropless), got {self.capacity_factor}")
        problems.require(self.aux_loss_coef >= 0, "aux_loss_coef",
                         f"must be >= 0, got {self.aux_loss_coef}")

    def args(self, vocab_size: int, max_seq_len: int, bos_id: int | None = None) -> dict[str, Any]:
        return dict(super().args(vocab_size, max_seq_len, bos_id), num_experts=self.num_experts,
                    top_k=self.top_k, capacity_factor=self.capacity_factor,
                    aux_loss_coef=self.aux_loss_coef)

    def _ffn_params(self, active: bool) -> int:
        router = self.dim * self.num_experts
        return router + (self.top_k if active else self.num_experts) * self._mlp_params()

    def hf_unsupported(self) -> list[str]:
        return [*super().hf_unsupported(),
                "a mixture of experts (LlamaForCausalLM is dense; llama_moe does not export)"]


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
    return [Llama, LlamaMoE]
