"""Gradient-norm clipping across device meshes, for tensor-parallel runs.

Under tensor parallelism (``fsdp`` with ``tensor_parallel_degree > 1``) a block's projections
are ``DTensor``s on the 2-D (data-parallel x tensor-parallel) mesh while the norms and
embeddings live on the data-parallel mesh alone. torch's ``clip_grad_norm_`` (which
Composer's ``GradientClipping`` calls) stacks every gradient's norm into one tensor and
fails on operands from two meshes. Here the norms are reduced per mesh and placement — one
collective per group, not per parameter — and combined as plain tensors; every gradient is
then scaled by the same factor, as torch's clipping would. Other runs keep Composer's
algorithm (and its exact numerics).

Imported inside the training run only (torch, Composer).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from composer.core import Algorithm, Event


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together (plain or ``DTensor``, on any meshes), as a
    plain fp32 tensor on every rank: NaN or infinite when any gradient is (the stability
    guard's test)."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for g in grads:
        if isinstance(g, DTensor):
            n = torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
            groups.setdefault((n.device_mesh, n.placements), []).append(n)
        else:
            plain.append(g)
    parts = [torch.linalg.vector_norm(torch.stack(ns), 2.0).full_tensor()
             for ns in groups.values()]
    if plain:  # torch's own multi-tensor (foreach) norm
        parts.append(torch.nn.utils.get_total_norm(plain, 2.0).float())
    if not parts:
        return torch.zeros(())
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([p.to(device) for p in parts]), 2.0)


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients in place so that their joint 2-norm is at most ``max_norm``;
    returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = float(total_grad_norm(grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


class MeshGradientClipping(Algorithm):
    """Composer algorithm: clip the gradient norm after the backward pass
    (``AFTER_TRAIN_BATCH``, where Composer's ``GradientClipping`` acts)."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def match(self, event: Event, state: Any) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state: Any, logger: Any) -> None:
        clip_grad_norm(state.model.parameters(), self.max_norm)
