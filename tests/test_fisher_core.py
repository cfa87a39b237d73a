"""Fisher pruning signal (Liège thesis eq. 4.10) against a direct per-sample autograd computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_nas.fisher import fisher_scores, fisher_signal


def small_net() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    tail = nn.Sequential(
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    return head.eval(), tail.eval()  # eval: samples independent, so per-sample losses are well defined


@pytest.mark.parametrize("mean_reduced", [True, False])
def test_fisher_scores_match_per_sample_mask_gradients(mean_reduced):
    head, tail = small_net()
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 5, (7,))

    # direct: a mask m (all ones) on the activation, d(loss_n)/dm for each sample on its own
    g_direct = []
    for n in range(len(x)):
        mask = torch.ones(6, requires_grad=True)
        a = head(x[n : n + 1])
        loss_n = nn.functional.cross_entropy(tail(a * mask[None, :, None, None]), y[n : n + 1])
        (g,) = torch.autograd.grad(loss_n, mask)
        g_direct.append(g)
    g_direct = torch.stack(g_direct)
    direct = g_direct.pow(2).sum(0) / (2 * len(x))

    # from one batch backward: the activation and its gradient
    a = head(x)
    a.retain_grad()
    loss = nn.functional.cross_entropy(tail(a), y, reduction="mean" if mean_reduced else "sum")
    loss.backward()
    torch.testing.assert_close(
        fisher_signal(a.detach(), a.grad, mean_reduced), g_direct, rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(fisher_scores(a.detach(), a.grad, mean_reduced), direct, rtol=1e-4, atol=1e-9)


def test_fisher_signal_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"activation \(2, 3, 4, 4\) and grad \(2, 3\) differ in shape"):
        fisher_signal(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3))
