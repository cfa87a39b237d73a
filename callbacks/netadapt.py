"""``NetAdapt``: the latency-driven greedy search of Yang et al. 2018 (Liège thesis section 4.6, Algorithm 4).

Example (YAML)::

    netadapt:
      start_epoch: 2            # after pretraining
      stop_at: latency          # or flops, params
      target_fraction: 0.5
      step_fraction: 0.05       # the first iteration's cost reduction, of the start cost
      decay: 0.96
      lut: configs/luts/wrn_fast_local.json
    retrain:
      epoch: 12                 # waits until the search has met its target
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.artifacts import log_picture, write_found
from callbacks.distributed import check_strategy, is_ddp, rewrap_ddp
from callbacks.luts import check_covers, lut_for
from callbacks.searches import refuse_two_searches
from lit_nas.align import check_round_to, resolve_round_to
from lit_nas.cost import MEASURES, spec_cost
from lit_nas.netadapt import CRITERIA, iterate
from lit_nas.plots import live_heatmap
from lit_nas.protocol import NASModule, SearchChanges, nas, require_nas_module
from lit_nas.validation import check_choice, check_target, target_of

_WHO = "NetAdapt"


class NetAdapt(Callback):
    """At the start of each epoch from ``start_epoch``, run NetAdapt iterations until the cost target is met.

    One iteration: for every channel group (channels tied by skip connections are one group), the fewest
    channels whose removal cuts the cost by the current step; a copy with those channels removed (lowest
    filter L2 norm, or lowest Fisher signal) is fine-tuned for ``short_term_batches`` training batches and
    scored on the datamodule's **held-out split** (``data.holdout_size``; never validation, never test). The
    pick (:func:`lit_nas.netadapt.pick_best`): the most accurate candidate if one beats the network, else the
    least accuracy lost per unit of cost. The winner is applied to the network by surgery (optimizer state
    sliced), with the candidate's fine-tuned weights unless ``adopt_finetuned: false``; the step decays by
    ``decay``.
    Candidates are copies: the network and its optimizer state are untouched until then.

    Deterministic (the fine-tuning batches, group sample and dropout draw from seeds of their own) and
    resumable: its state (iteration, step, history) is in every checkpoint. ``val/acc_full`` is NaN until the
    target is met. Compose with ``RetrainFromScratch`` (thesis section 4.6.3), which waits for the search.

    Logs per iteration ``netadapt/cost`` (ms, MFLOPs or params), ``netadapt/holdout_acc``,
    ``netadapt/candidates``, ``netadapt/iteration_s`` (wall time) and ``netadapt/params``; the W&B image
    ``netadapt/channels`` (channels per group across iterations, the thesis's figure 4.15); and writes
    ``found_arch.yaml`` at fit end.

    Args:
        stop_at: what the cost measures: ``latency`` (predicted by ``lut``, ms), ``flops`` (MFLOPs) or
            ``params``.
        target_fraction: stop once the cost is at most this fraction of the start cost, in (0, 1).
        target_value: or once it is at most this value (ms, MFLOPs or parameters).
        step_fraction: the first iteration's cost reduction, as a fraction of the start cost.
        step_value: or in the cost's unit.
        decay: the step is multiplied by this after every iteration, in (0, 1].
        start_epoch: first epoch (0-based) at whose start iterations run (the network trains before).
        iterations_per_epoch: iterations at the start of each epoch (the epoch's training follows them).
        short_term_batches: training batches each candidate is fine-tuned on.
        batch_size: their batch size (default: the datamodule's).
        criterion: which channels of a group go: ``l2`` (filter norm, Yang et al.) or ``fisher`` (4.6.2).
        allow_small_prunings: also propose groups that cannot meet the step, pruned to one channel (4.6.2).
        group_fraction: the fraction of groups tried per iteration, sampled anew each iteration (the speed-up
            the thesis suggests); 1 tries all.
        adopt_finetuned: the network takes the winner's fine-tuned weights (Algorithm 4); ``false`` keeps its
            own weights, without the removed channels.
        lut: latency look-up tables (JSON of :class:`lit_nas.latency.LatencyLUT`) for ``stop_at: latency``.
        seed: seed of the search's own randomness.
        round_to: channel alignment (:mod:`lit_nas.align`): each proposal removes the fewest channels that
            meet the step *in multiples*, leaving its group a multiple of ``round_to`` (one step at least).
            ``None``: the table's step (1 without a table).
    """

    changes: ClassVar[SearchChanges] = "width"  # an ArchitectureSearch (lit_nas.protocol)

    def __init__(
        self,
        stop_at: Literal["latency", "flops", "params"] = "latency",
        target_fraction: float | None = None,
        target_value: float | None = None,
        step_fraction: float | None = 0.05,
        step_value: float | None = None,
        decay: float = 0.96,
        start_epoch: int = 0,
        iterations_per_epoch: int = 1,
        short_term_batches: int = 20,
        batch_size: int | None = None,
        criterion: Literal["l2", "fisher"] = "l2",
        allow_small_prunings: bool = False,
        group_fraction: float = 1.0,
        adopt_finetuned: bool = True,
        lut: str | None = None,
        seed: int = 0,
        round_to: int | None = None,
    ) -> None:
        super().__init__()
        check_round_to(_WHO, round_to)
        check_choice(_WHO, "stop_at", stop_at, MEASURES)
        check_choice(_WHO, "criterion", criterion, CRITERIA)
        check_target(_WHO, target_fraction, target_value)
        if step_value is not None:
            step_fraction = None  # an explicit step replaces the default fraction
        if step_fraction is None and step_value is None:
            raise ValueError(f"{_WHO} needs step_fraction or step_value")
        if step_fraction is not None and not 0 < step_fraction < 1:
            raise ValueError(f"{_WHO} step_fraction must lie in (0, 1); got {step_fraction}")
        if step_value is not None and step_value <= 0:
            raise ValueError(f"{_WHO} step_value must be > 0; got {step_value}")
        if not 0 < decay <= 1:
            raise ValueError(f"{_WHO} decay must lie in (0, 1]; got {decay}")
        for name, v in (
            ("start_epoch", start_epoch),
            ("iterations_per_epoch", iterations_per_epoch),
            ("short_term_batches", short_term_batches),
        ):
            if not isinstance(v, int) or v < (0 if name == "start_epoch" else 1):
                raise ValueError(
                    f"{_WHO} {name} must be an integer >= {int(name != 'start_epoch')}; got {v!r}"
                )
        if not 0 < group_fraction <= 1:
            raise ValueError(f"{_WHO} group_fraction must lie in (0, 1]; got {group_fraction}")
        self.lut = lut_for(_WHO, "stop_at: latency" if stop_at == "latency" else None, lut)
        self.round_to = resolve_round_to(round_to, self.lut)
        self.stop_at, self.target_fraction, self.target_value = stop_at, target_fraction, target_value
        self.step_fraction, self.step_value, self.decay = step_fraction, step_value, decay
        self.start_epoch, self.iterations_per_epoch = start_epoch, iterations_per_epoch
        self.short_term_batches, self.batch_size, self.criterion = short_term_batches, batch_size, criterion
        self.allow_small_prunings, self.group_fraction = allow_small_prunings, group_fraction
        self.adopt_finetuned, self.seed = adopt_finetuned, seed
        # the search's state (checkpointed)
        self.iteration = 0
        self.step: float | None = None
        self.initial: float | None = None
        self.target: float | None = None
        self.cost: float | None = None
        self.done = False
        self.start_sizes: dict[str, int] = {}
        #: one record per iteration: group pruned, channels removed, cost after, held-out accuracies, sizes
        self.history: list[dict[str, Any]] = []

    # -- lifecycle ----------------------------------------------------------------------------------------
    def cost_of(self, spec: Any) -> float:
        """The cost of an architecture, in ``stop_at``'s unit."""
        return spec_cost(spec, self.stop_at, self.lut)

    def last_search_epoch(self) -> float | None:
        """Unknown in advance: the search goes on until the target is met."""
        return None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_two_searches(trainer, "NetAdapt")
        module = require_nas_module(pl_module, _WHO)
        check_covers(_WHO, self.lut, module.arch_spec)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        check_strategy(_WHO, trainer)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "holdout_batches") or not hasattr(dm, "criterion_batches"):
            raise ValueError(f"{_WHO} needs a lit_nas datamodule (holdout_batches, criterion_batches)")
        if not getattr(dm, "holdout_size", 0):
            raise ValueError(
                f"{_WHO} picks candidates on a held-out split: set data holdout_size (e.g. "
                "--data.init_args.holdout_size 2000); it is never validation nor test data"
            )
        if self.initial is None:  # a fresh run (a resume restores the search)
            self.initial = self.cost = self.cost_of(module.arch_spec)
            self.target = target_of(_WHO, self.stop_at, self.initial, self.target_fraction, self.target_value)
            self.step = self.step_value if self.step_value is not None else self.initial * self.step_fraction
            self.start_sizes = {g.name: g.size for g in module.channel_groups()}
        module.set_search_pending(_WHO, not self.done)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done or trainer.current_epoch < self.start_epoch:
            return
        module = nas(pl_module)
        for _ in range(self.iterations_per_epoch):
            self._iterate(trainer, module)
            if self.done:
                break

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history and not trainer.fast_dev_run:
            written = write_found(trainer, nas(pl_module))
            if written is not None:
                print(f"{_WHO}: architecture found -> {written[0]}")

    # -- one iteration ------------------------------------------------------------------------------------
    def _iterate(self, trainer: L.Trainer, module: NASModule) -> None:
        if self.cost is None or self.step is None or self.target is None:
            raise RuntimeError(f"{_WHO}: on_fit_start did not run before the first iteration")
        started = time.perf_counter()
        net = module.net
        device = next(net.parameters()).device
        dm = trainer.datamodule
        bs = self.batch_size or dm.batch_size
        tune = [
            (x.to(device), y.to(device))
            for x, y in dm.criterion_batches(self.short_term_batches, bs, seed=1000 + self.iteration)
        ]
        holdout = [(x.to(device), y.to(device)) for x, y in dm.holdout_batches()]
        opt = trainer.optimizers[0]

        def make_optimizer(params: Any) -> torch.optim.Optimizer:
            return type(opt)(params, **{**opt.defaults, "lr": opt.param_groups[0]["lr"]})

        def agree(choice: tuple[int, torch.Tensor]) -> tuple[int, torch.Tensor]:
            # every rank ran the same candidates on the same images; rank 0 decides
            return trainer.strategy.broadcast(choice, src=0) if is_ddp(trainer) else choice

        done = iterate(
            net,
            tune,
            holdout,
            module.exit_weights(),
            self.cost_of,
            self.cost,
            self.step,
            make_optimizer,
            trainer.optimizers,
            criterion=self.criterion,
            group_fraction=self.group_fraction,
            allow_small_prunings=self.allow_small_prunings,
            adopt_finetuned=self.adopt_finetuned,
            seed=self.seed * 1_000_003 + self.iteration,
            agree=agree,
            round_to=self.round_to,
        )
        if done is None:
            self._finish(module, f"no group can cut {self.step:.4g} any more; target not reached")
            return
        module.set_arch_spec(net.spec)
        rewrap_ddp(trainer)  # new shapes; DDP also broadcasts rank 0's (fine-tuned) weights
        self.cost = self.cost_of(module.arch_spec)
        self.step *= self.decay
        self.iteration += 1
        sizes = {g.name: g.size for g in module.channel_groups()}
        wall = time.perf_counter() - started
        self.history.append(
            {
                "group": done.group,
                "removed": done.removed,
                "cost": self.cost,
                "base_acc": done.base_acc,
                "acc": done.acc,
                "candidates": done.candidates,
                "seconds": wall,
                "sizes": sizes,
            }
        )
        for key, value in (
            ("netadapt/cost", self.cost),
            ("netadapt/holdout_acc", done.acc),
            ("netadapt/candidates", done.candidates),
            ("netadapt/iteration_s", wall),
            ("netadapt/params", module.costs().total_params),
        ):
            module.log(key, float(value), on_step=False, on_epoch=True)
        print(
            f"\n{_WHO} iteration {self.iteration}: {done.group} -{done.removed} channels, {self.stop_at} "
            f"{self.cost:.4g} (target {self.target:.4g}), held-out acc {done.base_acc:.4f} -> "
            f"{done.acc:.4f}, {done.candidates} candidates in {wall:.1f} s"
        )
        log_picture(
            trainer,
            "netadapt/channels",
            f"channels_iter{self.iteration:03d}.png",
            lambda path: live_heatmap(
                [h["sizes"] for h in self.history],
                self.start_sizes,
                list(range(1, self.iteration + 1)),
                path,
                xlabel="iteration",
            ),
        )
        if self.cost <= self.target:
            self._finish(module, f"target met: {self.stop_at} {self.cost:.4g} <= {self.target:.4g}")

    def _finish(self, module: NASModule, why: str) -> None:
        self.done = True
        module.set_search_pending(_WHO, False)
        print(f"\n{_WHO}: {why} after {self.iteration} iterations")

    # -- state --------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        keys = ("iteration", "step", "initial", "target", "cost", "done", "start_sizes", "history")
        return {k: getattr(self, k) for k in keys}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)
