"""NetAdapt (pure functions): one iteration builds a pruned candidate per channel group and keeps the best.

Yang et al. 2018; Liège thesis section 4.6, Algorithm 4 and the variations of 4.6.2. While the network's cost
is above the objective, every channel group ``k`` gets the smallest number of channels whose removal cuts the
cost by ``step`` (:func:`channels_to_cut`; groups tied by skip connections are one group, so their costs
count together), the candidate with those channels removed (chosen by filter L2 norm or by the Fisher signal)
is fine-tuned for a few batches, and the candidate picked on a held-out split (:func:`pick_best`) becomes the
network; ``step`` decays.

Every candidate is a deep copy: the network the search keeps, its weights and optimizer state, are read,
never written, until the winner is applied (:func:`iterate`, with :func:`lit_nas.surgery.remove_channels`).
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_nas.align import smaller_sizes
from lit_nas.arch import ArchSpec
from lit_nas.fisher import FisherAccumulator, filter_norms
from lit_nas.gates import attach_gates
from lit_nas.nets.base import MultiExitNet
from lit_nas.objectives import multi_exit_loss
from lit_nas.surgery import remove_channels

Batch = tuple[Tensor, Tensor]
#: The cost of an architecture (ms, MFLOPs or parameters): :func:`lit_nas.cost.spec_cost` with its options.
CostFn = Callable[[ArchSpec], float]
CRITERIA = ("l2", "fisher")


@dataclass(frozen=True)
class Proposal:
    """How many channels of one group to remove, and what that saves.

    Attributes:
        group: the channel group.
        remove: channels to remove (at least 1, leaving at least 1).
        cost: the network's cost after the removal.
        reduction: the cost saved.
        meets_step: whether ``reduction`` reaches the iteration's step (``False`` only for a small pruning).
    """

    group: str
    remove: int
    cost: float
    reduction: float
    meets_step: bool


def channels_to_cut(
    net: MultiExitNet,
    group: str,
    cost_fn: CostFn,
    current: float,
    step: float,
    allow_small: bool = False,
    round_to: int = 1,
) -> Proposal | None:
    """The fewest channels of ``group`` whose removal brings the cost to ``current - step`` or below.

    Bisection over the number removed (the cost falls as channels go); the answer is checked against
    ``cost_fn`` itself, so it always meets the step. If even the narrowest allowed width does not, the group
    is skipped (``None``), or with ``allow_small`` (the thesis's *allow small prunings*, section 4.6.2)
    proposes that narrowest width, for whatever it saves. With ``round_to`` > 1 the group only takes widths
    that are multiples of it (:func:`lit_nas.align.smaller_sizes`), down to one step.
    """
    size = {g.name: g.size for g in net.channel_groups()}[group]
    removals = [size - k for k in smaller_sizes(size, round_to)]  # increasing
    if not removals:
        return None
    target = current - step

    def cost_after(n: int) -> float:
        return cost_fn(net.resized_spec(group, size - n))

    most = cost_after(removals[-1])
    if most > target:
        if not allow_small or most >= current:
            return None
        return Proposal(group, removals[-1], most, current - most, False)
    # the fewest channels removed that meet the target (removing the most does)
    i = bisect.bisect_left(range(len(removals) - 1), True, key=lambda j: cost_after(removals[j]) <= target)
    hi = removals[i]
    cost = cost_after(hi)
    if cost > target:  # a non-monotone table: fall back to the sure answer
        hi, cost = removals[-1], most
    return Proposal(group, hi, cost, current - cost, True)


def l2_scores(net: MultiExitNet, group: str) -> Tensor:
    """Squared L2 norm of the filters producing each channel of ``group`` (summed over its producers)."""
    return filter_norms(net, group, 2)


def fisher_scores_of(
    net: MultiExitNet, groups: Sequence[str], batches: Iterable[Batch], weights: dict[int, float]
) -> dict[str, Tensor]:
    """Fisher signal ``Delta_k`` of every channel of ``groups``, on a copy of ``net`` (untouched)."""
    probe = copy.deepcopy(net)
    probe.train()
    attach_gates(probe, groups)
    acc = FisherAccumulator(probe, groups)
    acc.attach()
    try:
        for x, y in batches:
            probe.zero_grad(set_to_none=True)
            loss, _ = multi_exit_loss(probe(x), y, weights)
            loss.backward()
            acc.end_step()
    finally:
        acc.detach()
    return {g: s.detach().double().cpu() for g, s in acc.scores().items()}


def prune_copy(net: MultiExitNet, group: str, remove: int, scores: Tensor) -> MultiExitNet:
    """A copy of ``net`` without the ``remove`` channels of ``group`` with the lowest ``scores``."""
    cand = copy.deepcopy(net)
    order = torch.argsort(scores.cpu(), stable=True)  # ties: the lower index goes first
    keep = order[remove:].sort().values
    remove_channels(cand, group, keep)
    return cand


def fine_tune(
    net: MultiExitNet,
    batches: Iterable[Batch],
    weights: dict[int, float],
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    """Short-term fine-tuning: one optimizer step per batch, in training mode, of ``net`` in place."""
    net.train()
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad])
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = multi_exit_loss(net(x), y, weights)
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(net: MultiExitNet, batches: Iterable[Batch]) -> float:
    """Accuracy of the last exit on ``batches``, in eval mode (the training mode is restored)."""
    was = net.training
    net.eval()
    right = total = 0
    try:
        for x, y in batches:
            logits = net(x).final
            right += int((logits.argmax(1) == y).sum())
            total += len(y)
    finally:
        net.train(was)
    return right / max(total, 1)


def pick_best(base_acc: float, accs: Sequence[float], reductions: Sequence[float]) -> int:
    """The thesis's ``pick_best_network`` (Algorithm 4): the index of the candidate to keep.

    If some candidate is more accurate than the network it came from, the most accurate one; otherwise the one
    with the smallest positive ratio ``-Delta acc / Delta cost`` (accuracy lost per unit of cost saved). Ties
    go to the earlier candidate.
    """
    if not accs or len(accs) != len(reductions):
        raise ValueError(f"need one reduction per candidate; got {len(accs)} accuracies, {len(reductions)}")
    if max(accs) > base_acc:
        return max(range(len(accs)), key=lambda i: (accs[i], -i))
    ratios = [(base_acc - a) / r if r > 0 else math.inf for a, r in zip(accs, reductions, strict=True)]
    return min(range(len(accs)), key=lambda i: (ratios[i], i))


def sample_groups(groups: Sequence[str], fraction: float, generator: torch.Generator) -> list[str]:
    """A random ``fraction`` of ``groups`` (at least one), in their original order (the thesis's speed-up)."""
    if fraction >= 1:
        return list(groups)
    n = max(1, round(fraction * len(groups)))
    chosen = torch.randperm(len(groups), generator=generator)[:n].sort().values
    return [groups[int(i)] for i in chosen]


@dataclass(frozen=True)
class Iteration:
    """What one NetAdapt iteration did to the network (:func:`iterate`).

    Attributes:
        group: the channel group pruned.
        removed: channels removed from it.
        base_acc: the network's held-out accuracy before the iteration.
        acc: the winner's held-out accuracy (after its fine-tuning).
        candidates: candidates built and scored.
    """

    group: str
    removed: int
    base_acc: float
    acc: float
    candidates: int


#: how the callers of :func:`iterate` agree on the winner (DDP: rank 0's), given ``(index, kept channels)``
Agree = Callable[[tuple[int, Tensor]], tuple[int, Tensor]]


def iterate(
    net: MultiExitNet,
    tune: Sequence[Batch],
    holdout: Sequence[Batch],
    exit_weights: dict[int, float],
    cost_of: CostFn,
    cost: float,
    step: float,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    criterion: str = "l2",
    group_fraction: float = 1.0,
    allow_small_prunings: bool = False,
    adopt_finetuned: bool = True,
    seed: int = 0,
    agree: Agree | None = None,
    round_to: int = 1,
) -> Iteration | None:
    """One NetAdapt iteration (Algorithm 4): candidates, short-term fine-tuning, the pick, surgery on ``net``.

    For each channel group (a random ``group_fraction`` of them), the fewest channels that cut ``step`` off
    ``cost`` (:func:`channels_to_cut`) are removed from a copy by the lowest ``criterion`` score (filter
    ``l2`` norm or ``fisher`` signal), the copy is fine-tuned on ``tune`` and scored on ``holdout``;
    :func:`pick_best` picks one. Its channels are then removed from ``net`` itself
    (:func:`lit_nas.surgery.remove_channels`, with the optimizers' state sliced), and with ``adopt_finetuned``
    the winner's fine-tuned weights are copied in.

    Args:
        net: the network searched; changed in place when a candidate wins (``net.spec`` is the new spec).
        tune: the short-term fine-tuning batches (and the Fisher criterion's), on the network's device.
        holdout: the held-out batches the candidates are scored on.
        exit_weights: each exit's weight in the training loss.
        cost_of: an architecture's cost.
        cost: ``net``'s cost now.
        step: the cost to cut this iteration.
        make_optimizer: the fine-tuning optimizer of a candidate's parameters.
        optimizers: the training's optimizers, whose state is sliced with ``net``'s weights.
        criterion: ``l2`` or ``fisher``.
        group_fraction: the share of groups tried (at least one).
        allow_small_prunings: let a group that cannot cut ``step`` propose all it can.
        adopt_finetuned: copy the winner's fine-tuned weights into ``net``.
        round_to: every proposal leaves its group a multiple of ``round_to`` channels (one step at least).
        seed: seeds the group sample and the fine-tuning (the caller's random state is left alone).
        agree: maps the local choice ``(index, kept channels)`` to the one every process applies (DDP).

    Returns:
        What was done, or ``None`` when no group can cut ``step`` (``net`` untouched).
    """
    base_acc = accuracy(net, holdout)
    gen = torch.Generator().manual_seed(seed)
    groups = sample_groups([g.name for g in net.channel_groups()], group_fraction, gen)
    if criterion == "fisher":
        scores = fisher_scores_of(net, groups, tune, exit_weights)
    else:
        scores = {g: l2_scores(net, g) for g in groups}
    device = next(net.parameters()).device
    proposals, cands, accs = [], [], []
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout in fine-tuning leaves the run's RNG alone
        torch.manual_seed(seed)
        for group in groups:
            prop = channels_to_cut(net, group, cost_of, cost, step, allow_small_prunings, round_to)
            if prop is None:
                continue
            cand = prune_copy(net, group, prop.remove, scores[group])
            fine_tune(cand, tune, exit_weights, make_optimizer)
            proposals.append(prop)
            cands.append(cand)
            accs.append(accuracy(cand, holdout))
    if not proposals:
        return None
    best = pick_best(base_acc, accs, [p.reduction for p in proposals])
    keep = torch.argsort(scores[proposals[best].group].cpu(), stable=True)[proposals[best].remove :]
    best, keep = (agree or (lambda choice: choice))((best, keep.sort().values))
    win = proposals[best]
    remove_channels(net, win.group, keep, optimizers)
    if adopt_finetuned:
        with torch.no_grad():
            for mine, theirs in zip(
                net.state_dict().values(), cands[best].state_dict().values(), strict=True
            ):
                mine.copy_(theirs)
    return Iteration(win.group, win.remove, base_acc, accs[best], len(proposals))
