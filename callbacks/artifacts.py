"""Where callbacks write their files: the run's own directory, and the architecture found next to checkpoints.

Not an algorithm: the small file-placement helpers the callbacks share.
"""

from __future__ import annotations

from collections.abc import Callable
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


def log_picture(
    trainer: L.Trainer,
    key: str,
    name: str,
    draw: Callable[[Path], Path],
    always: bool = False,
    path: Path | None = None,
) -> Path | None:
    """Draw a picture and log it to every W&B logger as the image ``key`` at the current step.

    The one directory rule: ``<artifact_dir>/<algorithm>/<name>``, the algorithm being ``key``'s prefix
    (``snip/connectivity`` -> ``snip/``), unless ``path`` says where. Without a W&B logger nothing is drawn
    (nobody would look) unless ``always``. Every rank must call it (the directory may be a collective); rank
    0 draws and logs.

    Args:
        trainer: the trainer.
        key: the W&B key, ``<algorithm>/<what>``.
        name: the file name.
        draw: writes the picture to the path it is given and returns the path.
        always: draw even without a W&B logger (the file is an output of its own).
        path: the file to write instead of the rule's.

    Returns:
        The file written (rank 0), or ``None``.
    """
    wandb = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not wandb and not always:
        return None
    target = path if path is not None else artifact_dir(trainer) / key.split("/")[0] / name
    if not trainer.is_global_zero:
        return None
    png = draw(target)
    for logger in wandb:
        logger.log_image(key, images=[str(png)], step=trainer.global_step)
    return png


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
