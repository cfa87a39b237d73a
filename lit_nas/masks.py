"""Unstructured weight masks: where they live, how they stay applied, what they say about the architecture.

A mask is a buffer named ``<param>_mask`` registered beside its weight (``conv1.weight`` ->
``conv1.weight_mask``, the naming of ``torch.nn.utils.prune``), holding 1 (kept) or 0 (pruned) in the
weight's dtype. Being a buffer, it is in every checkpoint, moves with ``.to()`` and is sliced with its
weight by :mod:`lit_nas.surgery`. Masks are *not* applied with forward pre-hooks (which recompute
``weight * mask`` on every forward and keep a second copy of each weight): the weight itself is zeroed once,
its gradient is masked before each optimizer step and the weight is re-masked after it, so a masked
training step costs what a dense one does plus two fused in-place multiplications.

On the dense super-network (Inria thesis, section 5) the masks *are* the architecture found:
:func:`connectivity_map` reads, for each (source feature -> target cell) edge of the dense concatenation,
the fraction of its weights still kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_nas.arch import ArchSpec
from lit_nas.nets.base import MultiExitNet

MASK_SUFFIX = "_mask"
MASKS_FILE_FORMAT = 1


def _owner(root: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = param_name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr


def attach_masks(root: nn.Module, masks: Mapping[str, Tensor]) -> list[tuple[nn.Parameter, Tensor]]:
    """Register (or overwrite) the mask of each named parameter and zero its pruned weights.

    Args:
        root: module the names are relative to.
        masks: ``{parameter name: mask}``, each mask the parameter's shape, nonzero = kept.

    Returns:
        ``(parameter, mask buffer)`` of every mask set.
    """
    pairs = []
    for name, mask in masks.items():
        module, attr = _owner(root, name)
        param = getattr(module, attr, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"cannot mask {name!r}: no parameter of that name")
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}; the parameter is {tuple(param.shape)}"
            )
        buf = (mask != 0).to(device=param.device, dtype=param.dtype)
        module.register_buffer(attr + MASK_SUFFIX, buf)
        with torch.no_grad():
            param.mul_(buf)
        pairs.append((param, buf))
    return pairs


def get_masks(root: nn.Module) -> dict[str, Tensor]:
    """Every mask under ``root``, keyed by the name of the parameter it masks."""
    params = dict(root.named_parameters())
    out = {}
    for name, buf in root.named_buffers():
        if name.endswith(MASK_SUFFIX) and name[: -len(MASK_SUFFIX)] in params:
            out[name[: -len(MASK_SUFFIX)]] = buf
    return out


def masked_pairs(root: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
    """``(parameter, mask)`` for every masked parameter under ``root``."""
    params = dict(root.named_parameters())
    return [(params[name], mask) for name, mask in get_masks(root).items()]


def ensure_mask_buffers(root: nn.Module, state_dict_keys: Iterable[str]) -> None:
    """Create placeholder masks for the mask entries of a state dict, so that loading it fills them.

    Called before a checkpoint's weights are loaded into a freshly built network (which has no masks).
    """
    params, buffers = dict(root.named_parameters()), dict(root.named_buffers())
    for key in state_dict_keys:
        name = key[: -len(MASK_SUFFIX)]
        if key.endswith(MASK_SUFFIX) and name in params and key not in buffers:
            module, attr = _owner(root, name)
            module.register_buffer(attr + MASK_SUFFIX, torch.ones_like(params[name]))


@torch.no_grad()
def apply_masks(pairs: Sequence[tuple[nn.Parameter, Tensor]]) -> None:
    """Zero the pruned weights in place (one fused call for all of them)."""
    if pairs:
        torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])


@torch.no_grad()
def mask_grads(pairs: Sequence[tuple[nn.Parameter, Tensor]]) -> None:
    """Zero the gradients of pruned weights in place, so no optimizer state builds up for them."""
    live = [(p.grad, m) for p, m in pairs if p.grad is not None]
    if live:
        torch._foreach_mul_([g for g, _ in live], [m for _, m in live])


@torch.no_grad()
def mask_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], pairs: Sequence[tuple[nn.Parameter, Tensor]]
) -> None:
    """Zero the per-element optimizer state (SGD momentum, Adam moments) of pruned weights.

    Without it, a momentum buffer built before the prune would keep pushing a pruned weight away from zero
    (re-masking after the step hides that, but the state would no longer describe the weights).
    """
    for opt in optimizers:
        for p, mask in pairs:
            for value in opt.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.mul_(mask.to(value.dtype))


def kept_count(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> int:
    """Weights of ``params`` not pruned (an unmasked parameter counts in full)."""
    return sum(int(masks[n].count_nonzero()) if n in masks else p.numel() for n, p in params.items())


# -- the architecture the masks describe ------------------------------------------------------------------
@dataclass(frozen=True)
class ConnectivityMap:
    """Fraction of weights kept on each edge of the dense concatenation.

    Attributes:
        sources: feature names, ``stem`` then ``cell0``, ``cell1``, ... (all but the last cell's)
        targets: cell names, ``cell0``, ``cell1``, ...
        kept: ``(len(targets), len(sources))``; entry ``[i, j]`` is the fraction of cell ``i``'s first-conv
            weights that read feature ``j`` and are kept; NaN where the cell does not read that feature.
        blocks: block of each target cell (to draw block boundaries).
    """

    sources: list[str]
    targets: list[str]
    kept: Tensor
    blocks: list[int]

    @property
    def dead_edges(self) -> list[tuple[str, str]]:
        """``(source, target)`` edges whose weights are all pruned."""
        idx = (self.kept == 0).nonzero().tolist()
        return [(self.sources[j], self.targets[i]) for i, j in idx]

    @property
    def num_edges(self) -> int:
        """Edges of the network (dead or alive)."""
        return int((~self.kept.isnan()).sum())

    def rows(self) -> list[list[Any]]:
        """One row per target: its name, then the kept fraction per source (``None`` where no edge)."""
        return [
            [t] + [None if math.isnan(v) else round(v, 4) for v in row]
            for t, row in zip(self.targets, self.kept.tolist())
        ]

    def save_png(self, path: str | Path, title: str = "") -> Path:
        """Draw the map as a heatmap (targets down, sources across) and write it as a PNG."""
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt

        kept = self.kept.numpy()
        n_t, n_s = kept.shape
        fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n_s, 1.0 + 0.45 * n_t), dpi=120)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # no edge: blank
        im = ax.imshow(kept, cmap=cmap, vmin=0.0, vmax=1.0)
        for i in range(n_t):
            for j in range(n_s):
                if not math.isnan(kept[i, j]):
                    v = kept[i, j]
                    ax.text(j, i, "x" if v == 0 else f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 else "black")  # fmt: skip
        for i in range(1, n_t):  # block boundaries
            if self.blocks[i] != self.blocks[i - 1]:
                ax.axhline(i - 0.5, color="red", linewidth=0.8)
        ax.set_xticks(range(n_s), self.sources, rotation=90, fontsize=7)
        ax.set_yticks(range(n_t), self.targets, fontsize=7)
        ax.set_xlabel("source feature")
        ax.set_ylabel("target cell (first conv)")
        ax.set_title(title or f"kept fraction per edge ({len(self.dead_edges)} dead)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def connectivity_map(net: MultiExitNet, masks: Mapping[str, Tensor], prefix: str = "") -> ConnectivityMap:
    """Read the (source feature -> target cell) connectivity from the masks of the cells' first convs.

    Shortcuts are not part of the map: an identity shortcut has no weights and a projection is its own 1x1
    layer, so a dead edge means the cell no longer reads that feature through its first convolution (all
    its weights masked, or the edge removed from the ArchSpec). An unmasked first conv counts as fully kept.

    Args:
        net: the network (its ``dense_sources`` say which input slice comes from which feature).
        masks: masks keyed by parameter name.
        prefix: prepended to the network's parameter names to find them in ``masks`` (``"net."`` for the
            names of ``MultiExitModule``).
    """
    spec = net.spec
    # the last cell's output feeds only the final exit, so it is never a source
    sources = ["stem"] + [f"cell{j}" for j in range(spec.num_cells - 1)]
    kept = torch.full((spec.num_cells, len(sources)), float("nan"))
    for i in range(spec.num_cells):
        if spec.dense:  # an edge removed by surgery (lit_nas.surgery.remove_edges) is dead
            kept[i, : i + 1] = 0.0
        mask = masks.get(f"{prefix}{net.cell_input_layer(i)}.weight")
        for src in net.dense_sources(i):
            if mask is None:
                kept[i, src.feature] = 1.0
            else:
                kept[i, src.feature] = float((mask[:, src.start : src.stop] != 0).float().mean())
    blocks = [spec.block_of_cell(i) for i in range(spec.num_cells)]
    targets = [f"cell{i}" for i in range(spec.num_cells)]
    return ConnectivityMap(sources, targets, kept, blocks)


# -- the found architecture on disk -----------------------------------------------------------------------
def save_masks(path: str | Path, spec: ArchSpec, masks: Mapping[str, Tensor]) -> Path:
    """Write an architecture and its masks (bool, on CPU) to one ``torch.save`` file.

    The file loads with ``torch.load(weights_only=True)``; :func:`load_masks` reads it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MASKS_FILE_FORMAT,
        "arch_spec": spec.to_dict(),
        "masks": {n: (m != 0).cpu() for n, m in masks.items()},
    }
    torch.save(payload, path)
    return path


def load_masks(path: str | Path) -> tuple[ArchSpec, dict[str, Tensor]]:
    """Read a file written by :func:`save_masks`: the architecture and its bool masks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks file {str(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != MASKS_FILE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a lit_nas masks file (format {MASKS_FILE_FORMAT})")
    return ArchSpec.from_dict(payload["arch_spec"]), dict(payload["masks"])
