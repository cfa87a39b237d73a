"""Post-fit device benchmark: export the best checkpoint to TFLite, time it on a device, log per-exit results.

After ``fit``, the best checkpoint (or the final weights when no checkpoint has a real score, as the CLI
tests) is exported with :func:`device_bench.export.export_tflite` (each exit's prefix and the full model,
float32 and int8) next to the checkpoint, timed with the configured runner (``local`` or ``ssh``; Liège
thesis section 2.3 protocol) and evaluated on the host: per exit, latency and test accuracy for each
precision, and the expected latency under early exit for each confidence threshold. The results go to
``device_bench.json`` next to the checkpoint, to the loggers (``device_bench/...``, a table and a latency vs
accuracy picture) and to the console.

A failing device (or export) never fails the run: the checkpoint and whatever was exported stay, the error
is recorded in the JSON and logged, and fit ends normally.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from callbacks.artifacts import artifact_dir, log_picture
from device_bench.export import PRECISIONS, export_tflite
from device_bench.pipeline import format_report, measure, plot_latency_accuracy
from device_bench.runners import BenchSettings, DeviceError, make_runner
from lit_nas.protocol import require_nas_module
from lit_nas.runs import best_checkpoint

log = logging.getLogger(__name__)


class DeviceBench(L.Callback):
    """Export, time and evaluate the trained network after fit.

    Args:
        runner: ``local`` (this machine, in its own process) or ``ssh``.
        host: for ``ssh``: a ``Host`` of ``~/.ssh/config`` (or of ``ssh_config``), or ``[user@]host[:port]``.
        ssh_config: ssh_config file to use instead of ``~/.ssh/config``.
        remote_python: the device's Python (with numpy and tflite-runtime).
        precisions: ``fp32`` and/or ``int8`` (full-integer post-training quantization).
        runs: timed single-image inferences per model and pass.
        passes: passes over the models in shuffled orders.
        warmup_s: warm-up per model and pass, in seconds.
        sleep_s: pause between models (default: 10 s over SSH, 0 locally).
        threads: interpreter threads.
        calib_images: training images used to calibrate int8.
        test_images: test images for the accuracies (``None``: the whole test set).
        val_images: validation images for the early-exit fractions (``None``: the whole validation split).
        thresholds: early-exit thresholds (``None``: the model's ``thresholds``).
        export_python: Python with TensorFlow (default ``$LIT_NAS_EXPORT_PYTHON`` or ``.venv-export``).
        timeout_s: limit of the device run.
        check_runner: at fit start, probe the device once (it answers, with numpy and the interpreter), so
            an unreachable Pi fails the run before training rather than after it.
    """

    def __init__(
        self,
        runner: Literal["local", "ssh"] = "local",
        host: str | None = None,
        ssh_config: str | None = None,
        remote_python: str = "python3",
        precisions: list[Literal["fp32", "int8"]] | None = None,
        runs: int = 50,
        passes: int = 3,
        warmup_s: float = 1.0,
        sleep_s: float | None = None,
        threads: int = 1,
        calib_images: int = 200,
        test_images: int | None = None,
        val_images: int | None = None,
        thresholds: list[float] | None = None,
        export_python: str | None = None,
        timeout_s: float = 3600.0,
        check_runner: bool = True,
    ) -> None:
        kwargs: dict[str, Any] = {"timeout_s": timeout_s}
        self.check_runner = check_runner
        self.device_machine: str | None = None  # what the probe at fit start reported
        if runner == "ssh":
            kwargs["python"] = remote_python
        self.runner = make_runner(runner, host=host, ssh_config=ssh_config, **kwargs)
        self.precisions = tuple(precisions or PRECISIONS)
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precisions {bad}; valid choices: {list(PRECISIONS)}")
        if passes < 1:
            raise ValueError(f"passes must be >= 1; got {passes}")
        self.settings = BenchSettings(
            runs=runs, passes=passes, warmup_s=warmup_s, sleep_s=sleep_s, threads=threads
        )
        for name, value in (
            ("calib_images", calib_images),
            ("test_images", test_images),
            ("val_images", val_images),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null for all); got {value}")
        if thresholds is not None and any(not 0 <= q <= 1 for q in thresholds):
            raise ValueError(f"thresholds must lie in [0, 1]; got {thresholds}")
        self.calib_images = calib_images
        self.test_images = test_images
        self.val_images = val_images
        self.thresholds = thresholds
        self.export_python = export_python
        self.report: dict[str, Any] | None = None
        self.report_path: Path | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the model and the datamodule offer what the benchmark needs."""
        require_nas_module(pl_module, "DeviceBench")
        dm = trainer.datamodule
        needed = ("criterion_batches", "prepare_batch", "test_dataloader", "val_dataloader")
        if dm is None or any(not hasattr(dm, n) for n in needed):
            raise TypeError(
                "DeviceBench needs a lit_nas ImageDataModule (calibration, validation and test images); got "
                f"{type(dm).__name__}"
            )
        if stage == "fit" and self.check_runner and trainer.is_global_zero and not trainer.fast_dev_run:
            # one short probe now rather than a failure after hours of training and the export
            try:
                self.device_machine = self.runner.probe(self.settings.interpreter)
            except DeviceError as err:
                raise DeviceError(
                    f"DeviceBench: the device is not usable, checked before training: {err}. Fix the runner "
                    "settings, or switch the benchmark off for this run with --device_bench null"
                ) from err

    # ----------------------------------------------------------------------------------------------------
    def _best_net(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Any, str | None]:
        best = best_checkpoint(trainer, warn=False)  # the post-fit test warns about a missing best
        if best is None or not hasattr(pl_module, "load_from_checkpoint"):
            return pl_module.net, None
        loaded = type(pl_module).load_from_checkpoint(best, map_location="cpu", weights_only=True)
        return loaded.net, best

    def _images(self, dm: Any, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, n = [], [], 0
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        for batch in loader:
            x, y = dm.prepare_batch(batch, train=False)
            xs.append(x.cpu())
            ys.append(y.cpu())
            n += len(y)
            if limit is not None and n >= limit:
                break
        x, y = torch.cat(xs), torch.cat(ys)
        return (x, y) if limit is None else (x[:limit], y[:limit])

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export, time, evaluate, write and log; never raise for a device or export failure."""
        if trainer.fast_dev_run or trainer.interrupted:
            return
        if not trainer.is_global_zero:
            return
        net, best = self._best_net(trainer, pl_module)
        directory = Path(best).parent if best else artifact_dir(trainer)
        out_dir = directory / "device_bench"
        report: dict[str, Any] = {"checkpoint": best, "runner": self.runner.describe(), "error": None}
        dm = trainer.datamodule
        try:
            dm.setup("test")
            calib = torch.cat([x for x, _ in dm.criterion_batches(1, self.calib_images, seed=7)])
            exported = export_tflite(net, out_dir, calib, self.precisions, python=self.export_python)
            report["files"] = {m.name: str(m.path) for m in exported.models}
            thresholds = (
                self.thresholds if self.thresholds is not None else getattr(pl_module, "thresholds", [])
            )
            report.update(
                measure(
                    exported,
                    self.runner,
                    self.settings,
                    self._images(dm, "test", self.test_images),
                    self._images(dm, "val", self.val_images),
                    thresholds,
                )
            )
        except Exception as err:  # a post-fit measurement must never fail the run or lose its files
            report["error"] = f"{type(err).__name__}: {err}"
            log.warning(
                "DeviceBench failed; the checkpoint is kept and the run ends normally:\n%s",
                traceback.format_exc(),
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        self.report_path = out_dir / "device_bench.json"
        self.report_path.write_text(json.dumps(report, indent=1, default=str))
        self.report = report
        self._log(trainer, report)
        print("\n" + self.summary())

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Repeat the table after the post-fit test, so a run's output ends with it.

        Lightning prints its test results after ``on_test_end``; ``teardown`` comes later.
        """
        if stage == "test" and self.report is not None and trainer.is_global_zero:
            print("\n" + self.summary())

    def summary(self) -> str:
        """The results table (or the error) of the last benchmark."""
        if self.report is None:
            return "DeviceBench has not run"
        if "exits" not in self.report:
            return f"DeviceBench failed ({self.report['error']}); details in {self.report_path}"
        return format_report(self.report) + f"\n(written to {self.report_path})"

    # ----------------------------------------------------------------------------------------------------
    def _log(self, trainer: L.Trainer, report: dict[str, Any]) -> None:
        metrics: dict[str, float] = {"device_bench/failed": float(report["error"] is not None)}
        for r in report.get("exits", []):
            key = f"device_bench/exit{r['exit']}_{r['precision']}"
            metrics[f"{key}/latency_ms"] = r["latency_ms"]
            metrics[f"{key}/accuracy"] = r["accuracy"]
        for p, rows in report.get("early_exit", {}).items():
            for r in rows:
                metrics[f"device_bench/early_exit_{p}/latency_ms_q{r['q']:g}"] = r["expected_latency_ms"]
                metrics[f"device_bench/early_exit_{p}/acc_q{r['q']:g}"] = r["accuracy"]
        metrics = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger) and "exits" in report:
                columns = ["exit", "precision", "latency_ms", "std_ms", "accuracy", "bytes"]
                logger.log_table(
                    "device_bench/exits",
                    columns=columns,
                    data=[[r[c] for c in columns] for r in report["exits"]],
                )
        if "exits" in report and self.report_path is not None:
            log_picture(
                trainer,
                "device_bench/latency_accuracy",
                self.report_path.with_suffix(".png").name,
                lambda path: plot_latency_accuracy(report, path),
                path=self.report_path.with_suffix(".png"),
            )
