"""Mixture-of-experts feed-forward layer: a linear router, top-k routing, per-expert SwiGLU
(or GELU) MLPs, and the Switch Transformer load-balancing loss.

Routing (Mixtral's, Switch's for ``top_k = 1``): router probabilities ``p = softmax(x W_r)``
in float32; each token goes to its ``top_k`` most probable experts, weighted by their
probabilities renormalised over those ``k`` (with ``k = 1`` the raw probability, as in Switch,
so that the language-model loss still reaches the router).

Capacity: ``capacity_factor = 0`` is dropless (every expert takes every token routed to it).
Otherwise each expert takes at most ``ceil(capacity_factor * tokens * top_k / num_experts)``
of the (token, expert) assignments of a forward, earliest tokens first; the rest are
dropped (their contribution from that expert is zero, the residual stream carries them).

Load balancing (Fedus et al. 2021, eq. 4; Mixtral's ``load_balancing_loss_func``):
``aux_loss = aux_loss_coef * num_experts * sum_i f_i * P_i`` with ``f_i`` the fraction of the
(token, expert) assignments that chose expert ``i`` (no gradient) and ``P_i`` the mean
router probability of expert ``i``. It is 1 (times the coefficient) when routing is uniform,
and grows as the router favours experts; its gradient flows to the router through ``P``.

Every expert runs on every forward, with zero tokens if none were routed to it, so each
expert parameter is in the autograd graph (DDP needs no ``find_unused_parameters``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoEFeedForward(nn.Module):
    """Parameters: ``router.weight`` ``(num_experts, dim)``; ``w1`` (gate for SwiGLU, up for
    GELU) and, for SwiGLU, ``w3`` (up), each ``(num_experts, dim, hidden_dim)``; ``w2`` (down)
    ``(num_experts, hidden_dim, dim)``. ``aux_loss`` after each forward."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int,
                 capacity_factor: float = 0.0, aux_loss_coef: float = 0.01,
                 mlp: str = "swiglu"):
        super().__init__()
        assert 1 <= top_k <= num_experts
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.aux_loss_coef = capacity_factor, aux_loss_coef
        self.gated = mlp == "swiglu"
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim)) if self.gated else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        for p in (self.w1, self.w3, self.w2):
            if p is not None:
                nn.init.normal_(p, std=0.02)  # LlamaModel.reset_parameters sets the real init
        self.aux_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None  # assignments per expert, last forward
        self.last_dropped = 0  # assignments over capacity, last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``x`` ``(tokens, dim)``: router probabilities ``(tokens, num_experts)``, the
        chosen experts ``(tokens, top_k)`` and their weights ``(tokens, top_k)``."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, experts, weights

    def balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)
        self.last_counts = counts.detach()
        fraction = counts.float() / experts.numel()
        return self.aux_loss_coef * self.num_experts * (fraction * probs.mean(dim=0)).sum()

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return (F.silu(h @ self.w1[e]) * (h @ self.w3[e])) @ self.w2[e]
        return F.gelu(h @ self.w1[e]) @ self.w2[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens = x.shape[0]
        probs, experts, weights = self.route(x)
        self.aux_loss = self.balance_loss(probs, experts)

        flat_expert = experts.flatten()  # assignment a = token * top_k + slot
        order = torch.argsort(flat_expert, stable=True)  # by expert, then by token
        per_expert = self.last_counts.tolist()
        capacity = (math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)
                    if self.capacity_factor > 0 else None)
        flat_weight = weights.flatten()
        out = torch.zeros_like(x)
        begin, dropped = 0, 0
        for e, n in enumerate(per_expert):
            chosen = order[begin:begin + n]
            begin += n
            if capacity is not None and n > capacity:
                chosen, dropped = chosen[:capacity], dropped + n - capacity
            token = chosen // self.top_k
            y = self.expert(e, x[token])
            out.index_add_(0, token, (y * flat_weight[chosen, None]).to(out.dtype))
        self.last_dropped = dropped
        return out.view(shape)
