"""The architecture as plain data.

An :class:`ArchSpec` describes every shape in a multi-exit network: the stem, each residual cell's inner and
output widths, how cells are grouped into blocks (each block ends with an exit), which exits exist, whether
the cells are densely connected, and how many blocks are active (growing). Networks are *built* from it,
every grow or surgery step *updates* it, and it is saved in every checkpoint so a network whose shape
changed during training is rebuilt exactly on load.

Users rarely write an ArchSpec by hand: :class:`NetConfig` is the short recipe found in YAML configs and
:func:`NetConfig.build_spec` expands it into the full per-cell spec.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

SPEC_VERSION = 1
#: cell kinds: the basic residual cell (ResNet, WRN), MobileNetV1's depthwise-separable cell and
#: MobileNetV2's inverted residual (also MnasNet's)
CELL_OPS = ("basic", "dwsep", "inverted")
ACTIVATIONS = ("relu", "relu6")


@dataclass(frozen=True)
class DataShape:
    """What the data feeds the network: channels, square input size and number of classes."""

    in_channels: int
    input_size: int
    num_classes: int

    def __post_init__(self) -> None:
        for name in ("in_channels", "input_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DataShape.{name} must be a positive integer; got {value!r}")


@dataclass
class CellSpec:
    """One cell of a network; ``op`` says which.

    - ``basic``: conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, ReLU (ResNet, WRN);
    - ``dwsep``: depthwise kxk(stride) -> BN -> act -> pointwise 1x1 -> BN -> act (MobileNetV1); the depthwise
      conv keeps its input's channels, so the cell has no inner width of its own (``mid`` is 0);
    - ``inverted``: 1x1 expand -> BN -> act -> depthwise kxk(stride) -> BN -> act -> 1x1 project -> BN, plus
      an identity shortcut where ``residual`` (MobileNetV2, MnasNet; no activation after the addition).

    Attributes:
        mid: the cell's inner width, free to prune (nothing outside the cell is tied to it): the first
            conv's outputs (basic), the expansion width (inverted); 0 for ``dwsep``.
        out: output channels of the cell (tied to the residual stream when the shortcut is an identity).
        stride: stride of the first spatial conv and of the shortcut (1 or 2).
        projection: shortcut is a 1x1 conv + BN instead of an identity (``basic`` only). Stored explicitly
            (not derived from the widths) so that a pruned cell whose in/out widths happen to become equal
            keeps its weights.
        se: hidden width of a Squeeze-and-Excitation gate at the end of the cell's branch (0: none). Stored,
            not derived from ``out``, so the SE layers keep their shape when ``out`` is pruned.
        op: the cell kind, one of :data:`CELL_OPS`.
        kernel: side of the depthwise kernel (``dwsep``, ``inverted``: 3 or 5; ``basic``: 3).
        residual: the cell has a shortcut; MobileNetV1's cells and MobileNetV2's strided or widening ones
            have none (``basic`` cells always have one).
        reads: the features the cell's first conv reads in a dense network (0: the stem, ``j``: the output
            of cell ``j - 1``), increasing; ``None`` reads every earlier feature. Edge surgery
            (:func:`lit_nas.surgery.remove_edges`) drops the sources whose edge was pruned. Plain networks
            leave it ``None`` (a cell reads the previous feature).
    """

    mid: int
    out: int
    stride: int = 1
    projection: bool = False
    se: int = 0
    op: str = "basic"
    kernel: int = 3
    residual: bool = True
    reads: list[int] | None = None


@dataclass
class ArchSpec:
    """Full description of a multi-exit network; JSON/YAML-able.

    Attributes:
        kind: network family in the registry (see ``lit_nas.nets.NETWORKS``).
        in_channels: image channels.
        input_size: square image side, in pixels.
        num_classes: classifier outputs of every exit.
        stem_width: output channels of the 3x3 stem conv.
        cells: every residual cell, in order.
        block_cells: number of cells in each block; the stem belongs to block 0; an exit follows each block.
        exits: which blocks have an exit (internal classifier). The last block's exit is the final output
            and must exist; a baseline network has only that one.
        active_blocks: blocks ``0..active_blocks-1`` are computed (growing activates the rest).
        dense: every cell's first conv reads the concatenation of the stem and all earlier cell outputs
            (average-pooled to its input resolution); the shortcut still comes from the previous cell.
        exit_pool: internal classifiers pool feature maps down to about ``exit_pool`` x ``exit_pool`` with a
            learned max/avg mix (SDN); the final exit pools globally.
        activation: ``relu`` or ``relu6`` (the mobile families) after the stem and inside the cells.
        dropout: drop rate before the final classifier (training only; 0: none).
        gated: the channel groups that carry a channel gate (:mod:`lit_nas.gates`) and its kind (``mask``:
            frozen 0/1, Fisher pruning; ``switch``: trained, ShrinkNets), so a checkpoint rebuilds them;
            set when a callback gates groups, cleared when the gates are folded.
        version: format version of this spec.
    """

    kind: str
    in_channels: int
    input_size: int
    num_classes: int
    stem_width: int
    cells: list[CellSpec]
    block_cells: list[int]
    exits: list[bool]
    active_blocks: int
    dense: bool = False
    exit_pool: int = 4
    activation: str = "relu"
    dropout: float = 0.0
    gated: dict[str, str] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.cells, list) or not all(isinstance(c, CellSpec | dict) for c in self.cells):
            raise ValueError(f"ArchSpec cells must be a list of cell mappings; got {self.cells!r:.200}")
        self.cells = [c if isinstance(c, CellSpec) else _cell(i, c) for i, c in enumerate(self.cells)]
        self.block_cells = list(self.block_cells)
        self.exits = list(self.exits)
        self.gated = dict(self.gated)
        self.validate()

    # ----------------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of blocks (and of possible exits)."""
        return len(self.block_cells)

    @property
    def num_cells(self) -> int:
        """Number of residual cells."""
        return len(self.cells)

    def cells_of_block(self, block: int) -> range:
        """Indices of the cells in ``block``."""
        start = sum(self.block_cells[:block])
        return range(start, start + self.block_cells[block])

    def block_of_cell(self, cell: int) -> int:
        """Block that holds ``cell``."""
        for b in range(self.num_blocks):
            if cell in self.cells_of_block(b):
                return b
        raise IndexError(f"cell {cell} out of range 0..{self.num_cells - 1}")

    def feature_widths(self) -> list[int]:
        """Channels of feature ``j``: 0 is the stem, ``j >= 1`` is the output of cell ``j-1``."""
        return [self.stem_width] + [c.out for c in self.cells]

    def feature_sizes(self) -> list[int]:
        """Spatial side of feature ``j`` (same indexing as :meth:`feature_widths`)."""
        sizes = [self.input_size]
        for c in self.cells:
            sizes.append(_strided(sizes[-1], c.stride))
        return sizes

    def cell_reads(self, cell: int) -> list[int]:
        """Features read by ``cell``'s first conv: the previous one (plain), its live sources (dense)."""
        if not self.dense:
            return [cell]
        reads = self.cells[cell].reads
        return list(range(cell + 1)) if reads is None else list(reads)

    def cell_input_widths(self) -> list[int]:
        """Input channels of each cell's first conv (the dense variant reads its live earlier features)."""
        widths = self.feature_widths()
        return [sum(widths[j] for j in self.cell_reads(i)) for i in range(self.num_cells)]

    def removed_edges(self) -> list[tuple[int, int]]:
        """``(source feature, target cell)`` edges of the dense concatenation removed by edge surgery."""
        if not self.dense:
            return []
        return [(j, i) for i in range(self.num_cells) for j in range(i + 1) if j not in self.cell_reads(i)]

    def exit_blocks(self, active_only: bool = True) -> list[int]:
        """Blocks whose exit produces logits; with ``active_only`` only those currently computed."""
        last = self.active_blocks if active_only else self.num_blocks
        return [b for b in range(last) if self.exits[b]]

    # ----------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency."""
        # the kind is checked by lit_nas.nets.build_net, which owns the registry: this module imports no net
        _check_types("ArchSpec", self, _SPEC_TYPES)
        for i, c in enumerate(self.cells):
            _check_types(f"cell {i}:", c, _CELL_TYPES)
        if self.version != SPEC_VERSION:
            raise ValueError(f"ArchSpec version {self.version} is not supported (expected {SPEC_VERSION})")
        for name in ("in_channels", "input_size", "num_classes", "stem_width", "exit_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"ArchSpec.{name} must be >= 1; got {getattr(self, name)}")
        if not self.cells:
            raise ValueError("ArchSpec.cells is empty: a network needs at least one cell")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ArchSpec.activation {self.activation!r} is not one of {list(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ArchSpec.dropout must be in [0, 1); got {self.dropout}")
        bad = {g: k for g, k in self.gated.items() if k not in ("mask", "switch")}
        if bad:
            raise ValueError(f"ArchSpec.gated kinds must be 'mask' or 'switch'; got {bad}")
        prev = self.stem_width
        size = self.input_size
        for i, c in enumerate(self.cells):
            _check_cell(i, c, prev)
            _check_reads(i, c, self.dense)
            size = _strided(size, c.stride)
            prev = c.out
        if size < 1:
            raise ValueError(f"input_size {self.input_size} is too small for the strides of the cells")
        if self.dense:
            mobile = sorted({c.op for c in self.cells} - {"basic"})
            if mobile:
                raise ValueError(f"dense connections need basic cells; this network has {mobile} cells")
            self._check_dense_pooling()
        if any(n < 1 for n in self.block_cells):
            raise ValueError(f"every block needs at least one cell; got block_cells={self.block_cells}")
        if sum(self.block_cells) != self.num_cells:
            raise ValueError(
                f"block_cells {self.block_cells} sum to {sum(self.block_cells)} but there are "
                f"{self.num_cells} cells"
            )
        if len(self.exits) != self.num_blocks:
            raise ValueError(
                f"exits has {len(self.exits)} entries; expected one per block ({self.num_blocks})"
            )
        if not self.exits[-1]:
            raise ValueError("the last block's exit is the network output and must be enabled (exits[-1])")
        if not 1 <= self.active_blocks <= self.num_blocks:
            raise ValueError(f"active_blocks must be in 1..{self.num_blocks}; got {self.active_blocks}")
        if not self.exits[self.active_blocks - 1]:
            raise ValueError(
                f"block {self.active_blocks - 1} is the last active block but has no exit: "
                "a partially active network needs an exit after its last active block"
            )

    def _check_dense_pooling(self) -> None:
        """Every earlier feature map must average-pool (kernel ``side // target``) to each cell's input."""
        sizes = self.feature_sizes()
        for i in range(self.num_cells):
            target = sizes[i]
            for j in range(i):
                if sizes[j] // (sizes[j] // target) != target:
                    raise ValueError(
                        f"dense connections cannot run on {self.input_size}x{self.input_size} inputs: "
                        f"feature {j} ({sizes[j]}x{sizes[j]}) does not average-pool to cell {i}'s input "
                        f"side {target} "
                        f"(feature sides {sizes}); use an input size that halves evenly at every stride-2 "
                        "cell (e.g. 16, 28 or 32 for two), or dense: false"
                    )

    def with_active_blocks(self, n: int) -> ArchSpec:
        """A copy of this spec with ``n`` active blocks (validated)."""
        return ArchSpec.from_dict({**self.to_dict(), "active_blocks": n})

    # ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (safe for ``torch.load(weights_only=True)`` and YAML/JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        """Inverse of :meth:`to_dict`; rejects unknown and missing keys by name."""
        if not isinstance(data, dict):
            raise ValueError(f"an ArchSpec must be a mapping; got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ArchSpec keys {unknown}; valid keys: {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"ArchSpec is missing keys {missing}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write as YAML (``.yaml``/``.yml``) or JSON (any other suffix)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            yaml.safe_dump(self.to_dict(), sort_keys=False)
            if path.suffix in (".yaml", ".yml")
            else json.dumps(self.to_dict(), indent=2)
        )
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        """Read a spec written by :meth:`save`."""
        from lit_nas.yamlfile import load_yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ArchSpec file {str(path)!r} does not exist")
        # YAML is a superset of JSON; an architecture never needs aliases (a file with them is refused)
        data = load_yaml(path, "architecture file", aliases=False)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"architecture file {path}: {err}") from err


#: the type of every field read from a file: YAML gives a string for ``"16"`` and a float for ``16.5``,
#: which would otherwise fail later, deep in a layer's constructor (``int`` means a whole number, not a bool)
_SPEC_TYPES = {
    "kind": str,
    "in_channels": int,
    "input_size": int,
    "num_classes": int,
    "stem_width": int,
    "active_blocks": int,
    "exit_pool": int,
    "version": int,
    "dense": bool,
    "activation": str,
    "dropout": float,
    "block_cells": list[int],
    "exits": list[bool],
}
_CELL_TYPES = {
    "mid": int,
    "out": int,
    "stride": int,
    "se": int,
    "kernel": int,
    "projection": bool,
    "residual": bool,
    "op": str,
}


_TYPE_NAMES = {int: "whole number", float: "finite number", bool: "boolean", str: "string"}


def _is(value: Any, kind: Any) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is bool or kind is str:
        return isinstance(value, kind)
    (item,) = kind.__args__  # list[...]
    return isinstance(value, list) and all(_is(v, item) for v in value)


def _check_types(where: str, obj: Any, types: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of ``obj`` whose value is not of its type."""
    for name, kind in types.items():
        value = getattr(obj, name)
        if not _is(value, kind):
            what = _TYPE_NAMES.get(kind, str(kind))
            raise ValueError(f"{where} {name} must be a {what}; got {value!r} ({type(value).__name__})")


def _cell(i: int, data: dict[str, Any]) -> CellSpec:
    known = {f.name for f in fields(CellSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"cell {i}: unknown keys {unknown}; valid keys: {sorted(known)}")
    try:
        return CellSpec(**data)
    except TypeError as err:  # a missing mid or out
        raise ValueError(f"cell {i}: {err}") from None


def _check_cell(i: int, c: CellSpec, prev: int) -> None:
    """Raise ``ValueError`` naming what is wrong with cell ``i`` (``prev``: its input width)."""
    if c.op not in CELL_OPS:
        raise ValueError(f"cell {i}: op {c.op!r} is not one of {list(CELL_OPS)}")
    if c.out < 1 or (c.mid < 1 and c.op != "dwsep"):
        raise ValueError(f"cell {i}: widths must be >= 1; got mid={c.mid}, out={c.out}")
    if c.op == "dwsep" and c.mid != 0:
        raise ValueError(
            f"cell {i}: a dwsep cell has no inner width (its depthwise conv keeps the input's {prev} "
            f"channels): mid must be 0; got {c.mid}"
        )
    if c.se < 0:
        raise ValueError(f"cell {i}: se (SE hidden width) must be >= 0 (0: no SE); got {c.se}")
    if c.stride not in (1, 2):
        raise ValueError(f"cell {i}: stride must be 1 or 2; got {c.stride}")
    if c.kernel not in (3, 5) or (c.op == "basic" and c.kernel != 3):
        raise ValueError(f"cell {i}: kernel must be 3 or 5 (a basic cell's is 3); got {c.kernel} ({c.op})")
    if c.op == "basic" and not c.residual:
        raise ValueError(f"cell {i}: a basic cell always has a shortcut (residual: true)")
    if c.op != "basic" and c.projection:
        raise ValueError(f"cell {i}: only basic cells have projection shortcuts; got a {c.op} cell")
    if c.residual and not c.projection and (c.stride != 1 or c.out != prev):
        raise ValueError(
            f"cell {i}: an identity shortcut needs stride 1 and out == input width ({prev}); got "
            f"stride={c.stride}, out={c.out}; set projection: true (basic) or residual: false"
        )


def _check_reads(i: int, c: CellSpec, dense: bool) -> None:
    """Raise ``ValueError`` unless cell ``i``'s ``reads`` is ``None`` or live sources of a dense cell."""
    if c.reads is None:
        return
    if not dense:
        raise ValueError(
            f"cell {i}: reads {c.reads} needs dense: true (a plain cell reads the previous feature)"
        )
    reads = list(c.reads)
    if (
        not reads
        or any(isinstance(j, bool) or not isinstance(j, int) for j in reads)
        or reads != sorted(set(reads))
        or reads[0] < 0
        or reads[-1] > i
    ):
        raise ValueError(
            f"cell {i}: reads must be increasing features in 0..{i} (0: the stem, j: cell j-1's output), "
            f"at least one; got {c.reads}"
        )


def _strided(size: int, stride: int) -> int:
    # 3x3 conv, padding 1: out = floor((size - 1) / stride) + 1
    return (size - 1) // stride + 1
