"""Channel gates: one value per channel of a channel group, applied by every normalisation producing it.

The shared mechanism of channel pruning (Liège thesis section 4.2.3, ShrinkNets draft section 3.2): Fisher
pruning sets gate entries to 0 (a binary ``mask``, not trained), ShrinkNets trains them (``switch`` layers
``θ`` with an L1 penalty). A gate belongs to a :class:`~lit_nas.nets.base.ChannelGroup`, so the channels tied
by residual additions share one gate: it multiplies the output of *every* BatchNorm that produces the group
(the stem's, each cell's last BN, each projection shortcut's BN, a depthwise conv's BN), and a gated-off
channel is exactly zero everywhere the group is read, which is what lets garbage collection
(:func:`lit_nas.surgery.remove_channels`) remove it without changing the network's function.

Gates are part of the network (:meth:`MultiExitNet.add_gates <lit_nas.nets.base.MultiExitNet.add_gates>`):
they live in ``net.gates`` (in every checkpoint, and in the optimizer when trainable), each producing
:class:`~lit_nas.nets.base.GatedBatchNorm2d` multiplies by its group's gate in its own forward, and the
ArchSpec records which groups are gated and how (``spec.gated``), so a network rebuilt from a checkpoint's
spec has its gates before the weights load. :func:`fold_gates` multiplies them into the BatchNorms and
removes them, for inference and export.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lit_nas.nets.base import MultiExitNet, gate_key

__all__ = [
    "attach_gates",
    "close_channels",
    "fold_gates",
    "gate_key",
    "gated_groups",
    "producer_norms",
    "remove_gates",
]


def producer_norms(net: MultiExitNet, group: str) -> list[nn.BatchNorm2d]:
    """The BatchNorms producing channel group ``group``: where its gate multiplies."""
    return list(net.gated_norms(group))


def attach_gates(
    net: MultiExitNet, groups: Iterable[str], trainable: bool = False, init: float = 1.0
) -> dict[str, nn.Parameter]:
    """Gate the channel groups ``groups`` (idempotent for groups already gated).

    Args:
        net: the network; gains the gates in ``net.gates`` and in ``net.spec.gated``.
        groups: channel-group names (from ``net.channel_groups()``).
        trainable: the gates receive gradients (ShrinkNets ``switch``); binary ``mask`` gates do not. A
            group already gated keeps its kind.
        init: initial value of every gate entry.

    Returns:
        The gate of each requested group, by group name.
    """
    return net.add_gates({g: "switch" if trainable else "mask" for g in groups}, init=init)


def gated_groups(net: MultiExitNet) -> dict[str, nn.Parameter]:
    """Every gate of ``net``, by group name."""
    return {k.replace("__", "."): p for k, p in getattr(net, "gates", {}).items()}


@torch.no_grad()
def close_channels(net: MultiExitNet, channels: Iterable[tuple[str, int]]) -> None:
    """Gate channels off: ``(group, channel)`` pairs set to exactly 0 (garbage collection removes them)."""
    gates = gated_groups(net)
    for group, k in channels:
        gates[group][k] = 0.0


def remove_gates(net: MultiExitNet, groups: Iterable[str] | None = None) -> None:
    """Drop the gates of ``groups`` (default: every gate), after :func:`fold_gates` or to discard them."""
    net.drop_gates(groups)


@torch.no_grad()
def fold_gates(net: MultiExitNet) -> None:
    """Multiply every gate into the BatchNorms it follows and remove the gates (outputs unchanged).

    ``gate * (γ x̂ + β) = (gate γ) x̂ + gate β``: scaling a BatchNorm's affine weight and bias by the gate is
    exact, in eval and training mode, so the inference network has no gate layers.
    """
    for group, gate in gated_groups(net).items():
        for norm in producer_norms(net, group):
            norm.weight.mul_(gate)
            norm.bias.mul_(gate)
    remove_gates(net)
