"""Network surgery: physically remove channels without changing what the network computes.

ShrinkNets draft, section 3.5.2 (neural garbage collection): every layer that produces or reads the removed
channels is sliced (conv out/in, BatchNorm weight/bias/running statistics, exits' linear inputs, the slices
of a dense concatenation, every member of a residual stream), and so are the weight masks and the
optimizer state of each sliced parameter, so the optimizer keeps optimizing the same tensors. The ArchSpec
is updated, so checkpoints rebuild the smaller network.

Parameters are sliced *in place* (``p.data = ...``): the ``nn.Parameter`` objects stay the same, so the
optimizer's ``param_groups`` and the identity of every tensor it holds remain valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from lit_nas.align import collected_width
from lit_nas.arch import ArchSpec
from lit_nas.cost import CostReport, count_costs
from lit_nas.gates import fold_gates, gated_groups
from lit_nas.nets.base import ChannelGroup, ChannelSlice, MultiExitNet

__all__ = [
    "collect_gated",
    "collected_costs",
    "dead_edges",
    "edge_removed_spec",
    "fold_gates",
    "kept_indices",
    "remove_channels",
    "remove_edges",
]


def kept_indices(total: int, slices: Iterable[ChannelSlice], group_size: int, keep: Tensor) -> Tensor:
    """Indices along a ``total``-long dimension that survive keeping channels ``keep`` of a group.

    ``slices`` are every place the group occupies in that dimension (a dense conv can read the same residual
    stream at several offsets); entries outside them (other concatenated sources) are all kept.
    """
    mask = torch.ones(total, dtype=torch.bool)
    drop = torch.ones(group_size, dtype=torch.bool)
    drop[keep] = False
    for where in slices:
        pc = where.per_channel
        entries = where.start + torch.arange(group_size * pc).view(group_size, pc)
        mask[entries[drop].flatten()] = False
    return mask.nonzero().flatten()


def _slice_param(p: nn.Parameter, dim: int, idx: Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    old_shape = p.shape
    idx = idx.to(p.device)
    p.data = p.data.index_select(dim, idx).contiguous()  # same Parameter object: optimizers keep it
    if p.grad is not None:
        p.grad = p.grad.index_select(dim, idx).contiguous()
    for opt in optimizers:
        for key, value in opt.state.get(p, {}).items():
            # per-element state (momentum, exp_avg, exp_avg_sq); scalars such as "step" are kept
            if isinstance(value, Tensor) and value.shape == old_shape:
                opt.state[p][key] = value.index_select(dim, idx.to(value.device)).contiguous()


def _resize(module: nn.Module, dim: int, size: int) -> None:
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        if module.groups != module.in_channels or dim != 0:
            raise TypeError(f"cannot slice a grouped conv that is not depthwise along dim {dim}")
        module.in_channels = module.out_channels = module.groups = size  # one filter per channel
    elif isinstance(module, nn.Conv2d):
        if dim == 0:
            module.out_channels = size
        else:
            module.in_channels = size
    elif isinstance(module, nn.Linear):
        if dim == 0:
            module.out_features = size
        else:
            module.in_features = size
    elif isinstance(module, nn.BatchNorm2d):
        module.num_features = size
    else:
        raise TypeError(f"cannot slice a {type(module).__name__}; expected Conv2d, Linear or BatchNorm2d")


def remove_channels(
    net: MultiExitNet,
    group: ChannelGroup | str,
    keep_idx: Sequence[int] | Tensor,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> ArchSpec:
    """Keep only channels ``keep_idx`` of ``group`` everywhere they are produced or read.

    Args:
        net: the network; sliced in place and given the new ArchSpec (``net.spec``).
        group: a group from ``net.channel_groups()`` or its name.
        keep_idx: channels to keep (any order; sorted here), at least one.
        optimizers: optimizers whose per-parameter state is sliced with the weights.

    Returns:
        The new ArchSpec (also set on ``net``); a module should record it with ``set_arch_spec``.
    """
    groups = {g.name: g for g in net.channel_groups()}
    name = group if isinstance(group, str) else group.name
    if name not in groups:
        raise ValueError(f"no channel group named {name!r}; valid choices: {sorted(groups)}")
    g = groups[name]
    keep = torch.as_tensor(keep_idx, dtype=torch.long).unique(sorted=True)
    if keep.numel() == 0:
        raise ValueError(f"keep_idx is empty: a layer may not be left with 0 channels (group {name!r})")
    if keep.min() < 0 or keep.max() >= g.size:
        raise ValueError(f"keep_idx must lie in 0..{g.size - 1} for group {name!r}; got {keep.tolist()}")
    optimizers = list(optimizers)
    new_spec = net.resized_spec(name, keep.numel())  # validates before anything is touched
    modules = dict(net.named_modules())
    places: dict[tuple[str, int], list[ChannelSlice]] = {}
    for where in (*g.producers, *g.consumers):
        places.setdefault((where.module, where.dim), []).append(where)
    for (module_name, dim), slices in places.items():
        m = modules[module_name]
        idx = kept_indices(m.weight.shape[dim], slices, g.size, keep)
        _slice_param(m.weight, dim, idx, optimizers)
        mask = getattr(m, "weight_mask", None)  # a pruning mask (lit_nas.masks) is sliced with its weight
        if mask is not None:
            m.weight_mask = mask.index_select(dim, idx.to(mask.device)).contiguous()
        if dim == 0:
            if getattr(m, "bias", None) is not None:
                _slice_param(m.bias, 0, idx, optimizers)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean = m.running_mean.index_select(0, idx.to(m.running_mean.device))
                m.running_var = m.running_var.index_select(0, idx.to(m.running_var.device))
        _resize(m, dim, m.weight.shape[dim])
    gate = gated_groups(net).get(name)  # a channel gate (lit_nas.gates) is sliced like a producer
    if gate is not None:
        _slice_param(gate, 0, keep, optimizers)
    net.spec = new_spec
    return new_spec


def edge_removed_spec(spec: ArchSpec, edges: Iterable[tuple[int, int]]) -> ArchSpec:
    """The ArchSpec once the dense edges ``(source feature, target cell)`` are removed (validated).

    Raises:
        ValueError: the network is not dense, an edge is not live, or a cell would read nothing.
    """
    if not spec.dense:
        raise ValueError("edges can only be removed from a dense network (dense: true)")
    new = ArchSpec.from_dict(spec.to_dict())
    drop: dict[int, set[int]] = {}
    for j, i in edges:
        if not 0 <= i < spec.num_cells or j not in spec.cell_reads(i):
            live = [(s, t) for t in range(spec.num_cells) for s in spec.cell_reads(t)]
            raise ValueError(
                f"edge ({j}, {i}) is not a live (source feature, target cell) edge; live: {live}"
            )
        drop.setdefault(i, set()).add(j)
    for i, js in drop.items():
        reads = [j for j in spec.cell_reads(i) if j not in js]
        if not reads:
            raise ValueError(f"cell {i} would read no feature: keep at least one of {spec.cell_reads(i)}")
        new.cells[i].reads = reads
    new.validate()
    return new


def remove_edges(
    net: MultiExitNet,
    edges: Iterable[tuple[int, int]],
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> ArchSpec:
    """Remove dense edges ``(source feature, target cell)``: the input slices of the cells' first convs.

    The first conv's weight loses the input channels reading each removed source (with its weight mask and
    per-element optimizer state), and the ArchSpec records the sources each cell still reads
    (``CellSpec.reads``), so the network computes exactly what it did when the removed slices' weights were
    zero, and checkpoints, FLOPs, look-up tables and the export rebuild it from data.

    Args:
        net: a dense network; sliced in place and given the new ArchSpec (``net.spec``).
        edges: ``(j, i)``: cell ``i`` stops reading feature ``j`` (0: the stem, ``j``: cell ``j - 1``'s
            output).
        optimizers: optimizers whose per-parameter state is sliced with the weights.

    Returns:
        The new ArchSpec (also set on ``net``); a module should record it with ``set_arch_spec``.
    """
    edges = list(edges)
    new_spec = edge_removed_spec(net.spec, edges)  # validates before anything is touched
    optimizers = list(optimizers)
    modules = dict(net.named_modules())
    for i in sorted({i for _, i in edges}):
        dropped = {j for j, t in edges if t == i}
        m = modules[net.cell_input_layer(i)]
        keep = [
            k
            for src in net.dense_sources(i)
            if src.feature not in dropped
            for k in range(src.start, src.stop)
        ]
        idx = torch.as_tensor(keep, dtype=torch.long)
        _slice_param(m.weight, 1, idx, optimizers)
        mask = getattr(m, "weight_mask", None)
        if mask is not None:
            m.weight_mask = mask.index_select(1, idx.to(mask.device)).contiguous()
        _resize(m, 1, idx.numel())
    net.spec = new_spec
    return new_spec


def dead_edges(net: MultiExitNet, masks: dict[str, Tensor], prefix: str = "") -> list[tuple[int, int]]:
    """Live edges ``(source feature, target cell)`` whose first-conv input slice is entirely masked."""
    out = []
    for i in range(net.spec.num_cells):
        mask = masks.get(f"{prefix}{net.cell_input_layer(i)}.weight")
        if mask is None:
            continue
        sources = net.dense_sources(i)
        dead = [src.feature for src in sources if not bool(mask[:, src.start : src.stop].any())]
        if len(dead) == len(sources):
            dead = dead[1:]  # a cell keeps one (silent) source: its conv needs an input
        out += [(j, i) for j in dead]
    return out


def collect_gated(
    net: MultiExitNet, optimizers: Iterable[torch.optim.Optimizer] = (), round_to: int = 1
) -> dict[str, int]:
    """Remove every channel whose gate is exactly 0 (neural garbage collection); the count per group.

    A group whose gate is all zero keeps one (still gated-off, so still silent) channel: no layer is left
    with 0 channels. With ``round_to`` > 1 each group keeps enough silent channels (the first gated-off
    ones) for its width to be a multiple of ``round_to`` (:mod:`lit_nas.align`): the device computes the
    whole tile anyway, and silent channels change nothing, so the collection stays exact. ``net.spec`` is
    updated; a module records it with ``set_arch_spec``.
    """
    optimizers = list(optimizers)
    removed = {}
    for name, gate in gated_groups(net).items():
        live = gate.detach() != 0
        if bool(live.all()):
            continue
        keep = live.nonzero().flatten()
        want = collected_width(keep.numel(), gate.numel(), round_to)
        if want == gate.numel():
            continue
        if want > keep.numel():  # silent channels fill the last tile (or the one a closed group keeps)
            silent = (~live).nonzero().flatten()[: want - keep.numel()]
            keep = torch.sort(torch.cat([keep, silent])).values
        removed[name] = gate.numel() - keep.numel()
        remove_channels(net, name, keep, optimizers)
    return removed


def collected_costs(net: MultiExitNet) -> CostReport:
    """Costs of ``net`` once its gated-off channels are collected (``net`` itself is left untouched)."""
    import copy

    probe = copy.deepcopy(net)
    collect_gated(probe)
    return count_costs(probe)
