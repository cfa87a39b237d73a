"""What every lit_nas network is: blocks that each end with an exit, built from an ArchSpec.

A network computes a list of *features*: feature 0 is the stem output, feature ``j >= 1`` the output of
cell ``j - 1``. Blocks run their cells in order; the exit of block ``b`` reads the last feature of the block.
Inactive blocks (growing) are simply not run, so they cost nothing in forward or backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_nas.arch import ArchSpec


@dataclass(frozen=True)
class ExitLogits:
    """Logits of the exits that ran, in depth order.

    Attributes:
        exits: block index of each exit that produced logits (increasing).
        logits: one ``(batch, num_classes)`` tensor per entry of ``exits``.
    """

    exits: tuple[int, ...]
    logits: tuple[Tensor, ...]

    @property
    def final(self) -> Tensor:
        """Logits of the deepest active exit."""
        return self.logits[-1]

    def __getitem__(self, exit_block: int) -> Tensor:
        """Logits of the exit after block ``exit_block``."""
        return self.logits[self.exits.index(exit_block)]

    def __len__(self) -> int:
        return len(self.exits)

    def __iter__(self) -> Iterator[Tensor]:
        """The logits, in depth order (without it, iteration would go through ``__getitem__`` by index)."""
        return iter(self.logits)

    def items(self) -> Iterator[tuple[int, Tensor]]:
        """``(exit block, logits)`` pairs in depth order."""
        return iter(zip(self.exits, self.logits))


@dataclass(frozen=True)
class ChannelSlice:
    """Where a channel group lives inside one layer.

    Attributes:
        module: qualified module name inside the network (a Conv2d, BatchNorm2d or Linear).
        dim: 0 for the output channels of a producer (conv/BN), 1 for the inputs of a consumer.
        start: first index of the group along ``dim`` (non-zero for slices of a dense concatenation).
        per_channel: consecutive entries along ``dim`` per channel (a Linear after a flattened s x s map has
            ``s * s``; channel ``k`` owns entries ``start + k*s*s .. start + (k+1)*s*s - 1``).
    """

    module: str
    dim: int
    start: int = 0
    per_channel: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together: every producer and consumer of the same channels.

    Residual cells with identity shortcuts tie their output to their input, so a whole residual stream is
    one group; the inner width of each cell is a group of its own.
    """

    name: str
    size: int
    producers: tuple[ChannelSlice, ...]
    consumers: tuple[ChannelSlice, ...]


@dataclass(frozen=True)
class DenseSource:
    """A slice ``[start, stop)`` of a cell's first-conv input channels and the feature it comes from."""

    source: str  # "stem" or "cell{j}"
    feature: int  # index into the feature list (0 = stem)
    start: int
    stop: int


class ExitHead(nn.Module):
    """SDN internal classifier: learned mix of max and average pooling, then a linear layer.

    ``out = linear(flatten(a * maxpool(x) + (1 - a) * avgpool(x)))`` with ``a = sigmoid(mix)``. The pooling
    kernel is ``size // pool_to`` (at least 1), as in the SDN code. SDN leaves ``a`` unconstrained; a single
    scalar that scales every pooled feature gets a large gradient and made the first exit diverge at lr 0.1
    here, so the mix is kept in [0, 1] (starting at 0.5). With ``mixed=False`` only average pooling is used
    (the final exit: global average pooling, a plain ResNet head).
    """

    def __init__(self, channels: int, in_size: int, num_classes: int, pool_to: int, mixed: bool) -> None:
        super().__init__()
        self.kernel = max(1, in_size // pool_to)
        self.out_size = in_size // self.kernel
        self.mixed = mixed
        self.mix = nn.Parameter(torch.zeros(())) if mixed else None
        self.linear = nn.Linear(channels * self.out_size**2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, s, s)`` features to ``(B, num_classes)`` logits."""
        avg = nn.functional.avg_pool2d(x, self.kernel) if self.kernel > 1 else x
        if self.mix is not None:
            mx = nn.functional.max_pool2d(x, self.kernel) if self.kernel > 1 else x
            a = torch.sigmoid(self.mix)
            avg = a * mx + (1 - a) * avg
        return self.linear(avg.flatten(1))


class MultiExitNet(nn.Module):
    """Base class of every network in the registry.

    Subclasses build ``self.blocks`` (one module per block, stem inside block 0) and ``self.exits``
    (an ``nn.ModuleDict`` keyed by the block index as a string, only for blocks with an exit), and
    implement :meth:`run_block`, :meth:`channel_groups` and :meth:`dense_sources`.
    """

    blocks: nn.ModuleList
    exits: nn.ModuleDict

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec

    # -- computation ------------------------------------------------------------------------------------
    def run_block(self, block: int, feats: list[Tensor], x: Tensor | None = None) -> list[Tensor]:
        """Run ``block``; ``feats`` holds every feature so far (empty for block 0, which reads ``x``)."""
        raise NotImplementedError

    def run_exit(self, block: int, feats: list[Tensor]) -> Tensor:
        """Logits of the exit after ``block``, from the features computed so far."""
        return self.exits[str(block)](feats[-1])

    def forward(self, x: Tensor, active_blocks: int | None = None) -> ExitLogits:
        """Run the active blocks and their exits.

        Args:
            x: images ``(B, C, H, W)``.
            active_blocks: how many blocks to run; defaults to ``spec.active_blocks``.
        """
        n = self.spec.active_blocks if active_blocks is None else active_blocks
        feats: list[Tensor] = []
        exits, logits = [], []
        for b in range(n):
            feats = self.run_block(b, feats, x)
            if str(b) in self.exits:
                exits.append(b)
                logits.append(self.run_exit(b, feats))
        return ExitLogits(tuple(exits), tuple(logits))

    # -- introspection for callbacks --------------------------------------------------------------------
    def prunable_weights(self, include_exits: bool = False) -> dict[int, dict[str, nn.Parameter]]:
        """Conv and linear weights grouped by block (qualified names); exits only when asked."""
        groups: dict[int, dict[str, nn.Parameter]] = {}
        for b, block in enumerate(self.blocks):
            groups[b] = _layer_weights(block, f"blocks.{b}")
            if include_exits and str(b) in self.exits:
                groups[b].update(_layer_weights(self.exits[str(b)], f"exits.{b}"))
        return groups

    def exit_weights(self) -> dict[int, dict[str, nn.Parameter]]:
        """Conv and linear weights of each exit head."""
        return {int(k): _layer_weights(m, f"exits.{k}") for k, m in self.exits.items()}

    def channel_groups(self) -> list[ChannelGroup]:
        """Groups of channels that are pruned together (see :class:`ChannelGroup`)."""
        raise NotImplementedError

    def dense_sources(self, cell: int) -> list[DenseSource]:
        """Which slice of ``cell``'s first-conv input comes from which earlier feature."""
        raise NotImplementedError

    def cell_input_layer(self, cell: int) -> str:
        """Name of the layer of ``cell`` that reads the slices of :meth:`dense_sources` (its first conv)."""
        raise NotImplementedError

    def resized_spec(self, group: str, size: int) -> ArchSpec:
        """The ArchSpec after channel group ``group`` (a name from :meth:`channel_groups`) has ``size``."""
        raise NotImplementedError

    def residual_scales(self, block: int) -> list[nn.Parameter]:
        """Scale of the last normalisation of each residual branch in ``block``.

        Zeroing them turns every residual cell into its shortcut (an identity where the shortcut is one),
        the identity start of a newly grown block.
        """
        raise NotImplementedError


def _layer_weights(module: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    return {
        f"{prefix}.{name}.weight": m.weight
        for name, m in module.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
