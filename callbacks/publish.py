"""``PublishBest``: copy the run's best checkpoint to a fixed path, only when it beats the one there.

The teacher configs publish ``runs/teachers/<name>/best.ckpt``, which the distillation configs read. A rerun
that ends worse, or diverges, must never replace a good teacher there. So at fit end the best checkpoint
(with a finite monitored value) is copied to ``path`` through a temporary file and a rename, and only if
its score beats the score recorded beside the published file (``<path>.json``), measured by the same monitor
in the same mode; otherwise the published file is left as it is, and the run says so.

Example (YAML)::

    publish:
      path: runs/teachers/teacher_fast/best.ckpt
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_nas.runs import best_checkpoint, copy_atomically, monitoring_checkpoint, replace_atomically
from lit_nas.validation import check_choice

MODES = ("max", "min")


class PublishBest(Callback):
    """At fit end, publish the best checkpoint to ``path`` if it is better than the one already there.

    Args:
        path: where the checkpoint is published (e.g. ``runs/teachers/teacher_fast/best.ckpt``).
        mode: ``max`` (higher is better, as accuracy) or ``min``; the metric is the run's
            ``ModelCheckpoint`` monitor.
    """

    def __init__(self, path: str, mode: Literal["max", "min"] = "max") -> None:
        super().__init__()
        if not path:
            raise ValueError("PublishBest path must be a file path; got an empty string")
        check_choice("PublishBest", "mode", mode, MODES)
        self.path = Path(path)
        self.mode = mode
        #: what happened at fit end: ``published``, ``kept`` or ``nothing`` (a result, not resume state)
        self.outcome: str | None = None

    @property
    def record(self) -> Path:
        """The score and origin of the published checkpoint."""
        return self.path.with_name(self.path.name + ".json")

    def published_record(self) -> dict | None:
        """The record of the checkpoint published at ``path`` (``None`` when there is none).

        Raises:
            ValueError: the record is not a JSON object with a numeric ``score`` (named with its path).
        """
        if not self.record.is_file():
            return None
        try:
            record = json.loads(self.record.read_text())
            record["score"] = float(record["score"])
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(
                f"PublishBest: {self.record} is not a score record ({type(err).__name__}: {err})"
            ) from err
        return record

    def published_score(self) -> float | None:
        """The score of the checkpoint published at ``path`` (``None`` when there is none)."""
        record = self.published_record()
        return None if record is None else record["score"]

    def better(self, new: float, old: float | None) -> bool:
        """Whether a checkpoint scoring ``new`` replaces one scoring ``old``."""
        if old is None or math.isnan(old):
            return True
        return new > old if self.mode == "max" else new < old

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ckpt = monitoring_checkpoint(trainer)
        if stage == "fit" and (ckpt is None or not ckpt.monitor):
            raise ValueError(
                "PublishBest needs a ModelCheckpoint with a monitor (its best checkpoint is published)"
            )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        ckpt = monitoring_checkpoint(trainer)  # a ModelCheckpoint with a monitor (checked in setup)
        best = best_checkpoint(trainer, warn=False)
        monitor = getattr(ckpt, "monitor", None)
        best_score = getattr(ckpt, "best_model_score", None)
        if best is None or best_score is None:
            self.outcome = "nothing"
            print(f"PublishBest: no checkpoint with a finite {monitor}; {self.path} left unchanged")
            return
        score = float(best_score)
        if self.path.exists() and not self.record.is_file():
            self.outcome = "kept"
            print(f"PublishBest: {self.path} exists without its score record {self.record}; left unchanged")
            return
        try:
            record = self.published_record()
        except ValueError as err:
            self.outcome = "kept"
            print(f"{err}; {self.path} left unchanged")
            return
        # a score of another monitor (val/loss against val/acc) or mode says nothing about which is better
        theirs = None if record is None else (record.get("monitor"), record.get("mode", self.mode))
        if theirs is not None and theirs != (monitor, self.mode):
            self.outcome = "kept"
            print(
                f"PublishBest: {self.path} kept: it was published for {theirs[0]} ({theirs[1]}), this run "
                f"monitors {monitor} ({self.mode}), and the two scores cannot be compared; publish to "
                "another path, or remove the old checkpoint and its record to replace it"
            )
            return
        old = None if record is None else record["score"]
        if not self.better(score, old):
            self.outcome = "kept"
            print(f"PublishBest: {self.path} kept ({monitor} {old:.4f}); this run's best is {score:.4f}")
            return
        copy_atomically(best, self.path)
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps({"monitor": monitor, "mode": self.mode, "score": score, "source": best}))
        replace_atomically(tmp, self.record)
        self.outcome = "published"
        print(f"PublishBest: {best} ({monitor} {score:.4f}) -> {self.path}")
