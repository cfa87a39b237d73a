"""``Distillation``: a frozen teacher (or the network's own final exit) teaches every student exit.

Example (YAML)::

    distillation:
      teacher: runs/teacher/checkpoints/last.ckpt
      lam: 0.2
      temperature: 2.0
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lit_nas.distill import kd_loss, load_teacher, soft_kl
from lit_nas.nets.base import ExitLogits
from lit_nas.protocol import NASModule, nas, require_nas_module

_WHO = "Distillation"
_TERM = "distill/loss_delta"


class Distillation(Callback):
    """Knowledge distillation (Liège thesis section 5.2, eq. 5.5) on every exit of the student.

    Each distilled exit's loss becomes ``λ CE(student, labels) + (1 - λ) T² KL(teacher_T || student_T)``
    (:func:`lit_nas.distill.kd_loss`), weighted by the module's exit weights; the callback adds the
    difference from the plain cross-entropy as a loss term (``distill/loss_delta``) and logs the weighted
    soft term ``distill/kl``.

    * ``teacher``: any lit_nas checkpoint (loaded with ``weights_only=True``, frozen, in eval mode, on the
      student's device, never in the optimizer or the student's checkpoint); ``teacher_exit`` picks the
      exit that teaches (default: its final one). It sees the same (augmented) images as the student.
    * ``self_distill: true``: the network's own final exit, detached, teaches its earlier exits (no
      checkpoint needed); the final exit keeps the plain cross-entropy.

    Teaching-assistant chains (teacher -> TA -> student) are successive runs: train the TA with the teacher,
    then the student with the TA's checkpoint (README).

    Args:
        teacher: path of the teacher checkpoint.
        lam: ``λ``, the weight of the label cross-entropy, in [0, 1].
        temperature: ``T > 0``.
        teacher_exit: the teacher's exit (block index) whose logits teach; ``None`` for its final exit.
        self_distill: the network's final exit teaches its earlier exits (instead of ``teacher``).
    """

    def __init__(
        self,
        teacher: str | None = None,
        lam: float = 0.2,
        temperature: float = 2.0,
        teacher_exit: int | None = None,
        self_distill: bool = False,
    ) -> None:
        super().__init__()
        if (teacher is None) != self_distill:
            raise ValueError(
                "Distillation needs a teacher checkpoint or self_distill: true (exactly one); got "
                f"teacher={teacher!r}, self_distill={self_distill}"
            )
        if not 0 <= lam <= 1:
            raise ValueError(f"Distillation lam (weight of the label loss) must lie in [0, 1]; got {lam}")
        if not temperature > 0:
            raise ValueError(f"Distillation temperature must be > 0; got {temperature}")
        if teacher_exit is not None and (self_distill or teacher_exit < 0):
            raise ValueError(
                f"Distillation teacher_exit must be a block index >= 0 of a teacher checkpoint; got "
                f"teacher_exit={teacher_exit} with self_distill={self_distill}"
            )
        self.teacher_path = teacher
        self.lam = lam
        self.temperature = temperature
        self.teacher_exit = teacher_exit
        self.self_distill = self_distill
        self.teacher: L.LightningModule | None = None
        self._module: NASModule | None = None
        self._last_kl: Tensor | None = None  # the step's weighted soft term, logged after the step

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        module = require_nas_module(pl_module, _WHO)
        if stage != "fit":
            return
        self._module = module
        if self.teacher_path is not None:
            self.teacher = load_teacher(self.teacher_path)
            t, s = self.teacher.arch_spec, module.arch_spec
            if (t.in_channels, t.input_size, t.num_classes) != (s.in_channels, s.input_size, s.num_classes):
                raise ValueError(
                    f"{_WHO}: the teacher {self.teacher_path!r} takes {t.in_channels}x{t.input_size}x"
                    f"{t.input_size} images into {t.num_classes} classes, the student {s.in_channels}x"
                    f"{s.input_size}x{s.input_size} into {s.num_classes}"
                )
            exits = t.exit_blocks()
            if self.teacher_exit is not None and self.teacher_exit not in exits:
                raise ValueError(
                    f"{_WHO}: teacher_exit {self.teacher_exit} is not one of the teacher's exits {exits}"
                )
        module.add_loss_term(_TERM, self._term)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)  # the student is on its device only now

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            nas(pl_module).remove_loss_term(_TERM)

    def _teacher_logits(self, images: Tensor, outputs: ExitLogits) -> Tensor:
        if self.self_distill:
            return outputs.final.detach()
        if self.teacher is None:
            raise RuntimeError(f"{_WHO}: no teacher loaded; setup() did not run for fit")
        with torch.no_grad():
            out = self.teacher(images)
        return out.final if self.teacher_exit is None else out[self.teacher_exit]

    def _term(self, images: Tensor, targets: Tensor, outputs: ExitLogits) -> Tensor:
        """``sum_e w_e (KD_e - CE_e)`` over the distilled exits: added to the module's ``sum_e w_e CE_e``."""
        teacher = self._teacher_logits(images, outputs)
        if self._module is None:
            raise RuntimeError(f"{_WHO}: the loss term runs before setup()")
        weights = self._module.exit_weights()
        exits = outputs.exits[:-1] if self.self_distill else outputs.exits
        delta = outputs.final.new_zeros(())
        soft = outputs.final.new_zeros(())
        for e in exits:
            logits = outputs[e]
            kd = kd_loss(logits, teacher, targets, self.lam, self.temperature)
            delta = delta + weights[e] * (kd - F.cross_entropy(logits, targets))
            with torch.no_grad():
                soft = soft + weights[e] * soft_kl(logits, teacher, self.temperature)
        self._last_kl = soft if exits else None
        return delta

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_kl is not None:
            pl_module.log("distill/kl", self._last_kl, on_step=False, on_epoch=True)
