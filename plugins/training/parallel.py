"""Parallelism strategies for ``composer_train``: each a component mapped onto Composer's
``Trainer`` arguments, and each able to say how it spreads the training state over devices
(``sharding()``, which the memory planner reads) — the stage never asks for a name.

* ``single``: one process, the CPU or one GPU.
* ``ddp``: ``DistributedDataParallel``, every process holds the whole model.
* ``fsdp``: Composer's FSDP (``parallelism_config={"fsdp": ...}``): full, gradient-and-
  optimizer-only or hybrid sharding, activation checkpointing and CPU offload of
  activations, and tensor parallelism inside a node (``parallelism_config={"tp": ...}``).
  ``fsdp_version: 1`` is torch's ``FullyShardedDataParallel`` (Composer's default; CUDA only in
  Composer 0.32); ``fsdp_version: 2`` is torch's per-parameter ``fully_shard`` (DTensor), which
  Composer 0.32 also runs on CPU processes with gloo.

Light: torch is imported inside the methods that run in the training process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from recipe_engine import Component, ModelConfig, Problems, StageError

from .planner import Sharding

# module names (last component) the tensor-parallel plan splits: column-wise (their output
# dimension, i.e. heads and the MLP's hidden units) and row-wise (their input dimension)
TP_COLWISE = ("wq", "wk", "wv", "w1", "w3")
TP_ROWWISE = ("wo", "w2")


@dataclass(kw_only=True)
class Parallelism(Component, kind="parallelism"):
    """How the model is spread over devices. The stage launches ``num_processes_per_node()``
    processes (one per device) with Composer's launcher when that is more than one."""

    def num_processes_per_node(self) -> int:
        return 1

    def world_size(self) -> int:
        """Processes in the whole run as the recipe declares it (all nodes)."""
        return self.num_processes_per_node()

    def trainer_kwargs(self) -> dict[str, Any]:
        """Extra ``composer.Trainer`` arguments (``parallelism_config``...)."""
        return {}

    def prepare(self, module: Any) -> None:
        """Mark the plain ``nn.Module`` for wrapping before the trainer sees it."""

    def prepare_optimizer(self, optimizer: Any) -> None:
        """Called with the optimizer built over the prepared module's parameters."""

    def sharding(self) -> Sharding:
        """How one process's weights, gradients, optimizer state and activations are spread
        (the memory planner's input)."""
        return Sharding()

    def shards_state(self) -> bool:
        """Whether more devices lower the memory per device (for the planner's hints)."""
        return False

    def data_replication(self) -> int:
        """Consecutive ranks that read the same batch (a tensor-parallel group); the data
        are split over ``world_size / data_replication()`` ranks."""
        return 1

    def check_with(self, model: ModelConfig, optimizer: Any, problems: Problems) -> None:
        """Checks that need the stage's other sub-components; ``problems`` is the stage's,
        so keys are written ``parallelism.<param>``."""

    def check_device(self, device: str, problems: Problems) -> None:
        """Checks against the stage's ``device`` (``auto``, ``cpu``, ``gpu``); keys as in
        ``check_with``."""


@dataclass(kw_only=True)
class SingleDevice(Parallelism,
                   name="single",
                   description="no wrapping: the CPU or one GPU, one process"):
    """No wrapping: the model on the CPU or one GPU, in one process."""


@dataclass(kw_only=True)
class DDP(Parallelism, name="ddp", description="DistributedDataParallel, one process per device"):
    """Data parallel: every process holds the whole model; Composer wraps it in
    ``DistributedDataParallel`` when the world has more than one process."""

    num_processes: int = 1  # per node; multi-node: NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT
    num_nodes: int = 1  # the nodes the plan assumes (the launch reads the rendezvous variables)

    def check(self, problems: Problems) -> None:
        problems.require(self.num_processes >= 1, "num_processes",
                         f"must be >= 1, got {self.num_processes}")
        problems.require(self.num_nodes >= 1, "num_nodes", f"must be >= 1, got {self.num_nodes}")

    def num_processes_per_node(self) -> int:
        return self.num_processes

    def world_size(self) -> int:
        return self.num_processes * self.num_nodes

    def sharding(self) -> Sharding:
        return Sharding(grad_buckets=self.world_size() > 1)


