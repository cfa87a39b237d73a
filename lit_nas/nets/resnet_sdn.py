"""CIFAR-style ResNet split into blocks that each end with an SDN internal classifier.

Plain variant (``dense=False``): stem 3x3 conv -> basic residual cells -> exits after each block.
Dense variant (``dense=True``, the super-network of the Inria thesis, section 5): the first conv of every
cell reads the concatenation of the stem output and *all* earlier cell outputs, each average-pooled down to
the cell's input resolution. The residual shortcut still comes from the previous cell only, so the plain
ResNet is the sub-network in which every extra (dense) input slice is pruned away; pruning those slices is
the architecture search.

The cells need not be basic residual ones: ``CellSpec.op`` also builds MobileNetV1's depthwise-separable
and MobileNetV2's inverted-residual cells (:mod:`lit_nas.nets.mobilenet`), so the mobile families share the
stem, blocks, exits and channel groups defined here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_nas.arch import ArchSpec, CellSpec
from lit_nas.nets.base import (
    ChannelGroup,
    ChannelSlice,
    DenseSource,
    ExitHead,
    GatedBatchNorm2d,
    MultiExitNet,
)
from lit_nas.nets.cells import ACT, DepthwiseSeparableCell, InvertedResidualCell


class Stem(nn.Module):
    """3x3 conv -> BN -> ReLU (ReLU6 in the mobile families)."""

    def __init__(self, in_channels: int, width: int, act: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = GatedBatchNorm2d(width)
        self.act = ACT[act]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, width, H, W)``."""
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): scale each channel by ``sigmoid(fc2(relu(fc1(avgpool(x)))))``.

    The two fully connected layers are 1x1 convolutions, so channel surgery slices them like any conv.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class BasicCell(nn.Module):
    """Residual cell: conv3x3(stride)-BN-ReLU-conv3x3-BN[-SE], plus identity or 1x1-conv-BN shortcut, ReLU."""

    def __init__(self, in_channels: int, residual_channels: int, spec: CellSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, spec.mid, 3, stride=spec.stride, padding=1, bias=False)
        self.bn1 = GatedBatchNorm2d(spec.mid)
        self.conv2 = nn.Conv2d(spec.mid, spec.out, 3, padding=1, bias=False)
        self.bn2 = GatedBatchNorm2d(spec.out)
        self.se = SqueezeExcite(spec.out, spec.se) if spec.se else None
        self.shortcut: nn.Module = nn.Identity()
        if spec.projection:
            self.shortcut = nn.Sequential(
                nn.Conv2d(residual_channels, spec.out, 1, stride=spec.stride, bias=False),
                GatedBatchNorm2d(spec.out),
            )

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``x`` feeds conv1 (the concatenation in the dense variant); ``residual`` feeds the shortcut."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return torch.relu(out + self.shortcut(residual))


def make_cell(in_channels: int, residual_channels: int, spec: CellSpec, act: str) -> nn.Module:
    """The cell ``spec.op`` names (first conv reading ``in_channels``, shortcut ``residual_channels``)."""
    se = SqueezeExcite(spec.out, spec.se) if spec.se else None
    if spec.op == "dwsep":
        return DepthwiseSeparableCell(in_channels, spec, act, se)
    if spec.op == "inverted":
        return InvertedResidualCell(in_channels, spec, act, se)
    return BasicCell(in_channels, residual_channels, spec)


#: per cell kind: (layers producing its inner width, layers reading it) and the layer reading its input
_MID = {
    "basic": (("conv1", "bn1"), ("conv2",)),
    "inverted": (("expand", "bn1", "dw", "bn2"), ("project",)),
}
_OUT = {"basic": ("conv2", "bn2"), "dwsep": ("pw", "bn2"), "inverted": ("project", "bn3")}
_INPUT = {"basic": "conv1", "dwsep": "dw", "inverted": "expand"}


