"""``Growing``: activate the network block by block at epoch milestones (Inria thesis, section 3).

Example (YAML, the thesis's schedule)::

    growing:
      grow_epochs: [25, 50, 75]
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from callbacks.distributed import rewrap_ddp
from lit_nas.cost import COST_COLUMNS, CostReport, cost_rows, format_costs
from lit_nas.growing import GROW_INITS, active_blocks_at, check_growable, identity_init, validate_grow_epochs
from lit_nas.protocol import NASModule, SearchChanges, nas, require_nas_module
from lit_nas.validation import check_choice

log = logging.getLogger(__name__)


class Growing(Callback):
    """Start with block 0 and its exit; activate the next block and its exit at each epoch of ``grow_epochs``.

    Every block exists from the start (so the optimizer, the LR schedule and checkpoints never see a new
    parameter); inactive blocks are not run, so they get no gradient, no optimizer state, no weight decay
    and no momentum until they activate, and then train at the learning rate in force.

    Under DDP use ``strategy: ddp_find_unused_parameters_true``: the inactive blocks are parameters that no
    loss uses, which plain DDP rejects. Once the last block is active nothing is unused any more, and the
    DDP wrapper is rebuilt without ``find_unused_parameters`` (it costs a traversal of the autograd graph
    every step); pass ``keep_find_unused=True`` to keep it (a loss term of yours leaves parameters unused).

    Logs every epoch ``grow/active_blocks``, ``grow/active_params`` and ``grow/active_mflops`` (forward cost
    per image of the active blocks and exits); at each growth it prints the architecture and logs it as the
    W&B table ``grow/architecture``.

    Args:
        grow_epochs: epoch (0-based) at which blocks ``1, 2, ...`` activate; one entry per block after the
            first, strictly increasing, below ``max_epochs``. The thesis uses ``[25, 50, 75]``.
        init: how a new block starts: ``"random"`` (its initial random weights, as in the thesis) or
            ``"identity"`` (the last BN scale of each of its residual cells is zeroed at activation, so each
            cell first passes its shortcut through).
        keep_find_unused: under DDP, keep ``find_unused_parameters`` after the last growth.
    """

    changes: ClassVar[SearchChanges] = "depth"  # an ArchitectureSearch (lit_nas.protocol)

    def __init__(
        self,
        grow_epochs: list[int],
        init: Literal["random", "identity"] = "random",
        keep_find_unused: bool = False,
    ) -> None:
        super().__init__()
        check_choice("Growing", "init", init, GROW_INITS)
        self.grow_epochs = validate_grow_epochs(grow_epochs)
        self.init = init
        self.keep_find_unused = keep_find_unused
        #: ``(block, epoch)`` of every activation so far.
        self.history: list[tuple[int, int]] = []
        self._restored = False  # True once load_state_dict ran (a resumed run)

    # -- checks -----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        module = require_nas_module(pl_module, "Growing")
        if stage != "fit":
            return
        spec = module.arch_spec
        # fast_dev_run is a smoke test of a few batches: growth epochs beyond it are expected, not an error
        max_epochs = None if trainer.fast_dev_run else trainer.max_epochs
        validate_grow_epochs(self.grow_epochs, spec.num_blocks, max_epochs)
        check_growable(spec)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ValueError(
                "Growing keeps inactive blocks out of the loss, which DDP rejects unless told: use "
                "strategy 'ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True))"
            )
        module = nas(pl_module)
        # Fresh run: block 0 only. Resumed run: the restored count (the checkpoint's ArchSpec says the same).
        if not self._restored:
            self.history = []
        module.set_active_blocks(1 + len(self.history))
        self._drop_find_unused(trainer, module)  # a resume after the last growth

    def _drop_find_unused(self, trainer: L.Trainer, module: NASModule) -> None:
        """Every block active: rebuild DDP without ``find_unused_parameters`` (every rank alike)."""
        model = trainer.strategy.model
        if (
            not self.keep_find_unused
            and isinstance(model, DistributedDataParallel)
            and model.find_unused_parameters
            and module.active_blocks == module.arch_spec.num_blocks
        ):
            rewrap_ddp(trainer, find_unused_parameters=False)
            log.info("Growing: every block active; DDP rebuilt without find_unused_parameters")

    def activation_epochs(self) -> list[int]:
        """Epoch at which each block activates (block 0 at epoch 0): what pruning schedules plan against."""
        return [0, *self.grow_epochs]

    def last_search_epoch(self) -> float | None:
        """The last epoch at which this callback changes the network."""
        return self.grow_epochs[-1] if self.grow_epochs else 0

    # -- growth -----------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        target = active_blocks_at(trainer.current_epoch, self.grow_epochs)
        grown = []
        while module.active_blocks < target:
            block = module.active_blocks
            if self.init == "identity":
                identity_init(module.net, block)
            module.set_active_blocks(block + 1)
            self.history.append((block, trainer.current_epoch))
            grown.append(block)
        n, costs = module.active_blocks, module.costs()
        if grown:
            self._report(trainer, module, grown, costs)
            self._drop_find_unused(trainer, module)
        pl_module.log("grow/active_blocks", float(n), on_step=False, on_epoch=True)
        pl_module.log("grow/active_params", float(costs.active_params(n)), on_step=False, on_epoch=True)
        pl_module.log("grow/active_mflops", costs.active_flops(n) / 1e6, on_step=False, on_epoch=True)

    def _report(self, trainer: L.Trainer, module: NASModule, grown: list[int], costs: CostReport) -> None:
        """Print and log the architecture after the blocks in ``grown`` activated."""
        spec, epoch = module.arch_spec, trainer.current_epoch
        summary = format_costs(spec, costs)
        log.info("Growing: blocks %s activated at epoch %d\n%s", grown, epoch, summary)
        if trainer.is_global_zero:
            for block in grown:
                print(f"\nGrowing: block {block} activated at epoch {epoch} ({self.init} init)")
            print(summary)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(
                    "grow/architecture",
                    columns=COST_COLUMNS,
                    data=cost_rows(spec, costs),
                    step=trainer.global_step,
                )

    # -- state ------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # the number of active blocks is 1 + len(history); the ArchSpec in the checkpoint records it too
        return {"grow_epochs": list(self.grow_epochs), "history": [list(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["grow_epochs"]) != self.grow_epochs:
            log.warning(
                "Growing: resuming with grow_epochs %s; the checkpoint was trained with %s",
                self.grow_epochs,
                state_dict["grow_epochs"],
            )
        self.history = [(int(b), int(e)) for b, e in state_dict["history"]]
        self._restored = True
