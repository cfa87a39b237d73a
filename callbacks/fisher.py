"""``FisherPruning``: gate off, one by one, the channels whose removal costs the least loss.

Theis et al. 2018, as used by Crowley et al. 2018 and the Liège thesis (section 4.2.3, eq. 4.10; section
4.4): every ``every_n_steps`` training steps, the ``per_step`` live channels with the lowest Fisher signal
``Delta_k`` (or the lowest ``Delta_k / Delta cost_k`` with a cost) are gated off and the signals restart.

Example (YAML)::

    fisher:
      every_n_steps: 100
      cost: flops
      stop_at: flops
      target_fraction: 0.5
    gc:
      after_prune: true
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.artifacts import log_picture
from callbacks.distributed import all_reduce_sum, check_strategy, is_ddp
from callbacks.luts import check_covers, lut_for
from callbacks.searches import GROUP_SCOPES, refuse_trainable_gates, refuse_two_searches, scoped_groups
from lit_nas.align import check_round_to, resolve_round_to
from lit_nas.cost import CostReport, channel_flops, count_costs, spec_cost
from lit_nas.fisher import CRITERIA, FisherAccumulator, l1_scores, random_scores, select_channels
from lit_nas.gates import attach_gates, close_channels, gated_groups
from lit_nas.latency import channel_latency
from lit_nas.plots import channel_chart
from lit_nas.protocol import NASModule, SearchChanges, nas, require_nas_module
from lit_nas.surgery import collect_gated
from lit_nas.validation import check_choice, check_target, target_of

log = logging.getLogger(__name__)

COSTS = ("none", "flops", "latency")
TARGETS = ("channels", "params", "flops", "latency")
_WHO = "FisherPruning"


class FisherPruning(Callback):
    """Fisher channel pruning of the network's channel groups, until a target is met.

    A binary gate (:mod:`lit_nas.gates`) follows every BatchNorm producing a pruned group; a pruned channel
    is gated to exactly 0, so :class:`~callbacks.GarbageCollection` can remove it without changing the
    network's function. Channels tied by residual additions form one group, are scored by the signal summed
    over the group and pruned together. No group is ever left with 0 live channels.

    While the target is not met, ``val/acc_full`` is NaN (model selection waits for the pruned network).
    Logs ``fisher/channels`` (live channels in the pruned groups), ``fisher/params`` and ``fisher/mflops``
    (of the network once its gated channels are collected; FLOPs to the last exit) after each prune event,
    and a bar chart of the live channels per group (W&B image ``fisher/channels_chart``) every epoch.

    Args:
        every_n_steps: training steps over which the signal is accumulated before each prune event.
        per_step: channels gated off at each event.
        cost: ``none`` ranks by ``Delta_k``; ``flops`` by ``Delta_k`` over the FLOPs one channel of its group
            costs (:func:`lit_nas.cost.channel_flops`); ``latency`` by ``Delta_k`` over the latency one
            channel costs, predicted by the look-up tables ``lut`` (:func:`lit_nas.latency.channel_latency`,
            Liège thesis section 4.4.2).
        stop_at: what the target measures: ``channels`` (live channels in the pruned groups), ``params``,
            ``flops`` (to the last exit) or ``latency`` (predicted by ``lut``, full model, milliseconds).
        target_fraction: stop once ``stop_at`` is at most this fraction of its value at the start, in (0, 1).
        target_value: or stop once it is at most this value (channels, parameters, MFLOPs or ms).
        scope: ``all`` channel groups, or ``inner``: only the inner width of each residual cell
            (``cell<i>.mid``), as Crowley et al. did, so the residual streams keep their width.
        start_epoch: first epoch (0-based) whose steps accumulate the signal (a pretraining phase before).
        lut: latency look-up tables (JSON of :class:`lit_nas.latency.LatencyLUT`) for the ``latency``
            cost or target; they must cover the network's layers.
        round_to: channel alignment (:mod:`lit_nas.align`): each event removes whole units, a group's
            lowest-scored channels down to its next multiple of ``round_to`` (never below one step), priced
            per step; every pruned group ends aligned. The event that reaches a ``params``/``flops``/
            ``latency`` target takes the one unit that lands closest below it.
            ``None``: the table's step (1 without a table).
        criterion: what ranks the channels: ``fisher`` (``Delta_k``, the method), or a control that tells
            whether the signal matters, everything else (schedule, cost, alignment, target) unchanged:
            ``l1`` (:func:`lit_nas.fisher.l1_scores`, the L1 norm of the producing filters) or ``random``
            (:func:`lit_nas.fisher.random_scores`, drawn from the run's seed and the step).
    """

    changes: ClassVar[SearchChanges] = "width"  # an ArchitectureSearch (lit_nas.protocol)

    def __init__(
        self,
        every_n_steps: int = 100,
        per_step: int = 1,
        cost: Literal["none", "flops", "latency"] = "none",
        stop_at: Literal["channels", "params", "flops", "latency"] = "channels",
        target_fraction: float | None = None,
        target_value: float | None = None,
        scope: Literal["all", "inner"] = "all",
        start_epoch: int = 0,
        lut: str | None = None,
        round_to: int | None = None,
        criterion: Literal["fisher", "l1", "random"] = "fisher",
    ) -> None:
        super().__init__()
        check_choice(_WHO, "criterion", criterion, CRITERIA)
        self.criterion = criterion
        check_round_to(_WHO, round_to)
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"FisherPruning every_n_steps must be an integer >= 1; got {every_n_steps!r}")
        if not isinstance(per_step, int) or per_step < 1:
            raise ValueError(f"FisherPruning per_step must be an integer >= 1; got {per_step!r}")
        check_choice(_WHO, "cost", cost, COSTS)
        check_choice(_WHO, "stop_at", stop_at, TARGETS)
        priced = (
            "cost: latency" if cost == "latency" else "stop_at: latency" if stop_at == "latency" else None
        )
        self.lut = lut_for(_WHO, priced, lut)
        self.round_to = resolve_round_to(round_to, self.lut)
        check_target(_WHO, target_fraction, target_value)
        check_choice(_WHO, "scope", scope, GROUP_SCOPES)
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"FisherPruning start_epoch must be an integer >= 0; got {start_epoch!r}")
        self.every_n_steps = every_n_steps
        self.per_step = per_step
        self.cost = cost
        self.stop_at = stop_at
        self.target_fraction = target_fraction
        self.target_value = target_value
        self.scope = scope
        self.start_epoch = start_epoch
        self.steps = 0  # accumulating steps seen
        self.initial: float | None = None  # stop_at's value when pruning began
        self.target: float | None = None
        self.done = False
        #: ``(global step, [[group, channel], ...], stop_at value after)`` of every prune event
        self.history: list[tuple[int, list[list[Any]], float]] = []
        self._acc: FisherAccumulator | None = None
        self._acc_state: dict[str, Any] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_two_searches(trainer, "FisherPruning")
        module = require_nas_module(pl_module, _WHO)
        check_covers(_WHO, self.lut, module.arch_spec)
        if stage == "fit":
            # before configure_optimizers, as on a resume (the checkpoint recreates them): the optimizer
            # then has the same parameter groups either way (the gates are frozen, in the no-decay group)
            attach_gates(module.net, self.groups(module))

    def last_search_epoch(self) -> float | None:
        """Unknown in advance: pruning goes on until the target is met."""
        return None

    def groups(self, module: NASModule) -> list[str]:
        """Names of the channel groups this callback prunes."""
        return scoped_groups(module, self.scope)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        check_strategy(_WHO, trainer)
        groups = self.groups(module)
        gates = attach_gates(module.net, groups)  # after any checkpoint restore: the loaded gates
        refuse_trainable_gates(_WHO, gates)
        # under DDP each step's signal is summed over the ranks: all of them hold the global batch's
        reduce = (lambda tensors: all_reduce_sum(trainer, tensors)) if is_ddp(trainer) else None
        self._acc = FisherAccumulator(module.net, groups, reduce=reduce)
        if self._acc_state is not None:
            self._acc.load_state_dict(self._acc_state)
        self._acc.attach()
        if self.initial is None:  # a fresh run (a resume restores them)
            self.initial = self._measure(module)
            self.target = target_of(
                _WHO, self.stop_at, self.initial, self.target_fraction, self.target_value, self._fmt
            )
        module.set_search_pending(_WHO, not self.done)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._acc is not None:
            self._acc.detach()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.on_fit_end(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._acc is not None:
            self._acc.enabled = self._active(trainer)

    def _active(self, trainer: L.Trainer) -> bool:
        return not self.done and trainer.current_epoch >= self.start_epoch

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._acc is not None and self._acc.enabled:
            self._acc.end_step()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._acc is None or not self._active(trainer):
            return
        self.steps += 1
        if self.steps % self.every_n_steps == 0:
            self._prune(trainer, nas(pl_module))

    # -- the prune event ----------------------------------------------------------------------------------
    def _prune(self, trainer: L.Trainer, module: NASModule) -> None:
        if self._acc is None:
            return
        gates = gated_groups(module.net)
        scores = self._acc.scores()
        live = {g: gates[g].detach() != 0 for g in scores}
        if self.criterion == "l1":
            scores = l1_scores(module.net, scores)
        elif self.criterion == "random":  # the run's seed and the step: a resume draws the same
            scores = random_scores(live, (torch.initial_seed() + trainer.global_step) % 2**63)
        landing = self.round_to > 1 and self.target is not None and self.stop_at != "channels"
        before = self._collected(module) if landing or self.cost == "latency" else None
        costs: dict[str, float] | None = None
        if self.cost == "flops":
            costs = dict(channel_flops(module.net))
        elif self.cost == "latency" and self.lut is not None:
            costs = channel_latency(self.lut, before, self.round_to)
        chosen = select_channels(scores, live, self.per_step, costs, self.round_to)
        if landing:
            chosen = self._landing(before, scores, live, costs, chosen)
        if is_ddp(trainer):  # equal sums on every rank; rank 0's choice makes ties agree bit for bit
            chosen = trainer.strategy.broadcast(chosen, src=0)
        close_channels(module.net, chosen)
        self._acc.reset()
        probe = self._collected(module)  # what the network is once collected: one copy for every figure
        report = count_costs(probe)
        value = self._measure(module, probe)
        self.history.append((trainer.global_step, [[g, k] for g, k in chosen], value))
        for key, v in (
            ("fisher/channels", self._live_channels(module)),
            ("fisher/params", report.total_params),
            ("fisher/mflops", _mflops(module, report)),
            ("fisher/pruned", sum(len(c) for _, c, _ in self.history)),
            *([("fisher/latency_ms", self.lut.predict(probe.spec))] if self.lut is not None else []),
        ):
            module.log(key, float(v), on_step=True, on_epoch=False)
        if self.target is not None and value <= self.target:
            self._finish(module, f"target met: {self.stop_at} {self._fmt(value)} <= {self._fmt(self.target)}")
        elif not chosen:
            self._finish(module, "every pruned group is down to one live channel; target not reached")

    def _finish(self, module: NASModule, why: str) -> None:
        self.done = True
        if self._acc is not None:
            self._acc.enabled = False
        module.set_search_pending(_WHO, False)
        pruned = sum(len(c) for _, c, _ in self.history)
        print(f"\n{_WHO}: {why} after {pruned} channels in {len(self.history)} events")

    def _live_channels(self, module: NASModule) -> int:
        gates = gated_groups(module.net)
        return sum(int((gates[g] != 0).sum()) for g in self.groups(module))

    @staticmethod
    def _collected(module: NASModule) -> Any:
        """A copy of the network with its gated-off channels collected (the network itself is untouched)."""
        probe = copy.deepcopy(module.net)
        collect_gated(probe)
        return probe

    def _measure(self, module: NASModule, probe: Any = None) -> float:
        """``stop_at``'s value; ``probe``: the collected copy when the caller already has one."""
        if self.stop_at == "channels":
            return float(self._live_channels(module))
        probe = probe if probe is not None else self._collected(module)
        if self.stop_at == "latency" and self.lut is not None:
            return self.lut.predict(probe.spec)
        report = count_costs(probe)
        return float(report.total_params) if self.stop_at == "params" else _mflops(module, report)

    def _landing(
        self,
        probe: Any,
        scores: dict[str, Any],
        live: dict[str, Any],
        costs: dict[str, float] | None,
        chosen: list[tuple[str, int]],
    ) -> list[tuple[str, int]]:
        """The event that reaches the target, in whole units: the one unit that lands closest below it.

        A unit of ``round_to`` channels of a wide, high-resolution group can cut far past the target, so
        when ``chosen`` would reach it, every group's next unit (its lowest-scored channels) is priced alone
        and the one whose network stays closest below the target is taken; Fisher's ranking decides every
        event before. ``probe``: the network now, collected. ``chosen`` as it is when no unit reaches it.
        """
        if not chosen or self.target is None:
            return chosen
        sizes = {g.name: g.size for g in probe.channel_groups()}

        def value(cut: dict[str, int]) -> float:
            spec = probe.resized_spec_all({g: sizes[g] - n for g, n in cut.items()})
            return self.lut.predict(spec) if self.stop_at == "latency" else spec_cost(spec, self.stop_at)

        cut: dict[str, int] = {}
        for g, _ in chosen:
            cut[g] = cut.get(g, 0) + 1
        if value(cut) > self.target:
            return chosen
        best: tuple[float, list[tuple[str, int]]] | None = None
        for group in scores:
            price = {group: costs[group]} if costs is not None else None
            unit = select_channels({group: scores[group]}, {group: live[group]}, 1, price, self.round_to)
            if not unit:
                continue
            v = value({group: len(unit)})
            if v <= self.target and (best is None or v > best[0]):
                best = (v, unit)
        return best[1] if best is not None else chosen

    def _fmt(self, value: float) -> str:
        if self.stop_at == "latency":
            return f"{value:.3f} ms"
        return f"{value:.2f} MFLOPs" if self.stop_at == "flops" else f"{value:,.0f}"

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._acc is None:
            return
        gates = gated_groups(pl_module.net)
        live = {g: int((gates[g] != 0).sum()) for g in self._acc.groups if g in gates}
        epoch = trainer.current_epoch
        log_picture(
            trainer,
            "fisher/channels_chart",
            f"live_epoch{epoch:03d}.png",
            lambda path: channel_chart(live, path, title=f"live channels, epoch {epoch}"),
        )

    # -- state --------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "initial": self.initial,
            "target": self.target,
            "done": self.done,
            "history": [[s, c, v] for s, c, v in self.history],
            "accumulator": self._acc.state_dict() if self._acc is not None else self._acc_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.initial = state_dict["initial"]
        self.target = state_dict["target"]
        self.done = bool(state_dict["done"])
        self.history = [(int(s), [list(x) for x in c], float(v)) for s, c, v in state_dict["history"]]
        self._acc_state = state_dict["accumulator"]


def _mflops(module: NASModule, report: CostReport) -> float:
    """MFLOPs of one image through the whole network to its last exit."""
    return report.flops_to_exit(module.arch_spec.exit_blocks(active_only=False)[-1]) / 1e6
