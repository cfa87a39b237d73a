"""Callbacks the crash-safety tests inject through the command line (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


def _signal_once(signum: int, marker: str | None) -> None:
    """Send this process ``signum``, unless ``marker`` is given and exists (then only the first run dies)."""
    if marker is not None:
        if Path(marker).exists():
            return
        Path(marker).write_text("signalled")
    os.kill(os.getpid(), signal.Signals(signum))


class SignalAt(Callback):
    """Send this process ``signum`` (9: SIGKILL, 15: SIGTERM) at the start of batch ``batch`` of ``epoch``
    (with ``marker``: only the first time)."""

    def __init__(self, epoch: int, signum: int = 9, batch: int = 0, marker: str | None = None) -> None:
        self.epoch, self.signum, self.batch, self.marker = epoch, signum, batch, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            _signal_once(self.signum, self.marker)


class SignalInTest(Callback):
    """Send this process ``signum`` at the start of test batch ``batch`` (the test after fit; with
    ``marker``: only the first time)."""

    def __init__(self, signum: int = 9, batch: int = 0, marker: str | None = None) -> None:
        self.signum, self.batch, self.marker = signum, batch, marker

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            _signal_once(self.signum, self.marker)


def comparable_summary(run: Path) -> dict:
    """``summary.json`` without the clocks and the command line; files by their place in the run directory."""
    s = json.loads((Path(run) / "summary.json").read_text())
    s.pop("wall_s"), s.pop("cpu_s"), s.pop("overrides")
    s["checkpoint"] = "/".join(Path(s["checkpoint"]).parts[-2:]) if s["checkpoint"] else None
    for key in ("found_arch", "found_masks"):
        s[key] = Path(s[key]).name if s[key] else None
    return s


class KillParent(Callback):
    """At train start, SIGKILL this process's parent (a Ray worker running the trial) and exit: a lost node.

    Counts its kills in ``marker`` and stops killing after ``times``.
    """

    def __init__(self, marker: str, times: int = 1) -> None:
        self.marker, self.times = Path(marker), times

    def on_train_start(self, trainer, pl_module) -> None:
        done = int(self.marker.read_text()) if self.marker.exists() else 0
        if done < self.times:
            self.marker.write_text(str(done + 1))
            os.kill(os.getppid(), signal.SIGKILL)
            os._exit(137)


class DumpMasks(Callback):
    """At fit end, save this rank's weight masks and weights to ``directory/rank<r>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "masks": {k: v.cpu() for k, v in pl_module.masks().items()},
            "weights": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            "world_size": trainer.world_size,
        }
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def train_command(*args: str, subcommand: str = "fit", home: Path | None = None) -> tuple[list[str], dict]:
    """The command line and environment of ``train.py SUBCOMMAND ARGS`` (the one way tests start it).

    Args:
        *args: the arguments after the subcommand.
        subcommand: ``fit``, ``test``, ``check``, ...
        home: a fresh user's environment (``PATH`` and this ``HOME`` only: no W&B login, no settings);
            ``None`` keeps this process's environment.
    """
    root = Path(__file__).resolve().parent.parent
    if home is None:
        # not this process's W&B service: one started by an in-process test would write the child's run
        # files relative to its own working directory (the checkout)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    else:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(root))
    return [sys.executable, str(root / "train.py"), subcommand, *args], env


def train_py(
    cwd: Path, *args: str, timeout: float = 300, subcommand: str = "fit", home: Path | None = None
) -> subprocess.CompletedProcess:
    """``train.py SUBCOMMAND ARGS`` in its own process, in ``cwd`` (so ``runs/`` is the test's own)."""
    cmd, env = train_command(*args, subcommand=subcommand, home=home)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_popen(cwd: Path, *args: str, subcommand: str = "fit", **popen: Any) -> subprocess.Popen:
    """``train.py SUBCOMMAND ARGS`` started in the background, in ``cwd`` (``popen``: Popen's options)."""
    cmd, env = train_command(*args, subcommand=subcommand)
    return subprocess.Popen(cmd, cwd=cwd, env=env, **popen)
