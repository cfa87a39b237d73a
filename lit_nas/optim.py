"""Optimizers and learning-rate schedules, configured from YAML and validated when built."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

import torch
from torch.optim.lr_scheduler import LRScheduler

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")


@dataclass
class OptimizerConfig:
    """Optimizer settings (the thesis: SGD, momentum 0.9, Nesterov, weight decay).

    Attributes:
        name: ``sgd``, ``adam`` or ``adamw``.
        lr: base learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum (SGD).
        weight_decay: L2 penalty; parameters flagged ``no_weight_decay`` by a network or callback are exempt.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name must be one of {list(OPTIMIZERS)}; got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"optimizer lr must be > 0; got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0:
            raise ValueError(
                f"weight_decay and momentum must be >= 0; got {self.weight_decay}, {self.momentum}"
            )
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")

    def build(self, param_groups: Iterable[dict]) -> torch.optim.Optimizer:
        """Instantiate for the given parameter groups (groups may override ``weight_decay``)."""
        groups = [dict(g) for g in param_groups]
        for g in groups:
            g.setdefault("weight_decay", self.weight_decay)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=self.lr)


@dataclass
class LRScheduleConfig:
    """Learning-rate schedule.

    Attributes:
        name: ``multistep`` (one gamma per milestone, applied cumulatively), ``cosine`` (to 0 at the end of
            training) or ``constant``.
        milestones: epochs at which the learning rate is multiplied (multistep), strictly increasing.
        gammas: one factor per milestone; after milestone ``i`` the rate is
            ``lr * gammas[0] * ... * gammas[i]`` (the thesis: 120/160/180 with 0.1/0.01/0.01).
        interval: ``epoch`` (the rate changes between epochs) or ``step`` (after every optimizer step: a
            smooth decay, what a run of few epochs needs). ``step`` is for ``cosine`` only.
        warmup_epochs: ``cosine`` only: the rate rises linearly from ``lr / warm-up steps`` to ``lr`` over
            this many epochs (a fraction is fine with ``interval: step``), then decays to 0 at the end.
    """

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [35, 60, 85])
    gammas: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.1])
    interval: Literal["epoch", "step"] = "epoch"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"lr_schedule name must be one of {list(SCHEDULES)}; got {self.name!r}")
        if self.interval not in ("epoch", "step"):
            raise ValueError(f"lr_schedule interval must be 'epoch' or 'step'; got {self.interval!r}")
        if self.name != "cosine" and (self.interval == "step" or self.warmup_epochs):
            raise ValueError(
                f"lr_schedule interval: step and warmup_epochs are for name: cosine; got name {self.name!r} "
                f"with interval {self.interval!r}, warmup_epochs {self.warmup_epochs}"
            )
        whole = self.warmup_epochs == int(self.warmup_epochs)
        if self.warmup_epochs < 0 or (self.interval == "epoch" and not whole):
            raise ValueError(
                f"warmup_epochs must be >= 0 (a whole number with interval: epoch); got {self.warmup_epochs}"
            )
        if self.name == "multistep":
            m = self.milestones
            if any(b <= a for a, b in pairwise(m)) or any(x < 1 for x in m):
                raise ValueError(f"milestones must be positive and strictly increasing; got {m}")
            if len(self.gammas) != len(m):
                raise ValueError(
                    f"one gamma per milestone: got {len(self.gammas)} gammas {self.gammas} for "
                    f"{len(m)} milestones {m}"
                )
            if any(g <= 0 for g in self.gammas):
                raise ValueError(f"gammas must be > 0; got {self.gammas}")

    def build(
        self, optimizer: torch.optim.Optimizer, max_epochs: int, steps_per_epoch: int | None = None
    ) -> LRScheduler:
        """Instantiate for ``optimizer``.

        Args:
            optimizer: the optimizer whose rates it sets.
            max_epochs: the epochs this schedule spans (the cosine period).
            steps_per_epoch: optimizer steps per epoch; needed with ``interval: step``.
        """
        if self.name == "cosine" and (self.interval == "step" or self.warmup_epochs):
            per = 1 if self.interval == "epoch" else steps_per_epoch
            if per is None or per < 1:
                raise ValueError(f"lr_schedule interval: step needs steps_per_epoch >= 1; got {per}")
            total = max(1, max_epochs) * per
            return WarmupCosineLR(optimizer, total, min(total - 1, round(self.warmup_epochs * per)))
        if self.name == "multistep":
            late = [m for m in self.milestones if max_epochs > 0 and m >= max_epochs]
            if late:
                # A warning, not an error: shortened debug runs (fast_dev_run, fewer epochs) are legitimate.
                warnings.warn(
                    f"milestones {late} are not before max_epochs={max_epochs}: they will never fire",
                    stacklevel=2,
                )
            return MultiStepGammaLR(optimizer, self.milestones, self.gammas)
        if self.name == "cosine":  # kept (not WarmupCosineLR): existing checkpoints resume its state
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up over ``warmup`` steps, then a half cosine to 0 at step ``total``.

    The rate at step ``t`` is ``base_lr * (t + 1) / warmup`` during the warm-up and
    ``base_lr * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2`` after it: closed form from the step
    counter (resumes cannot drift), and only numbers in its state (checkpoints load with ``weights_only``).
    A "step" is an epoch or an optimizer step, whichever the scheduler is stepped on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, warmup: int = 0) -> None:
        if not 0 <= warmup < total:
            raise ValueError(f"warm-up must be in [0, total); got warmup {warmup}, total {total}")
        self.total, self.warmup = int(total), int(warmup)
        super().__init__(optimizer)

    def factor(self, t: int) -> float:
        """Multiplier of the base rate at step ``t``."""
        if t < self.warmup:
            return (t + 1) / self.warmup
        progress = min(1.0, (t - self.warmup) / (self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:  # noqa: D102
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def _constant(epoch: int) -> float:
    return 1.0


class MultiStepGammaLR(LRScheduler):
    """Multi-step schedule with its own gamma per milestone, applied cumulatively.

    The rate at epoch ``e`` is ``base_lr * prod(gammas[i] for milestones[i] <= e)``; it is computed in closed
    form from the epoch counter, so resuming from a checkpoint cannot drift.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: list[int], gammas: list[float]) -> None:
        if len(milestones) != len(gammas):
            raise ValueError(
                f"one gamma per milestone: {len(gammas)} gammas for {len(milestones)} milestones"
            )
        self.milestones = list(milestones)
        self.gammas = list(gammas)
        super().__init__(optimizer)

    def factor(self, epoch: int) -> float:
        """Multiplier of the base rate at ``epoch``."""
        return math.prod(g for m, g in zip(self.milestones, self.gammas) if m <= epoch)

    def get_lr(self) -> list[float]:  # noqa: D102
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    _get_closed_form_lr = get_lr
