"""Callbacks the crash-safety tests inject through the command line (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send this process ``signum`` (9: SIGKILL, 15: SIGTERM) at the start of batch ``batch`` of ``epoch``."""

    def __init__(self, epoch: int, signum: int = 9, batch: int = 0) -> None:
        self.epoch, self.signum, self.batch = epoch, signum, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.Signals(self.signum))


class SignalInTest(Callback):
    """Send this process ``signum`` at the start of test batch ``batch`` (the test after fit)."""

    def __init__(self, signum: int = 9, batch: int = 0) -> None:
        self.signum, self.batch = signum, batch

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.Signals(self.signum))


class RecordBest(Callback):
    """Append ``[epoch, best checkpoint's file name]`` to ``path`` (JSON lines) after every epoch's
    checkpointing: which epochs made a new best."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    # read at the next epoch's start: a plain callback's epoch end runs before the ModelCheckpoint's
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._write(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, trainer.current_epoch - 1)

    def _write(self, trainer, epoch: int) -> None:
        if epoch < 0:
            return
        from lit_nas.runs import monitoring_checkpoint

        best = Path(monitoring_checkpoint(trainer).best_model_path or "").name
        with self.path.open("a") as f:
            f.write(json.dumps([epoch, best]) + "\n")


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


def train_py(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``train.py fit ARGS`` in its own process, in ``cwd`` (so ``runs/`` is the test's own)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, str(root / "train.py"), "fit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
