"""LightningCLI for lit_nas: ``python train.py fit --config quickstart.yaml``.

- Bare config names resolve under ``configs/`` (``--config dense_iterative.yaml``).
- Every lit_nas callback has a key of its own (``callbacks.NAMED_CALLBACKS``): ``--snip.keep_ratio 0.5``
  tunes one, ``--device_bench null`` switches it off, ``--snip '{keep_ratio: 0.5}'`` switches it on.
- The datamodule's data shape is linked into the model, so YAML never repeats it.
- Each fit has its own run directory (``--run_dir``, default ``runs/<config name>``, numbered when taken)
  whose ``checkpoints/last.ckpt`` is rewritten every epoch; ``--ckpt_path last`` resumes the latest.
- The resolved config is saved with each run without ever overwriting another run's.
- W&B runs offline unless the user is logged in or sets ``WANDB_MODE``.
- After ``fit``, the best checkpoint is tested (per-exit accuracies and the early-exit table).
- A run that cannot go on (non-finite loss, missing or corrupt data) ends with one message and a non-zero
  status; SIGTERM saves a resumable checkpoint and exits 143.

This module composes ``lit_nas`` and ``callbacks``; neither imports it.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from callbacks import NAMED_CALLBACKS, LastCheckpoint, RunSummary
from lit_nas.data import DataError, ImageDataModule
from lit_nas.module import MultiExitModule
from lit_nas.paths import CONFIG_DIR, REPO_ROOT, find_config
from lit_nas.runs import (
    RUN_DIR_ENV,
    RunFailure,
    best_checkpoint,
    check_checkpoint,
    checkpoint_dir,
    claim_run_dir,
    last_checkpoint,
    latest_run_dir,
    launched_secondary,
    new_run_dir,
    release_unused_run_dirs,
)
from lit_nas.yamlfile import YamlFileError, load_yaml

RUNS_ROOT = Path("runs")
#: exit status of a run stopped by SIGTERM (128 + 15, as a shell reports it)
EXIT_SIGTERM = 143


def resolve_config_args(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Turn ``--config NAME`` into ``--config configs/NAME`` when NAME is not a path that exists."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1], config_dir)
        elif arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg.split("=", 1)[1], config_dir)
    return out


def check_config_files(argv: Sequence[str]) -> None:
    """Read every ``--config`` file once, bounded (:func:`lit_nas.yamlfile.load_yaml`), before the parser.

    Raises:
        RunFailure: a config is not UTF-8 YAML, expands past the bound (an alias bomb), or is not a
            mapping; the message names the file and never echoes its contents.
    """
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not Path(path).is_file():
            continue  # the parser names a missing config
        try:
            data = load_yaml(path, "config")
        except YamlFileError as err:
            raise RunFailure(str(err)) from None
        if data is not None and not isinstance(data, dict):
            raise RunFailure(
                f"config {path} must be a mapping of keys (trainer:, model:, data:, ...); it holds a "
                f"{type(data).__name__}"
            )


def _resolve(name: str, config_dir: Path) -> str:
    found = find_config(name, config_dir)
    return name if found is None else str(found)  # none: let the parser report it


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
    # W&B records the code's git state, looking for the repository under its save_dir (runs/), where there is
    # none ("git root runs does not exist" on every run): point it at this checkout
    if (REPO_ROOT / ".git").exists():
        os.environ.setdefault("WANDB_GIT_ROOT", str(REPO_ROOT))


def _quiet_known_warnings() -> None:
    """Silence per-run warnings that say nothing actionable here (each with the reason)."""
    # Batches are single indexing operations of in-memory tensors: workers would only add IPC.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # A resume continues in its own checkpoint directory, which is not empty by design.
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    # Resumes through LastCheckpoint restore epoch-boundary loops; mid-epoch (SIGTERM) ones are approximate
    # and the README says so.
    warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecated; nothing for a user to change.
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # An advertisement for a hosted logger, printed on every run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run's own directory; never overwrite another run's file.

    Lightning's default writes ``config.yaml`` into ``trainer.log_dir``, which for W&B is the shared save
    directory (so a second run fails or clobbers the first). Here the config goes into the run directory
    (``--run_dir``) and, for W&B, also into the W&B run's files (and is sent as its hyper-parameters);
    an existing file gets a numbered sibling.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        # trainer.log_dir is a collective under DDP: every rank reads it, or rank 0 waits forever
        log_dir = trainer.log_dir
        if trainer.is_global_zero:
            directories = []
            run_dir = self.config.get("run_dir")
            if run_dir:
                directories.append(Path(run_dir))
            logger = trainer.logger
            if isinstance(logger, WandbLogger):
                directories.append(Path(logger.experiment.dir))
                logger.log_hyperparams(
                    json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                )
            elif not directories and trainer.logger is not None:
                # a logger's own directory; without a run directory or a logger (test, validate with
                # logger: false) there is nowhere of the run's own, and the working directory is not one
                directories.append(Path(log_dir or trainer.default_root_dir))
            for directory in directories:
                self._save(directory)
        self.already_saved = True
        trainer.strategy.barrier()

    def _save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.config_filename
        n = 1
        while path.exists():
            path = directory / f"{Path(self.config_filename).stem}-{n}.yaml"
            n += 1
        self.parser.save(self.config, path, skip_none=False, overwrite=False, multifile=self.multifile)
        self.saved_path = path


class LitNASCLI(LightningCLI):
    """LightningCLI in subclass mode for both model and data, with lit_nas defaults and callback keys."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", MultiExitModule)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        # not "config.yaml": W&B writes its own file of that name into the run directory
        kwargs.setdefault("save_config_kwargs", {"config_filename": "lit_nas_config.yaml"})
        kwargs.setdefault("seed_everything_default", 0)
        argv = kwargs.get("args")
        self.argv = [str(a) for a in argv] if isinstance(argv, Sequence) and not isinstance(argv, str) else []
        _quiet_known_warnings()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint (per-exit accuracy and the early-exit table).",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory of this run (checkpoints/last.ckpt, best checkpoints, the saved config). "
            "Default: runs/<config name>, or runs/<config name>_<n> when that one holds a run; with "
            "--ckpt_path last, the latest of them.",
        )
        parser.add_argument(
            "--lut",
            type=str | None,
            default=None,
            help="A latency look-up table (device_bench lut JSON): summary.json then gives the predicted "
            "latency of every exit of the network found.",
        )
        for key, cls in NAMED_CALLBACKS.items():
            parser.add_lightning_class_args(cls, key, subclass_mode=True, required=False)

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args`` (``main`` passes the command line with config names resolved, hence no warning)."""
        self.config = parser.parse_object(args) if isinstance(args, Mapping) else parser.parse_args(args)

    # -- run directory and resume ------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand in ("test", "validate", "predict"):
            path = self.config[subcommand].get("ckpt_path")
            if path and path not in ("best", "last", "hpc", "registry"):
                check_checkpoint(path, {"test": "tested", "validate": "validated"}.get(subcommand, "used"))
        if subcommand in ("fit", None):  # None: built with run=False, to fit by hand
            config = self.config[subcommand] if subcommand else self.config
            root = (config.get("trainer") or {}).get("default_root_dir")  # a Lightning user's "runs go here"
            config.run_dir, ckpt_path = resolve_run(
                config.get("run_dir"), config.get("ckpt_path"), _config_name(config), root
            )
            if "ckpt_path" in config:  # absent with run=False
                config.ckpt_path = ckpt_path
            if ckpt_path:
                warn_changed_settings(config, ckpt_path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the switched-on named callbacks and (for fit) the run's checkpoint files."""
        keys = self._parser(self.subcommand).callback_keys
        extra = [cb for cb in (self._get(self.config_init, k) for k in keys) if cb is not None]
        config = self.config.get(str(self.subcommand), self.config)
        run_dir = config.get("run_dir") if self.subcommand in ("fit", None) else None
        if run_dir:
            extra.append(
                RunSummary(
                    run_dir,
                    _config_name(config),
                    overrides=_overrides(self.argv),
                    seed=config.get("seed_everything"),
                    lut=config.get("lut"),
                )
            )
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if run_dir:
            # what Lightning and the callbacks write without a logger (SNIP's connectivity maps, say) goes
            # into the run directory (under a given default_root_dir), where the next run cannot overwrite it
            trainer_config["default_root_dir"] = run_dir
        trainer = self._instantiate_trainer(trainer_config, extra)
        for logger in trainer.loggers:
            init = getattr(logger, "_wandb_init", None)
            if isinstance(logger, WandbLogger) and isinstance(init, dict) and init.get("anonymous") is None:
                # Lightning 2.6 always passes anonymous=None, which wandb 0.31 reports on every run as a
                # deprecated setting: leave it out (not set is what None means)
                init.pop("anonymous", None)
        if run_dir:
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                    cb.dirpath = str(checkpoint_dir(run_dir))
            # after the ModelCheckpoints (see LastCheckpoint): last.ckpt holds this epoch's best tracker
            trainer.callbacks.append(LastCheckpoint(str(checkpoint_dir(run_dir))))
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError) as err:
            # a setting refused at fit start (schedules, devices): a message, not a traceback, unless asked
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.global_step > 0 or os.environ.get("LIT_NAS_TRACEBACK"):
                raise
            raise RunFailure(f"{err} (refused before training; LIT_NAS_TRACEBACK=1 shows where)") from err

    def after_fit(self) -> None:
        """Test the best checkpoint (or the final weights when there is none)."""
        config = self.config.get(self.subcommand, self.config)
        if not config.get("test_after_fit", True) or self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        best = best_checkpoint(self.trainer)
        if best is not None and not Path(best).is_file():
            raise RunFailure(
                f"the best checkpoint of this run, {best}, is gone (its tracker in last.ckpt names it), so "
                "the test after fit cannot run; test another checkpoint with `train.py test --ckpt_path "
                "FILE`, or resume with --test_after_fit false"
            )
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)


