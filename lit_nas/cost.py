"""Parameter and FLOP counts per block and per exit.

FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts for one image (2 per multiply-add of
convolutions and matrix products; BN, ReLU and pooling are not counted), measured block by block on a real
forward pass instead of hand-counted, so any network in the registry is covered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_nas.arch import ArchSpec
from lit_nas.nets.base import MultiExitNet


@dataclass(frozen=True)
class CostReport:
    """Per-block and per-exit costs of one image.

    Attributes:
        block_flops: FLOPs of each block (the stem is in block 0).
        exit_flops: FLOPs of each exit head, keyed by block index.
        block_params: parameters of each block.
        exit_params: parameters of each exit head, keyed by block index.
    """

    block_flops: list[int]
    exit_flops: dict[int, int]
    block_params: list[int]
    exit_params: dict[int, int]

    def flops_to_exit(self, exit_block: int, with_heads: list[int] | None = None) -> int:
        """FLOPs of blocks ``0..exit_block`` plus the heads in ``with_heads`` (default: that exit's)."""
        heads = [exit_block] if with_heads is None else with_heads
        return sum(self.block_flops[: exit_block + 1]) + sum(self.exit_flops[h] for h in heads)

    def early_exit_costs(self, exits: list[int]) -> list[int]:
        """Cost of stopping at each of ``exits``: its blocks plus every head evaluated on the way."""
        return [self.flops_to_exit(e, [h for h in exits if h <= e]) for e in exits]

    def active_params(self, active_blocks: int) -> int:
        """Parameters of blocks ``0..active_blocks-1`` and their exits (what is trained while growing)."""
        exits = sum(n for b, n in self.exit_params.items() if b < active_blocks)
        return sum(self.block_params[:active_blocks]) + exits

    def active_flops(self, active_blocks: int) -> int:
        """FLOPs of one forward pass of the first ``active_blocks`` blocks and all their exits."""
        exits = sum(f for b, f in self.exit_flops.items() if b < active_blocks)
        return sum(self.block_flops[:active_blocks]) + exits

    @property
    def total_params(self) -> int:
        """All parameters of all blocks and exits."""
        return sum(self.block_params) + sum(self.exit_params.values())


@torch.no_grad()
def count_costs(net: MultiExitNet) -> CostReport:
    """Measure FLOPs and parameters of every block and exit of ``net`` (all blocks, active or not)."""
    spec = net.spec
    param = next(net.parameters())
    x = torch.zeros(
        1, spec.in_channels, spec.input_size, spec.input_size, device=param.device, dtype=param.dtype
    )
    was_training = net.training
    net.eval()  # no BN statistics update
    try:
        feats: list[torch.Tensor] = []
        block_flops, exit_flops = [], {}
        for b in range(spec.num_blocks):
            with FlopCounterMode(display=False) as counter:
                feats = net.run_block(b, feats, x)
            block_flops.append(int(counter.get_total_flops()))
            if str(b) in net.exits:
                with FlopCounterMode(display=False) as counter:
                    net.run_exit(b, feats)
                exit_flops[b] = int(counter.get_total_flops())
    finally:
        net.train(was_training)
    return CostReport(
        block_flops=block_flops,
        exit_flops=exit_flops,
        block_params=[sum(p.numel() for p in blk.parameters()) for blk in net.blocks],
        exit_params={int(k): sum(p.numel() for p in h.parameters()) for k, h in net.exits.items()},
    )


@torch.no_grad()
def channel_flops(net: MultiExitNet) -> dict[str, int]:
    """FLOPs saved per image by removing one channel of each channel group, by group name.

    Counted as :func:`count_costs` counts (2 per multiply-add of convolutions and linear layers) over every
    block and every exit: each producing conv loses one filter and each consuming conv or linear layer one
    input slice, at the spatial size measured on a real forward pass. The cost of a channel is the same for
    every channel of a group, and exact for removing one; it is the ``Delta cost`` of Fisher pruning with a
    FLOPs cost (Liège thesis section 4.2.3, after Theis et al.).
    """
    modules = dict(net.named_modules())
    out_area: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, i, o, name=name: out_area.__setitem__(name, o.shape[-2] * o.shape[-1])
        )
        for name, m in modules.items()
        if isinstance(m, nn.Conv2d)
    ]
    spec = net.spec
    param = next(net.parameters())
    x = torch.zeros(
        1, spec.in_channels, spec.input_size, spec.input_size, device=param.device, dtype=param.dtype
    )
    was_training = net.training
    net.eval()
    try:
        net(x, active_blocks=spec.num_blocks)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    costs = {}
    for g in net.channel_groups():
        total = 0
        for where in (*g.producers, *g.consumers):
            m = modules[where.module]
            if isinstance(m, nn.Conv2d):
                # a filter reads in_channels / groups inputs (1 for a depthwise conv)
                k = m.kernel_size[0] * m.kernel_size[1] * out_area[where.module]
                total += 2 * k * (m.in_channels if where.dim == 0 else m.out_channels) // m.groups
            elif isinstance(m, nn.Linear):
                total += 2 * (m.in_features if where.dim == 0 else m.out_features * where.per_channel)
        costs[g.name] = total
    return costs


