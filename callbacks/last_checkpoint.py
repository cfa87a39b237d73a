"""``LastCheckpoint``: a resumable ``last.ckpt`` at the end of every epoch, whatever the monitored value does.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only in an epoch where it also
saves a top-k checkpoint, so with a monitor that stays NaN for the whole search (``val/acc_full``) the file
stays at epoch 0. This callback owns ``last.ckpt`` instead: it is written every epoch through a temporary
file and a rename (a crash mid-write leaves the previous one), and also when the run is stopped by
SIGTERM or Ctrl-C during training (never during the test after fit: the module then holds the best
checkpoint's weights, not the last epoch's). A checkpoint with non-finite weights is never written
(``MultiExitModule.on_save_checkpoint`` refuses it), so a diverging run keeps its last good one.

It is a :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs its epoch-end hook after
EarlyStopping and after every ``ModelCheckpoint`` listed before it: ``last.ckpt`` then holds the best-model
tracker of the same epoch (a resume tests the same best checkpoint as a run that was never stopped). Add it
to a trainer after the trainer is built (as the CLI does): given to ``Trainer(callbacks=...)`` it would
stand in for the default ``ModelCheckpoint`` and clash with ``enable_checkpointing=False``.

The CLI adds it to every run (``runs/<name>/checkpoints/last.ckpt``); ``--ckpt_path last`` resumes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lit_nas.runs import LAST, RunFailure, replace_atomically


class LastCheckpoint(Checkpoint):
    """Write ``dirpath/last.ckpt`` at the end of every training epoch and when the run is interrupted.

    Args:
        dirpath: directory of the file (created on first write).
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.path = self.dirpath / LAST

    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint (every rank calls it; rank 0 writes and renames)."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / f".{LAST}.tmp-{os.getpid()}"
        try:
            trainer.save_checkpoint(tmp, weights_only=False)
        except BaseException:
            if trainer.is_global_zero and tmp.exists():
                tmp.unlink()
            raise
        if trainer.is_global_zero:
            replace_atomically(tmp, self.path)
        trainer.strategy.barrier("last_checkpoint")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a kill during a write leaves its temporary file; the run directory is this process's now (the CLI
        # claimed it), so none of them is being written
        if stage == "fit" and trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(f".{LAST}.tmp-*"):
                stale.unlink(missing_ok=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self.save(trainer)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # a scheduler's SIGTERM or Ctrl-C: keep the progress since the last epoch end; any other failure
        # (a NaN, a bug) leaves the last good checkpoint as it is, and so does a stop outside training (the
        # test after fit runs on the best checkpoint's weights, which are not the last epoch's)
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.fast_dev_run:
            return
        if trainer.state.fn != TrainerFn.FITTING or not trainer.training:
            return
        try:
            self.save(trainer)
        except RunFailure:
            pass  # non-finite weights: the previous last.ckpt stays
        else:
            print(f"\nLastCheckpoint: run interrupted; resumable checkpoint written to {self.path}")
