"""Pruning criteria and mask selection (pure functions).

SNIP connection sensitivity (Lee et al. 2019; Inria thesis sections 2.3.2 and 4): with a multiplicative mask
``c`` on every weight (``w' = c * w``), the sensitivity of connection ``w`` is the magnitude of the loss's
gradient with respect to its mask at ``c = 1``, ``|dL/dc| = |g * w|`` with ``g = dL/dw``. Ranking is
local to each block (:func:`snip_block_masks`); iterative pruning reaches a block's keep ratio in steps
(:func:`keep_ratio_steps`), each step ranking only the surviving weights.

Fisher pruning (Theis et al. 2018; Liège thesis section 4.2.3, eq. 4.10): with a binary mask ``m_k`` on
channel ``k`` of an activation ``a`` (``a' = m_k a``), removing the channel raises the loss by about

    Delta_k = 1/(2N) * sum_n g_nk^2,   g_nk = sum_ij a_nkij * d(loss_n)/d(a_nkij),

where ``loss_n`` is the loss of sample ``n`` alone. ``g_nk`` is the per-sample gradient of the mask, which
the activation and the gradient that backpropagation already computes give for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_nas.gates import gated_groups, producer_norms

KEEP_SCHEDULES = ("geometric", "linear")


def snip_scores(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Any, Tensor], Tensor],
    params: Mapping[str, nn.Parameter] | None = None,
) -> dict[str, Tensor]:
    """SNIP connection sensitivity ``|g * w|`` of every weight in ``params``.

    ``g`` is the gradient of the *mean* of the batches' losses, so several batches of ``B`` images score
    like one batch of ``n * B`` (the thesis's criterion batch sizes 128..896). A pruned weight (``w = 0``)
    scores 0. The model runs in its current mode (training mode: batch statistics, as SNIP does); its
    buffers (BatchNorm running statistics) and the parameters' ``.grad`` are left exactly as they were.

    Args:
        model: maps a batch of images to whatever ``loss_fn`` takes.
        batches: ``(images, targets)`` pairs; moved to the parameters' device.
        loss_fn: ``loss_fn(model(images), targets) -> scalar``.
        params: weights to score, by name; defaults to every conv and linear weight of ``model``.

    Returns:
        ``{name: scores}``, each the parameter's shape, on its device.
    """
    if params is None:
        params = {
            f"{n}.weight" if n else "weight": m.weight
            for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }
    names, tensors = list(params), list(params.values())
    if not tensors:
        raise ValueError("snip_scores: no parameters to score")
    device = tensors[0].device
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    grads = [torch.zeros_like(t) for t in tensors]
    n = 0
    try:
        for x, y in batches:
            loss = loss_fn(model(x.to(device)), y.to(device))
            for acc, g in zip(grads, torch.autograd.grad(loss, tensors, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
            n += 1
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved:
                    b.copy_(saved[k])
    if n == 0:
        raise ValueError("snip_scores: no batches")
    return {name: (g / n * t.detach()).abs() for name, g, t in zip(names, grads, tensors)}


@contextmanager
def reinitialized(
    params: Mapping[str, nn.Parameter],
    masks: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Temporarily give ``params`` a fresh variance-scaled initialisation, then restore them exactly.

    Original SNIP scores a network at initialisation: with ``reinit: true`` the trained weights are swapped
    for He-normal ones (fan-in, the ``variance_scaling_initializer`` of the SNIP code) for the scoring, pruned
    weights staying zero, and put back afterwards.
    """
    masks = masks or {}
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                nn.init.kaiming_normal_(p, mode="fan_in", nonlinearity="relu", generator=generator)
                if n in masks:
                    p.mul_(masks[n])
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def keep_ratio_steps(
    keep: float, steps: int, schedule: Literal["geometric", "linear"] = "geometric"
) -> list[float]:
    """Keep ratio of a block after each of ``steps`` prunings, ending at ``keep``.

    ``geometric`` (default): step ``j`` keeps ``keep ** (j / steps)``, so every step removes the same
    *fraction of the surviving* weights (0.5 in 3 steps: 0.794, 0.630, 0.5), the rule of iterative magnitude
    pruning. ``linear``: equal *numbers* of weights per step (0.833, 0.667, 0.5).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep ratio must be in (0, 1]; got {keep}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if schedule == "geometric":
        return [keep ** (j / steps) for j in range(1, steps + 1)]
    if schedule == "linear":
        return [1 - (1 - keep) * j / steps for j in range(1, steps + 1)]
    raise ValueError(f"keep-ratio schedule must be one of {list(KEEP_SCHEDULES)}; got {schedule!r}")


@dataclass(frozen=True)
class PruneSchedule:
    """When each block of a growing network is pruned.

    Block ``b`` becomes eligible ``after_epochs`` epochs after it activates and is pruned ``steps`` times,
    each time at a pruning event. The events are ``prune_epochs`` when given; otherwise an event happens
    when a block becomes eligible for its first pruning, and, once every block has had its first, every
    ``after_epochs`` epochs after the previous event while a block still has steps to go. So while the
    network grows, a block's later steps ride on the next blocks' first prunings (the thesis: growth at
    25/50/75, 3 steps -> events 10/35/60/85/95/105).

    Attributes:
        steps: prunings per block (1: one-shot).
        after_epochs: epochs between a block's activation and its first pruning.
        prune_epochs: explicit events, or ``None`` for the rule above.
    """

    steps: int = 1
    after_epochs: int = 10
    prune_epochs: tuple[int, ...] | None = None

    def blocks_at(
        self,
        epoch: int,
        activated: Mapping[int, int],
        steps_done: Mapping[int, int],
        last_event: int | None,
        num_blocks: int,
    ) -> list[int]:
        """Blocks pruned at ``epoch``.

        Args:
            epoch: the current epoch.
            activated: epoch at which each active block activated.
            steps_done: prunings done so far per block.
            last_event: epoch of the previous pruning event, if any.
            num_blocks: blocks of the whole network.
        """
        eligible = [
            b
            for b, start in sorted(activated.items())
            if steps_done.get(b, 0) < self.steps and epoch >= start + self.after_epochs
        ]
        if not eligible:
            return []
        if self.prune_epochs is not None:
            return eligible if epoch in self.prune_epochs else []
        first = any(steps_done.get(b, 0) == 0 for b in eligible)
        started = all(steps_done.get(b, 0) > 0 for b in range(num_blocks))  # every block had its first
        due = started and last_event is not None and epoch - last_event >= self.after_epochs
        return eligible if first or due else []

    def plan(self, activation_epochs: list[int], max_epochs: int) -> list[tuple[int, list[int]]]:
        """``(epoch, blocks pruned)`` of every event, for blocks activating at ``activation_epochs``."""
        activated: dict[int, int] = {}
        steps_done: dict[int, int] = {}
        last, events = None, []
        for epoch in range(max_epochs):
            for b, start in enumerate(activation_epochs):
                if start <= epoch:
                    activated.setdefault(b, epoch)
            blocks = self.blocks_at(epoch, activated, steps_done, last, len(activation_epochs))
            for b in blocks:
                steps_done[b] = steps_done.get(b, 0) + 1
            if blocks:
                events.append((epoch, blocks))
                last = epoch
        return events


def snip_block_masks(
    scores: Mapping[str, Tensor], keep_count: int, current: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Keep the ``keep_count`` highest-scoring weights of one block, ranked together across its layers.

    Weights already pruned (0 in ``current``) are never revived: they rank below every survivor, and
    ``keep_count`` is capped at the number of survivors.

    Args:
        scores: scores of every weight of the block, by parameter name.
        keep_count: weights to keep in the whole block (exact).
        current: the block's current masks, by name (a parameter without one is fully alive).

    Returns:
        A 0/1 mask (the scores' dtype) for every parameter in ``scores``.
    """
    current = current or {}
    names = list(scores)
    flat = []
    for n in names:
        s = scores[n].detach().flatten().float()
        if n in current:
            s = s.masked_fill(current[n].flatten() == 0, -math.inf)
        flat.append(s)
    allscores = torch.cat(flat)
    alive = int(torch.isfinite(allscores).sum())
    k = max(0, min(int(keep_count), alive))
    keep = torch.zeros_like(allscores, dtype=torch.bool)
    keep[torch.topk(allscores, k, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        numel = scores[n].numel()
        out[n] = keep[start : start + numel].view_as(scores[n]).to(scores[n].dtype)
        start += numel
    return out


def fisher_signal(activation: Tensor, grad: Tensor, mean_reduced: bool = True) -> Tensor:
    """Per-sample gradient of a channel mask, ``g_nk = sum_ij a_nkij * d(loss_n)/d(a_nkij)``: ``(N, C)``.

    Args:
        activation: ``(N, C, H, W)`` (or ``(N, C)``) activation the mask multiplies.
        grad: gradient of the backpropagated batch loss with respect to ``activation``, same shape.
        mean_reduced: the batch loss was the *mean* of the per-sample losses (PyTorch's default), so each
            sample's own gradient is ``N`` times its share of ``grad``; ``False`` for a summed loss.
    """
    if activation.shape != grad.shape:
        raise ValueError(f"activation {tuple(activation.shape)} and grad {tuple(grad.shape)} differ in shape")
    g = (activation * grad).flatten(2).sum(2) if activation.dim() > 2 else activation * grad
    return g * activation.shape[0] if mean_reduced else g


def fisher_scores(activation: Tensor, grad: Tensor, mean_reduced: bool = True) -> Tensor:
    """Fisher pruning signal of every channel for one batch: ``1/(2N) sum_n g_nk^2``, shape ``(C,)``.

    Scores of several batches average (weight each by its ``N``); the lowest score is the channel whose
    removal is expected to cost the least loss.
    """
    g = fisher_signal(activation, grad, mean_reduced)
    return g.pow(2).sum(0) / (2 * g.shape[0])


class FisherAccumulator:
    """Accumulates the Fisher signal of every channel of gated channel groups during training.

    A forward hook on each BatchNorm that produces a group (after its gate) keeps the activation and puts a
    tensor hook on it, which turns the gradient backpropagation computes anyway into the per-sample signal
    ``g_nk`` (:func:`fisher_signal`). A group produced by several BatchNorms (a residual stream: channels
    tied by identity shortcuts share one gate) sums their signals *before* squaring: ``g_nk`` is the
    derivative with respect to the one mask they share. :meth:`end_step` squares and accumulates a step's
    signal; :meth:`scores` gives ``Delta_k = 1/(2N) sum_n g_nk^2`` over every sample seen since
    :meth:`reset`.

    Garbage collection may remove channels between steps; the running sums then follow: the channels whose
    gate was 0 at the last step are the ones removed.

    Args:
        net: the network, with gates on ``groups`` (:func:`lit_nas.gates.attach_gates`).
        groups: names of the channel groups to score.
    """

    def __init__(self, net: nn.Module, groups: Iterable[str]) -> None:
        self.net = net
        self.groups = list(groups)
        self.enabled = True
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._live: dict[str, Tensor] = {}  # gate != 0 when each group's sums began
        self._step: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self._gates: dict[str, Tensor] = {}

    def attach(self) -> None:
        """Hook the producing BatchNorms of every group (after their gate hooks)."""
        self.detach()
        gates = gated_groups(self.net)
        self._gates = {group: gates[group] for group in self.groups}  # sliced in place by surgery: stable
        for group in self.groups:
            for norm in producer_norms(self.net, group):
                self._handles.append(norm.register_forward_hook(self._forward_hook(group)))

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _gate(self, group: str) -> Tensor:
        return self._gates[group].detach()

    def _forward_hook(self, group: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.enabled and torch.is_grad_enabled() and output.requires_grad:
                act = output.detach()
                output.register_hook(lambda grad: self._add(group, act, grad))

        return hook

    def _align(self, group: str) -> None:
        """Follow a garbage collection: the running sums keep the channels that were live when they began.

        Gates only close at prune events, which reset the sums, so the live channels recorded when a group's
        sums begin are the ones a later collection keeps.
        """
        gate = self._gate(group)
        if group in self.sums and self.sums[group].numel() != gate.numel():
            live = self._live[group]
            if int(live.sum()) == gate.numel():  # collected: keep the sums of the surviving channels
                self.sums[group] = self.sums[group][live.to(self.sums[group].device)]
                self._live[group] = gate != 0
            else:
                del self.sums[group]
                self.counts[group] = 0

    def _add(self, group: str, act: Tensor, grad: Tensor) -> None:
        g = fisher_signal(act, grad).detach()
        prev = self._step.get(group)
        self._step[group] = g if prev is None else prev + g

    def end_step(self) -> None:
        """Square and accumulate the signals of the step whose backward pass just ran."""
        for group, g in self._step.items():
            self._align(group)
            total = g.pow(2).sum(0)
            if group in self.sums:
                self.sums[group] = self.sums[group] + total
            else:  # the sums begin: remember which channels are live now
                self.sums[group] = total
                self._live[group] = self._gate(group) != 0
            self.counts[group] = self.counts.get(group, 0) + g.shape[0]
        self._step = {}

    def scores(self) -> dict[str, Tensor]:
        """``Delta_k`` of every channel of the groups that saw samples since the last reset."""
        out = {}
        for group in list(self.sums):
            self._align(group)
            if self.counts.get(group, 0) > 0 and group in self.sums:
                out[group] = self.sums[group] / (2 * self.counts[group])
        return out

    def reset(self) -> None:
        """Forget every accumulated signal (Theis et al. reset after each pruned channel)."""
        self.sums, self.counts, self._step = {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        """Accumulated sums and sample counts (for an exact resume)."""
        return {
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "counts": dict(self.counts),
            "live": {k: v.cpu() for k, v in self._live.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        device = next(self.net.parameters()).device
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self._live = {k: v.to(device) for k, v in state["live"].items()}


def select_channels(
    scores: Mapping[str, Tensor],
    live: Mapping[str, Tensor],
    count: int,
    costs: Mapping[str, float] | None = None,
) -> list[tuple[str, int]]:
    """The ``count`` live channels to prune: lowest score, or lowest ``score / cost`` with ``costs``.

    Never leaves a group with 0 live channels; fewer than ``count`` channels come back when every
    remaining channel is the last of its group.

    Args:
        scores: ``Delta_k`` of each channel, by group (groups without scores are not pruned).
        live: boolean mask of the channels still live (gate != 0), by group.
        count: channels to choose.
        costs: what removing one channel of each group saves (e.g. :func:`lit_nas.cost.channel_flops`).
    """
    candidates: list[tuple[float, int, int, str]] = []
    for order, (group, score) in enumerate(scores.items()):
        alive = live[group].to(score.device)
        if alive.shape != score.shape:
            raise ValueError(f"group {group!r}: {alive.numel()} live flags for {score.numel()} scores")
        value = score / costs[group] if costs is not None else score
        candidates += [(float(value[k]), order, int(k), group) for k in alive.nonzero().flatten()]
    candidates.sort()
    left = {group: int(live[group].sum()) for group in scores}
    chosen: list[tuple[str, int]] = []
    for _, _, k, group in candidates:
        if len(chosen) == count:
            break
        if left[group] > 1:  # the last live channel of a layer stays
            chosen.append((group, k))
            left[group] -= 1
    return chosen
