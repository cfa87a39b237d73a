"""MorphNet (pure functions): a cost-weighted sparsity penalty on BatchNorm scales, and the expand step.

Gordon et al. 2018; Liège thesis section 4.7. The penalty is ``lambda * sum_channels cost_channel *
|gamma_channel|``, ``gamma`` being the scale of the BatchNorm that produces the channel. Channels tied by skip
connections (one channel group, several producing BatchNorms) enter through the L-infinity group LASSO:
channel ``k`` of group ``g`` costs ``cost_g * max_p |gamma_{p,k}|`` over its producers ``p``, so pruning
one member alone saves nothing and SGD drives all of them to zero or none. A channel whose largest
``|gamma|`` falls below a threshold is dead: its gate closes and garbage collection removes it. The expand
step multiplies every group's width by the one factor that meets a budget, for another shrinking round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lit_nas.align import align_down
from lit_nas.arch import ArchSpec
from lit_nas.gates import gated_groups
from lit_nas.nets.base import MultiExitNet


def producer_norms(net: MultiExitNet, groups: Iterable[str]) -> dict[str, list[nn.Module]]:
    """The BatchNorms producing each of ``groups``: look them up once, not on every training step."""
    return {group: list(net.gated_norms(group)) for group in groups}


def group_scales(net: MultiExitNet, group: str, norms: Sequence[nn.Module] | None = None) -> Tensor:
    """``|gamma|`` of every BatchNorm producing ``group``: ``(producers, channels)``, differentiable.

    ``norms``: those BatchNorms, from :func:`producer_norms` (looked up in ``net`` when ``None``).
    """
    norms = net.gated_norms(group) if norms is None else norms
    return torch.stack([norm.weight.abs() for norm in norms])


def penalty(
    net: MultiExitNet, costs: Mapping[str, float], norms: Mapping[str, Sequence[nn.Module]] | None = None
) -> Tensor:
    """``sum_g cost_g * sum_k max_p |gamma_{p,k}|`` over the groups in ``costs`` (multiply by lambda).

    Channels already gated off do not count: they are dead, waiting for garbage collection. ``norms``: the
    producers of every group in ``costs`` (:func:`producer_norms`), so a training step does not walk the net.
    """
    gates = gated_groups(net)
    total = None
    for group, cost in costs.items():
        scale = group_scales(net, group, norms[group] if norms is not None else None).max(0).values
        gate = gates.get(group)
        if gate is not None:
            scale = scale * (gate.detach() != 0)
        term = cost * scale.sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


@torch.no_grad()
def dead_channels(net: MultiExitNet, groups: Iterable[str], threshold: float) -> list[tuple[str, int]]:
    """Live channels whose largest ``|gamma|`` is below ``threshold``; each group keeps its largest one."""
    gates = gated_groups(net)
    out = []
    for group in groups:
        scale = group_scales(net, group).max(0).values
        live = gates[group] != 0 if group in gates else torch.ones_like(scale, dtype=torch.bool)
        dead = live & (scale < threshold)
        if bool(dead.sum() == live.sum()):  # never the whole group: its strongest channel stays
            strongest = torch.where(live, scale, torch.full_like(scale, -1.0)).argmax()
            dead[strongest] = False
        out += [(group, int(k)) for k in dead.nonzero().flatten()]
    return out


def scaled_sizes(
    sizes: Mapping[str, int], factor: float, caps: Mapping[str, int] | None = None, round_to: int = 1
) -> dict[str, int]:
    """Every group's width times ``factor``, rounded down, at least 1 (and at most its cap, if any).

    With ``round_to`` > 1, rounded down to a multiple of it (:func:`lit_nas.align.align_down`: a width
    narrower than one step stays as it is), caps included.
    """
    out = {g: align_down(max(1, int(n * factor + 1e-9)), round_to) for g, n in sizes.items()}
    return {g: min(n, align_down(caps[g], round_to)) if caps and g in caps else n for g, n in out.items()}


def expand(
    net: MultiExitNet,
    cost_fn: Callable[[ArchSpec], float],
    budget: float,
    caps: Mapping[str, int] | None = None,
    iterations: int = 40,
    round_to: int = 1,
) -> tuple[ArchSpec, float]:
    """The expand step: the largest uniform width factor whose network still fits ``budget``.

    Every channel group's width is multiplied by one factor (rounded down, at least 1, at most its entry in
    ``caps``); the factor is found by bisection, so the result fits the budget and one more channel in every
    group below its cap would not. With ``round_to`` every width is a multiple of it, and single groups then
    take one more step at a time while the network fits (no one group can take another). Returns the
    widened ArchSpec and the uniform factor.
    """
    sizes = {g.name: g.size for g in net.channel_groups()}

    def cost(factor: float) -> float:
        return cost_fn(net.resized_spec_all(scaled_sizes(sizes, factor, caps, round_to)))

    lo, hi = 1.0, 2.0
    if cost(lo) > budget:
        lo = 0.0
        hi = 1.0
    else:
        while cost(hi) <= budget:
            lo, hi = hi, hi * 2
            if hi > 1024:  # every group at its cap (or the budget is out of reach): the widest allowed
                return net.resized_spec_all(scaled_sizes(sizes, lo, caps, round_to)), lo
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    if cost(lo) > budget:
        raise ValueError(f"even one channel per group costs more than the budget {budget}")
    widths = scaled_sizes(sizes, lo, caps, round_to)
    if round_to > 1:
        widths = _fill_steps(net, widths, cost_fn, budget, caps, round_to)
    return net.resized_spec_all(widths), lo


def _fill_steps(
    net: MultiExitNet,
    widths: Mapping[str, int],
    cost_fn: Callable[[ArchSpec], float],
    budget: float,
    caps: Mapping[str, int] | None,
    step: int,
) -> dict[str, int]:
    """One more step to one group at a time while the network fits; afterwards no single group can take one.

    Aligned widths move in whole steps, so one uniform factor can stop well short of the budget (the next
    factor widens many groups at once). The narrowest groups (relative to their start) go first.
    """
    widths = dict(widths)
    start = {g.name: g.size for g in net.channel_groups()}
    grown = True
    while grown:
        grown = False
        for g in sorted(widths, key=lambda g: (widths[g] / start[g], g)):
            wider = align_down(widths[g], step) + step
            if caps and g in caps and wider > align_down(caps[g], step):
                continue
            trial = {**widths, g: wider}
            if cost_fn(net.resized_spec_all(trial)) <= budget:
                widths, grown = trial, True
    return widths