def _config_name(config: Any) -> str:
    files = config.get("config") or []
    return Path(str(files[0])).stem if files else "run"


def _overrides(argv: Sequence[str]) -> list[str]:
    """The command line without the subcommand and ``--config`` files: what a run changed from its config."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("--config", "-c"):
            skip = True
        elif not arg.startswith("--config=") and not (i == 0 and arg == "fit"):
            out.append(arg)
    return out


def resolve_run(
    run_dir: str | None, ckpt_path: str | None, name: str, root: str | Path | None = None
) -> tuple[str, str | None]:
    """The run directory of a fit and the checkpoint it resumes (``ckpt_path: last`` made concrete).

    The directory is claimed for this process as it is chosen (:func:`lit_nas.runs.claim_run_dir`), so runs
    started together never share one; the processes a DDP launcher starts take the one their rank 0 chose.

    Args:
        run_dir: ``--run_dir``, or ``None`` for ``<root>/<name>`` (numbered when taken).
        ckpt_path: ``--ckpt_path``: ``None``, ``last`` or a path.
        name: the config's name.
        root: where new run directories go: ``--trainer.default_root_dir`` when given, else ``runs``.

    Raises:
        RunFailure: ``run_dir`` is empty, already holds a run and nothing resumes it, or is in use by
            another live process.
    """
    if run_dir is not None and not str(run_dir).strip():
        raise RunFailure("--run_dir is empty: give a directory, or leave it out for runs/<config name>")
    secondary = launched_secondary()
    if secondary and os.environ.get(RUN_DIR_ENV):  # a DDP rank > 0: rank 0 chose and claimed it
        run_dir = os.environ[RUN_DIR_ENV]
    runs = Path(root) if root else RUNS_ROOT
    if run_dir is None and ckpt_path == "last":
        found = latest_run_dir(runs, name)
        if found is None:
            fresh = new_run_dir(runs, name, claim=not secondary)
            rank_zero_warn(
                f"--ckpt_path last: no {runs}/{name}*/checkpoints/last.ckpt to resume; training starts "
                f"in {fresh}"
            )
            return _chosen(str(fresh), None, secondary)
        run_dir = str(found)
    elif run_dir is None and ckpt_path is not None:
        path = Path(ckpt_path)
        if path.name == "last.ckpt" and path.parent.name == "checkpoints":  # a run's own: continue it
            run_dir = str(path.parent.parent)
    if run_dir is None:
        return _chosen(str(new_run_dir(runs, name, claim=not secondary)), ckpt_path, secondary)
    if not secondary:
        holder = claim_run_dir(run_dir)
        if holder is not None:
            raise RunFailure(
                f"run directory {run_dir} is in use by another running process ({holder}); wait for it to "
                "end, or choose another --run_dir (two runs in one directory would overwrite each other)"
            )
    last = last_checkpoint(run_dir)
    if ckpt_path == "last":
        if last is None:
            rank_zero_warn(f"--ckpt_path last: {run_dir} has no checkpoints/last.ckpt yet; training starts")
        return _chosen(run_dir, None if last is None else str(last), secondary)
    if ckpt_path is None and last is not None:
        raise RunFailure(
            f"--run_dir {run_dir} already holds a run ({last}); resume it with --ckpt_path last, or "
            "choose another --run_dir (a new run never writes over an earlier one)"
        )
    return _chosen(run_dir, ckpt_path, secondary)


def _chosen(run_dir: str, ckpt_path: str | None, secondary: bool) -> tuple[str, str | None]:
    """Hand the chosen directory to the processes this one launches (DDP ranks > 0), then return it."""
    if not secondary:
        os.environ[RUN_DIR_ENV] = run_dir
    return run_dir, ckpt_path


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    elif hasattr(value, "__dataclass_fields__"):
        value = {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def warn_changed_settings(config: Any, ckpt_path: str) -> list[str]:
    """Warn about every model setting that differs between the config and the checkpoint resumed.

    The checkpoint's values are used (Lightning restores them, and its weights, optimizer state and schedule
    belong to them): a resume continues the saved run exactly. Returns the warning's lines.
    """
    saved = check_checkpoint(ckpt_path, "resumed").get("hyper_parameters", {})
    model = config.get("model")
    given = _flat(model.get("init_args", {}) if model is not None else {})
    stored = _flat({k: v for k, v in saved.items() if not k.startswith("_")})
    lines = [
        f"  model.{k}: config/command line {given[k]!r}, checkpoint {stored[k]!r}"
        for k in sorted(set(given) & set(stored))
        # None in the config is "the default", which the module resolved into what it stored
        if k.split(".")[0] != "data_shape" and given[k] is not None and given[k] != stored[k]
    ]
    if lines:
        rank_zero_warn(
            f"resuming {ckpt_path} with settings that differ from the checkpoint's; the checkpoint's values "
            "are used (a resume continues the saved run; to train with new settings, start a new run, e.g. "
            "from its found_arch.yaml):\n" + "\n".join(lines)
        )
    return lines


def main(argv: Sequence[str] | None = None) -> LitNASCLI:
    """Entry point of ``train.py``: a failed run prints one message and exits non-zero."""
    default_wandb_mode()
    args = resolve_config_args(sys.argv[1:] if argv is None else argv)
    try:
        check_config_files(args)
        return LitNASCLI(args=args)
    except SIGTERMException:
        print(
            "\nstopped by SIGTERM: resume with --ckpt_path last (see 'When a run goes wrong')",
            file=sys.stderr,
        )
        sys.exit(EXIT_SIGTERM)
    except (RunFailure, DataError) as err:
        release_unused_run_dirs()
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(1)


def check_arguments(argvs: Sequence[Sequence[str]]) -> list[str | None]:
    """Parse and build (model, data, callbacks, trainer; nothing is trained) each ``fit`` command line.

    What a study runs before its first trial, so a bad key or value fails in seconds, not after hours of the
    trials before it. Returns one error message per command line, ``None`` for those that build.
    """
    import contextlib
    import io
    import tempfile

    errors: list[str | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, argv in enumerate(argvs):
            args = resolve_config_args([a for a in argv if a != "fit"])
            args += ["--run_dir", str(Path(tmp) / str(i)), "--trainer.logger", "false"]
            stderr = io.StringIO()
            try:
                check_config_files(args)
                with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    LitNASCLI(args=args, run=False, parser_kwargs={"exit_on_error": False})
            except SystemExit:
                lines = [ln for ln in stderr.getvalue().splitlines() if ln.strip()]
                errors.append(lines[-1] if lines else "the arguments were refused")
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
            else:
                errors.append(None)
    return errors


def check_main(path: str) -> None:
    """``train.py check FILE``: FILE holds a JSON list of command lines; prints a JSON list of errors."""
    default_wandb_mode()
    print(json.dumps(check_arguments(json.loads(Path(path).read_text()))))
