"""Retraining from scratch (pure functions): fresh or rewound weights for an architecture that stays.

The architecture is the ArchSpec, the weight masks (:mod:`lit_nas.masks`) and the closed channel gates
(:mod:`lit_nas.gates`); everything else in a network's state (parameters, BatchNorm statistics) is its
weights. Liège thesis section 4.3; lottery-ticket rewinding after Frankle et al.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lit_nas.arch import ArchSpec
from lit_nas.gates import gated_groups
from lit_nas.masks import get_masks
from lit_nas.nets import build_net
from lit_nas.nets.base import MultiExitNet


def weights(net: MultiExitNet) -> dict[str, Tensor]:
    """The network's parameters and BatchNorm statistics, without its masks and gates (the architecture).

    The tensors themselves (``keep_vars``), by state-dict key: copying into them changes the network.
    """
    architecture = {id(t) for t in get_masks(net).values()} | {id(g) for g in gated_groups(net).values()}
    return {k: v for k, v in net.state_dict(keep_vars=True).items() if id(v) not in architecture}


def fresh_weights(spec: ArchSpec, seed: int) -> dict[str, Tensor]:
    """Newly initialised weights for ``spec`` (drawn under ``seed``, the global random state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_net(spec).state_dict()


def changed_layers(current: Mapping[str, Tensor], saved: Mapping[str, Tensor]) -> list[str]:
    """Keys of ``current`` that ``saved`` lacks or holds with another shape (a garbage collection since)."""
    return [k for k, v in current.items() if k not in saved or saved[k].shape != v.shape]


@torch.no_grad()
def restart(net: MultiExitNet, new: Mapping[str, Tensor]) -> None:
    """Put ``new`` weights into ``net``; live gates back to 1, closed ones stay closed.

    The masks are left as they are: re-apply them (``NASModule.set_masks``) to zero the pruned weights.
    """
    for k, v in weights(net).items():
        v.copy_(new[k].to(device=v.device, dtype=v.dtype))
    for gate in gated_groups(net).values():
        gate.copy_((gate != 0).to(gate.dtype))
