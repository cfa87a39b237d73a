"""What many tests build: the tiny network, trainer and data, and the DDP fits' per-rank results.

Plain functions, imported where used (``from tests.helpers import tiny_module``); the fixtures and the
session hooks stay in ``conftest.py``.
"""

from pathlib import Path

import torch

import lit_nas  # noqa: F401  (first: torchvision compat)
from lit_nas import DataShape, NetConfig

#: the tiny 4-block recipe (3x16x16 images): a few milliseconds per step
TINY = dict(stage_widths=[4, 8, 8], cells_per_stage=[1, 1, 2], exit_depths=[0.25, 0.5, 0.75, 1.0])


def tiny_module(seed: int | None = 0, net=None, **kwargs):
    """The tiny 4-block SDN on 3x16x16 images, 10 classes.

    Args:
        seed: seeds torch before building (``None``: the random state as it is).
        net: a NetConfig, or overrides of ``TINY``'s recipe (e.g. ``{"dense": True}``).
        **kwargs: the other ``MultiExitModule`` arguments.
    """
    from lit_nas import MultiExitModule

    if seed is not None:
        torch.manual_seed(seed)
    recipe = net if isinstance(net, NetConfig) else NetConfig(**{**TINY, **(net or {})})
    return MultiExitModule(net=recipe, data_shape=DataShape(3, 16, 10), **kwargs)


def tiny_trainer(tmp_path, **kwargs):
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def tiny_data():
    """Synthetic 3x16x16 images, 10 classes: 144 training images after the validation split, 4 steps of 32."""
    from lit_nas.data import SyntheticDataModule

    return SyntheticDataModule(num_train=160, num_test=64, input_size=16, batch_size=32)


def ranks(out: Path, fit: str) -> list[dict]:
    """What ranks 0 and 1 saved at the end of ``fit`` (``tests/ddp_search.py``)."""
    return [torch.load(out / fit / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
