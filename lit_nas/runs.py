"""Run directories, crash-safe checkpoint files and the failures that stop a run (pure functions).

A run lives in its own directory (``runs/<config name>`` by default): ``checkpoints/last.ckpt``, rewritten
at the end of every epoch, is what ``--ckpt_path last`` resumes. A new run never writes into a directory
that already holds one; a resume continues in the directory it resumes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LAST = "last.ckpt"
CHECKPOINTS = "checkpoints"


class RunFailure(RuntimeError):
    """A run cannot go on; the message says why and what to do. The CLI prints it without a traceback."""


class NonFiniteError(RunFailure):
    """A loss term or a weight became NaN or infinite."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run's checkpoints go."""
    return Path(run_dir) / CHECKPOINTS


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's ``last.ckpt``, if it exists."""
    path = checkpoint_dir(run_dir) / LAST
    return path if path.is_file() else None


def _numbered(root: Path, name: str) -> list[tuple[int, Path]]:
    """``root/name`` (0), ``root/name_1`` (1), ... that exist, in order."""
    pattern = re.compile(rf"^{re.escape(name)}(?:_(\d+))?$")
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = pattern.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1) or 0), p))
    return sorted(found)


def new_run_dir(root: str | Path, name: str) -> Path:
    """A directory for a new run: ``root/name`` unless it holds a run, else the first free ``name_<n>``."""
    root = Path(root)
    taken = {n for n, p in _numbered(root, name) if any(p.iterdir())}
    n = 0
    while n in taken:
        n += 1
    return root / (name if n == 0 else f"{name}_{n}")


def latest_run_dir(root: str | Path, name: str) -> Path | None:
    """The highest-numbered ``root/name[_n]`` holding a ``last.ckpt`` (what ``--ckpt_path last`` resumes)."""
    runs = [p for _, p in _numbered(Path(root), name) if last_checkpoint(p) is not None]
    return runs[-1] if runs else None


def first_non_finite(tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an infinity, with what it holds."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(t.isfinite().all()):
            kind = "NaN" if bool(t.isnan().any()) else "inf"
            return f"{name} ({kind})"
    return None


def replace_atomically(tmp: str | Path, final: str | Path) -> None:
    """Move ``tmp`` over ``final`` in one step: a reader sees the old file or the new one, never half."""
    os.replace(tmp, final)


def copy_atomically(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file beside ``dst``, then rename it into place."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    replace_atomically(tmp, dst)
    return dst


def best_checkpoint(trainer: Any, warn: bool = True) -> str | None:
    """The best checkpoint of the fit, or ``None`` when there is none worth using (use the final weights).

    If every monitored value was NaN (a search never finished; ``ModelCheckpoint`` stores NaN as -inf),
    "best" would be an arbitrary checkpoint, perhaps of the network before the search.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    score = getattr(ckpt, "best_model_score", None)
    if best and ckpt.monitor and (score is None or not bool(torch.isfinite(score))):
        if warn:
            rank_zero_warn(
                f"no checkpoint has a real {ckpt.monitor} (the architecture search did not finish): "
                f"testing the final weights instead of {best}"
            )
        return None
    return best