_HYBRID = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
# FSDP2 (fully_shard): resharding after forward or not is the whole choice
_FSDP2_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


@dataclass(kw_only=True)
class FSDP(DDP, name="fsdp", description="FSDP (full, grad/optimizer-only or hybrid sharding), optional TP"):
    """Fully sharded data parallel (Composer's FSDP config). Every element of the model's
    ``nn.ModuleList``s — the transformer blocks — is its own FSDP unit (and, with
    ``activation_checkpointing``, is recomputed in backward)."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD",
                               "_HYBRID_SHARD_ZERO2"] = "FULL_SHARD"
    shard_group_size: int = 0  # hybrid: devices one copy is sharded over; 0: one node's
    mixed_precision: Literal["PURE", "FULL", "DEFAULT"] = "PURE"
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    cpu_offload: bool = False
    sync_module_states: bool = False
    state_dict_type: Literal["sharded", "full"] = "sharded"
    tensor_parallel_degree: int = 1
    fsdp_version: Literal[1, 2] = 1  # 1: FullyShardedDataParallel; 2: fully_shard (DTensor; CPU too)

    def check(self, problems: Problems) -> None:
        super().check(problems)
        world, tp = self.world_size(), self.tensor_parallel_degree
        if self.fsdp_version == 2:
            if self.sharding_strategy not in _FSDP2_STRATEGIES:
                problems.add("sharding_strategy", f"{self.sharding_strategy} is not available "
                             "with fsdp_version: 2 (Composer 0.32 builds its FSDP2 mesh without a "
                             "replicate dimension); use FULL_SHARD or SHARD_GRAD_OP, or "
                             "version: 1")
        if self.cpu_offload:
            problems.add("cpu_offload", "Composer 0.32 refuses FSDP parameter CPU offload "
                         "('FSDP CPU Offload not supported yet'); to save device memory use "
                         "activation_checkpointing, activation_cpu_offload or more devices")
        if tp < 1:
            problems.add("tensor_parallel_degree", f"must be >= 1, got {tp}")
            tp = 1
        elif tp > 1:
            if self.num_processes % tp:
                problems.add("tensor_parallel_degree", f"{tp} must divide num_processes="
                             f"{self.num_processes} (tensor parallelism stays inside a node)")
            elif world // tp < 2:
                problems.add("tensor_parallel_degree", f"{tp} leaves {world // tp} device(s) "
                             "to shard over; Composer's tensor parallelism needs FSDP over at "
                             "least 2 (more num_processes or num_nodes)")
            if self.sharding_strategy in _HYBRID:
                problems.add("tensor_parallel_degree", "not combined with a hybrid "
                             "sharding_strategy here; use FULL_SHARD or SHARD_GRAD_OP")
        group = self.shard_group_size
        if group < 0:
            problems.add("shard_group_size", f"must be >= 0, got {group}")
        elif self.sharding_strategy in _HYBRID:
            size = group or self.num_processes
            if world % size:
                problems.add("shard_group_size", f"{size} does not divide the "
                             f"{world} processes ({self.num_nodes} node(s) x {self.num_processes})")
            elif size == world:
                problems.add("sharding_strategy", f"{self.sharding_strategy} shards within a "
                             f"group and replicates across groups, but the group of {size} is the "
                             f"whole world ({self.num_nodes} node(s) x {self.num_processes}): set "
                             "num_nodes to the nodes of the run, a smaller shard_group_size, or "
                             "use FULL_SHARD / SHARD_GRAD_OP")
        elif group:
            problems.add("shard_group_size", f"only for a hybrid sharding_strategy "
                         f"({', '.join(_HYBRID)}), not {self.sharding_strategy}")

    def check_with(self, model: ModelConfig, optimizer: Any, problems: Problems) -> None:
        tp, key = self.tensor_parallel_degree, "parallelism.tensor_parallel_degree"
        if tp <= 1:
            return
        heads, kv = getattr(model, "n_heads", None), getattr(model, "kv_heads", None)
        hidden = getattr(model, "hidden_dim", None)
        if heads is None or hidden is None:
            problems.add(key, f"the tensor-parallel plan splits Llama "
                         f"blocks (wq/wk/wv/wo, w1/w3/w2); model {model.name!r} is not one")
            return
        for what, n in (("n_heads", heads), ("key/value heads", kv), ("ffn hidden size", hidden)):
            if n % tp:
                problems.add(key, f"{tp} does not divide the model's "
                             f"{what} ({n})")
        if getattr(model, "num_experts", 0):
            problems.add(key, "no tensor-parallel plan for "
                         "mixture-of-experts layers")
        if getattr(model, "position_embedding", "rope") == "alibi":
            problems.add(key, "ALiBi's per-head slopes are not split over a tensor-parallel "
                         "group; use position_embedding: rope")
        if getattr(optimizer, "weight_decay", 0):
            problems.add(key, "Composer 0.32's tensor parallelism takes one "
                         "optimizer parameter group, so norms and embeddings cannot be exempt "
                         "from weight decay: set optimizer.weight_decay: 0")

    # -- what the trainer and the planner ask ---------------------------------------------

    def shards_state(self) -> bool:
        return self.sharding_strategy != "NO_SHARD"

    def data_replication(self) -> int:
        return max(1, self.tensor_parallel_degree)

    def shard_degree(self) -> int:
        """Devices the model state is sharded over (1: not sharded)."""
        if self.sharding_strategy == "NO_SHARD":
            return 1
        if self.sharding_strategy in _HYBRID:
            return self.shard_group_size or self.num_processes
        return max(1, self.world_size() // max(1, self.tensor_parallel_degree))

    def sharding(self) -> Sharding:
        n = self.shard_degree()
        full = self.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
        return Sharding(
            weights=n if self.sharding_strategy != "NO_SHARD" else 1,
            gradients=n, optimizer=n, tensor_parallel=max(1, self.tensor_parallel_degree),
            compute_copy=("gathered" if full else "full") if n > 1 else "autocast",
            param_dtype_bytes=4 if self.mixed_precision == "FULL" else 0,
            offload=self.cpu_offload,
            activation_checkpointing=self.activation_checkpointing,
            activation_offload=self.activation_cpu_offload)

    def check_device(self, device: str, problems: Problems) -> None:
        if device == "cpu" and self.fsdp_version == 1:
            problems.add("parallelism.fsdp_version", "Composer 0.32's FSDP version 1 runs on CUDA "
                         "devices only; on CPU processes use fsdp_version: 2")

    def trainer_kwargs(self) -> dict[str, Any]:
        if self.fsdp_version == 2:
            return {"parallelism_config": self._fsdp2_config()}
        fsdp: dict[str, Any] = {
            "sharding_strategy": self.sharding_strategy,
            "mixed_precision": self.mixed_precision,
            "activation_checkpointing": self.activation_checkpointing,
            "activation_cpu_offload": self.activation_cpu_offload,
            "cpu_offload": self.cpu_offload,
            "sync_module_states": self.sync_module_states,
            "state_dict_type": self.state_dict_type,
            "use_orig_params": True,
        }
        if self.sharding_strategy in _HYBRID:
            # a 2-D mesh (replicate x shard); Composer falls back to FULL_SHARD on a 1-D one
            fsdp["data_parallel_shard_degree"] = self.shard_group_size or self.num_processes
            fsdp["data_parallel_replicate_degree"] = -1  # the rest of the world
        out: dict[str, Any] = {"fsdp": fsdp}
        if self.tensor_parallel_degree > 1:
            out["tp"] = self._tp_config()
        return {"parallelism_config": out}

    def _fsdp2_config(self) -> dict[str, Any]:
        import warnings

        from composer.utils.parallelism import FSDP2Config

        with warnings.catch_warnings():  # "experimental": said once, in docs/training.md
            warnings.filterwarnings("ignore", "FSDP2 Config", UserWarning)
            fsdp = FSDP2Config(
                reshard_after_forward=_FSDP2_STRATEGIES[self.sharding_strategy],
                activation_checkpointing=self.activation_checkpointing,
                activation_cpu_offload=self.activation_cpu_offload,
                state_dict_type=self.state_dict_type, mixed_precision=self.mixed_precision)
        fsdp.sync_module_states = self.sync_module_states
        out: dict[str, Any] = {"fsdp": fsdp}
        if self.tensor_parallel_degree > 1:
            out["tp"] = self._tp_config()
        return out

    def _tp_config(self) -> dict[str, Any]:
        # the plan for the module prepare() saw (a GELU MLP has no w3), else every projection
        names = getattr(self, "_module_names", None)
        return {"tensor_parallel_degree": self.tensor_parallel_degree,
                "layer_plan": self.tp_layer_plan(names=names)}

    def tp_layer_plan(self, prefix: str = "model.", names: Any = None) -> dict[str, Any]:
        """torch's tensor-parallel plan for Llama blocks, keyed by module path in the
        Composer model (the trainer's ``CausalLM`` holds the module as ``model``):
        column-wise for q/k/v and the MLP's gate and up projections, row-wise for the
        attention output and the MLP's down projection. ``names``: the plain module's
        submodule names, to leave out projections it does not have."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        col, row = _keeping_optimizer(ColwiseParallel, self), _keeping_optimizer(RowwiseParallel, self)
        styles = {f"attention.{n}": col for n in TP_COLWISE[:3]}
        styles.update({f"feed_forward.{n}": col for n in TP_COLWISE[3:]})
        styles["attention.wo"] = row
        styles["feed_forward.w2"] = row
        have = {n.split(".", 2)[-1] for n in names if n.startswith("layers.")} if names else None
        return {f"{prefix}layers.*.{path}": style() for path, style in styles.items()
                if have is None or path in have}

    def prepare_optimizer(self, optimizer: Any) -> None:
        self._optimizer = optimizer  # the tensor-parallel styles swap its parameters

    def prepare(self, module: Any) -> None:
        import torch
        from torch import nn

        if self.fsdp_version == 1 and not torch.cuda.is_available():
            raise StageError("parallelism: Composer 0.32's FSDP version 1 needs CUDA devices "
                             "(it asks torch.cuda for the current device); on CPU processes "
                             "set parallelism.fsdp_version: 2")
        if self.tensor_parallel_degree > 1:
            self._module_names = [n for n, _ in module.named_modules()]
        blocks = {id(m) for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst}
        if not blocks:
            raise StageError(f"fsdp: {type(module).__name__} has no nn.ModuleList of blocks to wrap")
        # Composer's hooks (composer.distributed.dist_strategy): called for every submodule
        module.fsdp_wrap_fn = lambda m: id(m) in blocks
        module.activation_checkpointing_fn = lambda m: id(m) in blocks


def _keeping_optimizer(style: type, owner: FSDP) -> type:
    """``style`` (a torch tensor-parallel style) that, having replaced a module's weights by
    sharded ``DTensor`` parameters, puts them in place of the old ones in the optimizer the
    parallelism was given (``prepare_optimizer``). Composer 0.32 applies the plan after the
    optimizer is built; its FSDP2 path then looks the optimizer's parameters up in the model
    and would not find the replaced ones."""

    class Keeping(style):  # type: ignore[misc, valid-type]
        def _apply(self, module: Any, device_mesh: Any) -> Any:
            old = dict(module.named_parameters(recurse=False))
            out = super()._apply(module, device_mesh)
            optimizer = getattr(owner, "_optimizer", None)
            if optimizer is not None:
                swap = {id(p): module.get_parameter(n) for n, p in old.items()}
                for group in optimizer.param_groups:
                    group["params"] = [swap.get(id(p), p) for p in group["params"]]
            return out

    Keeping.__name__ = Keeping.__qualname__ = f"Keeping{style.__name__}"
    return Keeping


COMPONENTS = [SingleDevice, DDP, FSDP]
