"""What every lit_nas network is: blocks that each end with an exit, built from an ArchSpec.

A network computes a list of *features*: feature 0 is the stem output, feature ``j >= 1`` the output of
cell ``j - 1``. Blocks run their cells in order; the exit of block ``b`` reads the last feature of the block.
Inactive blocks (growing) are simply not run, so they cost nothing in forward or backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

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


#: what a channel group is to its network (:attr:`ChannelGroup.role`)
GroupRole = Literal["inner", "stream"]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together: every producer and consumer of the same channels.

    Residual cells with identity shortcuts tie their output to their input, so a whole residual stream is
    one group; the inner width of each cell is a group of its own.

    Attributes:
        name: unique within the network (``cell3.mid``, ``stream0``); a name, not a contract.
        size: channels.
        producers: the layers producing the channels (output dimension).
        consumers: the layers reading them (input dimension).
        role: set by the network: ``inner`` for a cell's inner width (no skip connection reads it), ``stream``
            for the features the cells pass on (a residual stream, tied by identity shortcuts).
    """

    name: str
    size: int
    producers: tuple[ChannelSlice, ...]
    consumers: tuple[ChannelSlice, ...]
    role: GroupRole


@dataclass(frozen=True)
class DenseSource:
    """A slice ``[start, stop)`` of a cell's first-conv input channels and the feature it comes from."""

    source: str  # "stem" or "cell{j}"
    feature: int  # index into the feature list (0 = stem)
    start: int
    stop: int


GATE_KINDS = ("mask", "switch")


def gate_key(group: str) -> str:
    """Key of ``group``'s gate in ``net.gates`` (ParameterDict keys cannot contain dots)."""
    return group.replace(".", "__")


class GatedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose output is multiplied by a channel gate when one is set (:mod:`lit_nas.gates`).

    Every producing normalisation of a network is one, so gating a channel group needs no hook: the gate,
    registered once in ``MultiExitNet.gates`` and shared by every norm producing the group, is referenced
    (not registered) here. Without a gate it is a plain BatchNorm (same state dict, same export).
    """

    gate: Tensor | None = None  # set with object.__setattr__ (a reference, not a second registration)

    def forward(self, x: Tensor) -> Tensor:
        """``BN(x) * gate`` per channel (just ``BN(x)`` without a gate)."""
        out = super().forward(x)
        gate = self.__dict__.get("gate")
        return out if gate is None else out * gate.view(1, -1, 1, 1)


class ExitHead(nn.Module):
    """SDN internal classifier: learned mix of max and average pooling, then a linear layer.

    ``out = linear(flatten(a * maxpool(x) + (1 - a) * avgpool(x)))`` with ``a = sigmoid(mix)``. The pooling
    kernel is ``size // pool_to`` (at least 1), as in the SDN code. SDN leaves ``a`` unconstrained; a single
    scalar that scales every pooled feature gets a large gradient and made the first exit diverge at lr 0.1
    here, so the mix is kept in [0, 1] (starting at 0.5). With ``mixed=False`` only average pooling is used
    (the final exit: global average pooling, a plain ResNet head). ``dropout`` drops pooled features before
    the linear layer while training (the mobile networks' final classifier).
    """

    def __init__(
        self, channels: int, in_size: int, num_classes: int, pool_to: int, mixed: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.kernel = max(1, in_size // pool_to)
        self.out_size = in_size // self.kernel
        self.mixed = mixed
        self.mix = nn.Parameter(torch.zeros(())) if mixed else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.linear = nn.Linear(channels * self.out_size**2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, s, s)`` features to ``(B, num_classes)`` logits."""
        avg = nn.functional.avg_pool2d(x, self.kernel) if self.kernel > 1 else x
        if self.mix is not None:
            mx = nn.functional.max_pool2d(x, self.kernel) if self.kernel > 1 else x
            a = torch.sigmoid(self.mix)
            avg = a * mx + (1 - a) * avg
        flat = avg.flatten(1)
        return self.linear(self.dropout(flat) if self.dropout is not None else flat)


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
        #: channel gates by group name (``.`` written ``__``: ParameterDict keys cannot hold dots); the
        #: groups and kinds are recorded in ``spec.gated``, so :func:`build_net` rebuilds them from data
        self.gates = nn.ParameterDict()

    # -- channel gates (the mechanism of lit_nas.gates) ----------------------------------------------------
    def add_gates(self, groups: dict[str, str], init: float = 1.0) -> dict[str, nn.Parameter]:
        """Gate the channel groups ``{name: kind}`` not gated yet (``mask``: frozen, ``switch``: trained).

        Each gate is one parameter per channel, multiplied into every :class:`GatedBatchNorm2d` producing
        the group; the group and its kind are recorded in ``spec.gated``. Returns every requested gate.
        """
        sizes = {g.name: g.size for g in self.channel_groups()}
        out = {}
        for group, kind in groups.items():
            if kind not in GATE_KINDS:
                raise ValueError(f"gate kind {kind!r} of {group!r} is not one of {list(GATE_KINDS)}")
            key = gate_key(group)
            if key not in self.gates:
                norms = self.gated_norms(group)
                ref = norms[0].weight
                gate = nn.Parameter(
                    torch.full((sizes[group],), float(init), device=ref.device, dtype=ref.dtype),
                    requires_grad=kind == "switch",
                )
                gate.no_weight_decay = True  # an L1 penalty, not weight decay, shrinks switches
                self.gates[key] = gate
                for norm in norms:
                    object.__setattr__(norm, "gate", gate)
                self.spec.gated[group] = kind
            out[group] = self.gates[key]
        return out

    def gated_norms(self, group: str) -> list[GatedBatchNorm2d]:
        """The normalisations producing channel group ``group``: where its gate multiplies."""
        groups = {g.name: g for g in self.channel_groups()}
        if group not in groups:
            raise ValueError(f"no channel group named {group!r}; valid choices: {sorted(groups)}")
        modules = dict(self.named_modules())
        norms = [modules[p.module] for p in groups[group].producers]
        norms = [m for m in norms if isinstance(m, GatedBatchNorm2d)]
        if not norms:
            raise ValueError(f"channel group {group!r} has no gated normalisation layer")
        return norms

    def drop_gates(self, groups: Iterable[str] | None = None) -> None:
        """Remove the gates of ``groups`` (default: every gate), after folding them or to discard them."""
        if groups is None:
            for module in self.modules():
                module.__dict__.pop("gate", None)
            self.gates = nn.ParameterDict()
            self.spec.gated = {}
            return
        for group in groups:
            for norm in self.gated_norms(group):
                norm.__dict__.pop("gate", None)
            del self.gates[gate_key(group)]
            self.spec.gated.pop(group, None)

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

    def resized_spec_all(self, sizes: Mapping[str, int]) -> ArchSpec:
        """The ArchSpec once every channel group named in ``sizes`` has its size (the net is unchanged)."""
        spec = self.spec
        try:
            for group, size in sizes.items():
                self.spec = self.resized_spec(group, size)  # each resize reads the spec the last one made
            return self.spec
        finally:
            self.spec = spec

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
