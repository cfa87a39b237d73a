"""Pictures of the architecture as it changes (written as PNG files, logged to W&B by the callbacks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def channel_chart(sizes: Mapping[str, int], path: str | Path, title: str = "") -> Path:
    """Bar chart of the channels of every group, written as a PNG."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(1.0 + 0.35 * len(sizes), 3.0), dpi=120)
    ax.bar(range(len(sizes)), list(sizes.values()))
    ax.set_xticks(range(len(sizes)), list(sizes), rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def live_heatmap(
    history: Sequence[Mapping[str, int]],
    sizes: Mapping[str, int],
    epochs: Sequence[int],
    path: str | Path,
    xlabel: str = "epoch",
) -> Path:
    """Heatmap of the live fraction of every group (rows) at each recorded epoch (columns), as a PNG.

    Args:
        history: live channels per group at each recorded epoch.
        sizes: channels of each group at the start (the 100% of each row).
        epochs: the epoch (or search iteration) of each entry of ``history``.
        path: where to write the PNG.
        xlabel: what the columns are.
    """
    plt = _pyplot()
    path = Path(path)
    groups = list(sizes)
    data = [[h.get(g, 0) / sizes[g] for h in history] for g in groups]
    fig, ax = plt.subplots(figsize=(2.5 + 0.3 * len(history), 1.0 + 0.22 * len(groups)), dpi=120)
    im = ax.imshow(data, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs], fontsize=7)
    ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=ax, label="live fraction")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
