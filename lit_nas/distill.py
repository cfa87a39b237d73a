"""Knowledge distillation (pure functions): the loss of the Liège thesis, eq. 5.5, and the teacher.

``KD = λ CE(student, labels) + (1 - λ) T² KL(softmax(teacher / T) || softmax(student / T))``
(Hinton et al. 2015): the student matches the teacher's softened predictions as well as the labels; the
``T²`` factor keeps the soft term's gradient on the scale of the hard one's (it shrinks as ``1/T²``). The
KL divergence differs from the thesis's soft cross-entropy by the teacher's entropy, a constant for the
student, so both give the same gradients. Defaults ``λ = 0.2``, ``T = 2`` (thesis section 5.2.2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_nas.module import MultiExitModule


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    lam: float = 0.2,
    temperature: float = 2.0,
) -> Tensor:
    """Distillation loss of one exit: ``λ CE + (1 - λ) T² KL`` (thesis eq. 5.5)."""
    hard = F.cross_entropy(student_logits, targets)
    return lam * hard + (1 - lam) * temperature**2 * soft_kl(student_logits, teacher_logits, temperature)


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> MultiExitModule:
    """A lit_nas checkpoint as a frozen teacher: eval mode, no gradients, on ``device``.

    Loaded with ``weights_only=True``; its own ArchSpec rebuilds it, whatever its architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {str(path)!r} does not exist")
    teacher = MultiExitModule.load_from_checkpoint(path, map_location=device, weights_only=True)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
