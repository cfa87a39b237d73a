"""``GarbageCollection``: physically remove gated-off channels (ShrinkNets draft, section 3.5.2).

Example (YAML)::

    gc:
      epochs: [20, 40, 60]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.artifacts import log_picture, write_found
from callbacks.distributed import check_strategy, rewrap_ddp
from lit_nas.align import check_round_to, collected_width
from lit_nas.gates import gated_groups
from lit_nas.plots import channel_chart
from lit_nas.protocol import NASModule, nas, require_nas_module
from lit_nas.surgery import collect_gated

log = logging.getLogger(__name__)


class GarbageCollection(Callback):
    """At the end of chosen training epochs, remove every channel whose gate is exactly 0.

    Everything that produces or reads a collected channel is sliced (convs, BatchNorm parameters and running
    statistics, exits' linear inputs, dense concatenation slices, every member of a residual stream, weight
    masks, the gate itself), and so is the optimizer state of each sliced parameter, so training continues
    on the same tensors, at the same point of the LR schedule, computing the same function. The ArchSpec is
    updated: checkpoints and ``load_from_checkpoint`` rebuild the smaller network. A group whose gate is
    all zero keeps one (still gated-off) channel: no layer is left with 0 channels.

    At fit end it collects once more and writes the architecture found (``found_arch.yaml``, and
    ``found_masks.pt`` with weight masks) next to the checkpoints, for a retraining from scratch.

    Logs after each collection ``gc/params``, ``gc/mflops`` (the full network to its last exit) and
    ``gc/channels_removed``, prints the channels per group, and logs a bar chart of them as the W&B image
    ``gc/channels``.

    Under DDP every rank holds the same gates (the pruning callbacks agree across ranks), so every rank
    performs the same surgery; the DDP wrapper is then rebuilt over the smaller parameters
    (:func:`callbacks.distributed.rewrap_ddp`), with the optimizer and its state kept. FSDP and DeepSpeed
    shard the parameters and are refused at fit start.

    It must run after the pruning callbacks, so a step's prune is collected at the end of that same step:
    the CLI's ``gc`` key does (``callbacks.NAMED_CALLBACKS``); in a callbacks list of your own, put it last.

    Args:
        epochs: 0-based epochs at whose end to collect; ``None`` collects at the end of every epoch.
        after_prune: also collect at the end of every training step that left a gate at 0 (right after
            each prune event, so the following steps already run on the smaller network).
        round_to: channel alignment (:mod:`lit_nas.align`): a group keeps enough of its gated-off (silent)
            channels for its width to be a multiple of ``round_to``, so ShrinkNets' kills and MorphNet's
            dead channels end aligned and the collection stays exact. 1: remove every dead channel.
    """

    def __init__(self, epochs: list[int] | None = None, after_prune: bool = False, round_to: int = 1) -> None:
        super().__init__()
        check_round_to("GarbageCollection", round_to)
        if epochs is not None and (
            not epochs
            or any(not isinstance(e, int) or e < 0 for e in epochs)
            or sorted(set(epochs)) != epochs
        ):
            raise ValueError(
                f"GarbageCollection epochs must be non-negative integers, strictly increasing; got {epochs}"
            )
        self.epochs = epochs
        self.after_prune = after_prune
        self.round_to = round_to or 1
        #: ``(epoch, channels removed, parameters after)`` of every collection
        self.history: list[tuple[int, int, int]] = []
        self.found_paths: tuple[Path, Path | None] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_nas_module(pl_module, "GarbageCollection")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_strategy("GarbageCollection", trainer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.after_prune and _collectable(gated_groups(pl_module.net).values(), self.round_to):
            self._collect(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epochs is None or trainer.current_epoch in self.epochs:
            self._collect(trainer, pl_module, on_step=False)

    def _collect(
        self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool, log_metrics: bool = True
    ) -> None:
        module = nas(pl_module)
        removed = collect(module, trainer.optimizers, self.round_to)
        if not removed:
            # the normal case while no gate has closed yet: say it at debug level only
            log.debug("GarbageCollection at epoch %d: no dead channel to remove", trainer.current_epoch)
            return
        if log_metrics:  # still training: DDP's buckets were laid out for the old shapes (every rank)
            rewrap_ddp(trainer)
        costs = module.costs()
        last = module.arch_spec.exit_blocks(active_only=False)[-1]
        total = sum(removed.values())
        self.history.append((trainer.current_epoch, total, costs.total_params))
        if not log_metrics:  # after fit: self.log is not allowed there
            return
        for key, value in (
            ("gc/params", float(costs.total_params)),
            ("gc/mflops", costs.flops_to_exit(last) / 1e6),
            ("gc/channels_removed", float(total)),
        ):
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step)
        self._report(trainer, module, removed)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a last collection, so the architecture written is the one found (gates may have closed since)
        self._collect(trainer, pl_module, on_step=False, log_metrics=False)
        if self.history and not trainer.fast_dev_run:
            written = write_found(trainer, nas(pl_module))  # every rank
            if written is not None:
                self.found_paths = written
                print(f"GarbageCollection: architecture found -> {written[0]}")

    def _report(self, trainer: L.Trainer, module: NASModule, removed: dict[str, int]) -> None:
        sizes = {g.name: g.size for g in module.channel_groups()}
        lines = [
            f"\nGarbageCollection at epoch {trainer.current_epoch}: {sum(removed.values())} channels removed"
        ]
        lines += [f"  {name}: {sizes[name] + n} -> {sizes[name]}" for name, n in removed.items()]
        print("\n".join(lines))
        name = f"channels_step{trainer.global_step:06d}.png"
        log_picture(trainer, "gc/channels", name, lambda path: channel_chart(sizes, path))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(e), int(n), int(p)) for e, n, p in state_dict["history"]]


def _collectable(gates: Iterable[torch.Tensor], round_to: int) -> bool:
    """A collection would remove a channel: a group has more gated-off channels than its tile keeps."""
    return any(collected_width(int((g != 0).sum()), g.numel(), round_to) < g.numel() for g in gates)


def collect(module: NASModule, optimizers: list[torch.optim.Optimizer], round_to: int = 1) -> dict[str, int]:
    """Remove the gated-off channels of every gated group; returns the channels removed per group."""
    removed = collect_gated(module.net, optimizers, round_to)
    if removed:
        module.set_arch_spec(module.net.spec)
    return removed
