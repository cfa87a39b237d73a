"""The cells of the mobile families: MobileNetV1's and MobileNetV2's (also MnasNet's).

The networks (:mod:`lit_nas.nets.mobilenet`) are :class:`~lit_nas.nets.resnet_sdn.ResNetSDN` with these
cells (``CellSpec.op``): the stem, the blocks, the SDN exits and the channel groups are shared, so every
callback works on them unchanged.

- :class:`DepthwiseSeparableCell` (MobileNetV1, Howard et al.): depthwise kxk(stride) -> BN -> ReLU6 ->
  pointwise 1x1 -> BN -> ReLU6, no shortcut (the thesis found its skip-connection variant worse);
- :class:`InvertedResidualCell` (MobileNetV2, Sandler et al.; MnasNet): 1x1 expand -> BN -> ReLU6 ->
  depthwise kxk(stride) -> BN -> ReLU6 -> 1x1 project -> BN (linear bottleneck), plus an identity shortcut
  where the stride is 1 and the width does not change.

Squeeze-and-Excitation, when asked for, closes the cell's branch (before the addition), as in the thesis
("a SE block at the end of each network block").

Channel groups: a depthwise conv ties each output channel to its input channel, so it belongs to the group
of the channels it reads. The expansion width of an inverted residual (expand conv, its BN, the depthwise
conv and its BN, the project conv's inputs) is the cell's inner group; a depthwise-separable cell's
depthwise conv and BN join the group of the cell's input feature.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_nas.arch import CellSpec
from lit_nas.nets.base import GatedBatchNorm2d

ACT = {"relu": nn.functional.relu, "relu6": nn.functional.relu6}


def _depthwise(channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, stride, padding=kernel // 2, groups=channels, bias=False)


class DepthwiseSeparableCell(nn.Module):
    """MobileNetV1 cell: ``act(bn2(pw(act(bn1(dw(x))))))`` [-> SE]."""

    def __init__(self, in_channels: int, spec: CellSpec, act: str, se: nn.Module | None) -> None:
        super().__init__()
        self.act = ACT[act]
        self.dw = _depthwise(in_channels, spec.kernel, spec.stride)
        self.bn1 = GatedBatchNorm2d(in_channels)
        self.pw = nn.Conv2d(in_channels, spec.out, 1, bias=False)
        self.bn2 = GatedBatchNorm2d(spec.out)
        self.se = se

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual`` is unused: the cell has no shortcut."""
        out = self.act(self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))
        return self.se(out) if self.se is not None else out


class InvertedResidualCell(nn.Module):
    """MobileNetV2 cell: ``bn3(project(act(bn2(dw(act(bn1(expand(x))))))))`` [-> SE] [+ x]."""

    def __init__(self, in_channels: int, spec: CellSpec, act: str, se: nn.Module | None) -> None:
        super().__init__()
        self.act = ACT[act]
        self.residual = spec.residual
        self.expand = nn.Conv2d(in_channels, spec.mid, 1, bias=False)
        self.bn1 = GatedBatchNorm2d(spec.mid)
        self.dw = _depthwise(spec.mid, spec.kernel, spec.stride)
        self.bn2 = GatedBatchNorm2d(spec.mid)
        self.project = nn.Conv2d(spec.mid, spec.out, 1, bias=False)
        self.bn3 = GatedBatchNorm2d(spec.out)
        self.se = se

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``x`` feeds the expansion; ``residual`` is added back when the cell has a shortcut."""
        out = self.act(self.bn1(self.expand(x)))
        out = self.bn3(self.project(self.act(self.bn2(self.dw(out)))))
        if self.se is not None:
            out = self.se(out)
        return out + residual if self.residual else out
