"""Memory per device before any GPU is booked: weights, gradients, optimizer state and
activations of one training process, under a parallelism strategy and a precision.

The parallelism component says how its strategy spreads the training state
(``Parallelism.sharding()`` returns a :class:`Sharding`), the optimizer how many bytes of
state it keeps per parameter (``Optimizer.state_bytes_per_param()``), the model its shape;
:func:`memory_per_device` adds them up. No framework is imported: ``recipe plan`` and
``recipe validate`` use it.

What is counted, per device (bytes; ``c`` = the compute dtype's size: 2 under ``amp_bf16``,
``amp_fp16`` and ``amp_fp8``, 4 under ``fp32`` or FSDP ``mixed_precision: FULL``):

* weights: the fp32 master copy (4 bytes per parameter, divided by the devices it is sharded
  over), plus the compute copy: under mixed precision without sharding, autocast's cached
  ``c``-byte copy of every weight; under ``SHARD_GRAD_OP`` the unsharded copy FSDP keeps from
  forward to backward; under ``FULL_SHARD``/``HYBRID_SHARD`` only what is gathered at once:
  the root unit (embeddings, output head, final norm) and two transformer blocks (the one
  computing and the one prefetched).
* gradients: fp32, 4 bytes per parameter (sharded like the strategy says); DDP with more than
  one process adds its gradient buckets (a second copy); sharded strategies add the
  unsharded gradient of one FSDP unit before it is reduced.
* optimizer state: ``state_bytes_per_param`` (AdamW: 8, two fp32 moments; Lion: 4) per
  parameter, sharded like the strategy says.
* activations, per microbatch of ``b`` sequences of ``s`` tokens: autograd keeps about
  ``10 * dim + 4 * ffn_hidden_dim`` values per token in every Llama block under SDPA / flash
  attention (norm inputs and outputs, q/k/v before and after RoPE, the attention output, the
  SwiGLU's gate, up, activation and product; a GELU MLP keeps ``2 * ffn_hidden_dim``; a
  mixture of experts ``top_k`` times its MLP's), in the compute dtype: ``layers * s * b *
  that * c``. With activation checkpointing, only each block's input (``layers * s * b * dim
  * c``) plus one block's recomputed activations. With activation CPU offload, the stored
  ones go to the host. Plus the logits: ``s * b * vocab * (c + 8)`` (the head's output, its
  fp32 copy, and the loss's fp32 gradient).
* overhead: a fixed :data:`OVERHEAD_GIB` for the CUDA context, NCCL buffers and allocator
  slack.

Tensor parallelism divides the blocks' weights (and their state) by its degree, and the
attention and MLP intermediates; the embeddings, the head and the residual stream are not.
Sizes are GiB (2**30 bytes), as ``nvidia-smi`` reports device memory: an H100 80GB holds
about 80, an H200 about 140.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack (a planning figure)
MIXED = ("amp_bf16", "amp_fp16", "amp_fp8")


@dataclass(frozen=True)
class Sharding:
    """How a parallelism strategy spreads one process's training state.

    ``weights``, ``gradients``, ``optimizer``: over how many devices each is split (1:
    replicated). ``tensor_parallel``: the tensor-parallel degree (blocks split that many
    ways). ``compute_copy``: which compute-dtype copy of the weights is resident: ``"autocast"``
    (mixed precision's cached copy of every weight; none in fp32), ``"full"`` (the unsharded
    weights, from forward to backward) or ``"gathered"`` (the root unit and two blocks at a
    time). ``param_dtype_bytes``: the compute copy's bytes per value when the strategy fixes
    it (FSDP ``mixed_precision: FULL``: 4), else 0 (from the precision). ``grad_buckets``:
    DDP's second copy of the gradients. ``offload``: weights, gradients and optimizer state
    live on the host. ``activation_checkpointing`` / ``activation_offload``: per block."""

    weights: int = 1
    gradients: int = 1
    optimizer: int = 1
    tensor_parallel: int = 1
    compute_copy: str = "autocast"
    param_dtype_bytes: int = 0
    grad_buckets: bool = False
    offload: bool = False
    activation_checkpointing: bool = False
    activation_offload: bool = False


@dataclass
class MemoryPlan:
    """Bytes per device (and on the host, for what is offloaded)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    host: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def as_dict(self) -> dict[str, Any]:
        """The breakdown in GiB, rounded to 0.1 (what ``recipe plan`` prints)."""
        out: dict[str, Any] = {k: round(getattr(self, k) / GIB, 1) for k in
                               ("weights", "gradients", "optimizer", "activations", "overhead")}
        out["total"] = round(self.total / GIB, 1)
        if self.host:
            out["host"] = round(self.host / GIB, 1)
        return out

    def describe(self) -> str:
        d = self.as_dict()
        parts = ", ".join(f"{k} {d[k]}" for k in
                          ("weights", "gradients", "optimizer", "activations", "overhead"))
        return f"{d['total']} GiB per device ({parts})"


