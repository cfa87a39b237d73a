"""LightningCLI for lit_nas: ``python train.py fit --config quickstart.yaml``.

- Bare config names resolve under ``configs/`` (``--config dense_iterative.yaml``).
- The datamodule's data shape is linked into the model, so YAML never repeats it.
- The resolved config is saved with each run without ever overwriting another run's.
- W&B runs offline unless the user is logged in or sets ``WANDB_MODE``.
- After ``fit``, the best checkpoint is tested (per-exit accuracies and the early-exit table).
"""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lit_nas.data import ImageDataModule
from lit_nas.module import MultiExitModule

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config_args(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Turn ``--config NAME`` into ``--config configs/NAME`` when NAME is not a path that exists."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1], config_dir)
        elif arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg.split("=", 1)[1], config_dir)
    return out


def _resolve(name: str, config_dir: Path) -> str:
    if Path(name).exists():
        return name
    for candidate in (config_dir / name, config_dir / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return name  # let the parser report it


def wandb_logged_in() -> bool:
    """Whether W&B credentials are configured (API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return auth is not None


def default_wandb_mode() -> None:
    """Run W&B offline unless the user logged in or chose a mode."""
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run's own directory; never overwrite another run's file.

    Lightning's default writes ``config.yaml`` into ``trainer.log_dir``, which for W&B is the shared save
    directory (so a second run fails or clobbers the first). Here a W&B run writes into its run directory
    (and the config is also sent as the run's hyper-parameters); other loggers use their versioned
    ``log_dir``; an existing file gets a numbered sibling.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        if self.already_saved:
            return
        directory = None
        if trainer.is_global_zero:
            logger = trainer.logger
            if isinstance(logger, WandbLogger):
                directory = Path(logger.experiment.dir)
                logger.log_hyperparams(
                    json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                )
            else:
                directory = Path(trainer.log_dir or trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / self.config_filename
            n = 1
            while path.exists():
                path = directory / f"{Path(self.config_filename).stem}-{n}.yaml"
                n += 1
            self.parser.save(self.config, path, skip_none=False, overwrite=False, multifile=self.multifile)
            self.saved_path = path
        self.already_saved = True
        trainer.strategy.barrier()


class LitNASCLI(LightningCLI):
    """LightningCLI in subclass mode for both model and data, with lit_nas defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", MultiExitModule)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        # not "config.yaml": W&B writes its own file of that name into the run directory
        kwargs.setdefault("save_config_kwargs", {"config_filename": "lit_nas_config.yaml"})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint (per-exit accuracy and the early-exit table).",
        )

    def after_fit(self) -> None:
        """Test the best checkpoint (or the final weights when there is none)."""
        config = self.config.get(self.subcommand, self.config)
        if not config.get("test_after_fit", True) or self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best_checkpoint(self.trainer))


def best_checkpoint(trainer: Trainer, warn: bool = True) -> str | None:
    """The best checkpoint of the fit, or ``None`` when there is none worth using (use the final weights).

    If every monitored value was NaN (a search never finished; ``ModelCheckpoint`` stores NaN as -inf),
    "best" would be an arbitrary checkpoint, perhaps of the network before the search.
    """
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


def main(argv: Sequence[str] | None = None) -> LitNASCLI:
    """Entry point of ``train.py``."""
    import sys

    default_wandb_mode()
    args = resolve_config_args(sys.argv[1:] if argv is None else argv)
    return LitNASCLI(args=args)
