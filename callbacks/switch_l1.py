"""``SwitchL1``: ShrinkNets switch layers, an L1 penalty on them, and neuron killing.

Example (YAML)::

    switch_l1:
      lam: 1.0e-4
      kill: threshold
      tau: 1.0e-3
      until_epoch: 60
    gc:
      epochs: null
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from callbacks.artifacts import log_picture
from callbacks.distributed import broadcast_tensors, check_strategy, rewrap_ddp
from callbacks.searches import GROUP_SCOPES, refuse_two_searches, scoped_groups
from lit_nas.gates import attach_gates, gated_groups
from lit_nas.masks import mask_optimizer_state
from lit_nas.plots import live_heatmap
from lit_nas.protocol import NASModule, SearchChanges, nas, require_nas_module
from lit_nas.switches import KILL_STRATEGIES, UPDATES, SignWindow, switch_step
from lit_nas.validation import check_choice

log = logging.getLogger(__name__)

_WHO = "SwitchL1"
_LOSS = "switch/l1"


class SwitchL1(Callback):
    """Learn the width of every channel group with switches ``θ`` and an L1 penalty ``λ‖θ‖₁``.

    A trainable switch (one value per channel, initialised to ``init``) follows every BatchNorm producing
    a channel group (:mod:`lit_nas.gates`); switches are excluded from weight decay (the L1 penalty is their
    regulariser). ``update`` chooses how the penalty acts (:mod:`lit_nas.switches`):

    * ``proximal`` (default): soft-threshold the switches after every optimizer step with threshold
      ``lr λ``. It is the exact proximal step of the penalty, and it produces *exact* zeros, so a channel
      dies without waiting for a rule to notice it, and garbage collection removes it without changing the
      output. Every switch it zeroes is killed at once.
    * ``subgradient``: add ``λ‖θ‖₁`` to the loss (logged as ``switch/l1``); switches hover around 0 and
      die through the killing rule only.

    ``kill`` is the rule of ShrinkNets section 3.5.1 that declares a live switch dead: ``threshold``
    (``|θ| < tau``), ``sign_change`` (the sign differs from the previous step's) or ``sign_variance`` (the
    variance of ``sign(θ)`` over the last ``window`` steps exceeds ``gamma``). A dead switch is set to
    exactly 0 and frozen: its gradient and optimizer state are zeroed, so it stays 0, and
    :class:`~callbacks.GarbageCollection` may remove its channel. A group never loses its last live switch.

    After ``until_epoch`` the penalty stops and the switches are frozen (fine-tuning of the found widths);
    until then ``val/acc_full`` is NaN, so model selection waits for the final widths. Logs every epoch the
    live channels in total (``switch/live_channels``) and per group (``switch/live/<group>``), the penalty
    ``switch/l1``, and a heatmap of the live fraction of every group over the epochs (W&B image
    ``switch/live``).

    Args:
        lam: ``λ``, the strength of the L1 penalty (``>= 0``).
        update: ``proximal`` or ``subgradient``.
        kill: ``threshold``, ``sign_change`` or ``sign_variance``.
        tau: threshold of ``threshold`` (``> 0``).
        gamma: sign-variance threshold of ``sign_variance``, in (0, 1).
        window: steps over which ``sign_variance`` measures the variance (``>= 2``).
        scope: ``all`` channel groups, or ``inner``: only the inner widths of residual cells.
        init: initial value of every switch (1: the network starts as it is without switches).
        until_epoch: 0-based epoch from which the switches are frozen and the penalty off; ``None``: never.
    """

    changes: ClassVar[SearchChanges] = "width"  # an ArchitectureSearch (lit_nas.protocol)

    def __init__(
        self,
        lam: float = 1e-4,
        update: Literal["proximal", "subgradient"] = "proximal",
        kill: Literal["threshold", "sign_change", "sign_variance"] = "threshold",
        tau: float = 1e-3,
        gamma: float = 0.5,
        window: int = 50,
        scope: Literal["all", "inner"] = "all",
        init: float = 1.0,
        until_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"SwitchL1 lam (the L1 strength) must be >= 0; got {lam}")
        check_choice(_WHO, "update", update, UPDATES)
        check_choice(_WHO, "kill", kill, KILL_STRATEGIES)
        if not tau > 0:
            raise ValueError(f"SwitchL1 tau must be > 0; got {tau}")
        if not 0 < gamma < 1:
            raise ValueError(f"SwitchL1 gamma (a variance of signs) must lie in (0, 1); got {gamma}")
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"SwitchL1 window must be an integer >= 2; got {window!r}")
        check_choice(_WHO, "scope", scope, GROUP_SCOPES)
        if init == 0:
            raise ValueError("SwitchL1 init must be nonzero: a switch at 0 is a dead channel")
        if until_epoch is not None and (not isinstance(until_epoch, int) or until_epoch < 1):
            raise ValueError(f"SwitchL1 until_epoch must be an integer >= 1 or null; got {until_epoch!r}")
        self.lam = lam
        self.update = update
        self.kill = kill
        self.tau = tau
        self.gamma = gamma
        self.window = window
        self.scope = scope
        self.init = init
        self.until_epoch = until_epoch
        self.stopped = False
        #: ``(epoch, {group: live channels})`` at the end of every training epoch
        self.history: list[tuple[int, dict[str, int]]] = []
        self.initial_sizes: dict[str, int] = {}
        self._prev_sign: dict[str, Tensor] = {}
        self._windows: dict[str, SignWindow] = {}
        self._live: dict[str, Tensor] = {}  # live switches after the last step (what GC keeps)
        self._groups: dict[str, dict[str, Any]] = {}  # the optimizer param group holding each switch
        self._names: list[str] = []  # the switched channel groups

    # -- lifecycle ----------------------------------------------------------------------------------------
    def groups(self, module: NASModule) -> list[str]:
        """Names of the channel groups that get switches."""
        return scoped_groups(module, self.scope)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_two_searches(trainer, "SwitchL1")
        module = require_nas_module(pl_module, _WHO)
        if stage != "fit":
            return
        # before configure_optimizers, so the switches are in the optimizer (without weight decay)
        self._names = self.groups(module)  # group names survive collections; computed once, not per step
        switches = attach_gates(module.net, self._names, trainable=True, init=self.init)
        if not self.initial_sizes:
            self.initial_sizes = {g: p.numel() for g, p in switches.items()}

    def last_search_epoch(self) -> float | None:
        """The last epoch at which the switches change the widths (infinite without ``until_epoch``)."""
        return float("inf") if self.until_epoch is None else self.until_epoch - 1

    def _switches(self, module: NASModule) -> dict[str, nn.Parameter]:
        gates = gated_groups(module.net)
        return {g: gates[g] for g in self._names if g in gates}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        check_strategy(_WHO, trainer)
        switches = self._switches(module)
        self._groups = {}
        # a resume rebuilds the net from its checkpoint, gates frozen, before DDP wraps it
        if any(t.requires_grad == self.stopped for t in switches.values()):
            for theta in switches.values():
                theta.requires_grad_(not self.stopped)
            rewrap_ddp(trainer)  # DDP reduces the parameters that required a gradient when it wrapped
        for name, theta in switches.items():
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    if any(p is theta for p in group["params"]):
                        self._groups[name] = group
            if name not in self._groups:
                raise ValueError(
                    f"{_WHO}: the switch of {name!r} is in no optimizer; configure_optimizers must optimize "
                    "every parameter of the module"
                )
            if self._groups[name].get("weight_decay", 0.0) != 0.0:
                raise ValueError(
                    f"{_WHO}: the switch of {name!r} has weight decay; exclude it (no_weight_decay)"
                )
            # a checkpoint is written after the epoch-end collection, its records before: align them
            self._follow_collection(name, theta)
            self._live[name] = theta.detach() != 0
            self._prev_sign.setdefault(name, torch.sign(theta.detach()))
        if self.update == "subgradient" and not self.stopped:
            module.add_loss_term(_LOSS, self._penalty(module))
        module.set_search_pending(_WHO, self.until_epoch is not None and not self.stopped)

    def _penalty(self, module: NASModule):
        def penalty(images: Tensor, targets: Tensor, outputs: Any) -> Tensor:
            return self.lam * sum(theta.abs().sum() for theta in self._switches(module).values())

        return penalty

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        nas(pl_module).remove_loss_term(_LOSS)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.until_epoch is not None and trainer.current_epoch >= self.until_epoch and not self.stopped:
            self.stopped = True
            for theta in self._switches(nas(pl_module)).values():
                theta.requires_grad_(False)
                theta.grad = None
            rewrap_ddp(trainer)  # DDP expects a gradient for every parameter that required one
            nas(pl_module).remove_loss_term(_LOSS)
            nas(pl_module).set_search_pending(_WHO, False)
            live = sum(int((t != 0).sum()) for t in self._switches(nas(pl_module)).values())
            print(f"\n{_WHO}: switches frozen at epoch {trainer.current_epoch}, {live} live channels")

    # -- every step ---------------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.stopped:
            return
        for theta in self._switches(nas(pl_module)).values():
            if theta.grad is not None:
                theta.grad.mul_(theta.detach() != 0)  # dead switches are frozen

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.stopped:
            return
        switches = self._switches(nas(pl_module))
        before = {name: theta.detach() != 0 for name, theta in switches.items()}
        for name, theta in switches.items():
            self._step(name, theta)
        # under DDP the switches' gradients are averaged, so every rank computed the same step; rank 0's
        # switches are made the truth anyway (one broadcast; nothing on one process), so the dead channels,
        # hence every collection, agree exactly
        broadcast_tensors(trainer, list(switches.values()))
        for name, theta in switches.items():
            fresh = before[name] & (theta.detach() == 0)  # killed by this step
            if bool(fresh.any()):  # momentum / Adam moments of a dead switch would move it again
                mask_optimizer_state(trainer.optimizers, [(theta, ~fresh)])
            self._prev_sign[name] = torch.sign(theta.detach())
            self._live[name] = theta.detach() != 0

    def _step(self, name: str, theta: nn.Parameter) -> None:
        """The L1 update and the kill rule on one group's switches (the records follow in the caller)."""
        self._follow_collection(name, theta)
        window = None
        if self.kill == "sign_variance":
            window = self._windows.setdefault(name, SignWindow(theta.numel(), self.window, theta.device))
            window.signs = window.signs.to(theta.device)  # restored from a checkpoint on the CPU
        switch_step(
            theta,
            update=self.update,
            kill=self.kill,
            threshold=self._groups[name]["lr"] * self.lam,
            tau=self.tau,
            gamma=self.gamma,
            previous_sign=self._prev_sign[name].to(theta.device),
            window=window,
        )

    def _follow_collection(self, name: str, theta: nn.Parameter) -> None:
        """Garbage collection removed the dead switches: drop them from the per-switch records too."""
        live = self._live.get(name)
        if live is None or live.numel() == theta.numel():
            return
        if int(live.sum()) == theta.numel():  # exactly the dead ones went
            live = live.to(theta.device)
            self._prev_sign[name] = self._prev_sign[name].to(theta.device)[live]
            if name in self._windows:
                self._windows[name].keep(live)
        else:  # collected by something else: start the records afresh
            self._prev_sign[name] = torch.sign(theta.detach())
            self._windows.pop(name, None)

    # -- logging ------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        switches = self._switches(nas(pl_module))
        live = {g: int((t != 0).sum()) for g, t in switches.items()}
        self.history.append((trainer.current_epoch, live))
        pl_module.log("switch/live_channels", float(sum(live.values())), on_step=False, on_epoch=True)
        l1 = sum(float(t.detach().abs().sum()) for t in switches.values())
        pl_module.log("switch/l1_norm", l1, on_step=False, on_epoch=True)
        for g, n in live.items():
            pl_module.log(f"switch/live/{g}", float(n), on_step=False, on_epoch=True)
        sizes = self.initial_sizes or {g: t.numel() for g, t in switches.items()}
        log_picture(
            trainer,
            "switch/live",
            f"live_epoch{trainer.current_epoch:03d}.png",
            lambda path: live_heatmap(
                [h for _, h in self.history], sizes, [e for e, _ in self.history], path
            ),
        )

    # -- state --------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stopped": self.stopped,
            "history": [[e, dict(h)] for e, h in self.history],
            "initial_sizes": dict(self.initial_sizes),
            "prev_sign": {k: v.cpu() for k, v in self._prev_sign.items()},
            "live": {k: v.cpu() for k, v in self._live.items()},
            "windows": {k: [w.signs.cpu(), w.steps] for k, w in self._windows.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped = bool(state_dict["stopped"])
        self.history = [(int(e), {k: int(v) for k, v in h.items()}) for e, h in state_dict["history"]]
        self.initial_sizes = {k: int(v) for k, v in state_dict["initial_sizes"].items()}
        self._prev_sign = dict(state_dict["prev_sign"])
        self._live = dict(state_dict["live"])
        self._windows = {}
        for k, (signs, steps) in state_dict["windows"].items():
            w = SignWindow(signs.shape[1], signs.shape[0])
            w.signs, w.steps = signs, int(steps)
            self._windows[k] = w