def cost_rows(spec: ArchSpec, costs: CostReport) -> list[list[object]]:
    """One row per block: block, cells, widths, state, params, MFLOPs, exit params, exit MFLOPs."""
    rows: list[list[object]] = []
    for b in range(spec.num_blocks):
        cells = spec.cells_of_block(b)
        widths = "/".join(str(spec.cells[i].out) for i in cells)
        rows.append(
            [
                b,
                len(cells),
                widths,
                "active" if b < spec.active_blocks else "inactive",
                costs.block_params[b],
                round(costs.block_flops[b] / 1e6, 3),
                costs.exit_params.get(b, 0),
                round(costs.exit_flops.get(b, 0) / 1e6, 3),
            ]
        )
    return rows


COST_COLUMNS = ["block", "cells", "widths", "state", "params", "MFLOPs", "exit_params", "exit_MFLOPs"]


def format_costs(spec: ArchSpec, costs: CostReport) -> str:
    """Plain-text table of the blocks (cells, widths, active or not, parameters, MFLOPs, their exits)."""
    lines = [
        f"{'block':>5} {'cells':>5} {'widths':<14} {'state':<8} {'params':>9} {'MFLOPs':>8}"
        f" | {'exit params':>11} {'exit MFLOPs':>11}"
    ]
    for b, n, widths, state, params, mflops, eparams, emflops in cost_rows(spec, costs):
        lines.append(
            f"{b:>5} {n:>5} {widths:<14} {state:<8} {params:>9,} {mflops:>8.2f}"
            f" | {eparams:>11,} {emflops:>11.3f}"
        )
    n, total = spec.active_blocks, spec.num_blocks
    lines.append(
        f"active: {n}/{total} blocks, {costs.active_params(n):,} of {costs.total_params:,} parameters, "
        f"{costs.active_flops(n) / 1e6:.2f} of {costs.active_flops(total) / 1e6:.2f} MFLOPs per image "
        "(all exits included)"
    )
    return "\n".join(lines)


#: What a search's cost measures: parameters, MFLOPs to the last exit, or predicted latency (ms).
MEASURES = ("params", "flops", "latency")


def spec_cost(spec: ArchSpec, measure: str, lut=None) -> float:
    """The cost of the architecture ``spec``, all blocks: parameters, MFLOPs or predicted latency (ms).

    Args:
        spec: the architecture (its gates play no part).
        measure: ``params``, ``flops`` (MFLOPs of one image through every block and the last exit's head, as
            FisherPruning counts) or ``latency`` (the full model, by ``lut``).
        lut: a :class:`lit_nas.latency.LatencyLUT`, for ``latency``.
    """
    if measure == "latency":
        if lut is None:
            raise ValueError("spec_cost measure='latency' needs lut (latency look-up tables)")
        return float(lut.predict(spec))
    if measure not in MEASURES:
        raise ValueError(f"spec_cost measure {measure!r} is not one of {list(MEASURES)}")
    from lit_nas.nets.registry import build_net  # the registry builds every family: imported when used

    bare = ArchSpec.from_dict({**spec.to_dict(), "gated": {}})
    with torch.device("meta"):  # shapes only: no weights are drawn
        report = count_costs(build_net(bare))
    if measure == "params":
        return float(report.total_params)
    return report.flops_to_exit(bare.exit_blocks(active_only=False)[-1]) / 1e6
