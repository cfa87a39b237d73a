"""``RetrainFromScratch``: keep the architecture found so far and train it again from new weights.

Liège thesis section 4.3 (after Liu et al. and Crowley et al. 2018: the structure found by pruning, trained
from scratch, beats the fine-tuned pruned network) and the lottery-ticket rewinding of Frankle et al.
("Stabilizing the lottery ticket hypothesis"; Inria thesis section 2.3.1).

Example (YAML)::

    retrain:
      epoch: 8
      init: rewind
      rewind_epoch: 1
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_nas.protocol import ArchitectureSearch, NASModule, nas, require_nas_module
from lit_nas.reinit import changed_layers, fresh_weights, restart, weights
from lit_nas.validation import check_choice

INITS = ("random", "rewind")
_WHO = "RetrainFromScratch"


class RetrainFromScratch(Callback):
    """At the start of epoch ``epoch``, restart training of the architecture found so far.

    What is kept is the architecture: the ArchSpec (active blocks, channel counts after garbage collection),
    the SNIP weight masks (the connectivity) and which channel gates are closed. What restarts:

    * the weights: ``init: random`` draws fresh ones (a new seed; pruned weights stay exactly zero), or
      ``init: rewind`` puts back the weights saved at the start of epoch ``rewind_epoch`` (lottery-ticket
      rewinding; the saved weights are in this callback's checkpoint state, so a resume in between keeps
      them); live gates and switches return to 1;
    * the optimizer state and the learning-rate schedule (``configure_optimizers`` runs again, so the
      schedule counts epochs from the restart: give ``max_epochs = epoch + the retraining's length``).

    ``val/acc_full`` is NaN before the restart (the best checkpoint is a retrained network). Logs
    ``retrain/started_epoch`` at the restart.

    The restart must come after every search has finished, or the searches would go on changing the
    retrained network. At fit start, a search whose schedule still changes the network at or after
    ``epoch`` (growing, SNIP's planned events, SwitchL1's ``until_epoch``) is refused. A search whose end
    depends on training (Fisher pruning until its target) cannot be checked in advance: if it is still
    running at ``epoch``, the restart **waits** (with a warning) and happens at the start of the first epoch
    after it has finished, so the retraining is shorter than planned by the epochs waited.

    Rewinding across a garbage collection is refused: the saved weights no longer fit the layers.

    Args:
        epoch: 0-based epoch at whose start training restarts (``>= 1``).
        init: ``random`` or ``rewind``.
        rewind_epoch: with ``rewind``: the epoch (``0 <= rewind_epoch < epoch``) whose starting weights come
            back; 0 is the initialisation itself (the original lottery ticket).
        seed: seed of the fresh weights with ``random``; ``None`` draws one from the run's random state at
            fit start and keeps it in the checkpoint, so a resumed run retrains from the same weights.
    """

    def __init__(
        self,
        epoch: int,
        init: Literal["random", "rewind"] = "random",
        rewind_epoch: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(epoch, int) or epoch < 1:
            raise ValueError(f"RetrainFromScratch epoch must be an integer >= 1; got {epoch!r}")
        check_choice(_WHO, "init", init, INITS)
        if init == "rewind" and (not isinstance(rewind_epoch, int) or not 0 <= rewind_epoch < epoch):
            raise ValueError(
                f"RetrainFromScratch init: rewind needs rewind_epoch in 0..{epoch - 1} (before the restart "
                f"at epoch {epoch}); got {rewind_epoch!r}"
            )
        if init == "random" and rewind_epoch is not None:
            raise ValueError("RetrainFromScratch rewind_epoch is only used with init: rewind")
        self.epoch = epoch
        self.init = init
        self.rewind_epoch = rewind_epoch
        self.seed = seed
        self.restarted = False
        self._waiting = False  # warned that the restart waits for a search
        self.rewind_state: dict[str, torch.Tensor] | None = None  # the network's weights at rewind_epoch
        self.drawn_seed: int | None = None  # seed None: the one drawn at fit start (in the checkpoint)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_nas_module(pl_module, _WHO)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and trainer.max_epochs is not None and self.epoch >= trainer.max_epochs:
            raise ValueError(
                f"RetrainFromScratch epoch {self.epoch} is not before max_epochs={trainer.max_epochs}: it "
                "would never restart"
            )
        if not self.restarted:
            self._check_schedules(trainer)
            if self.init == "random" and self.seed is None and self.drawn_seed is None:
                # drawn once, kept in the checkpoint: a resumed run retrains from the same weights; rank 0's
                # for every rank under DDP
                drawn = int(torch.randint(0, 2**31 - 1, ()))
                self.drawn_seed = int(trainer.strategy.broadcast(drawn, src=0))
        nas(pl_module).set_search_pending(_WHO, not self.restarted)

    def _check_schedules(self, trainer: L.Trainer) -> None:
        late = {}
        for cb in trainer.callbacks:
            end = cb.last_search_epoch() if isinstance(cb, ArchitectureSearch) else None
            if end is not None and end >= self.epoch:
                late[type(cb).__name__] = end
        if late:
            ends = ", ".join(
                f"{name} until {'the end (no until_epoch)' if end == float('inf') else f'epoch {int(end)}'}"
                for name, end in late.items()
            )
            raise ValueError(
                f"{_WHO} epoch {self.epoch} restarts while a search still changes the network ({ends}); "
                "restart after the last search epoch, or end the searches earlier"
            )

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        epoch = trainer.current_epoch
        if self.init == "rewind" and epoch == self.rewind_epoch and self.rewind_state is None:
            self.rewind_state = {k: v.detach().cpu().clone() for k, v in weights(module.net).items()}
        if epoch >= self.epoch and not self.restarted:
            pending = sorted(module.pending_searches() - {_WHO})
            if not pending:
                self._restart(trainer, module)
            elif not self._waiting:
                self._waiting = True
                rank_zero_warn(
                    f"{_WHO}: epoch {epoch} reached but {pending} still searching; the restart waits until "
                    "they finish (the retraining gets the epochs that remain)"
                )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.restarted and not trainer.fast_dev_run:
            pending = sorted(nas(pl_module).pending_searches() - {_WHO})
            rank_zero_warn(
                f"{_WHO}: training never restarted: the searches {pending} did not finish before the end "
                "(the network tested is the searched one, not a retrained one)"
            )

    def _restart(self, trainer: L.Trainer, module: NASModule) -> None:
        masks = module.masks()
        if self.init == "random":
            seed = self.seed if self.seed is not None else self.drawn_seed
            if seed is None:
                raise RuntimeError(f"{_WHO}: on_fit_start did not draw the seed before the restart")
            new = fresh_weights(module.arch_spec, seed)
        else:
            if self.rewind_state is None:
                raise RuntimeError(f"{_WHO}: no weights were saved at epoch {self.rewind_epoch}")
            changed = changed_layers(weights(module.net), self.rewind_state)
            if changed:
                raise ValueError(
                    f"{_WHO}: cannot rewind to epoch {self.rewind_epoch}: layers changed shape since "
                    f"(garbage collection?): {changed[:4]}; use init: random, or rewind to an epoch after "
                    "the last change"
                )
            new = self.rewind_state
        restart(module.net, new)
        module.set_masks(masks)  # pruned weights back to exactly zero
        trainer.strategy.setup_optimizers(trainer)  # fresh optimizer state and LR schedule
        self.restarted = True
        module.set_search_pending(_WHO, False)
        module.log("retrain/started_epoch", float(trainer.current_epoch), on_step=False, on_epoch=True)
        print(
            f"\n{_WHO}: training restarts at epoch {trainer.current_epoch} ({self.init}"
            + (f" to epoch {self.rewind_epoch}" if self.init == "rewind" else "")
            + f"): {module.costs().total_params:,} parameters, {len(masks)} masked weights"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"restarted": self.restarted, "rewind_state": self.rewind_state, "drawn_seed": self.drawn_seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restarted = bool(state_dict["restarted"])
        self.rewind_state = state_dict["rewind_state"]
        self.drawn_seed = state_dict.get("drawn_seed")  # absent from checkpoints written before it was kept
