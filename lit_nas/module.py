"""``MultiExitModule``: the single LightningModule of lit_nas.

It trains a multi-exit network on the weighted sum of its active exits' cross-entropies, logs per-exit
metrics, evaluates confidence-threshold early exit at test time, and keeps the architecture (an
:class:`~lit_nas.arch.ArchSpec`) in every checkpoint so that a network changed by callbacks (growing,
surgery) is rebuilt exactly when loaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_nas.arch import ArchSpec, DataShape
from lit_nas.cost import CostReport, count_costs, format_costs
from lit_nas.early_exit import EarlyExitResult, early_exit, format_table
from lit_nas.masks import (
    apply_masks,
    attach_masks,
    ensure_mask_buffers,
    get_masks,
    load_masks,
    mask_grads,
    mask_optimizer_state,
    masked_pairs,
)
from lit_nas.nets import build_net, check_runs
from lit_nas.nets.base import ChannelGroup, ExitLogits, MultiExitNet
from lit_nas.nets.recipe import NetConfig
from lit_nas.objectives import ExitLossConfig, exit_weights, multi_exit_loss
from lit_nas.optim import LRScheduleConfig, OptimizerConfig
from lit_nas.protocol import LossTerm
from lit_nas.runs import NonFiniteError, first_non_finite

log = logging.getLogger(__name__)

#: Checkpoint key of the architecture.
ARCH_KEY = "lit_nas_arch_spec"
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
STAGES = ("train", "val", "test")


class CheckpointArchError(RuntimeError):
    """A checkpoint's architecture entry is missing or unreadable."""


def _coerce(cls: type, value: Any) -> Any:
    # Hyper-parameters are stored as plain dicts (weights_only-safe); rebuild the dataclass on load.
    return cls(**value) if isinstance(value, Mapping) else value


