"""Where callbacks write their files: the run's own directory, and the architecture found next to checkpoints.

Not an algorithm: the small file-placement helpers the callbacks share.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lit_nas.masks import save_masks
from lit_nas.protocol import NASModule


def artifact_dir(trainer: L.Trainer) -> Path:
    """A directory of this run's own for files (the W&B run's files directory, else the log directory).

    Every rank must call it: ``trainer.log_dir`` is a collective under DDP.
    """
    log_dir = trainer.log_dir
    if trainer.is_global_zero:  # other ranks hold a dummy W&B experiment
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                return Path(logger.experiment.dir)
    return Path(log_dir or trainer.default_root_dir)


def write_found(trainer: L.Trainer, module: NASModule) -> tuple[Path, Path | None] | None:
    """Write ``found_arch.yaml`` (and ``found_masks.pt`` when weights are masked) next to the checkpoints.

    They are what a retraining from scratch reads (``--model.arch_spec``, ``--model.masks``). Every rank
    must call it (the directory may be a collective); rank 0 writes. Returns the paths written on rank 0.
    """
    ckpt = trainer.checkpoint_callback
    dirpath = getattr(ckpt, "dirpath", None) if ckpt is not None else None
    directory = Path(dirpath) if dirpath else artifact_dir(trainer)
    if not trainer.is_global_zero:
        return None
    spec_path = module.arch_spec.save(directory / "found_arch.yaml")
    masks = module.masks()
    masks_path = save_masks(directory / "found_masks.pt", module.arch_spec, masks) if masks else None
    return spec_path, masks_path
