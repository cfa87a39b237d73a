"""Fisher channel pruning (pure functions): the signal, its accumulation during training, the choice.

Fisher pruning (Theis et al. 2018; Liège thesis section 4.2.3, eq. 4.10): with a binary mask ``m_k`` on
channel ``k`` of an activation ``a`` (``a' = m_k a``), removing the channel raises the loss by about

    Delta_k = 1/(2N) * sum_n g_nk^2,   g_nk = sum_ij a_nkij * d(loss_n)/d(a_nkij),

where ``loss_n`` is the loss of sample ``n`` alone. ``g_nk`` is the per-sample gradient of the mask, which
the activation and the gradient that backpropagation already computes give for free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_nas.align import align_down
from lit_nas.gates import gated_groups, producer_norms


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

    Under data parallelism every process sees its own share of each batch: ``reduce`` then sums each step's
    squared signals and sample counts over the processes (one collective per step, in a fixed group order),
    so every process holds the signal of the global batch, identical everywhere, and a checkpoint written
    by any of them resumes all of them. A process's loss is the mean over its own samples, and
    :func:`fisher_signal` undoes that mean with its own batch size; with BatchNorm in training mode, each
    process normalises with its own batch's statistics.

    Args:
        net: the network, with gates on ``groups`` (:func:`lit_nas.gates.attach_gates`).
        groups: names of the channel groups to score.
        reduce: sums a list of tensors over the processes, elementwise (``None``: one process).
    """

    def __init__(
        self,
        net: nn.Module,
        groups: Iterable[str],
        reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        self.net = net
        self.groups = list(groups)
        self.reduce = reduce
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
        groups = [g for g in self.groups if g in self._step]  # the same order on every process
        totals = [self._step[g].pow(2).sum(0) for g in groups]
        counts = [float(self._step[g].shape[0]) for g in groups]
        if self.reduce is not None:
            counted = torch.tensor(counts, dtype=torch.float64, device=totals[0].device if totals else None)
            *totals, summed = self.reduce([*totals, counted])  # one device: NCCL reduces CUDA tensors only
            counts = summed.tolist()
        for group, total, count in zip(groups, totals, counts):
            self._align(group)
            if group in self.sums:
                self.sums[group] = self.sums[group] + total
            else:  # the sums begin: remember which channels are live now
                self.sums[group] = total
                self._live[group] = self._gate(group) != 0
            self.counts[group] = self.counts.get(group, 0) + round(count)
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


#: what ranks the channels: the Fisher signal, or one of the two controls that tell whether it matters
CRITERIA = ("fisher", "l1", "random")


def filter_norms(net: nn.Module, group: str, p: int = 2) -> Tensor:
    """``sum |w|^p`` over the filters producing each channel of ``group``, summed over its producers.

    ``p = 2``: the squared L2 norm NetAdapt ranks by; ``p = 1``: the L1 norm of Li et al. (2017). BatchNorm
    producers do not count: the producing conv's filters carry the norm (a BN's scale is another criterion).
    """
    g = {c.name: c for c in net.channel_groups()}[group]  # type: ignore[operator]
    modules = dict(net.named_modules())
    total = torch.zeros(g.size, dtype=torch.float64)
    for where in g.producers:
        m = modules[where.module]
        if isinstance(m, nn.BatchNorm2d):
            continue
        w = m.weight.detach().double().transpose(0, where.dim) if where.dim else m.weight.detach().double()
        w = w.flatten(1).abs().pow(p).sum(1)
        total += w[where.start : where.start + g.size * where.per_channel].view(g.size, -1).sum(1).cpu()
    return total


def l1_scores(net: nn.Module, groups: Iterable[str]) -> dict[str, Tensor]:
    """L1 norm of each channel's filters (:func:`filter_norms` with ``p = 1``), per group.

    A control for the Fisher signal: the magnitude of the weights, no data.
    """
    return {name: filter_norms(net, name, 1) for name in groups}


def random_scores(live: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Uniform random scores per channel from ``seed``: the control that uses no information at all.

    The same seed gives the same scores (a resume and every process of a DDP run agree).
    """
    gen = torch.Generator().manual_seed(seed)
    return {group: torch.rand(mask.shape, generator=gen, dtype=torch.float64) for group, mask in live.items()}


def select_channels(
    scores: Mapping[str, Tensor],
    live: Mapping[str, Tensor],
    count: int,
    costs: Mapping[str, float] | None = None,
    step: int = 1,
) -> list[tuple[str, int]]:
    """The ``count`` live channels to prune: lowest score, or lowest ``score / cost`` with ``costs``.

    Never leaves a group with 0 live channels; fewer than ``count`` channels come back when every
    remaining channel is the last of its group.

    Args:
        scores: ``Delta_k`` of each channel, by group (groups without scores are not pruned).
        live: boolean mask of the channels still live (gate != 0), by group.
        count: channels to choose.
        costs: what removing one channel of each group saves (e.g. :func:`lit_nas.cost.channel_flops`).
        step: channel alignment (:mod:`lit_nas.align`): with ``step > 1`` a group loses whole units, the
            lowest-scored live channels down to its next multiple of the step (never below one step), and
            units are ranked by their mean score (over the cost); at least ``count`` channels go while
            units remain.
    """
    if step > 1:
        return _select_units(scores, live, count, costs, step)
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


def _select_units(
    scores: Mapping[str, Tensor],
    live: Mapping[str, Tensor],
    count: int,
    costs: Mapping[str, float] | None,
    step: int,
) -> list[tuple[str, int]]:
    """:func:`select_channels` in whole units of ``step`` (see there)."""
    order: dict[str, list[int]] = {}  # each group's live channels, lowest score first
    value: dict[str, Tensor] = {}
    for group, score in scores.items():
        alive = live[group].to(score.device)
        if alive.shape != score.shape:
            raise ValueError(f"group {group!r}: {alive.numel()} live flags for {score.numel()} scores")
        value[group] = score / costs[group] if costs is not None else score
        idx = alive.nonzero().flatten()
        order[group] = [int(idx[i]) for i in torch.argsort(value[group][idx], stable=True)]
    chosen: list[tuple[str, int]] = []
    while len(chosen) < count:
        best: tuple[float, int, str, list[int]] | None = None
        for rank, (group, channels) in enumerate(order.items()):
            n = len(channels)
            k = n - align_down(n - 1, step) if n > step else 0  # down to the next multiple below
            if k <= 0:
                continue
            unit = channels[:k]
            mean = float(value[group][unit].mean())
            if best is None or (mean, rank) < best[:2]:
                best = (mean, rank, group, unit)
        if best is None:
            break
        _, _, group, unit = best
        chosen += [(group, k) for k in unit]
        order[group] = order[group][len(unit) :]
    return chosen
