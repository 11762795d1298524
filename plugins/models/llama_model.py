"""A Llama-style decoder: RMSNorm, rotary position embeddings, grouped-query attention with
causal SDPA, SwiGLU feed-forward. Plain ``nn.Module``; parallelism wraps it from outside.

Conventions match Hugging Face's ``LlamaForCausalLM`` (rotate-half RoPE, KV heads repeated
contiguously), so export is a renaming of weights, not a permutation.

Options, each off by default (the defaults build exactly the model above): RoPE scaling
(linear position interpolation, Llama 3's), ALiBi instead of RoPE, GELU MLP, LayerNorm,
per-head QK-norm, other initialisation schemes, a block-diagonal causal mask that keeps
attention inside a document of a packed sequence, and mixture-of-experts feed-forward layers
(``moe.py``).

Attention is ``F.scaled_dot_product_attention``. Plain causal attention (``is_causal=True``,
no mask tensor) lets it pick FlashAttention on GPU; an explicit mask (document masking, or
ALiBi's additive bias) rules flash out, and SDPA falls back to the memory-efficient kernel
(on GPU) or the math path (on CPU), materialising one ``(batch, 1 or heads, seq, seq)`` mask
per forward, shared by every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    init_std: float = 0.02
    position_embedding: str = "rope"  # "rope" | "alibi"
    rope_scaling: str = "none"  # "none" | "linear" | "llama3"
    rope_scaling_factor: float = 1.0
    rope_original_max_seq_len: int = 8192  # llama3 scaling: the context it was trained for
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    qk_norm: bool = False
    init: str = "scaled_normal"  # "scaled_normal" | "normal" | "trunc_normal" | "depth_scaled"
    document_masking: bool = False
    bos_id: int | None = None  # where documents start (document_masking); from the tokenizer
    num_experts: int = 0  # 0: dense feed-forward; otherwise a mixture of experts
    top_k: int = 2
    capacity_factor: float = 0.0  # 0: dropless
    aux_loss_coef: float = 0.01


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """RMSNorm (a gain), or LayerNorm (a gain and a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    return RMSNorm(dim, eps)


def rope_frequencies(head_dim: int, args: LlamaArgs) -> torch.Tensor:
    """RoPE's inverse frequencies, after ``args.rope_scaling``:

    * ``linear``: position interpolation (Chen et al. 2023): every frequency divided by
      ``rope_scaling_factor``, i.e. positions squeezed by that factor;
    * ``llama3``: Llama 3.1's rule: wavelengths shorter than ``rope_original_max_seq_len /
      rope_high_freq_factor`` kept, longer than ``rope_original_max_seq_len /
      rope_low_freq_factor`` divided by the factor, and a linear blend in between.
    """
    theta = args.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = args.rope_scaling_factor
    if args.rope_scaling == "linear":
        inv_freq = inv_freq / factor
    elif args.rope_scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
        # 1 for short wavelengths (kept), 0 for long ones (scaled), a ramp in between
        smooth = ((args.rope_original_max_seq_len / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_tables(head_dim: int, max_seq_len: int, args: LlamaArgs
                ) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, rope_frequencies(head_dim, args))
    emb = torch.cat([freqs, freqs], dim=-1)  # (seq, head_dim), rotate-half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim) or (batch, 1, seq, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): for ``n`` heads, a power of two, the
    geometric sequence ``2^(-8/n), 2^(-16/n), ..., 2^-8``; otherwise those of the largest
    power of two ``m < n``, then every other slope of ``2m`` heads' sequence."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    m = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(m)
    if m < n_heads:
        slopes += geometric(2 * m)[0::2][:n_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq: int) -> torch.Tensor:
    """``(heads, seq, seq)`` additive bias: ``-slope_h * (i - j)`` for key ``j <= i`` of query
    ``i``, ``-inf`` above the diagonal (causal)."""
    pos = torch.arange(seq, device=slopes.device)
    distance = (pos[:, None] - pos[None, :]).to(torch.float32)
    bias = -slopes[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        if args.qk_norm:  # per head, over head_dim (OLMo 2 / Qwen 3 style), before RoPE
            self.q_norm = make_norm(args.norm, self.head_dim, args.norm_eps)
            self.k_norm = make_norm(args.norm, self.head_dim, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # heads counted from the projections' outputs: under tensor parallelism each rank
        # holds its share of the heads (wq/wk/wv split column-wise), not n_heads
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads  # the same ratio in every rank's share
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:  # plain causal: flash attention on GPU
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # boolean (True: attend) or additive float mask; causality is in the mask
            if mask.is_floating_point():
                mask = mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluFeedForward(nn.Module):
    """The GPT-2 MLP: up, GELU, down (two matrices, no gate)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attention_norm = make_norm(args.norm, args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = make_norm(args.norm, args.dim, args.norm_eps)
        self.moe = bool(args.num_experts)
        if self.moe:
            from .moe import MoEFeedForward

            self.feed_forward: nn.Module = MoEFeedForward(
                args.dim, args.ffn_hidden_dim, args.num_experts, args.top_k,
                args.capacity_factor, args.aux_loss_coef, args.mlp)
        elif args.mlp == "gelu":
            self.feed_forward = GeluFeedForward(args.dim, args.ffn_hidden_dim)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> Any:
        """The block's output; with mixture-of-experts, ``(output, aux_loss)``: the loss is
        returned, not only left on the layer, so that it keeps its gradient when the block
        is wrapped in (reentrant) activation checkpointing, which runs the first forward
        without autograd and differentiates only the block's outputs."""
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        if self.moe:
            x = x + self.feed_forward(self.ffn_norm(x))
            return x, self.feed_forward.aux_loss
        return x + self.feed_forward(self.ffn_norm(x))


# weights whose output is added to the residual stream: scaled-down initialisation
_RESIDUAL_OUT = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w2")


class LlamaModel(nn.Module):
    """``forward(input_ids) -> logits`` (float32, ``(batch, seq, vocab)``). With mixture-of-
    experts layers, ``aux_loss`` holds the last forward's load-balancing loss (already
    multiplied by ``aux_loss_coef``, summed over layers), for the trainer to add to the
    language-model loss; ``None`` for a dense model."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        assert args.dim % args.n_heads == 0 and args.n_heads % args.n_kv_heads == 0
        self.args = args
        self.aux_loss: torch.Tensor | None = None
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = make_norm(args.norm, args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        head_dim = args.dim // args.n_heads
        if args.position_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(args.n_heads), persistent=False)
        else:
            cos, sin = rope_tables(head_dim, args.max_seq_len, args)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``init``: ``scaled_normal`` N(0, init_std), residual-branch outputs (attention
        ``wo``, feed-forward ``w2``) N(0, init_std / sqrt(2 n_layers)) (GPT-2 / OLMo
        practice); ``trunc_normal`` the same, truncated at 3 standard deviations (OLMo 2);
        ``depth_scaled`` the outputs of layer ``l`` (from 0) N(0, init_std / sqrt(2 (l + 1)))
        (torchtitan's depth init); ``normal`` N(0, init_std) everywhere. Norm gains 1,
        biases 0."""
        std, scheme = self.args.init_std, self.args.init
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = std
                if name.endswith(_RESIDUAL_OUT) and scheme != "normal":
                    if scheme == "depth_scaled":
                        s = std / math.sqrt(2 * (int(name.split(".")[1]) + 1))
                    else:
                        s = out_std
                if scheme == "trunc_normal":
                    nn.init.trunc_normal_(p, mean=0.0, std=s, a=-3 * s, b=3 * s)
                else:
                    nn.init.normal_(p, mean=0.0, std=s)

    def _document_layout(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions restarting at every ``bos_id`` and the ``(batch, 1, seq, seq)`` boolean
        mask letting token ``i`` attend to ``j <= i`` of the same document. Tokens before
        the first ``bos`` (a document carried over from the previous sequence) are one
        document, from position 0."""
        seq = input_ids.shape[1]
        is_start = input_ids == self.args.bos_id
        idx = torch.arange(seq, device=input_ids.device)
        segment = is_start.cumsum(dim=1)
        start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
        positions = idx - start
        causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
        mask = (segment[:, :, None] == segment[:, None, :]) & causal
        return positions, mask[:, None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        if seq > self.args.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(input_ids)
        positions = mask = None
        if self.args.document_masking and self.args.bos_id is not None:
            positions, mask = self._document_layout(input_ids)
        cos = sin = None
        if self.args.position_embedding == "alibi":
            bias = alibi_bias(self.alibi_slopes, seq)[None]  # (1, heads, seq, seq)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        elif positions is None:
            cos = self.rope_cos[:seq].to(dtype=torch.float32).to(h.dtype)
            sin = self.rope_sin[:seq].to(dtype=torch.float32).to(h.dtype)
        else:
            cos = self.rope_cos[positions].unsqueeze(1).to(h.dtype)  # (batch, 1, seq, head_dim)
            sin = self.rope_sin[positions].unsqueeze(1).to(h.dtype)
        aux_losses = []
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
            if self.args.num_experts:
                h, aux = h
                aux_losses.append(aux)
        if aux_losses:
            self.aux_loss = torch.stack(aux_losses).sum()
        return self.output(self.norm(h)).float()
