"""``MorphNet``: shrink by a cost-weighted L1 penalty on BatchNorm scales, expand, shrink again.

Gordon et al. 2018; Liège thesis section 4.7. Reuses the channel gates and ``GarbageCollection``: a dead
channel's gate closes, the collection removes it.

Example (YAML)::

    morphnet:
      strength: 0.5
      cost: flops             # or latency, with lut
      threshold: 0.01
      until_epoch: 9
      expand_epochs: [5]      # optional: widen to the budget at the start of epoch 5, then shrink again
      budget_fraction: 1.0
    gc:
      epochs: null            # collect at the end of every epoch
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from callbacks.artifacts import log_picture
from callbacks.distributed import check_strategy, is_ddp, rewrap_ddp
from callbacks.luts import check_covers, lut_for
from callbacks.searches import refuse_trainable_gates, refuse_two_searches
from lit_nas.align import check_round_to, resolve_round_to
from lit_nas.cost import channel_flops, spec_cost
from lit_nas.gates import attach_gates, close_channels, gated_groups
from lit_nas.latency import channel_latency
from lit_nas.morphnet import dead_channels, expand, penalty, producer_norms
from lit_nas.plots import channel_chart
from lit_nas.protocol import NASModule, SearchChanges, nas, require_nas_module
from lit_nas.surgery import collect_gated
from lit_nas.validation import check_choice

_WHO = "MorphNet"
COSTS = ("flops", "latency")


class MorphNet(Callback):
    """Train with ``strength * sum_channels cost_channel * |gamma_channel|``; close the channels that die.

    Each channel's cost is what removing one channel of its group saves (FLOPs, or latency from ``lut``), in
    units of the network's whole cost when the costs are computed (every epoch start, on the network as it is
    then), so ``strength`` does not depend on the network's size. Channels tied by skip connections are
    penalised by their largest ``|gamma|`` (L-infinity group LASSO). At the end of every epoch from
    ``start_epoch`` to ``until_epoch``, the live channels whose largest ``|gamma|`` is below ``threshold``
    are gated off (a group keeps its strongest channel); ``GarbageCollection`` removes them.

    The expand step: at the start of each epoch in ``expand_epochs``, the network found so far (collected)
    is widened by the one factor that makes it cost the budget (``budget_fraction`` of the start cost, or
    ``budget_value``), rebuilt with fresh weights and a fresh optimizer, and shrunk again; an expansion at
    ``until_epoch + 1`` ends the search with the network that meets the budget, trained from scratch (Gordon
    et al.'s last step). With the latency cost no group grows past its start width: the look-up tables
    were measured for the start network and price nothing wider.

    Logs ``morphnet/penalty`` every step, ``morphnet/dead`` (channels closed), ``morphnet/channels`` and
    ``morphnet/cost`` each epoch, ``morphnet/expand_factor`` at each expansion, and the W&B bar chart
    ``morphnet/channels_chart``. ``val/acc_full`` is NaN until ``until_epoch`` has passed.

    Args:
        strength: lambda, > 0.
        cost: ``flops`` or ``latency`` (with ``lut``).
        threshold: ``|gamma|`` below which a channel is dead.
        start_epoch: first epoch (0-based) whose end closes dead channels (the penalty applies from it).
        until_epoch: last epoch of the search (penalty and closing); ``None``: to the end of training.
        expand_epochs: epochs at whose start the network is widened to the budget (at most
            ``until_epoch + 1``).
        budget_fraction: the expand step's budget as a fraction of the start cost.
        budget_value: or in the cost's unit (MFLOPs or ms).
        lut: latency look-up tables (JSON of :class:`lit_nas.latency.LatencyLUT`) for ``cost: latency``.
        round_to: channel alignment (:mod:`lit_nas.align`): the expand step widens every group to a
            multiple of ``round_to``, and its collection keeps silent channels to fill the last tile (put
            ``round_to`` on GarbageCollection too, for the collections between). ``None``: the table's step
            (1 without a table).
    """

    changes: ClassVar[SearchChanges] = "width"  # an ArchitectureSearch (lit_nas.protocol)

    def __init__(
        self,
        strength: float,
        cost: Literal["flops", "latency"] = "flops",
        threshold: float = 1e-2,
        start_epoch: int = 0,
        until_epoch: int | None = None,
        expand_epochs: list[int] | None = None,
        budget_fraction: float | None = None,
        budget_value: float | None = None,
        lut: str | None = None,
        round_to: int | None = None,
    ) -> None:
        super().__init__()
        check_round_to(_WHO, round_to)
        if not strength > 0:
            raise ValueError(f"{_WHO} strength must be > 0; got {strength}")
        check_choice(_WHO, "cost", cost, COSTS)
        if not threshold > 0:
            raise ValueError(f"{_WHO} threshold must be > 0; got {threshold}")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"{_WHO} start_epoch must be an integer >= 0; got {start_epoch!r}")
        if until_epoch is not None and (not isinstance(until_epoch, int) or until_epoch < start_epoch):
            raise ValueError(
                f"{_WHO} until_epoch must be an integer >= start_epoch={start_epoch}; got {until_epoch!r}"
            )
        expand_epochs = list(expand_epochs or [])
        if sorted(set(expand_epochs)) != expand_epochs or any(
            not isinstance(e, int) or e < 1 for e in expand_epochs
        ):
            raise ValueError(
                f"{_WHO} expand_epochs must be strictly increasing integers >= 1; got {expand_epochs}"
            )
        if expand_epochs and until_epoch is not None and expand_epochs[-1] > until_epoch + 1:
            raise ValueError(
                f"{_WHO} expand_epochs {expand_epochs} must be at most until_epoch + 1 = {until_epoch + 1} "
                "(an expansion right after the search gives the network that meets the budget)"
            )
        if expand_epochs and (budget_fraction is None) == (budget_value is None):
            raise ValueError(
                f"{_WHO} expand_epochs need exactly one of budget_fraction and budget_value; got "
                f"budget_fraction={budget_fraction}, budget_value={budget_value}"
            )
        for name, v in (("budget_fraction", budget_fraction), ("budget_value", budget_value)):
            if v is not None and v <= 0:
                raise ValueError(f"{_WHO} {name} must be > 0; got {v}")
        self.lut = lut_for(_WHO, "cost: latency" if cost == "latency" else None, lut)
        self.round_to = resolve_round_to(round_to, self.lut)
        self.strength, self.cost, self.threshold = float(strength), cost, float(threshold)
        self.start_epoch, self.until_epoch, self.expand_epochs = start_epoch, until_epoch, expand_epochs
        self.budget_fraction, self.budget_value = budget_fraction, budget_value
        self.initial: float | None = None  # the start network's cost
        self.start_sizes: dict[str, int] = {}  # its group widths
        self.expanded: list[tuple[int, float]] = []  # (epoch, factor) of every expansion done
        self.closed = 0
        self._costs: dict[str, float] = {}
        self._costs_for = -1  # the epoch ``_costs`` were computed for (at the previous epoch's end)
        self._norms: dict[str, list[Any]] = {}  # each group's producing BatchNorms, found at epoch start
        self._epoch = -1  # the epoch running, and the network the penalty reads (set at each epoch start)
        self._net: Any = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def last_search_epoch(self) -> float | None:
        """The last epoch that changes the network (``inf``: to the end of training)."""
        if self.until_epoch is None:
            return float("inf")
        return float(max([self.until_epoch, *self.expand_epochs]))

    def _measure(self, spec: Any) -> float:
        return spec_cost(spec, "latency" if self.cost == "latency" else "flops", self.lut)

    def _priced(self, spec: Any) -> float:
        """``_measure``, with a network wider than the look-up tables priced out (over any budget)."""
        try:
            return self._measure(spec)
        except KeyError:  # outside the tables: the expansion must not pick what it cannot price
            return float("inf")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_two_searches(trainer, "MorphNet")
        module = require_nas_module(pl_module, _WHO)
        check_covers(_WHO, self.lut, module.arch_spec)
        if stage == "fit":  # before configure_optimizers, as on a resume: the gates are frozen masks
            attach_gates(module.net, [g.name for g in module.channel_groups()])

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        check_strategy(_WHO, trainer)
        gates = attach_gates(module.net, [g.name for g in module.channel_groups()])
        refuse_trainable_gates(_WHO, gates)
        if self.initial is None:
            self.initial = self._measure(module.arch_spec)
            self.start_sizes = {g.name: g.size for g in module.channel_groups()}
        module.add_loss_term("morphnet/penalty", self._loss)
        module.set_search_pending(_WHO, self._searching(trainer.current_epoch))

    def _searching(self, epoch: int) -> bool:
        """Whether the network will still change: shrinking, or an expansion still to come."""
        later = [e for e in self.expand_epochs if e >= epoch and all(e != done for done, _ in self.expanded)]
        return self.until_epoch is None or epoch <= self.until_epoch or bool(later)

    def _shrinking(self, epoch: int) -> bool:
        return self.until_epoch is None or epoch <= self.until_epoch

    def _active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and self._shrinking(epoch)

    def _loss(self, images: Tensor, targets: Tensor, outputs: Any) -> Tensor:
        if self._net is None or not self._active(self._epoch):
            return images.new_zeros(())
        return self.strength * penalty(self._net, self._costs, self._norms)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        epoch = trainer.current_epoch
        if epoch in self.expand_epochs and all(e != epoch for e, _ in self.expanded):
            self._expand(trainer, module)
        self._epoch, self._net = epoch, module.net
        module.set_search_pending(_WHO, self._searching(epoch))
        if self._active(epoch):
            if self._costs_for != epoch:  # first epoch, a resume or an expansion: the end of the last didn't
                probe = copy.deepcopy(module.net)
                collect_gated(probe)
                self._costs = self._channel_costs(probe)
            # after any collection or expansion: the modules the penalty reads all epoch
            self._norms = producer_norms(module.net, self._costs)

    def _channel_costs(self, probe: Any) -> dict[str, float]:
        """Per-channel cost of every group, in units of the network's whole cost (``probe``: collected)."""
        if self.lut is not None:
            total, per = self.lut.predict(probe.spec), channel_latency(self.lut, probe)
        else:
            total, per = (
                self._measure(probe.spec) * 1e6,
                {k: float(v) for k, v in channel_flops(probe).items()},
            )
        return {g: (c / total if c != float("inf") else 0.0) for g, c in per.items()}

    def _expand(self, trainer: L.Trainer, module: NASModule) -> None:
        collect_gated(module.net, trainer.optimizers, self.round_to)
        module.set_arch_spec(module.net.spec)
        budget = self.budget_value if self.budget_value is not None else self.initial * self.budget_fraction
        # priced by look-up tables measured for the start network: no group grows past its start width
        caps = self.start_sizes if self.lut is not None else None
        spec, factor = expand(module.net, self._priced, budget, caps, round_to=self.round_to)
        spec.gated = {}
        module.set_arch_spec(spec, rebuild=True)
        attach_gates(module.net, [g.name for g in module.channel_groups()])
        rewrap_ddp(trainer)  # new parameters: DDP wraps them anew and broadcasts rank 0's initialisation
        trainer.strategy.setup_optimizers(trainer)  # the new parameters, a fresh state and schedule
        self.expanded.append((trainer.current_epoch, factor))
        self._costs_for = -1  # a new network: its costs are computed anew
        module.log("morphnet/expand_factor", factor, on_step=False, on_epoch=True)
        print(f"\n{_WHO}: expanded x{factor:.3f} to {self._measure(spec):.4g} (budget {budget:.4g})")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = nas(pl_module)
        epoch = trainer.current_epoch
        if not self._active(epoch):
            return
        groups = [g.name for g in module.channel_groups()]
        dead = dead_channels(module.net, groups, self.threshold)
        if is_ddp(trainer):  # DDP keeps the scales equal on every rank; rank 0's list makes ties agree
            dead = trainer.strategy.broadcast(dead, src=0)
        close_channels(module.net, dead)
        self.closed += len(dead)
        gates = gated_groups(module.net)
        live = {g: int((gates[g] != 0).sum()) for g in groups}
        probe = copy.deepcopy(module.net)  # what GarbageCollection will leave: the next epoch's costs too
        collect_gated(probe)
        if self._active(epoch + 1):
            self._costs, self._costs_for = self._channel_costs(probe), epoch + 1
        for key, value in (
            ("morphnet/dead", len(dead)),
            ("morphnet/channels", sum(live.values())),
            ("morphnet/cost", self._measure(probe.spec)),
        ):
            module.log(key, float(value), on_step=False, on_epoch=True)
        log_picture(
            trainer,
            "morphnet/channels_chart",
            f"live_epoch{epoch:03d}.png",
            lambda path: channel_chart(live, path, title=f"live channels, epoch {epoch}"),
        )
        module.set_search_pending(_WHO, self._searching(epoch + 1))

    # -- state --------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "start_sizes": dict(self.start_sizes),
            "expanded": [list(e) for e in self.expanded],
            "closed": self.closed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict["initial"]
        self.start_sizes = dict(state_dict.get("start_sizes", {}))
        self.expanded = [(int(e), float(f)) for e, f in state_dict["expanded"]]
        self.closed = int(state_dict["closed"])
