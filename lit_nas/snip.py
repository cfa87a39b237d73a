"""SNIP connection sensitivity and its pruning schedule (pure functions).

SNIP (Lee et al. 2019; Inria thesis sections 2.3.2 and 4): with a multiplicative mask ``c`` on every weight
(``w' = c * w``), the sensitivity of connection ``w`` is the magnitude of the loss's gradient with respect to
its mask at ``c = 1``, ``|dL/dc| = |g * w|`` with ``g = dL/dw``. Ranking is local to each block
(:func:`snip_block_masks`); iterative pruning reaches a block's keep ratio in steps
(:func:`keep_ratio_steps`), each step ranking only the surviving weights, at the events of
:class:`PruneSchedule`.

Coarser units rank by the summed sensitivity of their weights: a conv output channel (:func:`filter_scores`,
over every filter producing it) or an edge of the dense concatenation (:func:`edge_scores`, over the input
slice of the target cell's first conv). :func:`rank_units` orders them for removal, and
:func:`removal_to_budget` removes as few as meet a latency budget. Each granularity is one object of
:data:`UNIT_KINDS`: what it scores, its units, what must keep one, and its removal.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_nas.arch import ArchSpec
from lit_nas.nets.base import ChannelGroup, MultiExitNet
from lit_nas.surgery import edge_removed_spec, remove_channels, remove_edges

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


def keep_ratios(keep_ratio: float | Iterable[float], who: str = "SnipPruning") -> list[float]:
    """One keep ratio, or one per block, each in ``(0, 1]``, as a list (else ``ValueError`` naming it)."""
    ratios = [keep_ratio] if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
    if not ratios or any(isinstance(r, bool) or not 0 < r <= 1 for r in ratios):
        raise ValueError(f"{who} keep_ratio must be in (0, 1] (one or one per block); got {keep_ratio}")
    return ratios


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

    @classmethod
    def build(
        cls,
        mode: str,
        steps: int | None,
        after_epochs: int,
        prune_epochs: Iterable[int] | None,
        who: str = "SnipPruning",
    ) -> PruneSchedule:
        """A checked schedule from a callback's arguments (``one_shot``: 1 step; ``iterative``: 3 by default).

        Raises:
            ValueError: naming the bad value (``who`` starts the message).
        """
        if mode == "one_shot" and steps not in (None, 1):
            raise ValueError(f"{who} mode 'one_shot' prunes once; got steps={steps} (use mode: iterative)")
        steps = 1 if mode == "one_shot" else (3 if steps is None else steps)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{who} steps must be an integer >= 1; got {steps!r}")
        if not isinstance(after_epochs, int) or after_epochs < 0:
            raise ValueError(f"{who} after_epochs must be an integer >= 0; got {after_epochs!r}")
        events = None if prune_epochs is None else list(prune_epochs)
        if events is not None and (
            not events
            or any(not isinstance(e, int) or e < 0 for e in events)
            or any(b <= a for a, b in pairwise(events))
        ):
            raise ValueError(
                f"{who} prune_epochs must be non-negative integers, strictly increasing; got {events}"
            )
        return cls(steps, after_epochs, None if events is None else tuple(events))

    def completing_plan(
        self, activation_epochs: list[int], max_epochs: int, who: str = "SnipPruning"
    ) -> list[tuple[int, list[int]]]:
        """:meth:`plan`, refused with a ``ValueError`` when a block would not get all its steps in time."""
        events = self.plan(activation_epochs, max_epochs)
        done = {b: sum(b in blocks for _, blocks in events) for b in range(len(activation_epochs))}
        short = {b: k for b, k in done.items() if k < self.steps}
        if short:
            raise ValueError(
                f"{who} can never finish: within max_epochs={max_epochs}, blocks {sorted(short)} would be "
                f"pruned {[short[b] for b in sorted(short)]} of {self.steps} times (blocks activate at "
                f"epochs {activation_epochs}; a block is pruned at events >= {self.after_epochs} epochs "
                f"after it activates; events planned: {[e for e, _ in events]}). Add later prune_epochs, "
                "lower after_epochs or train longer."
            )
        return events

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


# -- structured granularities: filters and edges ----------------------------------------------------------
def group_block(group: ChannelGroup) -> int:
    """The block that owns a channel group: the block of its first producing layer (``blocks.<b>...``)."""
    return int(group.producers[0].module.split(".")[1])


def filter_scores(
    scores: Mapping[str, Tensor], groups: Iterable[ChannelGroup], prefix: str = ""
) -> dict[str, Tensor]:
    """Sensitivity of each output channel of each group: the summed ``|g * w|`` of the filters producing it.

    A channel group's channel is produced by one filter of every conv among the group's producers (a residual
    stream's stem conv, each cell's last conv, each projection); its score sums the scores of all their
    weights (the conv's other dimensions). Producers without a score in ``scores`` (BatchNorms, layers not
    scored) add nothing.

    Args:
        scores: per-weight SNIP scores by parameter name (:func:`snip_scores`).
        groups: channel groups of the network (``net.channel_groups()``).
        prefix: prepended to the groups' module names to find them in ``scores`` (``"net."``).

    Returns:
        ``{group name: (size,) scores}``.
    """
    out = {}
    for g in groups:
        total = torch.zeros(g.size)
        for where in g.producers:
            s = scores.get(f"{prefix}{where.module}.weight")
            if s is not None and where.dim == 0:
                part = s.detach().float().flatten(1).sum(1).cpu()
                total += part[where.start : where.start + g.size]
        out[g.name] = total
    return out


def edge_scores(
    scores: Mapping[str, Tensor], net: MultiExitNet, cells: Iterable[int], prefix: str = ""
) -> dict[tuple[int, int], float]:
    """Sensitivity of each live dense edge into ``cells``: the summed ``|g * w|`` of its input slice.

    Returns:
        ``{(source feature, target cell): score}``; the slice is that of ``net.dense_sources(cell)``.
    """
    out = {}
    for i in cells:
        s = scores[f"{prefix}{net.cell_input_layer(i)}.weight"].detach().float()
        for src in net.dense_sources(i):
            out[(src.feature, i)] = float(s[:, src.start : src.stop].sum())
    return out


def rank_units(scores: Mapping[Hashable, float], owner: Mapping[Hashable, Hashable]) -> list[Hashable]:
    """Units in the order they are removed: lowest score first, each owner's best unit never.

    ``owner`` maps each unit to what must keep one unit (a channel's group: no layer is left with 0
    channels; an edge's target cell: its conv needs an input). Ties break by the units' order in
    ``scores``, so the ranking is deterministic.
    """
    order = sorted(scores, key=lambda u: -scores[u])  # stable: ties keep the given order
    best, rest = set(), []
    for u in order:
        if owner[u] not in best:
            best.add(owner[u])
        else:
            rest.append(u)
    return rest[::-1]


def removal_to_budget(ranked: Sequence[Hashable], cost: Callable[[int], float], budget: float) -> int:
    """Fewest units of ``ranked`` to remove (in order) for ``cost(k) <= budget``; all of them if none does.

    ``cost(k)`` is the cost once the first ``k`` units are removed, non-increasing in ``k`` (a predicted
    latency); found by bisection, so a look-up-table prediction runs ``log2(len(ranked))`` times.
    """
    if cost(len(ranked)) > budget:
        return len(ranked)
    return bisect.bisect_left(range(len(ranked)), True, key=lambda k: cost(k) <= budget)


class WeightUnits:
    """``weight`` granularity (the thesis): single weights, masked; the units of the block they lie in."""

    name = "weight"
    #: what the log counts
    noun = "weights"

    def scope(
        self, weights: Mapping[int, Mapping[str, nn.Parameter]], net: MultiExitNet, blocks: Sequence[int]
    ) -> dict[str, nn.Parameter]:
        """The weights scored to prune ``blocks``: their own (``weights`` is ``prunable_weights()``)."""
        return {n: p for b in blocks for n, p in weights[b].items()}

    def check_network(self, spec: ArchSpec) -> None:
        """Nothing to check: every network has weights."""


class StructuredUnits:
    """A granularity whose units are removed by surgery: filters or edges (:data:`UNIT_KINDS`).

    The four things a unit kind decides, in one place: which weights are scored (:meth:`scope`), what the
    units are and their scores (:meth:`units`), what must keep one of them (:meth:`owner`), and the network
    once some are gone (:meth:`spec_without`, :meth:`remove`).
    """

    name: str
    noun: str

    def scope(
        self, weights: Mapping[int, Mapping[str, nn.Parameter]], net: MultiExitNet, blocks: Sequence[int]
    ) -> dict[str, nn.Parameter]:
        """The weights whose scores rank the units of ``blocks`` (``weights``: ``prunable_weights()``)."""
        raise NotImplementedError

    def units(
        self, net: MultiExitNet, scores: Mapping[str, Tensor], blocks: Sequence[int], prefix: str = ""
    ) -> dict[int, dict[tuple, float]]:
        """The removable units of each block and their scores."""
        raise NotImplementedError

    def owner(self, unit: tuple) -> Hashable:
        """What must keep one unit (:func:`rank_units`)."""
        raise NotImplementedError

    def spec_without(self, net: MultiExitNet, removed: Iterable[tuple]) -> ArchSpec:
        """The ArchSpec once the units ``removed`` are gone; ``net`` is untouched."""
        raise NotImplementedError

    def remove(
        self, net: MultiExitNet, removed: Sequence[tuple], optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> ArchSpec:
        """Remove the units from ``net`` (optimizer state sliced with the weights); the new ArchSpec."""
        raise NotImplementedError

    def check_network(self, spec: ArchSpec) -> None:
        """``ValueError`` when ``spec`` has no units of this kind."""


class FilterUnits(StructuredUnits):
    """``filter`` granularity: conv output channels, ``(group, channel)``, of the groups a block owns.

    A channel scores the summed sensitivity of every filter producing it (:func:`filter_scores`); a
    residual stream's filters may lie in other blocks than its owner (:func:`group_block`), so every
    weight is scored.
    """

    name = "filter"
    noun = "channels"

    def scope(
        self, weights: Mapping[int, Mapping[str, nn.Parameter]], net: MultiExitNet, blocks: Sequence[int]
    ) -> dict[str, nn.Parameter]:
        """Every weight: a stream's filters may lie in other blocks than its owner."""
        return {n: p for ws in weights.values() for n, p in ws.items()}

    def units(
        self, net: MultiExitNet, scores: Mapping[str, Tensor], blocks: Sequence[int], prefix: str = ""
    ) -> dict[int, dict[tuple, float]]:
        """``{block: {(group, channel): score}}`` over the groups each block owns."""
        groups = [g for g in net.channel_groups() if group_block(g) in blocks]
        fs = filter_scores(scores, groups, prefix)
        out: dict[int, dict[tuple, float]] = {b: {} for b in blocks}
        for g in groups:
            out[group_block(g)].update({(g.name, k): float(fs[g.name][k]) for k in range(g.size)})
        return out

    def owner(self, unit: tuple) -> Hashable:
        """A channel's group: no layer is left with 0 channels."""
        return unit[0]

    def spec_without(self, net: MultiExitNet, removed: Iterable[tuple]) -> ArchSpec:
        """The ArchSpec with each group narrower by its removed channels."""
        return net.resized_spec_all({g: n - len(cut) for g, (n, cut) in self._cut(net, removed).items()})

    def remove(
        self, net: MultiExitNet, removed: Sequence[tuple], optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> ArchSpec:
        """Keep each group's other channels (:func:`lit_nas.surgery.remove_channels`)."""
        optimizers = list(optimizers)
        for g, (n, cut) in self._cut(net, removed).items():
            remove_channels(net, g, [k for k in range(n) if k not in cut], optimizers)
        return net.spec

    @staticmethod
    def _cut(net: MultiExitNet, removed: Iterable[tuple]) -> dict[str, tuple[int, set[int]]]:
        """``{group: (its size, the channels removed)}``, groups in name order."""
        sizes = {g.name: g.size for g in net.channel_groups()}
        cut: dict[str, set[int]] = {}
        for g, k in removed:
            cut.setdefault(g, set()).add(int(k))
        return {g: (sizes[g], cut[g]) for g in sorted(cut)}


class EdgeUnits(StructuredUnits):
    """``edge`` granularity: ``(source feature, target cell)`` edges of the dense concatenation.

    An edge scores the summed sensitivity of its input slice of the target cell's first conv
    (:func:`edge_scores`); only dense networks have them.
    """

    name = "edge"
    noun = "edges"

    def scope(
        self, weights: Mapping[int, Mapping[str, nn.Parameter]], net: MultiExitNet, blocks: Sequence[int]
    ) -> dict[str, nn.Parameter]:
        """The first conv of every cell of ``blocks``: it reads the concatenation."""
        inputs = {f"net.{net.cell_input_layer(i)}.weight" for b in blocks for i in net.spec.cells_of_block(b)}
        return {n: p for ws in weights.values() for n, p in ws.items() if n in inputs}

    def units(
        self, net: MultiExitNet, scores: Mapping[str, Tensor], blocks: Sequence[int], prefix: str = ""
    ) -> dict[int, dict[tuple, float]]:
        """``{block: {(source, cell): score}}`` over the live edges into each block's cells."""
        spec = net.spec
        es = edge_scores(scores, net, [i for b in blocks for i in spec.cells_of_block(b)], prefix)
        return {b: {e: v for e, v in es.items() if spec.block_of_cell(e[1]) == b} for b in blocks}

    def owner(self, unit: tuple) -> Hashable:
        """An edge's target cell: its conv needs an input."""
        return unit[1]

    def spec_without(self, net: MultiExitNet, removed: Iterable[tuple]) -> ArchSpec:
        """The ArchSpec without the edges (:func:`lit_nas.surgery.edge_removed_spec`)."""
        return edge_removed_spec(net.spec, removed)

    def remove(
        self, net: MultiExitNet, removed: Sequence[tuple], optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> ArchSpec:
        """Remove the edges (:func:`lit_nas.surgery.remove_edges`)."""
        return remove_edges(net, list(removed), optimizers) if removed else net.spec

    def check_network(self, spec: ArchSpec) -> None:
        """``ValueError`` unless the network is dense (only the dense concatenation has edges)."""
        if not spec.dense:
            raise ValueError(
                f"granularity 'edge' prunes the edges of the dense concatenation; the {spec.kind} network "
                "has dense: false (use granularity 'weight' or 'filter')"
            )


#: the unit kinds, by ``SnipPruning``'s ``granularity``
UNIT_KINDS: dict[str, WeightUnits | StructuredUnits] = {
    "weight": WeightUnits(),
    "filter": FilterUnits(),
    "edge": EdgeUnits(),
}
