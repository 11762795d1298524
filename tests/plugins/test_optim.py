"""The optimizers and schedules of plugins/training/optim.py: Lion's update by hand, the WSD
curve, parameter groups, validation, and each one driving a real (tiny) Composer run."""
from __future__ import annotations

import math

import pytest
import torch

from recipe_engine import RecipeError
from recipe_engine.testing import run_stage
from recipe_engine_plugins.training.optim import (LionOpt, WarmupStableDecay, lion_class,
                                                  wsd_multiplier)

from test_resume import make_shards, stage


def test_lion_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = lion_class()([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    g1 = torch.tensor([0.3, -0.1, 0.0])
    p.grad = g1.clone()
    opt.step()
    # m = 0: update = sign(0.1 * g); decay first: p * (1 - 0.1 * 0.5)
    want = torch.tensor([1.0, -2.0, 0.5]) * 0.95 - 0.1 * torch.sign(0.1 * g1)
    assert torch.allclose(p.detach(), want)
    m = 0.01 * g1
    assert torch.allclose(opt.state[p]["exp_avg"], m)
    g2 = torch.tensor([-1.0, 1.0, 2.0])
    p.grad = g2.clone()
    before = p.detach().clone()
    opt.step()
    want = before * 0.95 - 0.1 * torch.sign(0.9 * m + 0.1 * g2)
    assert torch.allclose(p.detach(), want)


def test_lion_does_not_decay_norms_or_embeddings():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    opt = LionOpt().build(model.named_parameters(), no_decay=["0.weight"])
    decays = sorted((g["weight_decay"], sum(p.numel() for p in g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 10 * 4 + 4 + 4 + 4), (1.0, 16)]


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_curve(shape, mid):
    f = lambda x: wsd_multiplier(x, 0.1, 0.2, 0.0, shape)  # noqa: E731
    assert f(0.05) == pytest.approx(0.5)  # warmup
    assert f(0.1) == f(0.5) == f(0.8) == 1.0  # stable
    assert f(0.9) == pytest.approx(mid)  # halfway through the decay
    assert f(1.0) == pytest.approx(0.0)
    assert wsd_multiplier(1.0, 0.1, 0.2, 0.1, shape) == pytest.approx(0.1)  # alpha_f


def test_bad_values_fail_validation():
    with pytest.raises(RecipeError, match="betas"):
        LionOpt(betas=[0.9, 1.5])
    with pytest.raises(RecipeError, match="decay_fraction"):
        WarmupStableDecay(decay_fraction=1.5)
    with pytest.raises(RecipeError, match="warmup"):
        WarmupStableDecay(warmup="soon")


@pytest.mark.parametrize("optimizer, scheduler", [
    ({"name": "lion", "lr": 3e-4}, {"name": "wsd", "warmup": "2ba", "decay_fraction": 0.5}),
    ({"name": "decoupled_adamw", "lr": 1e-2}, {"name": "linear_warmup", "warmup": "0.25dur"}),
    ({"name": "adamw", "lr": 1e-2}, {"name": "constant_warmup", "warmup": "2ba"}),
])
def test_each_trains_a_tiny_model(tmp_path, optimizer, scheduler):
    shards = make_shards(tmp_path / "shards", seed=3)
    art = run_stage(stage(optimizer=optimizer, scheduler=scheduler, max_duration="8ba",
                          save_interval="100ba"), tmp_path / "run", inputs={"shards": shards})
    loss = art.manifest["metrics"]["train_loss"]
    assert math.isfinite(loss) and loss < math.log(64) + 0.5  # vocabulary 64: below chance+
    assert (art.path / "model.safetensors").is_file()


# -- AdamW's kernels and the state the planner counts -------------------------------------------

def _train_steps(optimizer, steps: int = 5) -> list[torch.Tensor]:
    from recipe_engine_plugins.models import Llama

    torch.manual_seed(0)
    model = Llama(dim=32, n_layers=2, n_heads=4, multiple_of=32).build(64, 16)
    opt = optimizer.build(model.named_parameters(), no_decay=["tok_embeddings.weight"])
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        logits = model(data[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 64), data[:, 1:].reshape(-1)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_and_unfused_adamw_agree_on_cpu():
    from recipe_engine_plugins.training import AdamW

    fused = AdamW(lr=1e-2, fused=True)
    assert fused.build(torch.nn.Linear(2, 2).named_parameters()).defaults["fused"] is True
    plain = _train_steps(AdamW(lr=1e-2, fused=False, foreach=False))
    for other in (fused, AdamW(lr=1e-2, fused=False, foreach=True)):
        got = _train_steps(other)
        moved = max((a - b).abs().max().item() for a, b in zip(got, plain))
        assert moved < 1e-5, f"{other.fused=} {other.foreach=}: weights differ by {moved}"
    start = _train_steps(AdamW(lr=1e-2, fused=False), steps=0)
    assert max((a - b).abs().max().item() for a, b in zip(plain, start)) > 1e-3  # it trained


def test_adamw_kernel_options():
    from recipe_engine_plugins.training import AdamW

    with pytest.raises(RecipeError, match="foreach"):
        AdamW(fused=True, foreach=True)
    auto = AdamW().kernel_kwargs()
    assert auto.get("fused", False) == torch.cuda.is_available()  # auto: fused on a GPU machine
    assert AdamW(fused="auto", foreach=True).kernel_kwargs() == {"foreach": True}


def test_state_bytes_and_groups():
    from recipe_engine_plugins.training import AdamW
    from recipe_engine_plugins.training.optim import DecoupledAdamWOpt

    assert (AdamW().state_bytes_per_param(), DecoupledAdamWOpt().state_bytes_per_param(),
            LionOpt().state_bytes_per_param()) == (8, 8, 4)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    assert len(AdamW(weight_decay=0.1).param_groups(model.named_parameters())) == 2
    (one,) = AdamW(weight_decay=0.0).param_groups(model.named_parameters())  # what TP needs
    assert len(one["params"]) == 5 and one["weight_decay"] == 0.0
    with pytest.raises(RecipeError, match="betas"):
        DecoupledAdamWOpt(betas=[0.9])
