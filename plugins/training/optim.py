"""More optimizers and learning-rate schedules for ``composer_train`` (and ``sft``/``dpo``).

Optimizers (all with the parameter groups of ``adamw``: no weight decay on 1-D parameters,
biases, norm gains and embeddings):

* ``decoupled_adamw``: Composer's ``DecoupledAdamW`` (Loshchilov & Hutter's decoupled decay,
  scaled by the schedule's multiplier rather than by the raw learning rate: ``weight_decay``
  is a per-step fraction at the peak, e.g. 1e-5, not the 0.1 of torch's AdamW).
* ``lion``: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
  ``update = sign(beta1 * m + (1 - beta1) * g)``, ``m <- beta2 * m + (1 - beta2) * g``,
  decoupled decay ``p <- p * (1 - lr * weight_decay)``. The paper suggests a learning rate
  3-10x smaller and a weight decay 3-10x larger than AdamW's. Written here in torch: one
  state tensor per parameter (AdamW keeps two).

Schedules (Composer schedulers; time strings resolve against the run's length):

* ``linear_warmup``: linear warmup, then linear decay to ``alpha_f`` (Composer's
  ``LinearWithWarmupScheduler``).
* ``constant_warmup``: linear warmup, then constant (``ConstantWithWarmupScheduler``).
* ``wsd``: warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): linear
  warmup, a constant learning rate, then a decay over the last ``decay_fraction`` of the
  run to ``alpha_f`` (linear, cosine, or ``1-sqrt``, which Hägele et al. found best).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from recipe_engine import Problems

from . import AdamW, Optimizer, Scheduler, _check_time, check_lr_betas_decay


@dataclass(kw_only=True)
class DecoupledAdamWOpt(Optimizer,
                        name="decoupled_adamw",
                        description="Composer's DecoupledAdamW (decay scaled by the schedule)"):
    """Composer's ``DecoupledAdamW``: the decay follows the schedule's multiplier (not the
    learning rate), so ``weight_decay`` is a per-step fraction at the peak (e.g. 1e-5).
    A per-parameter Python loop: no fused or foreach kernel."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-5

    def check(self, problems: Problems) -> None:
        check_lr_betas_decay(problems, self.lr, self.betas, self.weight_decay)

    def state_bytes_per_param(self) -> int:
        return 8  # exp_avg and exp_avg_sq, fp32

    def build(self, named_parameters: Iterable[tuple[str, Any]], no_decay: Iterable[str] = ()) -> Any:
        from composer.optim import DecoupledAdamW

        groups = AdamW(weight_decay=self.weight_decay).param_groups(named_parameters, no_decay)
        return DecoupledAdamW(groups, lr=self.lr,
                              betas=(float(self.betas[0]), float(self.betas[1])), eps=self.eps)


def lion_class() -> Any:
    """The torch optimizer (defined on first use: torch is imported late)."""
    import torch

    class Lion(torch.optim.Optimizer):
        def __init__(self, params: Any, lr: float, betas: tuple[float, float],
                     weight_decay: float = 0.0):
            super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(p)
                    m = state["exp_avg"]
                    if wd:
                        p.mul_(1 - lr * wd)
                    update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                    p.add_(update, alpha=-lr)
                    m.mul_(b2).add_(p.grad, alpha=1 - b2)
            return loss

    return Lion