def activation_values_per_token(model: Any, tensor_parallel: int = 1) -> float:
    """Values autograd keeps per token in one block (see the module docstring)."""
    dim = int(getattr(model, "dim", 0))
    ffn = int(getattr(model, "hidden_dim", 0) or 4 * dim)
    mlp = (2 if getattr(model, "mlp", "swiglu") == "gelu" else 4) * ffn
    mlp *= max(1, int(getattr(model, "top_k", 1) or 1)) if getattr(model, "num_experts", 0) else 1
    # norms and the residual stream are replicated under TP; q/k/v, attention and MLP split
    return 4 * dim + (6 * dim + mlp) / max(1, tensor_parallel)


def memory_per_device(*, model: Any, vocab_size: int, seq_len: int, microbatch: int,
                      precision: str, state_bytes_per_param: float, sharding: Sharding) -> MemoryPlan:
    """The plan for one device. ``vocab_size = 0`` leaves the embeddings and the logits out
    and ``seq_len = 0`` the activations: a lower bound, for validation, which knows neither."""
    n_layers = int(getattr(model, "n_layers", 0))
    body = int(model.num_params(vocab_size, embeddings=False))
    total = int(model.num_params(vocab_size, embeddings=True)) if vocab_size else body
    dim = int(getattr(model, "dim", 0))
    block = (body - dim) // n_layers if n_layers else body  # one block (final norm left out)
    root = total - n_layers * block  # embeddings, output head, final norm
    tp = max(1, sharding.tensor_parallel)
    per_rank = root + n_layers * block / tp  # the parameters one tensor-parallel rank holds
    block_rank = block / tp
    c = sharding.param_dtype_bytes or (2 if precision in MIXED else 4)
    notes: list[str] = []

    master = 4 * per_rank / sharding.weights
    if sharding.compute_copy == "full":
        copy = c * per_rank
    elif sharding.compute_copy == "gathered":
        copy = c * (root + 2 * min(block_rank, per_rank))
    else:  # autocast's cached copy; none when the compute dtype is the master's
        copy = c * per_rank if c < 4 else 0.0
    grads = 4 * per_rank / sharding.gradients
    if sharding.grad_buckets:
        grads *= 2
    if sharding.gradients > 1:  # the unsharded gradient of one unit, before its reduce-scatter
        grads += c * max(root, block_rank)
    opt = state_bytes_per_param * per_rank / sharding.optimizer
    host = 0.0
    if sharding.offload:
        host += master + 4 * per_rank / sharding.gradients + opt
        master, opt = 0.0, 0.0
        grads = c * max(root, block_rank)

    acts = 0.0
    if seq_len and n_layers:
        tokens = seq_len * microbatch
        act_c = 2 if precision in MIXED else 4
        one_block = tokens * activation_values_per_token(model, tp) * act_c
        inputs = n_layers * tokens * dim * act_c  # what checkpointing keeps per block
        stored = inputs if sharding.activation_checkpointing else n_layers * one_block
        if sharding.activation_offload:
            host += stored
            acts = one_block
        else:
            acts = stored + (one_block if sharding.activation_checkpointing else 0.0)
        if vocab_size:
            acts += tokens * vocab_size * (act_c + 8)
    else:
        notes.append("activations not counted (sequence length unknown)")
    return MemoryPlan(weights=master + copy, gradients=grads, optimizer=opt, activations=acts,
                      overhead=OVERHEAD_GIB * GIB, host=host, notes=notes)


def hints(sharding: Sharding, microbatch: int, can_shard: bool) -> str:
    """What would lower the figure, for a refusal message."""
    out = ["more devices (num_processes / num_nodes)" if can_shard else
           "a sharded strategy (parallelism: fsdp with FULL_SHARD)"]
    if not sharding.activation_checkpointing:
        out.append("parallelism.activation_checkpointing: true")
    if microbatch > 1:
        out.append(f"a smaller device_microbatch_size (now {microbatch})")
    if not sharding.activation_offload and can_shard:
        out.append("parallelism.activation_cpu_offload: true")
    return "; ".join(out)
