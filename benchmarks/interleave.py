"""Interleaved step timing shared by the benchmarks.

This machine's speed drifts between back-to-back runs by more than the effects measured, so variants take
turns step by step on the same batch (in a shuffled order per batch) and are compared by the median of
their per-batch ratios.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def time_interleaved(
    names: Sequence[str],
    batches: Sequence[Any],
    step: Callable[[str, Any], None],
    rounds: int,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """Seconds of every ``step(name, batch)``, each variant once per batch per round, after a warm-up.

    Prints the mean step time of each variant after each round.
    """
    for name in names:
        for batch in batches[:warmup]:
            step(name, batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    rng = random.Random(0)
    for r in range(rounds):
        for batch in batches:
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                step(name, batch)
                times[name].append(time.perf_counter() - t0)
        last = slice(-len(batches), None)
        means = ", ".join(f"{n} {statistics.mean(times[n][last]) * 1e3:.1f} ms" for n in names)
        print(f"round {r + 1}/{rounds}: {means}")
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over batches of ``a``'s step time over ``b``'s on the same batch."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def random_batches(
    steps: int, batch_size: int, shape: tuple[int, ...] = (1, 28, 28), classes: int = 10, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` fixed batches of random images and labels (timing needs no real data)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, *shape, generator=g), torch.randint(0, classes, (batch_size,), generator=g))
        for _ in range(steps)
    ]
