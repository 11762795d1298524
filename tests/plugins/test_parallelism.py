"""Parallelism strategies, the memory planner and precision checks of ``composer_train``
(plugins/training/parallel.py, planner.py): Composer's FSDP config as each strategy maps it,
validation with key-naming errors, per-device memory under each strategy (the 7b_code
recipe fits its 8 x 80 GB, the 70B shape without checkpointing does not), and amp_fp8
refused cleanly where it cannot run.

Also the pieces of a tensor-parallel run that need no processes: the layer plan, the
attention's head count taken from its projections, and the clipping across device meshes.
The multi-process runs (FSDP version 2, tensor parallelism) are in test_training.py (slow).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipe_engine import RecipeError, StageError
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine_plugins.training import DDP, FSDP, ComposerTrain, SingleDevice, planner

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def model_spec(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())


def train(model: str = "llama_7b", parallelism: dict | None = None, **params) -> ComposerTrain:
    """A composer_train stage as the 7b_code recipe configures it, with overrides."""
    base = dict(model=model_spec(model), optimizer={"name": "adamw"},
                parallelism=parallelism or {"name": "fsdp", "num_processes": 8,
                                            "activation_checkpointing": True},
                global_batch_size=1024, device_microbatch_size=2, tokens_per_param=20.0,
                precision="amp_bf16", device="gpu")
    return instantiate(ComposerTrain, {**base, **params}, PluginManager().registry.build)


SHARDS_7B = {"shards": {"vocab_size": 32000, "seq_len": 4096}}
SHARDS_70B = {"shards": {"vocab_size": 128_256, "seq_len": 4096}}


# -- Composer's FSDP config -------------------------------------------------------------------

def test_fsdp_options_map_onto_composers_config():
    from composer.utils import FSDPConfig

    fsdp = FSDP(num_processes=8, num_nodes=2, sharding_strategy="HYBRID_SHARD",
                activation_checkpointing=True, activation_cpu_offload=True,
                sync_module_states=True)
    cfg = fsdp.trainer_kwargs()["parallelism_config"]["fsdp"]
    fields = {f.name for f in dataclasses.fields(FSDPConfig)}
    assert set(cfg) <= fields, f"not FSDPConfig fields: {set(cfg) - fields}"
    # hybrid needs a 2-D mesh: shard within the node, replicate across the rest
    assert cfg["data_parallel_shard_degree"] == 8 and cfg["data_parallel_replicate_degree"] == -1
    assert cfg["activation_cpu_offload"] and cfg["sync_module_states"] and not cfg["cpu_offload"]
    built = FSDPConfig(**cfg)
    assert built.sharding_strategy == "HYBRID_SHARD" and built.use_orig_params
    plain = FSDP(num_processes=4).trainer_kwargs()["parallelism_config"]
    assert "data_parallel_replicate_degree" not in plain["fsdp"] and "tp" not in plain
    group = FSDP(num_processes=8, num_nodes=2, sharding_strategy="_HYBRID_SHARD_ZERO2",
                 shard_group_size=4).trainer_kwargs()["parallelism_config"]["fsdp"]
    assert group["data_parallel_shard_degree"] == 4


@pytest.mark.parametrize("params, key, words", [
    (dict(cpu_offload=True), "cpu_offload", "Composer 0.32 refuses"),
    (dict(num_processes=8, sharding_strategy="HYBRID_SHARD"), "sharding_strategy", "whole world"),
    (dict(num_processes=8, num_nodes=2, sharding_strategy="HYBRID_SHARD", shard_group_size=3),
     "shard_group_size", "does not divide"),
    (dict(num_processes=8, shard_group_size=4), "shard_group_size", "only for a hybrid"),
    (dict(num_processes=8, tensor_parallel_degree=3), "tensor_parallel_degree", "must divide"),
    (dict(num_processes=2, tensor_parallel_degree=2), "tensor_parallel_degree", "at least 2"),
    (dict(num_nodes=0), "num_nodes", ">= 1"),
])
def test_fsdp_refuses_what_composer_would(params, key, words):
    with pytest.raises(RecipeError) as e:
        FSDP(**params)
    assert [p.key for p in e.value.problems] == [key] and words in str(e.value)


def test_fsdp_version_2_maps_onto_composers_fsdp2_config():
    from composer.utils.parallelism import FSDP2Config

    cfg = FSDP(num_processes=2, fsdp_version=2, sharding_strategy="SHARD_GRAD_OP",
               activation_checkpointing=True, sync_module_states=True
               ).trainer_kwargs()["parallelism_config"]
    fsdp = cfg["fsdp"]
    assert isinstance(fsdp, FSDP2Config) and "tp" not in cfg
    assert fsdp.reshard_after_forward is False and fsdp.activation_checkpointing
    assert fsdp.sync_module_states and fsdp.mixed_precision == "PURE"
    full = FSDP(num_processes=2, fsdp_version=2).trainer_kwargs()["parallelism_config"]["fsdp"]
    assert full.reshard_after_forward is True


@pytest.mark.parametrize("strategy", ["HYBRID_SHARD", "NO_SHARD"])
def test_fsdp_version_2_refuses_strategies_it_cannot_build(strategy):
    with pytest.raises(RecipeError) as e:
        FSDP(num_processes=4, num_nodes=2, fsdp_version=2, sharding_strategy=strategy)
    assert "sharding_strategy" in [p.key for p in e.value.problems] and "fsdp_version: 2" in str(e.value)


def test_fsdp_version_1_on_cpu_is_refused_with_the_way_out():
    with pytest.raises(RecipeError) as e:
        train(device="cpu", precision="fp32",
              parallelism={"name": "fsdp", "num_processes": 2})
    assert [p.key for p in e.value.problems] == ["parallelism.fsdp_version"]
    assert "fsdp_version: 2" in str(e.value)
    train(device="cpu", precision="fp32",
          parallelism={"name": "fsdp", "num_processes": 2, "fsdp_version": 2})


def test_hybrid_with_a_declared_group_on_one_node_is_valid():
    fsdp = FSDP(num_processes=8, sharding_strategy="HYBRID_SHARD", shard_group_size=4)
    assert fsdp.shard_degree() == 4 and fsdp.sharding().optimizer == 4


def test_tensor_parallel_checks_the_model_and_optimizer():
    with pytest.raises(RecipeError) as e:  # 7B: 32 heads, 11008 hidden; 3 divides neither
        train(parallelism={"name": "fsdp", "num_processes": 6, "tensor_parallel_degree": 3})
    keys = {p.key for p in e.value.problems}
    assert keys == {"parallelism.tensor_parallel_degree"}
    assert "n_heads (32)" in str(e.value) and "weight_decay" in str(e.value)
    ok = train(parallelism={"name": "fsdp", "num_processes": 8, "tensor_parallel_degree": 2,
                            "activation_checkpointing": True},
               optimizer={"name": "adamw", "weight_decay": 0.0})
    tp = ok.parallelism.trainer_kwargs()["parallelism_config"]["tp"]
    assert tp["tensor_parallel_degree"] == 2
    # splits the blocks' activations: less memory per device than FSDP alone over the same 8
    alone = train(optimizer={"name": "adamw", "weight_decay": 0.0}).memory_plan(32000, 4096)
    assert ok.memory_plan(32000, 4096).total < alone.total


def test_tensor_parallel_plan_names_the_llama_projections():
    import torch
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from recipe_engine_plugins.models import Llama

    holder = torch.nn.Module()  # the trainer's CausalLM holds the module as `model`
    holder.model = Llama(dim=64, n_layers=2, n_heads=4, multiple_of=32).build(64, 32)
    plan = FSDP(num_processes=4, tensor_parallel_degree=2).tp_layer_plan()
    names = [n for n, _ in holder.named_modules()]
    matched = {pattern: [n for n in names if fnmatch.fnmatchcase(n, pattern)] for pattern in plan}
    assert all(len(m) == 2 for m in matched.values()), matched  # one per layer
    styles = {n.rsplit(".", 1)[1]: type(s).__mro__[1] for n, s in plan.items()}
    assert styles == {"wq": ColwiseParallel, "wk": ColwiseParallel, "wv": ColwiseParallel,
                      "w1": ColwiseParallel, "w3": ColwiseParallel,
                      "wo": RowwiseParallel, "w2": RowwiseParallel}
    # prepared on a GELU model (no gate projection), the plan leaves w3 out
    gelu = Llama(dim=64, n_layers=2, n_heads=4, multiple_of=32, mlp="gelu").build(64, 32)
    fsdp = FSDP(num_processes=4, tensor_parallel_degree=2, fsdp_version=2)
    fsdp.prepare(gelu)
    layer_plan = fsdp.trainer_kwargs()["parallelism_config"]["tp"]["layer_plan"]
    assert sorted(p.rsplit(".", 1)[1] for p in layer_plan) == ["w1", "w2", "wk", "wo", "wq", "wv"]


def test_fsdp_version_1_without_cuda_stops_with_the_way_out():
    import torch

    from recipe_engine_plugins.models import Llama

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    module = Llama(dim=64, n_layers=2, n_heads=4, multiple_of=32).build(64, 32)
    with pytest.raises(StageError, match="fsdp_version: 2"):
        FSDP(num_processes=2).prepare(module)


def test_attention_heads_follow_the_projections():
    """Under tensor parallelism each rank's wq/wk/wv hold a share of the heads, so the
    attention must count heads from the projections' outputs, not from n_heads. Split
    2 ways by hand (q heads 0-1 with kv head 0, q heads 2-3 with kv head 1, wo by its input
    columns), the two shares' outputs add up to the whole attention's."""
    import copy

    import torch

    from recipe_engine_plugins.models import Llama

    torch.manual_seed(0)
    full = Llama(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32).build(64, 32)
    attn = full.layers[0].attention
    hd = attn.head_dim
    x = torch.randn(2, 8, 64)

    def share(i: int) -> torch.nn.Module:
        part = copy.deepcopy(attn)
        for name, rows in (("wq", 2 * hd), ("wk", hd), ("wv", hd)):
            w = getattr(attn, name).weight.data[i * rows:(i + 1) * rows]
            setattr(part, name, torch.nn.Linear(64, rows, bias=False))
            getattr(part, name).weight.data = w.clone()
        part.wo = torch.nn.Linear(2 * hd, 64, bias=False)
        part.wo.weight.data = attn.wo.weight.data[:, i * 2 * hd:(i + 1) * 2 * hd].clone()
        return part

    with torch.no_grad():
        whole = attn(x, None, None)
        split = share(0)(x, None, None) + share(1)(x, None, None)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


# -- the memory planner -----------------------------------------------------------------------

def test_the_7b_recipe_fits_its_eight_80gb_gpus():
    plan = train(device_memory_gb=80).describe_plan(SHARDS_7B)
    mem = plan["memory_gb_per_device"]
    assert set(mem) == {"weights", "gradients", "optimizer", "activations", "overhead", "total"}
    assert 10 < mem["total"] < 40 and plan["memory_headroom_gb"] == pytest.approx(80 - mem["total"], abs=0.11)
    # sharded over 8: about 16 bytes per parameter / 8 of weights, gradients and Adam state
    n = plan["params"]
    state = 16 * n / 8 / GIB
    assert mem["optimizer"] == pytest.approx(8 * n / 8 / GIB, abs=0.06)
    assert state < mem["weights"] + mem["gradients"] + mem["optimizer"] < state * 1.25


def test_70b_on_eight_80gb_gpus_without_checkpointing_is_refused_at_validation():
    # weights, gradients and AdamW state alone: 16 bytes x 68.5B non-embedding params / 8
    with pytest.raises(RecipeError) as e:
        train("llama_70b", parallelism={"name": "fsdp", "num_processes": 8}, device_memory_gb=80)
    (problem,) = e.value.problems
    assert problem.key == "device_memory_gb"
    text = problem.message
    for words in ("optimizer", "gradients", "weights", "device_memory_gb=80",
                  "activation_checkpointing", "device_microbatch_size", "more devices"):
        assert words in text, words
    total = float(text.split("at least ")[1].split(" GiB")[0])
    assert 16 * 68.45e9 / 8 / GIB < total < 160


def test_70b_full_breakdown_matches_the_rule_of_thumb():
    stage = train("llama_70b", parallelism={"name": "fsdp", "num_processes": 8})
    mem = stage.memory_plan(128_256, 4096)
    n = 70_553_706_496
    master_grads_adam = 16 * n / 8  # ~141 GB per GPU, the usual mixed-precision Adam figure
    assert master_grads_adam < mem.weights + mem.gradients + mem.optimizer < 1.15 * master_grads_adam
    assert mem.optimizer == pytest.approx(8 * n / 8)
    assert mem.activations > 100 * GIB  # 80 layers of 2 x 4096 tokens stored, no checkpointing
    # on 8 nodes with checkpointing and one sequence per microbatch it fits
    big = train("llama_70b", parallelism={"name": "fsdp", "num_processes": 8, "num_nodes": 8,
                                          "activation_checkpointing": True},
                device_microbatch_size=1, device_memory_gb=80)
    assert big.describe_plan(SHARDS_70B)["memory_gb_per_device"]["total"] < 80


def test_a_plan_over_budget_only_with_activations_is_refused_by_the_plan_and_at_run_time():
    # passes validation (the lower bound fits) but not with the 4096-token activations
    stage = train(parallelism={"name": "fsdp", "num_processes": 8}, device_memory_gb=24)
    with pytest.raises(RecipeError) as e:
        stage.describe_plan(SHARDS_7B)
    assert e.value.problems[0].key == "device_memory_gb" and "activations" in str(e.value)
    with pytest.raises(StageError, match="device_memory_gb"):
        stage.check_memory(SHARDS_7B)
    stage.check_memory({"shards": {"vocab_size": 32000, "seq_len": 256}})  # short: fits


def test_strategies_order_as_expected():
    def total(parallelism, **kw):
        return train(parallelism=parallelism, **kw).memory_plan(32000, 4096)

    full = total({"name": "fsdp", "num_processes": 8})
    grad_op = total({"name": "fsdp", "num_processes": 8, "sharding_strategy": "SHARD_GRAD_OP"})
    no_shard = total({"name": "fsdp", "num_processes": 8, "sharding_strategy": "NO_SHARD"})
    ddp = total({"name": "ddp", "num_processes": 8})
    single = total({"name": "single"}, global_batch_size=2)
    assert full.total < grad_op.total < no_shard.total
    assert grad_op.optimizer == full.optimizer and grad_op.weights > full.weights
    assert no_shard.optimizer == single.optimizer == pytest.approx(8 * full.optimizer)
    assert ddp.gradients == pytest.approx(2 * single.gradients)  # DDP's gradient buckets
    hybrid = total({"name": "fsdp", "num_processes": 8, "num_nodes": 4,
                    "sharding_strategy": "HYBRID_SHARD"})
    assert hybrid.optimizer == full.optimizer  # sharded within the node only
    wider = total({"name": "fsdp", "num_processes": 8, "num_nodes": 4})
    assert wider.optimizer == pytest.approx(full.optimizer / 4)
    ckpt = total({"name": "fsdp", "num_processes": 8, "activation_checkpointing": True})
    offload = total({"name": "fsdp", "num_processes": 8, "activation_cpu_offload": True})
    assert ckpt.activations < full.activations / 4 and offload.activations < full.activations / 4
    assert offload.host > 0 and full.host == 0


def test_the_optimizer_says_its_state_size():
    adamw = train(parallelism={"name": "single"}, global_batch_size=2).memory_plan(32000, 4096)
    lion = train(parallelism={"name": "single"}, global_batch_size=2,
                 optimizer={"name": "lion"}).memory_plan(32000, 4096)
    assert lion.optimizer == pytest.approx(adamw.optimizer / 2)
    fp32 = train(parallelism={"name": "single"}, global_batch_size=2,
                 precision="fp32").memory_plan(32000, 4096)
    # bf16 mixed: fp32 master plus a bf16 compute copy; fp32: the master only
    assert adamw.weights == pytest.approx(fp32.weights * 1.5)
    assert fp32.activations > adamw.activations


def test_plan_and_validate_from_the_command_line(tmp_path):
    env = {**os.environ, "RECIPE_STORE": str(tmp_path / "store")}
    cli = [sys.executable, "-m", "recipe_engine.cli"]
    proc = subprocess.run([*cli, "plan", "recipes/7b_code.yaml", "train.device_memory_gb=80",
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = next(s for s in json.loads(proc.stdout)["stages"]
               if s["component"] == "composer_train")["estimates"]
    assert est["memory_gb_per_device"]["total"] < 80 and est["device_memory_gb"] == 80
    refused = subprocess.run([*cli, "validate", "recipes/7b_code.yaml", "model=llama_70b",
                              "tokenizer.vocab_size=128256", "train.device_memory_gb=80",
                              "parallelism.activation_checkpointing=false"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "device_memory_gb" in refused.stderr and "GiB per device" in refused.stderr


# -- precision --------------------------------------------------------------------------------

def test_fp8_is_refused_on_the_cpu_at_validation():
    with pytest.raises(RecipeError) as e:
        train(parallelism={"name": "single"}, global_batch_size=2, precision="amp_fp8",
              device="cpu")
    assert [p.key for p in e.value.problems] == ["precision"]


def test_fp8_without_a_capable_gpu_is_a_stage_error():
    import torch

    stage = train(parallelism={"name": "single"}, global_batch_size=2, precision="amp_fp8",
                  device="auto")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has an fp8-capable GPU")
    with pytest.raises(StageError, match="amp_fp8 needs"):
        stage.check_precision()
    train(parallelism={"name": "single"}, global_batch_size=2).check_precision()  # bf16: no check


def test_parallelism_components_are_registered_and_reexported():
    from recipe_engine_plugins.training import parallel

    reg = PluginManager().registry
    assert {"single", "ddp", "fsdp"} <= set(reg.names("parallelism"))
    assert (SingleDevice, DDP, FSDP) == (parallel.SingleDevice, parallel.DDP, parallel.FSDP)
    assert planner.Sharding() == SingleDevice().sharding()


def test_mesh_clipping_matches_torch_on_plain_gradients():
    """The tensor-parallel runs' clipping (norms reduced per device mesh) scales plain
    gradients exactly as torch's clip_grad_norm_ does, and leaves small ones alone."""
    import torch

    from recipe_engine_plugins.training.clipping import clip_grad_norm

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    ours = clip_grad_norm(a, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert ours == pytest.approx(float(theirs), rel=1e-6) and ours > 1.0
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    small = [p.grad.clone() for p in a]
    clip_grad_norm(a, 1e6)
    assert all(torch.equal(p.grad, s) for p, s in zip(a, small))
