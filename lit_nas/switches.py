"""ShrinkNets switch layers: the L1 proximal step and the neuron-killing rules (pure functions).

A switch ``θ`` (one per channel, a trainable channel gate, :mod:`lit_nas.gates`) multiplies a layer's
output channels; an L1 penalty ``λ‖θ‖₁`` pushes the switches of unimportant channels to zero (ShrinkNets
draft sections 3.2-3.3). Two ways to apply it:

* ``subgradient``: add ``λ‖θ‖₁`` to the loss. SGD then moves each switch by ``lr λ sign(θ)`` per step, so
  switches oscillate around 0 and are never exactly 0: a channel only dies through a killing rule.
* ``proximal`` (default): after each optimizer step, soft-threshold ``θ ← sign(θ) max(|θ| - lr λ, 0)``,
  the proximal operator of ``lr λ‖θ‖₁``. It is the exact minimiser of the penalised step, so it puts
  switches at *exactly* 0, which is what lets garbage collection remove them without changing the output.

Killing (draft section 3.5.1) decides that a switch is dead: it is set to exactly 0 and frozen. The rules
return boolean masks of the switches to kill.
"""

from __future__ import annotations

import torch
from torch import Tensor

UPDATES = ("proximal", "subgradient")
KILL_STRATEGIES = ("threshold", "sign_change", "sign_variance")


def soft_threshold(theta: Tensor, t: float) -> Tensor:
    """Proximal operator of ``t‖θ‖₁``: ``sign(θ) max(|θ| - t, 0)`` (exact zeros below ``t``)."""
    return torch.sign(theta) * (theta.abs() - t).clamp_min(0)


def keep_one_alive(theta: Tensor, before: Tensor, dead: Tensor) -> Tensor:
    """Never let a group lose its last live switch: the guard of every update and killing rule.

    If ``dead`` covers every switch, the one that was strongest before this step (``before``: the values
    before the update, the soft-threshold and the killing) survives, with its value from before the step if
    the update had already zeroed it. ``theta`` is changed in place.

    Args:
        theta: the group's switches after the update.
        before: the same switches before it.
        dead: switches about to be killed.

    Returns:
        ``dead`` without the survivor.
    """
    if not bool(dead.all()):
        return dead
    strength = before.abs()
    i = int(strength.argmax())
    dead = dead.clone()
    dead[i] = False
    if theta[i] == 0:
        theta[i] = before[i]
    return dead


def threshold_kills(theta: Tensor, tau: float) -> Tensor:
    """Kill switches with ``|θ| < τ`` (deep-compression style; scale dependent)."""
    return theta.abs() < tau


def sign_change_kills(theta: Tensor, previous_sign: Tensor) -> Tensor:
    """Kill switches whose sign differs from ``previous_sign`` (reaching exactly 0 counts as a change)."""
    return torch.sign(theta) != previous_sign


class SignWindow:
    """The signs (+1 for ``θ > 0``, -1 otherwise) of each switch over the last ``window`` steps.

    :meth:`variance` is the variance of those signs, ``1 - mean²`` in ``[0, 1]``: 0 for a switch that kept
    its sign, 1 for one that flipped half of the time. ``sign_variance`` kills above a threshold ``γ``.
    """

    def __init__(self, size: int, window: int, device: torch.device | str = "cpu") -> None:
        self.window = window
        self.signs = torch.zeros(window, size, dtype=torch.int8, device=device)
        self.steps = 0

    def push(self, theta: Tensor) -> None:
        """Record the signs of one step."""
        self.signs[self.steps % self.window] = torch.where(theta > 0, 1, -1).to(torch.int8)
        self.steps += 1

    @property
    def full(self) -> bool:
        """``window`` steps have been recorded."""
        return self.steps >= self.window

    def variance(self) -> Tensor:
        """Variance of each switch's sign over the window (only meaningful once :attr:`full`)."""
        n = min(self.steps, self.window)
        mean = self.signs[:n].float().mean(0)
        return 1 - mean.pow(2)

    def keep(self, keep: Tensor) -> None:
        """Follow a garbage collection that kept only the switches ``keep`` (boolean mask)."""
        self.signs = self.signs[:, keep.to(self.signs.device)].contiguous()


def sign_variance_kills(window: SignWindow, gamma: float) -> Tensor:
    """Kill switches whose sign variance over a full window exceeds ``γ`` (none before it is full)."""
    if not window.full:
        return torch.zeros(window.signs.shape[1], dtype=torch.bool, device=window.signs.device)
    return window.variance() > gamma


@torch.no_grad()
def switch_step(
    theta: Tensor,
    *,
    update: str,
    kill: str,
    threshold: float,
    tau: float = 1e-3,
    gamma: float = 0.5,
    previous_sign: Tensor | None = None,
    window: SignWindow | None = None,
) -> Tensor:
    """One step of a group's switches, after the optimizer's: the L1 update, the kill rule, the guard.

    In place on ``theta``: the ``proximal`` update soft-thresholds by ``threshold`` (``lr * λ``); switches
    that were dead stay exactly 0 whatever momentum did; the ``kill`` rule (``threshold`` with ``tau``,
    ``sign_change`` against ``previous_sign``, ``sign_variance`` over ``window`` with ``gamma``) declares
    more dead; :func:`keep_one_alive` keeps the group's last switch; the dead are set to exactly 0.

    Returns:
        The switches that died in this step (their optimizer state must be zeroed too).
    """
    if update not in UPDATES:
        raise ValueError(f"unknown switch update {update!r}; valid choices: {list(UPDATES)}")
    was_dead = theta == 0
    before = theta.clone()
    if update == "proximal":
        theta.copy_(soft_threshold(theta, threshold))
    theta[was_dead] = 0
    if kill == "threshold":
        new = threshold_kills(theta, tau)
    elif kill == "sign_change":
        if previous_sign is None:
            raise ValueError("sign_change needs previous_sign")
        new = sign_change_kills(theta, previous_sign)
    elif kill == "sign_variance":
        if window is None:
            raise ValueError("sign_variance needs a SignWindow")
        window.push(theta)
        new = sign_variance_kills(window, gamma)
    else:
        raise ValueError(f"unknown kill rule {kill!r}; valid choices: {list(KILL_STRATEGIES)}")
    dead = keep_one_alive(theta, before, was_dead | (theta == 0) | new)  # never 0 channels
    theta[dead] = 0
    return dead & ~was_dead
