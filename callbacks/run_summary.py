"""``RunSummary``: every fit writes ``summary.json`` in its run directory, and the same values to W&B.

The summary is what a study reads back per trial (``python study.py``), and what a person reads to
know what a run found without opening its curves:

- ``config``, ``overrides`` (the command line), ``seed``;
- ``test_acc`` per exit and ``early_exit`` (accuracy and MFLOPs per confidence threshold) of the tested
  checkpoint (``checkpoint``), its ``best_epoch``;
- ``params``, ``nonzero_params`` (with masks), ``mflops`` per exit, ``mflops_full`` of the network as it
  would ship (:func:`lit_nas.summary.network_figures`), ``lut_latency_ms`` per exit with ``--lut``;
- ``device`` latency and accuracy per precision and exit when ``DeviceBench`` ran;
- ``wall_s``: ``fit`` (the training loop), split into ``search`` (until ``RetrainFromScratch`` restarts,
  or the whole loop when a search callback ran without a restart) and ``retrain`` (after the restart), then
  ``after_fit`` (DeviceBench and the reload before testing) and ``test``; ``cpu_s``: the same split of the
  loop in this process's CPU time (all threads), which other processes on the machine barely change;
- ``found_arch`` and ``found_masks`` when a search wrote them.

The CLI adds it to every fit. It is first written at fit end (so a run without a test has one) and again
after the post-fit test. Times survive a resume: the loop time of the epochs before the checkpoint is in this
callback's checkpoint state; time lost between that checkpoint and a crash is not counted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lit_nas.latency import LatencyLUT
from lit_nas.protocol import ArchitectureSearch, nas, require_nas_module
from lit_nas.runs import checkpoint_dir, replace_atomically
from lit_nas.summary import (
    SUMMARY_VERSION,
    Summary,
    device_figures,
    early_exit_figures,
    finite_or_none,
    flat_metrics,
    network_figures,
    test_figures,
)

SUMMARY = "summary.json"


class RunSummary(Callback):
    """Write ``<run_dir>/summary.json`` at fit end and after the post-fit test.

    Args:
        run_dir: the run's directory.
        config: the config's name (``snip_iterative_fast``).
        overrides: the command-line arguments after the config.
        seed: ``seed_everything``.
        lut: a latency look-up table (``device_bench lut``'s JSON) for predicted latencies, or ``None``.
    """

    def __init__(
        self,
        run_dir: str,
        config: str,
        overrides: list[str] | None = None,
        seed: int | None = None,
        lut: str | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(run_dir) / SUMMARY
        self.run_dir = Path(run_dir)
        self.config = config
        self.overrides = list(overrides or [])
        self.seed = seed
        self.lut = LatencyLUT.load(lut) if lut else None
        # per clock (wall, this process's CPU): training-loop seconds before this process (a resume), and
        # until the retraining restarted
        self.elapsed_s = dict.fromkeys(_CLOCKS, 0.0)
        self.search_s: dict[str, float] | None = None
        self._t0: dict[str, float] | None = None
        self._epoch_start_s = dict.fromkeys(_CLOCKS, 0.0)
        self._fit_end: float | None = None
        self._test_start: float | None = None
        self.wall: dict[str, float | None] = {}
        self.cpu: dict[str, float | None] = {}
        self.summary: dict[str, Any] | None = None

    def _loop_s(self) -> dict[str, float]:
        t0 = self._t0
        return {
            k: self.elapsed_s[k] + (clock() - t0[k] if t0 is not None else 0.0)
            for k, clock in _CLOCKS.items()
        }

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_nas_module(pl_module, "RunSummary")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = {k: clock() for k, clock in _CLOCKS.items()}

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start_s = self._loop_s()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        retrain = _callback(trainer, "RetrainFromScratch")
        if retrain is not None and retrain.restarted and self.search_s is None:
            self.search_s = self._epoch_start_s  # the restart is at the start of this epoch

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = self._loop_s()
        self.elapsed_s, self._t0 = loop, None
        searched = any(isinstance(cb, ArchitectureSearch) for cb in trainer.callbacks)
        split = {}
        for k, fit in loop.items():
            search = self.search_s[k] if self.search_s is not None else (fit if searched else 0.0)
            split[k] = {"fit": fit, "search": search, "retrain": fit - search if self.search_s else 0.0}
        self.wall, self.cpu = split["wall"], split["cpu"]
        self._fit_end = time.perf_counter()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        self.write(trainer, pl_module, tested=False)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_start = time.perf_counter()
        if self._fit_end is not None:
            self.wall["after_fit"] = self._test_start - self._fit_end

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._test_start is not None:
            self.wall["test"] = time.perf_counter() - self._test_start
        if not trainer.fast_dev_run:
            self.write(trainer, pl_module, tested=True)

    # ----------------------------------------------------------------------------------------------------
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tested: bool) -> Summary | None:
        """Build the summary of the network in ``pl_module`` and write it (rank 0); the summary."""
        if not trainer.is_global_zero:
            return None
        module = nas(pl_module)
        exits = module.arch_spec.exit_blocks()
        metrics = trainer.callback_metrics if tested else {}
        ckpt = trainer.ckpt_path if tested else None
        device = _callback(trainer, "DeviceBench")
        found = checkpoint_dir(self.run_dir) / "found_arch.yaml"
        masks = found.with_name("found_masks.pt")
        summary = Summary(
            version=SUMMARY_VERSION,
            config=self.config,
            overrides=self.overrides,
            seed=self.seed,
            tested=tested,
            test_acc=test_figures(metrics, exits) if tested else None,
            early_exit=early_exit_figures(getattr(pl_module, "early_exit_results", [])) if tested else None,
            checkpoint=ckpt,
            best_epoch=_epoch_of(ckpt),
            epochs=trainer.current_epoch,
            **network_figures(module.net, self.lut),
            device=device_figures(getattr(device, "report", None)) if device is not None else None,
            wall_s=dict(self.wall),
            cpu_s=dict(self.cpu),
            found_arch=str(found) if found.is_file() else None,
            found_masks=str(masks) if masks.is_file() else None,
        )
        summary = finite_or_none(summary)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{SUMMARY}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=1))
        replace_atomically(tmp, self.path)
        self.summary = summary
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(flat_metrics(summary))
        return summary

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self._loop_s(), "search_s": self.search_s}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        elapsed, search = state_dict["elapsed_s"], state_dict["search_s"]
        self.elapsed_s = {k: float(elapsed[k]) for k in _CLOCKS}
        self.search_s = None if search is None else {k: float(search[k]) for k in _CLOCKS}


#: the clocks of the training loop's time: wall, and this process's CPU time (all its threads)
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _callback(trainer: L.Trainer, name: str) -> Any:
    return next((cb for cb in trainer.callbacks if type(cb).__name__ == name), None)


def _epoch_of(ckpt: str | None) -> int | None:
    if not ckpt or not Path(ckpt).is_file():
        return None
    return int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1))
