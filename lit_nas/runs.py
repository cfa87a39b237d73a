"""Run directories, crash-safe checkpoint files and the failures that stop a run (pure functions).

A run lives in its own directory (``runs/<config name>`` by default): ``checkpoints/last.ckpt``, rewritten
at the end of every epoch, is what ``--ckpt_path last`` resumes. A new run never writes into a directory
that already holds one; a resume continues in the directory it resumes. A process claims its directory the
moment it chooses it (:func:`claim_run_dir`: an advisory lock that the kernel releases when the process
ends), so runs started together never share one.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LAST = "last.ckpt"
CHECKPOINTS = "checkpoints"
#: the lock file by which a process holds its run directory
LOCK = ".run.lock"
#: the run directory that the launching process (rank 0) claimed, for the processes it launches
RUN_DIR_ENV = "LIT_NAS_RUN_DIR"
#: the environment variables by which launchers (Lightning's DDP, torchrun, SLURM) give a process its rank
_RANK_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID")
#: lock files this process holds, by directory (open for the life of the process), and whether it made
#: the directory
_held: dict[Path, tuple[int, bool]] = {}


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


def launched_secondary() -> bool:
    """Whether a launcher started this process as a rank other than the first (rank 0 claims directories)."""
    for key in _RANK_ENV:
        value = os.environ.get(key, "0").strip()
        if value.isdigit() and int(value) != 0:
            return True
    return False


def claim_run_dir(path: str | Path) -> str | None:
    """Create ``path`` and hold it for this process until it ends; ``None``, or who holds it already.

    The hold is an exclusive ``flock`` on ``path/.run.lock``, kept open for the life of the process: the
    kernel releases it when the process ends, however it ends (a kill leaves no stale lock). Claiming a
    directory this process holds already succeeds.
    """
    path = Path(path)
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _held:
        return None
    if not _held:
        atexit.register(release_unused_run_dirs)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (path / LOCK).read_text(errors="replace").strip() or "another process"
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} pid {os.getpid()}".encode())
    _held[key] = (fd, made)
    return None


def release_unused_run_dirs() -> None:
    """Give up every directory this process claimed and left empty, removing those it made.

    A run refused before it wrote anything (missing data, a bad setting) leaves no directory behind.
    Runs at exit; a directory holding a run keeps its lock file until the process ends.
    """
    for key, (fd, made) in list(_held.items()):
        if key.is_dir() and not holds_run(key):
            (key / LOCK).unlink(missing_ok=True)
            if made:
                key.rmdir()
            os.close(fd)
            del _held[key]


def holds_run(path: Path) -> bool:
    """Whether directory ``path`` holds anything but its lock file."""
    return any(p.name != LOCK for p in path.iterdir())


def new_run_dir(root: str | Path, name: str, claim: bool = False) -> Path:
    """A directory for a new run: ``root/name`` unless it holds a run, else the first free ``name_<n>``.

    Args:
        root: where runs go.
        name: the config's name.
        claim: claim the directory for this process (:func:`claim_run_dir`); one held by another live
            process, even empty, is taken.
    """
    root = Path(root)
    taken = {n for n, p in _numbered(root, name) if holds_run(p)}
    n = 0
    while True:
        if n not in taken:
            path = root / (name if n == 0 else f"{name}_{n}")
            if not claim or claim_run_dir(path) is None:
                return path
        n += 1


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


def check_checkpoint(path: str | Path, purpose: str = "used") -> dict[str, Any]:
    """Read checkpoint ``path`` (``weights_only``) and refuse one that cannot be what it is used for.

    Args:
        path: the file.
        purpose: what it is for, in the message (``"tested"``, ``"resumed"``, ``"exported"``).

    Raises:
        RunFailure: naming the file: missing, not a checkpoint (truncated, another format), without weights,
            or with non-finite weights (every number measured from it would be meaningless).
    """
    path = Path(path)
    if not path.is_file():
        raise RunFailure(f"checkpoint {path} does not exist (or is not a file), so it cannot be {purpose}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunFailure(
            f"cannot read checkpoint {path}: it is truncated or not a checkpoint ({type(err).__name__}: "
            f"{str(err)[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise RunFailure(f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint")
    bad = first_non_finite(ckpt["state_dict"])
    if bad is not None:
        raise RunFailure(
            f"checkpoint {path} holds non-finite weights ({bad}), so it cannot be {purpose}: the run that "
            "wrote it diverged; use an earlier checkpoint"
        )
    return ckpt


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


def monitoring_checkpoint(trainer: Any) -> Any:
    """The trainer's first ``ModelCheckpoint`` (the one whose best checkpoint a run tests), or ``None``.

    ``trainer.checkpoint_callback`` is the first :class:`~lightning.pytorch.callbacks.Checkpoint`, which may
    be another kind (``LastCheckpoint``) that tracks no best checkpoint.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)


def best_checkpoint(trainer: Any, warn: bool = True) -> str | None:
    """The best checkpoint of the fit, or ``None`` when there is none worth using (use the final weights).

    If every monitored value was NaN (a search never finished; ``ModelCheckpoint`` stores NaN as -inf),
    "best" would be an arbitrary checkpoint, perhaps of the network before the search.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    ckpt = monitoring_checkpoint(trainer)
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
