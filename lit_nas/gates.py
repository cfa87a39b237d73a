"""Channel gates: one value per channel of a channel group, applied after every normalisation producing it.

The shared mechanism of channel pruning (Liège thesis section 4.2.3, ShrinkNets draft section 3.2): Fisher
pruning sets gate entries to 0 (a binary mask, not trained), ShrinkNets trains them (switch layers ``θ``
with an L1 penalty). A gate belongs to a :class:`~lit_nas.nets.base.ChannelGroup`, so the channels tied by
residual additions share one gate: it multiplies the output of *every* BatchNorm that produces the group
(the stem's, each cell's last BN, each projection shortcut's BN), and a gated-off channel is exactly zero
everywhere the group is read, which is what lets garbage collection (:func:`lit_nas.surgery.remove_channels`)
remove it without changing the network's function.

Gates live in ``net.gates`` (an ``nn.ParameterDict`` keyed by the group name with ``.`` written ``__``),
so they are in every checkpoint and in the optimizer when trainable; each producing BatchNorm gets a forward
hook multiplying its output by the gate (sliced in place by surgery, so the hook needs no update).
:func:`fold_gates` multiplies them into the BatchNorms and removes them, for inference and export.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lit_nas.nets.base import MultiExitNet

_GATE = "_lit_nas_gate"  # the gate, referenced (not registered) by each BatchNorm it follows


def gate_key(group: str) -> str:
    """Key of ``group``'s gate in ``net.gates`` (ParameterDict keys cannot contain dots)."""
    return group.replace(".", "__")


def producer_norms(net: MultiExitNet, group: str) -> list[nn.BatchNorm2d]:
    """The BatchNorms producing channel group ``group``: where its gate multiplies."""
    groups = {g.name: g for g in net.channel_groups()}
    if group not in groups:
        raise ValueError(f"no channel group named {group!r}; valid choices: {sorted(groups)}")
    modules = dict(net.named_modules())
    norms = [
        modules[p.module] for p in groups[group].producers if isinstance(modules[p.module], nn.BatchNorm2d)
    ]
    if not norms:
        raise ValueError(f"channel group {group!r} has no normalisation layer to gate")
    return norms


def _apply_gate(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    # a plain function reading the module's own reference: deepcopy and .to() keep it pointing right
    return output * module.__dict__[_GATE].view(1, -1, 1, 1)


def attach_gates(
    net: MultiExitNet, groups: Iterable[str], trainable: bool = False, init: float = 1.0
) -> dict[str, nn.Parameter]:
    """Gate the channel groups ``groups`` (idempotent for groups already gated).

    Args:
        net: the network; gains ``net.gates`` and forward hooks on the producing BatchNorms.
        groups: channel-group names (from ``net.channel_groups()``).
        trainable: the gates receive gradients (ShrinkNets switches); binary masks do not.
        init: initial value of every gate entry.

    Returns:
        The gate of each requested group, by group name.
    """
    if not hasattr(net, "gates"):
        net.gates = nn.ParameterDict()
    sizes = {g.name: g.size for g in net.channel_groups()}
    out = {}
    for group in groups:
        key = gate_key(group)
        norms = producer_norms(net, group)
        if key not in net.gates:
            ref = norms[0].weight
            net.gates[key] = nn.Parameter(
                torch.full((sizes[group],), float(init), device=ref.device, dtype=ref.dtype),
                requires_grad=trainable,
            )
            net.gates[key].no_weight_decay = True  # an L1 penalty, not weight decay, shrinks switches
            for norm in norms:
                object.__setattr__(norm, _GATE, net.gates[key])  # bypasses registration: no duplicate
                norm.register_forward_hook(_apply_gate)
        out[group] = net.gates[key]
    return out


def gated_groups(net: MultiExitNet) -> dict[str, nn.Parameter]:
    """Every gate of ``net``, by group name."""
    if not hasattr(net, "gates"):
        return {}
    return {k.replace("__", "."): p for k, p in net.gates.items()}


@torch.no_grad()
def close_channels(net: MultiExitNet, channels: Iterable[tuple[str, int]]) -> None:
    """Gate channels off: ``(group, channel)`` pairs set to exactly 0 (garbage collection removes them)."""
    gates = gated_groups(net)
    for group, k in channels:
        gates[group][k] = 0.0


def ensure_gates(net: MultiExitNet, state_dict_keys: Iterable[str], prefix: str = "") -> None:
    """Create the gates named in a state dict (``<prefix>gates.<key>``), so loading it fills them."""
    lead = f"{prefix}gates."
    groups = [k[len(lead) :].replace("__", ".") for k in state_dict_keys if k.startswith(lead)]
    if groups:
        attach_gates(net, groups)


def remove_gates(net: MultiExitNet) -> None:
    """Drop every gate and its hooks (after :func:`fold_gates`, or to discard them)."""
    for module in net.modules():
        if _GATE in module.__dict__:
            del module.__dict__[_GATE]
            for hook_id, fn in list(module._forward_hooks.items()):
                if fn is _apply_gate:
                    del module._forward_hooks[hook_id]
    if hasattr(net, "gates"):
        del net.gates


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
