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
    """Per-epoch learning-rate schedule.

    Attributes:
        name: ``multistep`` (one gamma per milestone, applied cumulatively), ``cosine`` (to 0 at the last
            epoch) or ``constant``.
        milestones: epochs at which the learning rate is multiplied (multistep), strictly increasing.
        gammas: one factor per milestone; after milestone ``i`` the rate is
            ``lr * gammas[0] * ... * gammas[i]`` (the thesis: 120/160/180 with 0.1/0.01/0.01).
    """

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [35, 60, 85])
    gammas: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.1])

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"lr_schedule name must be one of {list(SCHEDULES)}; got {self.name!r}")
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

    def build(self, optimizer: torch.optim.Optimizer, max_epochs: int) -> LRScheduler:
        """Instantiate for ``optimizer``; ``max_epochs`` sets the cosine period."""
        if self.name == "multistep":
            late = [m for m in self.milestones if max_epochs > 0 and m >= max_epochs]
            if late:
                # A warning, not an error: shortened debug runs (fast_dev_run, fewer epochs) are legitimate.
                warnings.warn(
                    f"milestones {late} are not before max_epochs={max_epochs}: they will never fire",
                    stacklevel=2,
                )
            return MultiStepGammaLR(optimizer, self.milestones, self.gammas)
        if self.name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


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