@dataclass(kw_only=True)
class LionOpt(Optimizer, name="lion", description="Lion: sign of interpolated momentum (Chen et al. 2023)"):
    """Lion (Chen et al. 2023) with decoupled weight decay; no decay on norms, biases and
    embeddings."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 1.0

    def check(self, problems: Problems) -> None:
        check_lr_betas_decay(problems, self.lr, self.betas, self.weight_decay)

    def state_bytes_per_param(self) -> int:
        return 4  # exp_avg, fp32

    def build(self, named_parameters: Iterable[tuple[str, Any]], no_decay: Iterable[str] = ()) -> Any:
        groups = AdamW(weight_decay=self.weight_decay).param_groups(named_parameters, no_decay)
        return lion_class()(groups, lr=self.lr, betas=(float(self.betas[0]), float(self.betas[1])),
                            weight_decay=self.weight_decay)


# -- schedules --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LinearWarmup(Scheduler, name="linear_warmup", description="linear warmup, then linear decay"):
    """Linear warmup, then linear decay to ``alpha_f * lr`` at the end of training."""

    warmup: str = "0.02dur"
    alpha_f: float = 0.0

    def check(self, problems: Problems) -> None:
        _check_time(problems, "warmup", self.warmup, ("ba", "sp", "tok", "ep", "dur"))
        problems.require(0 <= self.alpha_f <= 1, "alpha_f", f"must be in [0, 1], got {self.alpha_f}")

    def build(self) -> Any:
        from composer.optim import LinearWithWarmupScheduler

        return LinearWithWarmupScheduler(t_warmup=self.warmup.strip(), alpha_f=self.alpha_f)


@dataclass(kw_only=True)
class ConstantWarmup(Scheduler, name="constant_warmup", description="linear warmup, then constant"):
    """Linear warmup, then the peak learning rate to the end."""

    warmup: str = "0.02dur"

    def check(self, problems: Problems) -> None:
        _check_time(problems, "warmup", self.warmup, ("ba", "sp", "tok", "ep", "dur"))

    def build(self) -> Any:
        from composer.optim import ConstantWithWarmupScheduler

        return ConstantWithWarmupScheduler(t_warmup=self.warmup.strip())


def wsd_multiplier(frac: float, warmup_frac: float, decay_fraction: float, alpha_f: float,
                   shape: str) -> float:
    """The WSD learning-rate multiplier at ``frac`` of the run (all fractions of the run)."""
    if warmup_frac > 0 and frac < warmup_frac:
        return frac / warmup_frac
    decay_start = 1.0 - decay_fraction
    if frac < decay_start or decay_fraction <= 0:
        return 1.0
    x = min(1.0, (frac - decay_start) / decay_fraction)  # 0 -> 1 over the decay
    if shape == "linear":
        y = 1.0 - x
    elif shape == "cosine":
        y = 0.5 * (1.0 + math.cos(math.pi * x))
    else:  # 1-sqrt
        y = 1.0 - math.sqrt(x)
    return alpha_f + (1.0 - alpha_f) * y


@dataclass(kw_only=True)
class WarmupStableDecay(Scheduler, name="wsd", description="warmup, constant, then decay at the end"):
    """Warmup-stable-decay: linear warmup, constant, then a decay over the last
    ``decay_fraction`` of the run to ``alpha_f * lr``."""

    warmup: str = "0.02dur"
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    alpha_f: float = 0.0

    def check(self, problems: Problems) -> None:
        _check_time(problems, "warmup", self.warmup, ("ba", "sp", "tok", "ep", "dur"))
        problems.require(0 <= self.decay_fraction <= 1, "decay_fraction",
                         f"must be in [0, 1], got {self.decay_fraction}")
        problems.require(0 <= self.alpha_f <= 1, "alpha_f", f"must be in [0, 1], got {self.alpha_f}")

    def build(self) -> Any:
        from composer.optim.scheduler import _convert_time  # resolves "0.02dur", "100ba", ...

        warmup, decay, shape, alpha_f = (self.warmup.strip(), self.decay_fraction,
                                         self.decay_shape, self.alpha_f)

        def schedule(state: Any, ssr: float = 1.0) -> float:
            total = _convert_time("1dur", state, ssr)
            t_warm = _convert_time(warmup, state)
            now = state.timestamp.get(total.unit).value
            warm = state.timestamp.get(t_warm.unit)
            warm_frac = t_warm.value / total.value if t_warm.unit == total.unit and total.value \
                else (0.0 if warm >= t_warm else None)
            if warm_frac is None:  # warmup in another unit and not over: linear in that unit
                return warm.value / max(t_warm.value, 1)
            return wsd_multiplier(now / max(total.value, 1), warm_frac, decay, alpha_f, shape)

        return schedule


COMPONENTS = [DecoupledAdamWOpt, LionOpt, LinearWarmup, ConstantWarmup, WarmupStableDecay]
