"""The multi-exit training objective: a weighted sum of the active exits' cross-entropies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from lit_nas.nets.base import ExitLogits


@dataclass
class ExitLossConfig:
    """How the exits' losses are weighted.

    Attributes:
        weights: one weight per block exit of the spec (exits that do not exist are ignored); default equal.
        sdn_ramp: SDN schedule: the weight of every internal exit grows linearly from 0.01 at epoch 0 to its
            target at ``ramp_epochs`` (default: the whole run); the final exit keeps its weight.
        ramp_epochs: length of the ramp in epochs; ``None`` means ``max_epochs``.
        label_smoothing: each exit's training cross-entropy against targets smoothed by this amount
            (0 = off; 0.1 is the usual choice). Validation and test losses are always the plain cross-entropy.
    """

    weights: list[float] | None = None
    sdn_ramp: bool = False
    ramp_epochs: int | None = None
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise ValueError(f"exit loss weights must be >= 0; got {self.weights}")
        if self.ramp_epochs is not None and self.ramp_epochs < 1:
            raise ValueError(f"ramp_epochs must be >= 1; got {self.ramp_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1); got {self.label_smoothing}")

    def check(self, num_blocks: int) -> None:
        """Raise if ``weights`` does not have one entry per block."""
        if self.weights is not None and len(self.weights) != num_blocks:
            raise ValueError(
                f"exit loss weights {self.weights} have {len(self.weights)} entries; the network has "
                f"{num_blocks} blocks (one weight per block exit)"
            )


def exit_weights(
    config: ExitLossConfig, num_blocks: int, exits: tuple[int, ...], epoch: int, max_epochs: int
) -> dict[int, float]:
    """Weight of each active exit at ``epoch``.

    Args:
        config: the weighting recipe.
        num_blocks: blocks in the network (length of ``config.weights``).
        exits: the active exits (block indices, increasing); the last is the output.
        epoch: current epoch (for the SDN ramp).
        max_epochs: run length (default ramp length).
    """
    config.check(num_blocks)
    base = config.weights or [1.0] * num_blocks
    weights = {e: float(base[e]) for e in exits}
    if config.sdn_ramp:
        ramp = config.ramp_epochs or max(1, max_epochs)
        for e in exits[:-1]:
            target = weights[e]
            weights[e] = min(target, 0.01 + epoch * target / ramp)
    return weights


def multi_exit_loss(
    outputs: ExitLogits, targets: Tensor, weights: dict[int, float], label_smoothing: float = 0.0
) -> tuple[Tensor, dict[int, Tensor]]:
    """Weighted sum of per-exit cross-entropies; also returns each exit's (unweighted) loss."""
    per_exit = {
        e: F.cross_entropy(logits, targets, label_smoothing=label_smoothing) for e, logits in outputs.items()
    }
    total = torch.stack([weights[e] * loss for e, loss in per_exit.items()]).sum()
    return total, per_exit