class Block(nn.Module):
    """Consecutive cells (block 0 also owns the stem)."""

    def __init__(self, cells: list[nn.Module], stem: Stem | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.cells = nn.ModuleList(cells)


class ResNetSDN(MultiExitNet):
    """Multi-exit ResNet (optionally densely connected) built from an :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__(spec)
        widths = spec.feature_widths()
        in_widths = spec.cell_input_widths()
        sizes = spec.feature_sizes()
        blocks = []
        for b in range(spec.num_blocks):
            act = spec.activation
            cells = [make_cell(in_widths[i], widths[i], spec.cells[i], act) for i in spec.cells_of_block(b)]
            blocks.append(Block(cells, Stem(spec.in_channels, spec.stem_width, act) if b == 0 else None))
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleDict()
        for b in range(spec.num_blocks):
            if spec.exits[b]:
                feat = spec.cells_of_block(b)[-1] + 1
                final = b == spec.num_blocks - 1
                self.exits[str(b)] = ExitHead(
                    widths[feat],
                    sizes[feat],
                    spec.num_classes,
                    pool_to=1 if final else spec.exit_pool,
                    mixed=not final,
                    dropout=spec.dropout if final else 0.0,
                )

    def run_block(self, block: int, feats: list[Tensor], x: Tensor | None = None) -> list[Tensor]:
        """Append the outputs of ``block``'s cells to ``feats`` (a new list; the input is not modified)."""
        mod = self.blocks[block]
        feats = list(feats)
        if mod.stem is not None:
            feats.append(mod.stem(x))
        first = self.spec.cells_of_block(block).start
        for k, cell in enumerate(mod.cells):
            prev = feats[-1]
            inp = self._dense_input(feats, self.spec.cell_reads(first + k)) if self.spec.dense else prev
            feats.append(cell(inp, prev))
        return feats

    def _dense_input(self, feats: list[Tensor], reads: list[int]) -> Tensor:
        size = feats[-1].shape[-1]
        pooled = [
            f if f.shape[-1] == size else nn.functional.avg_pool2d(f, f.shape[-1] // size)
            for f in (feats[j] for j in reads)
        ]
        return torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]

    # -- introspection ----------------------------------------------------------------------------------
    def _cell_name(self, cell: int) -> str:
        b = self.spec.block_of_cell(cell)
        return f"blocks.{b}.cells.{cell - self.spec.cells_of_block(b).start}"

    def dense_sources(self, cell: int) -> list[DenseSource]:
        """Input slices of ``cell``'s conv1: its live earlier features (dense) or the previous one (plain)."""
        widths = self.spec.feature_widths()
        out, start = [], 0
        for j in self.spec.cell_reads(cell):
            out.append(DenseSource("stem" if j == 0 else f"cell{j - 1}", j, start, start + widths[j]))
            start += widths[j]
        return out

    def cell_input_layer(self, cell: int) -> str:
        """The conv that reads the (dense) input of ``cell``: ``conv1``, ``dw`` (dwsep) or ``expand``."""
        return f"{self._cell_name(cell)}.{_INPUT[self.spec.cells[cell].op]}"

    def resized_spec(self, group: str, size: int) -> ArchSpec:
        """``cell{i}.mid`` sets that cell's inner width; ``stream{s}`` sets every feature of the stream."""
        spec = ArchSpec.from_dict(self.spec.to_dict())
        if size < 1:
            raise ValueError(f"channel group {group!r} cannot shrink to {size} channels (at least 1)")
        if group.startswith("cell") and group.endswith(".mid"):
            cell = int(group[4:-4])
            if not 0 <= cell < spec.num_cells or spec.cells[cell].op not in _MID:
                raise ValueError(f"no channel group named {group!r}")
            spec.cells[cell].mid = size
        elif group.startswith("stream"):
            features = [j for j, s in enumerate(self._streams()) if s == int(group[6:])]
            if not features:
                raise ValueError(f"no channel group named {group!r}")
            for j in features:
                if j == 0:
                    spec.stem_width = size
                else:
                    spec.cells[j - 1].out = size
        else:
            raise ValueError(f"no channel group named {group!r}")
        spec.validate()
        return spec

    def _streams(self) -> list[int]:
        """Residual stream of every feature.

        Identity shortcuts keep the stream; projections, and cells without a shortcut, start one.
        """
        stream_of = [0]
        for c in self.spec.cells:
            same = c.residual and not c.projection
            stream_of.append(stream_of[-1] if same else stream_of[-1] + 1)
        return stream_of

    def residual_scales(self, block: int) -> list[nn.Parameter]:
        """The BN closing the branch of every cell of ``block`` that has a shortcut (``bn2``, ``bn3``).

        A cell without a shortcut (MobileNetV1's, a strided MobileNetV2 one) has no identity to start
        from, so it is left as initialised.
        """
        cells = zip(self.spec.cells_of_block(block), self.blocks[block].cells)
        return [
            getattr(m, _OUT[self.spec.cells[i].op][1]).weight for i, m in cells if self.spec.cells[i].residual
        ]

    def channel_groups(self) -> list[ChannelGroup]:
        """Per-cell inner widths, then residual streams (features tied by identity shortcuts)."""
        spec = self.spec
        groups = []
        for i, c in enumerate(spec.cells):
            if c.op not in _MID:
                continue  # a dwsep cell's depthwise conv belongs to its input's group
            name = self._cell_name(i)
            prod, cons = _MID[c.op]
            groups.append(
                ChannelGroup(
                    name=f"cell{i}.mid",
                    size=c.mid,
                    producers=tuple(ChannelSlice(f"{name}.{m}", 0) for m in prod),
                    consumers=tuple(ChannelSlice(f"{name}.{m}", 1) for m in cons),
                    role="inner",
                )
            )
        stream_of = self._streams()  # features tied by identity shortcuts
        producers: dict[int, list[ChannelSlice]] = {}
        consumers: dict[int, list[ChannelSlice]] = {}
        for j, s in enumerate(stream_of):
            prod = producers.setdefault(s, [])
            if j == 0:
                prod += [ChannelSlice("blocks.0.stem.conv", 0), ChannelSlice("blocks.0.stem.bn", 0)]
            else:
                name = self._cell_name(j - 1)
                prod += [ChannelSlice(f"{name}.{m}", 0) for m in _OUT[spec.cells[j - 1].op]]
                if spec.cells[j - 1].se:
                    prod.append(ChannelSlice(f"{name}.se.fc2", 0))
                if spec.cells[j - 1].projection:
                    prod += [ChannelSlice(f"{name}.shortcut.0", 0), ChannelSlice(f"{name}.shortcut.1", 0)]
        for i in range(spec.num_cells):
            name = self._cell_name(i)
            if spec.cells[i].op == "dwsep":  # the depthwise conv and its BN carry the input's channels on
                producers[stream_of[i]] += [ChannelSlice(f"{name}.dw", 0), ChannelSlice(f"{name}.bn1", 0)]
                consumers.setdefault(stream_of[i], []).append(ChannelSlice(f"{name}.pw", 1))
            else:
                for src in self.dense_sources(i):
                    consumers.setdefault(stream_of[src.feature], []).append(
                        ChannelSlice(f"{name}.{_INPUT[spec.cells[i].op]}", 1, start=src.start)
                    )
            if spec.cells[i].projection:
                consumers.setdefault(stream_of[i], []).append(ChannelSlice(f"{name}.shortcut.0", 1))
            if spec.cells[i].se:
                consumers.setdefault(stream_of[i + 1], []).append(ChannelSlice(f"{name}.se.fc1", 1))
        for key, head in self.exits.items():
            feat = spec.cells_of_block(int(key))[-1] + 1
            consumers.setdefault(stream_of[feat], []).append(
                ChannelSlice(f"exits.{key}.linear", 1, per_channel=head.out_size**2)
            )
        widths = spec.feature_widths()
        for s in sorted(producers):
            j = stream_of.index(s)
            groups.append(
                ChannelGroup(
                    name=f"stream{s}",
                    size=widths[j],
                    producers=tuple(producers[s]),
                    consumers=tuple(consumers.get(s, ())),
                    role="stream",
                )
            )
        return groups


class WideResNetSDN(ResNetSDN):
    """Wide ResNet (WRN-d-k, Zagoruyko and Komodakis), optionally with Squeeze-and-Excitation and exits.

    The layout is the WRN's (a 16-channel stem, three stages of ``(d - 4) / 6`` cells of widths
    ``16k, 32k, 64k``; :class:`~lit_nas.nets.recipe.NetConfig` expands ``depth``/``widen_factor`` with
    :func:`wrn_stages`). The cells are the post-activation cells of :class:`ResNetSDN`
    (conv-BN-ReLU-conv-BN, then the addition), not the original pre-activation ones: every prunable conv
    output then has its own BatchNorm, which is where channel gates sit and fold (Liège thesis section
    4.2.3; ShrinkNets section 3.6). No dropout.
    """


def wrn_stages(depth: int, widen_factor: int | None) -> tuple[list[int], list[int], int]:
    """The WRN-d-k recipe (Zagoruyko and Komodakis): ``(stage_widths, cells_per_stage, stem_width)``.

    Three stages of ``(d - 4) / 6`` cells of widths ``16k, 32k, 64k`` after a 16-channel stem.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
    if widen_factor is None or widen_factor < 1:
        raise ValueError(f"widen_factor must be >= 1; got {widen_factor}")
    k, n = widen_factor, (depth - 4) // 6
    return [16 * k, 32 * k, 64 * k], [n, n, n], 16