class MultiExitModule(L.LightningModule):
    """Trains a multi-exit network: one loss, per-exit metrics, early-exit evaluation.

    Args:
        net: recipe of the network (ignored when ``arch_spec`` is given).
        arch_spec: path to a saved :class:`ArchSpec` (YAML/JSON) to train instead of ``net``.
        masks: path to a masks file (``found_masks.pt``, :func:`lit_nas.masks.save_masks`) whose weight masks
            are applied from the start and kept (a found connectivity retrained from scratch); its
            architecture must be the one trained.
        data_shape: input channels, size and classes; linked from the datamodule by the CLI.
        exit_loss: weighting of the exits' losses.
        optimizer: optimizer settings.
        lr_schedule: learning-rate schedule (per epoch or per optimizer step).
        thresholds: early-exit confidence thresholds reported at test time.
    """

    def __init__(
        self,
        net: NetConfig | None = None,
        arch_spec: str | None = None,
        masks: str | None = None,
        data_shape: DataShape | None = None,
        exit_loss: ExitLossConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        lr_schedule: LRScheduleConfig | None = None,
        thresholds: list[float] | None = None,
    ) -> None:
        super().__init__()
        net = _coerce(NetConfig, net) or NetConfig()
        data_shape = _coerce(DataShape, data_shape)
        self.exit_loss = _coerce(ExitLossConfig, exit_loss) or ExitLossConfig()
        self.optimizer_config = _coerce(OptimizerConfig, optimizer) or OptimizerConfig()
        self.lr_schedule_config = _coerce(LRScheduleConfig, lr_schedule) or LRScheduleConfig()
        self.thresholds = list(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        if any(not 0 <= q <= 1 for q in self.thresholds):
            raise ValueError(f"early-exit thresholds must lie in [0, 1]; got {self.thresholds}")
        if arch_spec is not None:
            spec = ArchSpec.load(arch_spec)
            if (
                data_shape is not None
                and DataShape(spec.in_channels, spec.input_size, spec.num_classes) != data_shape
            ):
                raise ValueError(f"ArchSpec {arch_spec!r} was built for other data than {data_shape}")
        elif data_shape is None:
            raise ValueError(
                "MultiExitModule needs data_shape (in_channels, input_size, num_classes); the CLI links it "
                "from the datamodule, in Python pass e.g. DataShape(1, 28, 10)"
            )
        else:
            spec = net.build_spec(data_shape)
        self.exit_loss.check(spec.num_blocks)
        check_runs(spec)
        # Plain data only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "net": asdict(net),
                "arch_spec": arch_spec,
                "masks": masks,
                "data_shape": asdict(data_shape) if data_shape else None,
                "exit_loss": asdict(self.exit_loss),
                "optimizer": asdict(self.optimizer_config),
                "lr_schedule": asdict(self.lr_schedule_config),
                "thresholds": self.thresholds,
            }
        )
        self.net: MultiExitNet = build_net(spec)
        self._mask_pairs: list[tuple[nn.Parameter, Tensor]] | None = None  # cache; None = re-read
        self._search_pending: set[str] = set()  # callbacks that will still change the architecture
        self._loss_terms: dict[str, LossTerm] = {}
        self._build_metrics()
        if masks is not None:
            masks_spec, found = load_masks(masks)
            if masks_spec.with_active_blocks(spec.active_blocks) != spec:
                raise ValueError(
                    f"masks file {masks!r} was found for another architecture than the one trained; pass the "
                    "arch_spec written next to it (found_arch.yaml)"
                )
            self.set_masks(found)
        self._test_records: list[tuple[Tensor, Tensor]] = []
        self.early_exit_results: list[EarlyExitResult] = []

    # -- the protocol callbacks use (lit_nas.protocol.NASModule) ----------------------------------------
    @property
    def arch_spec(self) -> ArchSpec:
        """The current architecture."""
        return self.net.spec

    def set_arch_spec(self, spec: ArchSpec, rebuild: bool = False) -> None:
        """Record a changed architecture.

        Args:
            spec: the new architecture; it must describe the current weights unless ``rebuild``.
            rebuild: build a fresh network from ``spec`` (new parameters, same device and dtype).
        """
        spec.validate()
        if rebuild:
            ref = next(self.net.parameters())
            self.net = build_net(spec).to(device=ref.device, dtype=ref.dtype)
        else:
            self.net.spec = spec
        self._mask_pairs = None  # surgery slices (replaces) mask buffers; a rebuild drops them
        if set(self.metrics) != set(self._metric_keys()):
            self._build_metrics()

    @property
    def active_blocks(self) -> int:
        """Number of blocks currently computed."""
        return self.arch_spec.active_blocks

    def set_active_blocks(self, n: int) -> None:
        """Activate blocks ``0..n-1``; the spec (and so the checkpoint) records it."""
        self.net.spec = self.arch_spec.with_active_blocks(n)

    def prunable_weights(self, include_exits: bool = False) -> dict[int, dict[str, nn.Parameter]]:
        """Conv/linear weights per block, named relative to the module (``net.blocks.0...``)."""
        return {
            b: {f"net.{k}": p for k, p in ws.items()}
            for b, ws in self.net.prunable_weights(include_exits).items()
        }

    def channel_groups(self) -> list[ChannelGroup]:
        """Channel groups of the network (module names relative to ``self.net``)."""
        return self.net.channel_groups()

    def set_search_pending(self, who: str, pending: bool) -> None:
        """Say whether callback ``who`` will still change the architecture.

        ``val/acc_full`` is NaN while any callback is pending, so a checkpoint monitoring it is never a
        half-searched network.
        """
        if pending:
            self._search_pending.add(who)
        else:
            self._search_pending.discard(who)

    def pending_searches(self) -> frozenset[str]:
        """Callbacks that will still change the architecture (growing counts while blocks are inactive)."""
        grow = {"Growing"} if self.active_blocks < self.arch_spec.num_blocks else set()
        return frozenset(self._search_pending | grow)

    def add_loss_term(self, name: str, fn: LossTerm) -> None:
        """Add ``fn(images, targets, outputs)`` to the training loss; logged as ``name``."""
        if name in self._loss_terms:
            raise ValueError(f"a loss term named {name!r} is already registered")
        self._loss_terms[name] = fn

    def remove_loss_term(self, name: str) -> None:
        """Remove a loss term added with :meth:`add_loss_term` (no error if absent)."""
        self._loss_terms.pop(name, None)

    def exit_weights(self) -> dict[int, float]:
        """Weight of each active exit's loss in the training loss at the current epoch."""
        max_epochs = (self.trainer.max_epochs if self._trainer is not None else None) or 1
        exits = tuple(self.arch_spec.exit_blocks())
        return exit_weights(self.exit_loss, self.arch_spec.num_blocks, exits, self.current_epoch, max_epochs)

    def costs(self) -> CostReport:
        """FLOPs and parameters per block and exit of the current network."""
        return count_costs(self.net)

    def masks(self) -> dict[str, Tensor]:
        """Weight masks (1 kept, 0 pruned) by parameter name, as in :meth:`prunable_weights`."""
        return get_masks(self)

    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Set the masks of the named parameters (others keep theirs) and apply them at once.

        Pruned weights are zeroed, and so is their per-element optimizer state (momentum, Adam moments);
        from then on gradients are masked before and weights after every optimizer step, so they stay
        exactly zero through momentum, weight decay, growth, checkpoints and resumes.
        """
        pairs = attach_masks(self, masks)
        self._mask_pairs = None
        if self._trainer is not None:
            mask_optimizer_state(self.trainer.optimizers, pairs)

    def _masked(self) -> list[tuple[nn.Parameter, Tensor]]:
        if self._mask_pairs is None:
            self._mask_pairs = masked_pairs(self)
        return self._mask_pairs

    def _apply(self, fn, *args, **kwargs):
        self._mask_pairs = None  # .to()/.double() replace buffer tensors: the cached pairs would be stale
        return super()._apply(fn, *args, **kwargs)

    # -- computation ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> ExitLogits:
        """Logits of every active exit."""
        return self.net(x)

    def on_fit_start(self) -> None:
        """Print the architecture's cost per block and log its totals (``arch/params``, ``arch/mflops``)."""
        costs = self.costs()
        exits = self.arch_spec.exit_blocks(active_only=False)
        full = costs.flops_to_exit(exits[-1])
        if self.trainer.is_global_zero:
            print(
                f"\nArchitecture ({self.arch_spec.kind}, dense={self.arch_spec.dense}, "
                f"{self.active_blocks}/{self.arch_spec.num_blocks} blocks active):"
            )
            print(format_costs(self.arch_spec, costs))
        for logger in self.loggers:
            logger.log_metrics(
                {"arch/params": costs.total_params, "arch/mflops": full / 1e6}, step=self.global_step
            )

    def _metric_keys(self) -> list[str]:
        # Keys cannot start with "train" alone (an nn.Module attribute), hence "<stage>_acc<b>" etc.
        exits = self.arch_spec.exit_blocks(active_only=False)
        keys = [f"{stage}_{kind}{b}" for stage in STAGES for kind in ("acc", "loss") for b in exits]
        return keys + [f"{stage}_loss" for stage in STAGES]

    def _build_metrics(self) -> None:
        n_cls = self.arch_spec.num_classes
        metrics = {
            k: MulticlassAccuracy(n_cls, average="micro", validate_args=False)
            if "_acc" in k
            else MeanMetric()
            for k in self._metric_keys()
        }
        self.metrics = nn.ModuleDict(metrics).to(self.device)

    def _shared_step(
        self, batch: tuple[Tensor, Tensor], stage: str
    ) -> tuple[Tensor, ExitLogits, dict[int, Tensor]]:
        x, y = batch
        out = self(x)
        smoothing = self.exit_loss.label_smoothing if stage == "train" else 0.0
        loss, per_exit = multi_exit_loss(out, y, self.exit_weights(), smoothing)
        # Accumulate here, log once per epoch (_log_epoch): a self.log call costs ~0.7 ms on CPU, and a
        # dozen of them per step were 5% of a training step.
        for e, logits in out.items():
            self.metrics[f"{stage}_acc{e}"].update(logits.detach(), y)
            self.metrics[f"{stage}_loss{e}"].update(per_exit[e].detach(), weight=len(y))
        self.metrics[f"{stage}_loss"].update(loss.detach(), weight=len(y))
        return loss, out, per_exit

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's per-exit accuracy and loss, the total loss and the deepest exit's accuracy."""
        deepest = None
        for b in self.arch_spec.exit_blocks(active_only=False):
            acc = self.metrics[f"{stage}_acc{b}"]
            if acc.update_called:
                deepest = acc.compute()
                self.log(f"{stage}/acc_exit{b}", deepest)
                self.log(f"{stage}/loss_exit{b}", self.metrics[f"{stage}_loss{b}"].compute())
        total = self.metrics[f"{stage}_loss"]
        if total.update_called:
            self.log(f"{stage}/loss_epoch" if stage == "train" else f"{stage}/loss", total.compute())
        if deepest is not None and stage != "train":
            self.log(f"{stage}/acc", deepest, prog_bar=True)
            # The complete network's final exit; NaN while blocks are inactive (growing) or a callback will
            # still prune, which ModelCheckpoint ranks below any real value: monitor it to pick only
            # finished networks.
            complete = self.active_blocks == self.arch_spec.num_blocks and not self._search_pending
            self.log(f"{stage}/acc_full", deepest if complete else torch.full_like(deepest, float("nan")))
        for key, metric in self.metrics.items():
            if key.startswith(f"{stage}_"):
                metric.reset()

    def on_train_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("val")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Weighted exit losses plus every registered loss term."""
        loss, out, per_exit = self._shared_step(batch, "train")
        self.log("train/loss", loss.detach(), prog_bar=True)  # the one per-step log: a step-level curve
        terms = {f"exit {e} cross-entropy": v for e, v in per_exit.items()}
        for name, term in self._loss_terms.items():
            value = term(batch[0], batch[1], out)
            self.log(name, value.detach(), on_step=True, on_epoch=True)
            terms[name] = value
            loss = loss + value
        local = bool(torch.isfinite(loss))  # one host sync per step: training on NaN is worth nothing
        finite = local
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank stops together, or the others would wait for it in the next all-reduce
            finite = bool(self.trainer.strategy.reduce_boolean_decision(local, all=True))
        if not finite:
            self._non_finite_loss(terms, batch_idx, here=not local)
        return loss

    def _non_finite_loss(self, terms: dict[str, Tensor], batch_idx: int, here: bool) -> None:
        bad = {k: float(v) for k, v in terms.items() if not bool(torch.isfinite(v))}
        if not here:
            where = "on another process"
        elif not bad:
            where = "the sum of finite terms overflowed"
        else:
            where = ", ".join(f"{k} = {v}" for k, v in bad.items())
        lrs = sorted({g["lr"] for opt in self.trainer.optimizers for g in opt.param_groups})
        raise NonFiniteError(
            f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{batch_idx}): "
            + where
            + f"; learning rate {lrs[0] if len(lrs) == 1 else lrs}. Training stopped; no checkpoint was "
            "written from this state, so the last good one (checkpoints/last.ckpt) is intact. Lower the "
            "learning rate (or the term's weight) in a new run: a resume keeps the checkpoint's settings."
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Per-exit loss and accuracy on the validation split."""
        self._shared_step(batch, "val")

    def on_test_epoch_start(self) -> None:
        """Reset the per-sample records used for early exit."""
        self._test_records = []

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Per-exit metrics, plus each sample's confidence and correctness at every exit."""
        _, out, _ = self._shared_step(batch, "test")
        probs = torch.stack([lg.softmax(dim=1) for lg in out.logits], dim=1)  # (B, E, classes)
        conf, pred = probs.max(dim=2)
        self._test_records.append((conf, pred == batch[1][:, None]))

    def on_test_epoch_end(self) -> None:
        """Per-exit metrics, then early-exit accuracy and cost per threshold (``test/early_exit/...``)."""
        self._log_epoch("test")
        if not self._test_records:
            return
        conf = torch.cat([c for c, _ in self._test_records])
        correct = torch.cat([k for _, k in self._test_records])
        self._test_records = []
        if self.trainer.world_size > 1:
            conf = self.all_gather(conf).flatten(0, 1)
            correct = self.all_gather(correct).flatten(0, 1)
        exits = tuple(self.arch_spec.exit_blocks())
        costs = self.costs()
        reference = costs.flops_to_exit(exits[-1])  # the network to its last exit, no internal heads
        self.early_exit_results = early_exit(
            conf.cpu(), correct.cpu(), costs.early_exit_costs(list(exits)), reference, self.thresholds
        )
        for r in self.early_exit_results:
            tag = f"q{r.threshold:g}"
            self.log(f"test/early_exit/acc_{tag}", r.accuracy, rank_zero_only=True)
            self.log(f"test/early_exit/cost_fraction_{tag}", r.cost_fraction, rank_zero_only=True)
            self.log(f"test/early_exit/mflops_{tag}", r.avg_flops / 1e6, rank_zero_only=True)
        if self.trainer.is_global_zero:
            table = format_table(self.early_exit_results, exits)
            print(f"\nEarly exit on the test set (reference cost {reference / 1e6:.2f} MFLOPs):\n{table}")
            self._log_early_exit_table(exits)

    def _log_early_exit_table(self, exits: tuple[int, ...]) -> None:
        from lightning.pytorch.loggers import WandbLogger  # local: wandb is optional at import time

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                columns = ["q", "accuracy", "mflops", "cost_fraction"] + [f"frac_exit{e}" for e in exits]
                data = [
                    [r.threshold, r.accuracy, r.avg_flops / 1e6, r.cost_fraction, *r.exit_fractions]
                    for r in self.early_exit_results
                ]
                logger.log_table("test/early_exit_table", columns=columns, data=data)

    # -- optimization -----------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameters with and without weight decay (opt out with ``p.no_weight_decay = True``)."""
        decay, no_decay = [], []
        for p in self.parameters():
            (no_decay if getattr(p, "no_weight_decay", False) else decay).append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask the gradients of pruned weights (no momentum or Adam moments build up for them)."""
        mask_grads(self._masked())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then re-zero the pruned weights (in place: what a dense step costs, plus one multiply)."""
        super().optimizer_step(*args, **kwargs)
        apply_masks(self._masked())

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimizer over every parameter (inactive blocks receive no gradient and are skipped by it)."""
        opt = self.optimizer_config.build(self.param_groups())
        cfg = self.lr_schedule_config
        max_epochs = (self.trainer.max_epochs if self._trainer is not None else 0) or 0
        if cfg.interval == "step":
            # Called again by a restart (RetrainFromScratch, MorphNet's expansion): the schedule spans the
            # epochs that remain. A resume restores the saved schedule over this one.
            self.trainer.estimated_stepping_batches  # noqa: B018  (sets up the train loader: its length)
            per = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
            sched = cfg.build(opt, max(1, max_epochs - self.current_epoch), per)
        else:
            sched = cfg.build(opt, max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": cfg.interval}}

    # -- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the architecture next to the weights; refuse to write non-finite weights.

        Raising here aborts the save before any file is written, whoever saves (``ModelCheckpoint``,
        ``LastCheckpoint``, ``trainer.save_checkpoint``), so every checkpoint on disk holds finite weights.
        """
        bad = first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteError(
                f"refusing to write a checkpoint at global step {self.global_step} (epoch "
                f"{self.current_epoch}): weight {bad} is not finite. The training diverged; the last good "
                "checkpoint (checkpoints/last.ckpt) is intact. Lower the learning rate in a new run: a "
                "resume keeps the checkpoint's settings."
            )
        checkpoint[ARCH_KEY] = self.arch_spec.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the network from the checkpoint's architecture before its weights are loaded."""
        if ARCH_KEY not in checkpoint:
            raise CheckpointArchError(
                f"checkpoint has no {ARCH_KEY!r} entry, so its architecture is unknown; it was not written "
                "by lit_nas.MultiExitModule (keys present: "
                f"{sorted(k for k in checkpoint if isinstance(k, str))})"
            )
        try:
            spec = ArchSpec.from_dict(checkpoint[ARCH_KEY])
        except (TypeError, ValueError) as err:
            raise CheckpointArchError(f"checkpoint's {ARCH_KEY!r} entry is corrupt: {err}") from err
        if spec != self.arch_spec:
            if spec.with_active_blocks(self.active_blocks) == self.arch_spec:
                self.set_active_blocks(spec.active_blocks)  # only growing differs: same parameters
            else:
                log.info("rebuilding the network from the checkpoint's ArchSpec")
                self.set_arch_spec(spec, rebuild=True)
        # masks are buffers created by pruning: a fresh network lacks them until the weights load into them
        ensure_mask_buffers(self, checkpoint.get("state_dict", {}))
        self._mask_pairs = None

    @classmethod
    def spec_from_checkpoint(cls, path: str | Path) -> ArchSpec:
        """Read only the architecture of a checkpoint (loaded with ``weights_only=True``)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ARCH_KEY not in ckpt:
            raise CheckpointArchError(f"{str(path)!r} has no {ARCH_KEY!r} entry")
        return ArchSpec.from_dict(ckpt[ARCH_KEY])
