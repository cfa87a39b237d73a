"""Channel-pruning signals (pure functions).

Fisher pruning (Theis et al. 2018; Liège thesis section 4.2.3, eq. 4.10): with a binary mask ``m_k`` on
channel ``k`` of an activation ``a`` (``a' = m_k a``), removing the channel raises the loss by about

    Delta_k = 1/(2N) * sum_n g_nk^2,   g_nk = sum_ij a_nkij * d(loss_n)/d(a_nkij),

where ``loss_n`` is the loss of sample ``n`` alone. ``g_nk`` is the per-sample gradient of the mask, which
the activation and the gradient that backpropagation already computes give for free.
"""

from __future__ import annotations

from torch import Tensor


def fisher_signal(activation: Tensor, grad: Tensor, mean_reduced: bool = True) -> Tensor:
    """Per-sample gradient of a channel mask, ``g_nk = sum_ij a_nkij * d(loss_n)/d(a_nkij)``: ``(N, C)``.

    Args:
        activation: ``(N, C, H, W)`` (or ``(N, C)``) activation the mask multiplies.
        grad: gradient of the backpropagated batch loss with respect to ``activation``, same shape.
        mean_reduced: the batch loss was the *mean* of the per-sample losses (PyTorch's default), so each
            sample's own gradient is ``N`` times its share of ``grad``; ``False`` for a summed loss.
    """
    if activation.shape != grad.shape:
        raise ValueError(f"activation {tuple(activation.shape)} and grad {tuple(grad.shape)} differ in shape")
    g = (activation * grad).flatten(2).sum(2) if activation.dim() > 2 else activation * grad
    return g * activation.shape[0] if mean_reduced else g


def fisher_scores(activation: Tensor, grad: Tensor, mean_reduced: bool = True) -> Tensor:
    """Fisher pruning signal of every channel for one batch: ``1/(2N) sum_n g_nk^2``, shape ``(C,)``.

    Scores of several batches average (weight each by its ``N``); the lowest score is the channel whose
    removal is expected to cost the least loss.
    """
    g = fisher_signal(activation, grad, mean_reduced)
    return g.pow(2).sum(0) / (2 * g.shape[0])
