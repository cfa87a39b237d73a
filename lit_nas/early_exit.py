"""Confidence-threshold early exit (SDN): each sample stops at the first exit whose max softmax >= q."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class EarlyExitResult:
    """Early-exit outcome at one threshold.

    Attributes:
        threshold: the confidence threshold q.
        accuracy: top-1 accuracy of the prediction made where each sample stopped.
        avg_flops: mean FLOPs per sample (blocks run plus every head evaluated on the way).
        cost_fraction: ``avg_flops`` divided by the reference cost (the network to its last exit with
            no internal classifier evaluated), so values below 1 are savings.
        exit_fractions: fraction of samples stopping at each exit, in exit order.
    """

    threshold: float
    accuracy: float
    avg_flops: float
    cost_fraction: float
    exit_fractions: tuple[float, ...]


def early_exit(
    confidences: Tensor,
    correct: Tensor,
    exit_costs: list[int] | Tensor,
    reference_cost: float,
    thresholds: list[float],
) -> list[EarlyExitResult]:
    """Evaluate early exit at every threshold.

    Args:
        confidences: ``(N, E)`` max softmax probability of each sample at each exit (depth order).
        correct: ``(N, E)`` whether each exit's prediction is right.
        exit_costs: FLOPs of stopping at each of the ``E`` exits.
        reference_cost: cost that ``cost_fraction`` is relative to.
        thresholds: confidence thresholds q, each reported separately (never tuned here).
    """
    n, e = confidences.shape
    costs = torch.as_tensor(exit_costs, dtype=torch.float64)
    results = []
    for q in thresholds:
        confident = confidences >= q
        confident[:, -1] = True  # the last exit always answers
        stop = confident.float().argmax(dim=1)  # first confident exit
        right = correct.gather(1, stop[:, None]).squeeze(1).float()
        counts = torch.bincount(stop, minlength=e).double()
        avg = float((counts * costs).sum() / max(n, 1))
        results.append(
            EarlyExitResult(
                threshold=float(q),
                accuracy=float(right.mean()) if n else float("nan"),
                avg_flops=avg,
                cost_fraction=avg / reference_cost,
                exit_fractions=tuple((counts / max(n, 1)).tolist()),
            )
        )
    return results


def format_table(results: list[EarlyExitResult], exits: tuple[int, ...]) -> str:
    """Plain-text table of early-exit results, one row per threshold."""
    head = f"{'q':>6} {'acc':>7} {'MFLOPs':>8} {'cost':>6}  " + " ".join(f"exit{e:<3}" for e in exits)
    rows = [head]
    for r in results:
        fr = " ".join(f"{f:7.3f}" for f in r.exit_fractions)
        rows.append(
            f"{r.threshold:6.3f} {r.accuracy:7.4f} {r.avg_flops / 1e6:8.2f} {r.cost_fraction:6.3f}  {fr}"
        )
    return "\n".join(rows)
