"""MobileNetV1, MobileNetV2 and MnasNet as multi-exit networks in the WideResNet layout.

The Liège thesis (section 3.4, table 3.3) ran these on CIFAR-10 in the WRN layout: a 16-channel 3x3 stem,
three subnetworks of ``blocks / 3`` cells of widths ``w, 2w, 4w``, the first cell of subnetworks 2 and 3
strided, then global average pooling and the classifier (with dropout before it where asked). ReLU6
everywhere. The cells (:mod:`lit_nas.nets.cells`):

- ``mobilenet_v1``: depthwise-separable 3x3 cells without shortcut (the thesis kept the original after its
  5x5 and skip-connection variants did worse);
- ``mobilenet_v2``: inverted residuals with expansion ``t`` (``mid = t * input width``), 3x3 depthwise, an
  identity shortcut where stride and width allow;
- ``mnasnet``: ``mobilenet_v2`` with 5x5 depthwise kernels in every cell but the last one of subnetworks 2
  and 3, and half the expansion in the network's first cell.

Exits sit after blocks as in every family (``exit_depths``), so the SDN heads, growing and every pruning
callback apply unchanged.
"""

from __future__ import annotations

from lit_nas.arch import CellSpec
from lit_nas.nets.resnet_sdn import ResNetSDN

MOBILE_KINDS = ("mobilenet_v1", "mobilenet_v2", "mnasnet")


class MobileNetV1SDN(ResNetSDN):
    """Multi-exit MobileNetV1 (depthwise-separable cells) built from an ArchSpec."""


class MobileNetV2SDN(ResNetSDN):
    """Multi-exit MobileNetV2 (inverted residual cells) built from an ArchSpec."""


class MnasNetSDN(ResNetSDN):
    """Multi-exit CIFAR MnasNet (MobileNetV2 cells with 5x5 depthwise kernels) built from an ArchSpec."""


def mobile_cells(
    kind: str,
    stage_widths: list[int],
    cells_per_stage: list[int],
    stem_width: int,
    expansion: float,
    se_reduction: int,
) -> list[CellSpec]:
    """The cells of a ``kind`` network (one of :data:`MOBILE_KINDS`) over the given stages."""
    cells: list[CellSpec] = []
    prev = stem_width
    for stage, (width, n) in enumerate(zip(stage_widths, cells_per_stage)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            se = max(1, width // se_reduction) if se_reduction else 0
            if kind == "mobilenet_v1":
                cell = CellSpec(mid=0, out=width, stride=stride, se=se, op="dwsep", residual=False)
            else:
                t = expansion / 2 if kind == "mnasnet" and not cells else expansion
                kernel = 5 if kind == "mnasnet" and not (stage > 0 and i == n - 1) else 3
                cell = CellSpec(
                    mid=max(1, round(prev * t)),
                    out=width,
                    stride=stride,
                    se=se,
                    op="inverted",
                    kernel=kernel,
                    residual=stride == 1 and prev == width,
                )
            cells.append(cell)
            prev = width
    return cells
