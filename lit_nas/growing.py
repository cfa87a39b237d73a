"""Growing a multi-exit network block by block (Inria thesis, sections 2.2.1 and 3): the pure parts.

Training starts with block 0 and its exit; at each growth epoch the next block and its exit join, connected
after the last layer of the previous block, and the earlier exits stay on as output branches. Every block is
built at the start and inactive blocks are simply not run (:meth:`MultiExitNet.forward` stops after
``spec.active_blocks``), so no parameter is created mid-run: an inactive block gets no gradient, hence no
optimizer state, no weight decay and no momentum, and it starts training with the learning rate in force.

The callback that decides *when* is ``callbacks.growing.Growing``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from lit_nas.arch import ArchSpec
from lit_nas.nets.base import MultiExitNet

#: How a newly activated block starts.
GROW_INITS = ("random", "identity")


def validate_grow_epochs(
    grow_epochs: Sequence[int], num_blocks: int | None = None, max_epochs: int | None = None
) -> list[int]:
    """Check a growth schedule and return it as a list.

    Args:
        grow_epochs: epoch at which each of blocks ``1..num_blocks-1`` activates (block 0 starts active).
        num_blocks: blocks of the network, when known.
        max_epochs: length of the run, when known (``None`` or negative: unbounded).

    Raises:
        ValueError: naming the bad value; the schedule must be integers >= 1, strictly increasing, one per
            block after the first, and below ``max_epochs``.
    """
    epochs = list(grow_epochs)
    if any(isinstance(e, bool) or not isinstance(e, int) for e in epochs):
        raise ValueError(f"grow_epochs must be integers (epoch indices); got {epochs}")
    if any(e < 1 for e in epochs):
        raise ValueError(
            "grow_epochs must be >= 1 (block 0 trains alone from epoch 0 until the first growth); "
            f"got {epochs}"
        )
    if any(b <= a for a, b in pairwise(epochs)):
        raise ValueError(f"grow_epochs must be strictly increasing; got {epochs}")
    if num_blocks is not None and len(epochs) != num_blocks - 1:
        raise ValueError(
            f"grow_epochs {epochs} has {len(epochs)} entries but the network has {num_blocks} blocks: give "
            f"one growth epoch per block after the first ({num_blocks - 1} entries)"
        )
    if max_epochs is not None and max_epochs >= 0 and epochs and epochs[-1] >= max_epochs:
        late = [e for e in epochs if e >= max_epochs]
        raise ValueError(
            f"grow_epochs {late} are >= max_epochs={max_epochs}: those blocks would never train; epochs are "
            f"counted from 0, so the last valid growth epoch is {max_epochs - 1}"
        )
    return epochs


def active_blocks_at(epoch: int, grow_epochs: Sequence[int]) -> int:
    """Blocks active during ``epoch``: block 0 plus one per growth epoch reached (``<= epoch``)."""
    return 1 + sum(1 for e in grow_epochs if e <= epoch)


def check_growable(spec: ArchSpec) -> None:
    """Raise ``ValueError`` unless every block has an exit (each grown block ends with its classifier)."""
    missing = [b for b, has in enumerate(spec.exits) if not has]
    if missing:
        raise ValueError(
            f"growing needs an exit after every block (net.exits: true); blocks {missing} have none, so the "
            "network would have no output while they are the last active block"
        )


@torch.no_grad()
def identity_init(net: MultiExitNet, block: int) -> list[torch.nn.Parameter]:
    """Zero the last normalisation scale of every residual cell of ``block``; return those scales.

    Each cell then computes ``relu(shortcut(x) + bias)``: with an identity shortcut and the untrained zero
    bias that is ``x`` itself (``x`` is a ReLU output), so the features reaching the new exit are those the
    previous exit saw; a projection cell (stride or width change) starts as its 1x1 shortcut.
    """
    scales = net.residual_scales(block)
    for p in scales:
        p.zero_()
    return scales
