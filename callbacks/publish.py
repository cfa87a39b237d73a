"""``PublishBest``: copy the run's best checkpoint to a fixed path, only when it beats the one there.

The teacher configs publish ``runs/teachers/<name>/best.ckpt``, which the distillation configs read. A rerun
that ends worse, or diverges, must never replace a good teacher there. So at fit end the best checkpoint
(with a finite monitored value) is copied to ``path`` through a temporary file and a rename, and only if
its score beats the score recorded beside the published file (``<path>.json``); otherwise the published
file is left as it is, and the run says so.

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

from lit_nas.runs import best_checkpoint, copy_atomically, replace_atomically
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

    def published_score(self) -> float | None:
        """The score of the checkpoint published at ``path`` (``None`` when there is none)."""
        if not self.record.is_file():
            return None
        return float(json.loads(self.record.read_text())["score"])

    def better(self, new: float, old: float | None) -> bool:
        """Whether a checkpoint scoring ``new`` replaces one scoring ``old``."""
        if old is None or math.isnan(old):
            return True
        return new > old if self.mode == "max" else new < old

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and (
            trainer.checkpoint_callback is None or not trainer.checkpoint_callback.monitor
        ):
            raise ValueError(
                "PublishBest needs a ModelCheckpoint with a monitor (its best checkpoint is published)"
            )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        ckpt = trainer.checkpoint_callback  # a ModelCheckpoint with a monitor (checked in setup)
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
        old = self.published_score()
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
