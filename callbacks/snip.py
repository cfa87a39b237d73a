"""``SnipPruning``: SNIP connection-sensitivity pruning that follows the growth (Inria thesis, sections 4-5).

Example (YAML, the thesis's flagship: dense super-network, iterative, table 13)::

    growing: {grow_epochs: [25, 50, 75]}
    snip:
      keep_ratio: 0.3
      mode: iterative
      steps: 3
      prune_epochs: [10, 35, 60, 85, 95, 105, 115]
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from typing_extensions import override

from callbacks.artifacts import log_picture, write_found
from callbacks.distributed import check_strategy, rewrap_ddp
from callbacks.luts import check_covers, lut_for
from callbacks.searches import refuse_two_searches
from lit_nas.align import align_removal, check_round_to, resolve_round_to
from lit_nas.latency import LatencyLUT
from lit_nas.masks import connectivity_map, kept_count
from lit_nas.nets.base import ExitLogits
from lit_nas.protocol import NASModule, SearchChanges, nas, require_nas_module
from lit_nas.snip import (
    KEEP_SCHEDULES,
    UNIT_KINDS,
    PruneSchedule,
    StructuredUnits,
    keep_ratio_steps,
    keep_ratios,
    rank_units,
    reinitialized,
    removal_to_budget,
    snip_block_masks,
    snip_scores,
)
from lit_nas.surgery import dead_edges, remove_edges
from lit_nas.validation import check_choice

log = logging.getLogger(__name__)

MODES = ("one_shot", "iterative")
CRITERION_LOSSES = ("sum", "final")
GRANULARITIES = tuple(UNIT_KINDS)
STOP_AT = ("count", "latency")
_WHO = "SnipPruning"


class SnipPruning(Callback):
    """Prune each block's connections by SNIP sensitivity ``|g * w|``, some epochs after it activates.

    **When.** Block ``b`` becomes eligible ``after_epochs`` epochs after it activates (all blocks activate at
    epoch 0 without :class:`~callbacks.Growing`). ``one_shot`` prunes it once, straight to its keep ratio;
    ``iterative`` reaches the ratio in ``steps`` prunings, at the next pruning events. The events are
    ``prune_epochs`` when given (the thesis: ``[10, 35, 60, 85, 95, 105, 115]``); by default an event is the
    epoch a block becomes eligible, and once every block has been pruned once, every ``after_epochs``
    epochs while a block still has steps to go (:class:`lit_nas.snip.PruneSchedule`). With growth at
    25/50/75 that gives 10/35/60/85 (one-shot) and 10/35/60/85/95/105 (3 steps). The work happens before
    the first training batch of the epoch, after every ``on_train_epoch_start`` (so the callbacks' order
    does not matter).

    **What.** Scope: the conv and linear weights of each block (the stem is in block 0), plus its exit's
    with ``include_exits``. Ranking is local to each block: it keeps exactly ``round(ratio * weights)`` of
    them. Intermediate ratios follow :func:`lit_nas.snip.keep_ratio_steps` (geometric by default: every
    step removes the same fraction of the survivors). A step scores only the survivors and never revives a
    pruned weight. Scores use the current weights (``reinit: false``, thesis section 4.2) or, as original
    SNIP, a fresh He-normal re-initialisation that is undone after scoring (``reinit: true``).

    **Granularity.** ``weight`` (the thesis) masks single weights. ``filter`` ranks conv output channels, each
    scored by the summed sensitivity of every filter producing it (:func:`lit_nas.snip.filter_scores`; a
    residual stream's channel sums its stem, cell and projection filters), keeps ``ratio`` of the block's
    channels (the channel groups whose first producer is in the block, at least one per group), and removes
    the others at once (:class:`lit_nas.snip.FilterUnits`): the network gets narrower. ``edge`` ranks the
    (source -> target cell) edges of the dense concatenation, each scored by the summed sensitivity of its
    input slice, keeps ``ratio`` of the block's edges (at least one per cell) and removes the others
    (:func:`lit_nas.surgery.remove_edges`): the cells read fewer features. Surgery slices the optimizer state
    with the weights and records the new shapes in the ArchSpec, so checkpoints, ``found_arch.yaml``, FLOPs,
    look-up tables and the export follow. At ``weight`` granularity, an edge whose weights are all pruned is
    removed too (``remove_dead_edges``).

    **Budget.** ``stop_at: latency`` (``filter`` and ``edge``) reads ``keep_ratio`` as the fraction of each
    block's latency to keep, predicted by the look-up tables ``lut`` (:meth:`LatencyLUT.block_ms
    <lit_nas.latency.LatencyLUT.block_ms>`, measured at the block's first pruning): every step removes the
    fewest lowest-ranked units that bring the block under its step's share of that latency.

    The masks are the model's (``NASModule.set_masks``): buffers in every checkpoint, applied to gradients
    and weights around each optimizer step, so pruned weights stay exactly zero through momentum, weight
    decay, growth and resumes.

    Until every block has had all its prunings, ``val/acc_full`` is NaN, so a ``ModelCheckpoint``
    monitoring it only ever picks the pruned network (never a denser one from before the last prune).

    **Logs.** Every epoch ``snip/kept_params``, ``snip/kept_params_block{i}``, ``snip/sparsity_block{i}``
    and ``snip/dead_edges``; after every prune the connectivity map of the dense concatenation (kept
    fraction per source -> target edge) as the W&B image ``snip/connectivity`` (also written as a PNG next
    to the run's files) and table ``snip/connectivity_table``. At fit end the architecture found and its
    masks are written next to the checkpoints (``found_arch.yaml``, ``found_masks.pt``).

    Args:
        keep_ratio: fraction of each block's weights kept at the end: one number, or one per block (the
            thesis's decreasing ratios, e.g. ``[0.8, 0.7, 0.6, 0.5]``).
        mode: ``one_shot`` or ``iterative``.
        steps: prunings per block in ``iterative`` mode (default 3); ``one_shot`` is one step.
        schedule: intermediate keep ratios of ``iterative``: ``geometric`` or ``linear``.
        after_epochs: epochs a block trains between activating and its first pruning (thesis: 10).
        prune_epochs: explicit pruning events (0-based epochs), strictly increasing.
        criterion_loss: loss the scores differentiate: ``sum`` of the active exits' losses or ``final``
            (the deepest active exit only).
        criterion_batch_size: images per criterion batch (thesis: 128; it tried up to 896).
        criterion_batches: batches averaged per score (n batches of B score like one batch of n * B).
        reinit: score a fresh re-initialisation instead of the trained weights (original SNIP).
        include_exits: prune the exits' linear layers too (ranked with their block; ``weight`` only).
        save_found: write ``found_arch.yaml`` and ``found_masks.pt`` at fit end.
        granularity: what is pruned: ``weight``, ``filter`` (conv output channels) or ``edge`` (edges of
            the dense concatenation; needs ``dense: true``).
        stop_at: ``count`` (keep ``keep_ratio`` of the block's units) or ``latency`` (keep ``keep_ratio`` of
            the block's predicted latency; ``filter`` and ``edge`` only).
        lut: latency look-up tables (JSON of :class:`lit_nas.latency.LatencyLUT`) for ``stop_at: latency``.
        remove_dead_edges: at ``weight`` granularity, remove the edges whose weights are all pruned (exact:
            the network computes the same function, faster).
        round_to: ``filter`` granularity: channel alignment (:mod:`lit_nas.align`): each group a step
            touches keeps a multiple of ``round_to`` channels (its kept count rounded up, which costs no
            latency on a device that computes whole tiles). ``None``: the table's step (1 without a table).
    """

    changes: ClassVar[SearchChanges] = "width"  # an ArchitectureSearch (lit_nas.protocol)

    def __init__(
        self,
        keep_ratio: float | list[float],
        mode: Literal["one_shot", "iterative"] = "one_shot",
        steps: int | None = None,
        schedule: Literal["geometric", "linear"] = "geometric",
        after_epochs: int = 10,
        prune_epochs: list[int] | None = None,
        criterion_loss: Literal["sum", "final"] = "sum",
        criterion_batch_size: int = 128,
        criterion_batches: int = 1,
        reinit: bool = False,
        include_exits: bool = False,
        save_found: bool = True,
        granularity: Literal["weight", "filter", "edge"] = "weight",
        stop_at: Literal["count", "latency"] = "count",
        lut: str | None = None,
        remove_dead_edges: bool = True,
        round_to: int | None = None,
    ) -> None:
        super().__init__()
        check_round_to(_WHO, round_to)
        if round_to not in (None, 1) and granularity != "filter":
            raise ValueError(
                f"{_WHO} round_to aligns channel counts: it needs granularity 'filter'; got {granularity!r}"
            )
        self.keep_ratio = keep_ratios(keep_ratio)
        check_choice(_WHO, "mode", mode, MODES)
        check_choice(_WHO, "granularity", granularity, GRANULARITIES)
        check_choice(_WHO, "stop_at", stop_at, STOP_AT)
        #: the unit kind pruned (lit_nas.snip.UNIT_KINDS): what is scored, the units, their removal
        self.units = UNIT_KINDS[granularity]
        if include_exits and isinstance(self.units, StructuredUnits):
            raise ValueError(f"{_WHO} include_exits prunes the exits' weights: it needs granularity 'weight'")
        if stop_at == "latency" and not isinstance(self.units, StructuredUnits):
            raise ValueError(
                f"{_WHO} stop_at 'latency' needs granularity 'filter' or 'edge': scattered zero weights "
                "do not make the exported network faster"
            )
        self.lut = lut_for(_WHO, "stop_at: latency" if stop_at == "latency" else None, lut)
        self.round_to = resolve_round_to(round_to, self.lut) if granularity == "filter" else 1
        self.granularity = granularity
        self.stop_at = stop_at
        self.remove_dead_edges = remove_dead_edges
        #: block -> its units (weights, channels or edges) and predicted latency at its first pruning
        self.initial: dict[int, tuple[int, float]] = {}
        #: when blocks are pruned: steps, after_epochs, prune_epochs
        self.plan = PruneSchedule.build(mode, steps, after_epochs, prune_epochs)
        check_choice("SnipPruning", "schedule", schedule, KEEP_SCHEDULES)
        check_choice("SnipPruning", "criterion_loss", criterion_loss, CRITERION_LOSSES)
        if criterion_batch_size < 1 or criterion_batches < 1:
            raise ValueError(
                f"SnipPruning criterion_batch_size and criterion_batches must be >= 1; got "
                f"{criterion_batch_size}, {criterion_batches}"
            )
        self.mode = mode
        self.schedule = schedule
        self.criterion_loss = criterion_loss
        self.criterion_batch_size = criterion_batch_size
        self.criterion_batches = criterion_batches
        self.reinit = reinit
        self.include_exits = include_exits
        self.save_found = save_found
        #: block -> epoch at which it was first seen active
        self.activated: dict[int, int] = {}
        #: one row per block pruning: (epoch, block, step, target keep ratio, kept, total)
        self.history: list[tuple[int, int, int, float, int, int]] = []
        self._checked_epoch = -1
        self._restored = False
        self.found_paths: tuple[Path, Path | None] | None = None
        self._planned_last: int | None = None  # last pruning epoch of the planned schedule

    @property
    def steps(self) -> int:
        """Prunings per block (1: one-shot)."""
        return self.plan.steps

    @property
    def steps_done(self) -> dict[int, int]:
        """Prunings done so far, per block (read from :attr:`history`)."""
        done: dict[int, int] = {}
        for _, b, *_ in self.history:
            done[b] = done.get(b, 0) + 1
        return done

    # -- checks -----------------------------------------------------------------------------------------
    def ratios(self, num_blocks: int) -> list[float]:
        """Final keep ratio of every block."""
        return self.keep_ratio * num_blocks if len(self.keep_ratio) == 1 else list(self.keep_ratio)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_two_searches(trainer, "SnipPruning")
        module = require_nas_module(pl_module, "SnipPruning")
        if stage != "fit":
            return
        n = module.arch_spec.num_blocks
        if len(self.keep_ratio) not in (1, n):
            raise ValueError(
                f"SnipPruning keep_ratio has {len(self.keep_ratio)} entries; the network has {n} blocks "
                "(give one ratio, or one per block)"
            )
        max_epochs = None if trainer.fast_dev_run else trainer.max_epochs
        events = self.plan.prune_epochs
        if events and max_epochs is not None and max_epochs > 0 and events[-1] >= max_epochs:
            raise ValueError(
                f"SnipPruning prune_epochs {list(events)} reach past the last epoch ({max_epochs - 1}) "
                f"of max_epochs={max_epochs}"
            )
        data = trainer.datamodule
        if not callable(getattr(data, "criterion_batches", None)):
            raise TypeError(
                "SnipPruning draws its criterion batches from the datamodule's "
                "criterion_batches(num_batches, batch_size, seed) (lit_nas.data.ImageDataModule has it); "
                f"got {type(data).__name__}"
            )
        empty = [b for b, ws in module.prunable_weights(self.include_exits).items() if not ws]
        if empty:
            raise ValueError(f"SnipPruning: blocks {empty} have no conv or linear weights to prune")
        try:
            self.units.check_network(module.arch_spec)
        except ValueError as err:
            raise ValueError(f"{_WHO} {err}") from None
        check_covers(_WHO, self.lut, module.arch_spec)
        self._check_plan(trainer, n, max_epochs)

    def _check_plan(self, trainer: L.Trainer, num_blocks: int, max_epochs: int | None) -> None:
        """Refuse a schedule that cannot prune every block to its ratio within the run (before training)."""
        growers = [cb for cb in trainer.callbacks if callable(getattr(cb, "activation_epochs", None))]
        activation = growers[0].activation_epochs() if growers else [0] * num_blocks
        if max_epochs is None or max_epochs <= 0 or len(activation) != num_blocks:
            self._planned_last = None  # unbounded run, or Growing reports the mismatch itself
            return
        events = self.plan.completing_plan(activation, max_epochs)
        self._planned_last = events[-1][0] if events else None

    def last_search_epoch(self) -> float | None:
        """The last epoch at which this callback prunes (known once ``setup`` planned the schedule)."""
        return self._planned_last

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.units, StructuredUnits) or self.remove_dead_edges:  # surgery: DDP must rewrap
            check_strategy(_WHO, trainer)
        if not self._restored:  # a fresh run: forget any previous fit of this callback object
            self.activated, self.history, self._checked_epoch, self.initial = {}, [], -1, {}
        self._update_pending(nas(pl_module))

    def _update_pending(self, module: NASModule) -> None:
        done = self.steps_done
        finished = all(done.get(b, 0) >= self.steps for b in range(module.arch_spec.num_blocks))
        module.set_search_pending("SnipPruning", not finished)

    # -- when -------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        if epoch == self._checked_epoch:
            return
        self._checked_epoch = epoch
        module = nas(pl_module)
        for b in range(module.active_blocks):
            self.activated.setdefault(b, epoch)
        last_event = self.history[-1][0] if self.history else None
        blocks = self.plan.blocks_at(
            epoch, self.activated, self.steps_done, last_event, module.arch_spec.num_blocks
        )
        if blocks:
            self._prune(trainer, module, blocks, epoch)
        self._log_state(pl_module, module)

    # -- what -------------------------------------------------------------------------------------------
    def _loss(self, out: ExitLogits, y: Tensor) -> Tensor:
        if self.criterion_loss == "final":
            return nn.functional.cross_entropy(out.logits[-1], y)
        total = out.final.new_zeros(())  # summed in exit order, as sum() would
        for lg in out.logits:
            total = total + nn.functional.cross_entropy(lg, y)
        return total

    def _prune(self, trainer: L.Trainer, module: NASModule, blocks: list[int], epoch: int) -> None:
        net = module.net
        scope = self.units.scope(module.prunable_weights(self.include_exits), net, blocks)
        scores = self._scores(trainer, module, scope, epoch)
        ratios = self.ratios(module.arch_spec.num_blocks)
        done = self.steps_done
        before = module.arch_spec.to_dict()
        if isinstance(self.units, StructuredUnits):
            rows = self._prune_units(trainer, module, self.units, blocks, scores, ratios, done, epoch)
        else:
            rows = self._prune_weights(trainer, module, blocks, scores, ratios, done, epoch)
        if not isinstance(self.units, StructuredUnits) and self.remove_dead_edges:
            dead = dead_edges(net, module.masks(), prefix="net.")
            if dead:
                module.set_arch_spec(remove_edges(net, dead, trainer.optimizers))
        if module.arch_spec.to_dict() != before:  # every rank did the same surgery (rank 0's choice)
            rewrap_ddp(trainer)
        self.history.extend(rows)
        self._update_pending(module)
        self._report(trainer, module, rows, epoch)

    def _scores(self, trainer: L.Trainer, module: NASModule, params: dict, epoch: int) -> dict[str, Tensor]:
        current = module.masks()
        data: Any = trainer.datamodule  # has criterion_batches (checked in setup)
        batches = data.criterion_batches(self.criterion_batches, self.criterion_batch_size, seed=epoch)
        device = next(iter(params.values())).device
        gen = torch.Generator(device=device).manual_seed(1_000_003 * (epoch + 1))
        with reinitialized(params, current, gen) if self.reinit else nullcontext():
            return snip_scores(cast(nn.Module, module), batches, self._loss, params)

    def _target(self, ratio: float, step: int) -> float:
        return keep_ratio_steps(ratio, self.steps, self.schedule)[step]

    def _prune_weights(self, trainer, module, blocks, scores, ratios, done, epoch) -> list[tuple]:
        scope = module.prunable_weights(self.include_exits)
        current = module.masks()
        new: dict[str, Tensor] = {}
        rows = []
        for b in blocks:
            step = done.get(b, 0)
            target = self._target(ratios[b], step)
            total = self.initial.setdefault(b, (sum(p.numel() for p in scope[b].values()), 0.0))[0]
            block_masks = snip_block_masks({n: scores[n] for n in scope[b]}, round(target * total), current)
            new.update(block_masks)
            kept = sum(int(m.count_nonzero()) for m in block_masks.values())
            rows.append((epoch, b, step + 1, target, kept, total))
        # ranks score the same images with the same weights; rank 0's masks make sure they agree exactly
        module.set_masks(trainer.strategy.broadcast(new, src=0))
        return rows

    def _prune_units(self, trainer, module, kind, blocks, scores, ratios, done, epoch) -> list[tuple]:
        """Filters or edges: rank each block's units, remove the lowest (surgery), one row per block."""
        net = module.net
        units = kind.units(net, scores, blocks, prefix="net.")
        removed: list = []
        rest: dict[str, list[int]] = {}  # each group's channels not removed, lowest ranked first
        rows = []
        for b in blocks:
            ranked = rank_units(units[b], {u: kind.owner(u) for u in units[b]})
            first = self._initial_units(b, module.arch_spec, len(units[b]))
            step = done.get(b, 0)
            target = self._target(ratios[b], step)
            if self.stop_at == "latency":
                n = self._to_budget(kind, net, removed, ranked, b, target * first[1])
            else:
                n = min(len(ranked), max(0, len(units[b]) - round(target * first[0])))
            removed += ranked[:n]
            for g, k in ranked[n:] if self.round_to > 1 else []:
                rest.setdefault(g, []).append(k)
            rows.append((epoch, b, step + 1, target, len(units[b]) - n, first[0]))
        if self.round_to > 1:  # every group touched keeps a multiple of the step
            sizes = {g.name: g.size for g in net.channel_groups()}
            removed = align_removal(removed, sizes, self.round_to, rest)
        removed = trainer.strategy.broadcast(removed, src=0)  # rank 0's choice on every rank
        if removed:
            module.set_arch_spec(kind.remove(net, removed, trainer.optimizers))
        return rows

    def _to_budget(self, kind, net: Any, removed: list, ranked: list, block: int, budget: float) -> int:
        """Fewest of ``ranked`` to remove (after ``removed``) for the block's predicted latency <= budget."""
        lut = cast(LatencyLUT, self.lut)
        return removal_to_budget(
            ranked, lambda k: lut.block_ms(kind.spec_without(net, removed + ranked[:k]), block), budget
        )

    def _initial_units(self, block: int, spec, units: int) -> tuple[int, float]:
        """The block's units and predicted latency at its first pruning (what the ratios are of)."""
        if block not in self.initial:
            ms = self.lut.block_ms(spec, block) if self.lut is not None else 0.0
            self.initial[block] = (units, ms)
        return self.initial[block]

    # -- logs -------------------------------------------------------------------------------------------
    def _log_state(self, pl_module: L.LightningModule, module: NASModule) -> None:
        masks = module.masks()
        total_kept = 0
        for b, ws in module.prunable_weights(self.include_exits).items():
            kept, total = kept_count(ws, masks), sum(p.numel() for p in ws.values())
            total_kept += kept
            pl_module.log(f"snip/kept_params_block{b}", float(kept), on_step=False, on_epoch=True)
            pl_module.log(f"snip/sparsity_block{b}", 1.0 - kept / total, on_step=False, on_epoch=True)
        pl_module.log("snip/kept_params", float(total_kept), on_step=False, on_epoch=True)
        cmap = connectivity_map(module.net, masks, prefix="net.")
        pl_module.log("snip/dead_edges", float(len(cmap.dead_edges)), on_step=False, on_epoch=True)

    def _report(self, trainer: L.Trainer, module: NASModule, rows: list[tuple], epoch: int) -> None:
        cmap = connectivity_map(module.net, module.masks(), prefix="net.")
        dead = cmap.dead_edges
        title = f"epoch {epoch}: kept fraction per edge, {len(dead)}/{cmap.num_edges} edges dead"
        png = log_picture(  # on every rank (the directory is a collective under DDP)
            trainer,
            "snip/connectivity",
            f"connectivity_epoch{epoch:03d}.png",
            lambda path: cmap.save_png(path, title=title),
            always=True,
        )
        if not trainer.is_global_zero:
            return
        lines = [f"\nSnipPruning at epoch {epoch} ({self.mode}, reinit={self.reinit}):"]
        lines += [
            f"  block {b}: step {s}/{self.steps}, keep {t:.3f}{' of its latency' if self.lut else ''} -> "
            f"{k:,}/{n:,} {self.units.noun} kept"
            for _, b, s, t, k, n in rows
        ]
        lines.append(f"  dead edges: {len(dead)}/{cmap.num_edges}" + (f" {dead}" if dead else ""))
        lines.append(f"  connectivity map: {png}")
        print("\n".join(lines))
        log.info("\n".join(lines))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    "snip/connectivity_table",
                    columns=["target", *cmap.sources],
                    data=cmap.rows(),
                    step=trainer.global_step,
                )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        done = self.steps_done
        unfinished = {
            b: done.get(b, 0) for b in range(module.arch_spec.num_blocks) if done.get(b, 0) < self.steps
        }
        if unfinished and not trainer.fast_dev_run:
            log.warning(
                "SnipPruning: blocks %s did not reach their keep ratio (prunings done per block: %s of %d); "
                "add pruning epochs or train longer",
                sorted(unfinished),
                unfinished,
                self.steps,
            )
        if self.save_found and self.history:
            written = write_found(trainer, module)  # every rank: the directory may be a collective
            if written is not None:
                self.found_paths = written
                print(f"SnipPruning: architecture found -> {written[0]}, masks -> {written[1]}")

    # -- state ------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "keep_ratio": list(self.keep_ratio),
            "mode": self.mode,
            "steps": self.steps,
            "activated": {str(b): e for b, e in self.activated.items()},
            "history": [list(h) for h in self.history],
            "checked_epoch": self._checked_epoch,
            "granularity": self.granularity,
            "initial": {str(b): list(v) for b, v in self.initial.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (list(state_dict["keep_ratio"]), state_dict["mode"], state_dict["steps"])
        if saved != (self.keep_ratio, self.mode, self.steps):
            log.warning(
                "SnipPruning: resuming with keep_ratio/mode/steps %s; the checkpoint was pruned with %s "
                "(weights already pruned stay pruned)",
                (self.keep_ratio, self.mode, self.steps),
                saved,
            )
        self.activated = {int(b): int(e) for b, e in state_dict["activated"].items()}
        self.history = [
            (int(e), int(b), int(s), float(t), int(k), int(n)) for e, b, s, t, k, n in state_dict["history"]
        ]
        self._checked_epoch = int(state_dict["checked_epoch"])
        saved_granularity = state_dict.get("granularity", "weight")
        if saved_granularity != self.granularity:
            raise ValueError(
                f"{_WHO}: the checkpoint was pruned at granularity {saved_granularity!r}; resuming at "
                f"{self.granularity!r} would mix units (resume with granularity: {saved_granularity})"
            )
        self.initial = {int(b): (int(n), float(ms)) for b, (n, ms) in state_dict.get("initial", {}).items()}
        self._restored = True
