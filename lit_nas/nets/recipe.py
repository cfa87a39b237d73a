"""``NetConfig``: the short recipe of a network written in YAML, expanded into an :class:`ArchSpec`.

It lives beside the networks (not in :mod:`lit_nas.arch`) because it knows their families: the registry's
kinds, and the WRN-d-k recipe of ``wide_resnet`` (:func:`lit_nas.nets.resnet_sdn.wrn_stages`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from lit_nas.arch import ArchSpec, CellSpec, DataShape
from lit_nas.nets.mobilenet import MOBILE_KINDS, mobile_cells
from lit_nas.nets.registry import NETWORKS
from lit_nas.nets.resnet_sdn import wrn_stages


@dataclass
class NetConfig:
    """Short recipe of a network, as written in YAML; expanded by :meth:`build_spec`.

    Attributes:
        kind: network family: ``resnet_sdn``, ``wide_resnet``, ``mobilenet_v1``, ``mobilenet_v2`` or
            ``mnasnet`` (:mod:`lit_nas.nets.mobilenet`).
        stage_widths: channels of each resolution stage; stage ``k > 0`` halves the resolution.
        cells_per_stage: residual cells per stage.
        depth: WRN-d-k recipe (Zagoruyko and Komodakis): ``depth`` d with ``(d - 4) % 6 == 0`` sets three
            stages of ``(d - 4) / 6`` cells of widths ``16k, 32k, 64k`` after a 16-channel stem, overriding
            ``stage_widths``, ``cells_per_stage`` and ``stem_width``. Required by ``wide_resnet``.
        widen_factor: k of the WRN-d-k recipe.
        se_reduction: Squeeze-and-Excitation on every residual branch with hidden width ``out // r``
            (Liège thesis section 3.4); 0 for none.
        exit_depths: where the blocks end, as fractions of the number of cells (the thesis: 0.3/0.6/0.8/1.0);
            ignored when ``block_cells`` is given.
        block_cells: explicit number of cells per block.
        exits: ``True`` (an internal classifier after every block), ``False`` (baseline: final exit only)
            or one flag per block.
        dense: densely connected cells (the super-network of the thesis, section 5).
        stem_width: stem channels; defaults to ``stage_widths[0]``.
        exit_pool: pooled map size of the internal classifiers.
        active_blocks: blocks active at start; defaults to all (growing sets 1).
        blocks: the Liège thesis's WRN layout for the mobile families (table 3.3): ``blocks`` cells in three
            subnetworks of widths ``width, 2 * width, 4 * width`` after a 16-channel stem, overriding
            ``stage_widths``, ``cells_per_stage`` and ``stem_width``; ``blocks`` must be a multiple of 3.
        width: the first subnetwork's width of that layout (with ``blocks``).
        expansion: expansion ratio of the inverted residuals (``mobilenet_v2``, ``mnasnet``): a cell's inner
            width is ``expansion`` times its input width.
        dropout: drop rate before the final classifier (0: none).
        activation: ``relu`` or ``relu6``; defaults to ``relu6`` for the mobile families, ``relu`` otherwise.
    """

    kind: str = "resnet_sdn"
    stage_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    cells_per_stage: list[int] = field(default_factory=lambda: [3, 3, 3])
    exit_depths: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8, 1.0])
    block_cells: list[int] | None = None
    exits: bool | list[bool] = True
    dense: bool = False
    stem_width: int | None = None
    exit_pool: int = 4
    active_blocks: int | None = None
    depth: int | None = None
    widen_factor: int | None = None
    se_reduction: int = 0
    blocks: int | None = None
    width: int | None = None
    expansion: float = 4.0
    dropout: float = 0.0
    activation: str | None = None

    def __post_init__(self) -> None:
        if (self.blocks is None) != (self.width is None):
            raise ValueError(
                f"blocks and width come together (the WRN layout of the mobile families); got "
                f"blocks={self.blocks}, width={self.width}"
            )
        if self.blocks is not None:
            if self.depth is not None:
                raise ValueError("give either blocks/width or depth/widen_factor, not both")
            if self.blocks < 3 or self.blocks % 3 or self.width < 1:
                raise ValueError(
                    f"blocks must be a positive multiple of 3 (three subnetworks) and width >= 1; got "
                    f"blocks={self.blocks}, width={self.width}"
                )
            w, n = self.width, self.blocks // 3
            self.stage_widths, self.cells_per_stage, self.stem_width = [w, 2 * w, 4 * w], [n, n, n], 16
        if self.expansion <= 0:
            raise ValueError(f"expansion must be > 0; got {self.expansion}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.activation is not None and self.activation not in ("relu", "relu6"):
            raise ValueError(f"activation {self.activation!r} is not one of ['relu', 'relu6']")
        if (self.depth is None) != (self.widen_factor is None):
            raise ValueError(
                f"depth and widen_factor come together (WRN-d-k); got depth={self.depth}, "
                f"widen_factor={self.widen_factor}"
            )
        if self.kind not in NETWORKS:
            raise ValueError(f"unknown network kind {self.kind!r}; valid choices: {sorted(NETWORKS)}")
        if self.depth is not None:
            self.stage_widths, self.cells_per_stage, self.stem_width = wrn_stages(
                self.depth, self.widen_factor
            )
        elif self.kind == "wide_resnet":
            raise ValueError("kind wide_resnet needs depth and widen_factor (WRN-d-k, e.g. 40 and 2)")
        if self.se_reduction < 0:
            raise ValueError(
                f"se_reduction must be >= 0 (0: no Squeeze-and-Excitation); got {self.se_reduction}"
            )
        if len(self.stage_widths) != len(self.cells_per_stage):
            raise ValueError(
                f"stage_widths {self.stage_widths} and cells_per_stage {self.cells_per_stage} must have the "
                "same length (one entry per resolution stage)"
            )
        if not self.stage_widths or any(w < 1 for w in self.stage_widths):
            raise ValueError(f"stage_widths must be positive integers; got {self.stage_widths}")
        if any(n < 1 for n in self.cells_per_stage):
            raise ValueError(f"cells_per_stage must be positive integers; got {self.cells_per_stage}")
        if self.block_cells is None:
            d = self.exit_depths
            if not d or any(not 0 < x <= 1 for x in d) or any(b <= a for a, b in pairwise(d)) or d[-1] != 1:
                raise ValueError(
                    f"exit_depths must increase strictly within (0, 1] and end at 1.0; got {self.exit_depths}"
                )

    def build_spec(self, shape: DataShape) -> ArchSpec:
        """Expand into a full :class:`ArchSpec` for data of the given shape."""
        mobile = self.kind in MOBILE_KINDS
        stem = self.stem_width or self.stage_widths[0]
        if mobile:
            cells = mobile_cells(
                self.kind, self.stage_widths, self.cells_per_stage, stem, self.expansion, self.se_reduction
            )
        else:
            cells = self._basic_cells(stem)
        n_cells = len(cells)
        if self.block_cells is not None:
            block_cells = list(self.block_cells)
        else:
            ends = [round(x * n_cells) for x in self.exit_depths]
            if any(b <= a for a, b in zip([0, *ends], ends)):
                raise ValueError(
                    f"exit_depths {self.exit_depths} put two exits after the same cell of a {n_cells}-cell "
                    "network; use fewer exits or give block_cells explicitly"
                )
            block_cells = [b - a for a, b in zip([0, *ends], ends)]
        n_blocks = len(block_cells)
        if isinstance(self.exits, bool):
            exits = [True] * n_blocks if self.exits else [False] * (n_blocks - 1) + [True]
        else:
            exits = list(self.exits)
        return ArchSpec(
            kind=self.kind,
            in_channels=shape.in_channels,
            input_size=shape.input_size,
            num_classes=shape.num_classes,
            stem_width=stem,
            cells=cells,
            block_cells=block_cells,
            exits=exits,
            active_blocks=self.active_blocks or n_blocks,
            dense=self.dense,
            exit_pool=self.exit_pool,
            activation=self.activation or ("relu6" if mobile else "relu"),
            dropout=self.dropout,
        )

    def _basic_cells(self, stem: int) -> list[CellSpec]:
        cells: list[CellSpec] = []
        prev = stem
        for stage, (width, n) in enumerate(zip(self.stage_widths, self.cells_per_stage)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                se = max(1, width // self.se_reduction) if self.se_reduction else 0
                cells.append(
                    CellSpec(
                        mid=width, out=width, stride=stride, projection=stride != 1 or prev != width, se=se
                    )
                )
                prev = width
        return cells


def scale_widths(net: Mapping[str, Any], multiplier: float, round_to: int = 1) -> dict[str, Any]:
    """The recipe ``net`` (a ``model.init_args.net`` mapping) with every width scaled by ``multiplier``.

    Every width, the stem's included, is rounded and at least 1; with ``round_to`` > 1 rounded to the
    nearest multiple of it instead (a width under one step stays as it rounds: :mod:`lit_nas.align`), so
    a width baseline sits on the device's channel steps. A WRN-d-k recipe is written out
    (``resnet_sdn`` with the WRN's stages: the same network), since its widths come from ``widen_factor``;
    so is a mobile family's ``blocks``/``width`` layout (the same kind, with its stages). Other keys are kept.

    Raises:
        ValueError: ``multiplier`` is not positive, or ``net`` is not a valid recipe.
    """
    if multiplier <= 0:
        raise ValueError(f"width multipliers must be > 0; got {multiplier}")
    try:
        resolved = NetConfig(**net)  # the layout the recipe means (WRN-d-k and blocks/width expanded)
    except TypeError as err:
        raise ValueError(f"not a network recipe: {err}") from None
    out = dict(net)
    if net.get("depth") is not None:
        out.update(kind="resnet_sdn", depth=None, widen_factor=None, cells_per_stage=resolved.cells_per_stage)
    elif net.get("width") is not None:
        out.update(blocks=None, width=None, cells_per_stage=resolved.cells_per_stage)
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer; got {round_to!r}")

    def width(w: int) -> int:
        scaled = max(1, round(w * multiplier))
        return scaled if scaled < round_to else max(round_to, round(w * multiplier / round_to) * round_to)

    stem = resolved.stem_width or resolved.stage_widths[0]
    out["stage_widths"] = [width(w) for w in resolved.stage_widths]
    out["stem_width"] = width(stem)
    return out
