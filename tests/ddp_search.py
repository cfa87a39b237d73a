"""Two CPU processes (gloo) run channel searches with garbage collection under Lightning's DDP.

Run by ``tests/test_distributed.py`` as ``python -m tests.ddp_search OUT``; Lightning's launcher starts
rank 1 by re-running this module, and both ranks run the same fits one after the other (one process
start for all of them). Each fit saves what every rank holds as ``OUT/<fit>/rank<r>.pt``:

- ``growing``: the net grows (``grow_epochs: [1, 2, 3]``) and stops after epoch 2, before block 3 activates;
- ``growing_snip``: the same, SNIP (weights, keep 0.5, one-shot) pruning each block as it activates;
- ``fisher``: growing, then Fisher pruning with a collection after every prune event, checkpoints every
  epoch (``find_unused_parameters`` only while blocks are inactive);
- ``fisher_resumed``: the same, resumed from ``fisher``'s checkpoint after epoch 2 (after collections);
- ``fisher_stripped``: the same resume with FisherPruning's state removed from the checkpoint (negative
  control);
- ``switch``: SwitchL1 with a collection every epoch, then a retraining from scratch (no seed given);
- ``switch_resumed``: the same, resumed from its checkpoint after epoch 3 (the switches come back frozen
  with the rebuilt net and must be made trainable again, and DDP rebuilt over them);
- ``morphnet``: MorphNet closes channels, GC collects them, the network is expanded (rebuilt) at epoch 2;
- ``netadapt``: NetAdapt removes channels (every rank scores the same candidates; rank 0 decides);
- ``snip_edge``: the dense net grows, and SNIP removes half of each block's edges as it activates;
- ``sums``: Fisher's signal only (no prune), float64, BatchNorm in eval mode, batch ``SUMS_BATCH`` per rank,
  no shuffling: the test compares it with one process on batch ``2 * SUMS_BATCH``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import lit_nas  # noqa: F401  isort: skip
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler

from callbacks import (
    FisherPruning,
    GarbageCollection,
    Growing,
    MorphNet,
    NetAdapt,
    RetrainFromScratch,
    SnipPruning,
    SwitchL1,
)
from lit_nas.data import SyntheticDataModule, _as_batch
from lit_nas.gates import gated_groups
from tests.helpers import tiny_module, tiny_trainer

SUMS_BATCH = 8
SUMS_STEPS = 4
FIT_EPOCHS = 6
SWITCH_RESUME_FROM = "epoch=3-step=16.ckpt"  # after the collections, before the freeze and the retraining
RESUME_FROM = "epoch=2-step=12.ckpt"  # 4 steps per epoch per rank (72 images each, batches of 16)


class FindUnused(L.Callback):
    """Records DDP's ``find_unused_parameters`` at every epoch start (after Growing's)."""

    def __init__(self) -> None:
        self.by_epoch: list[list[Any]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.by_epoch.append([trainer.current_epoch, trainer.strategy.model.find_unused_parameters])


class SaveRankState(L.Callback):
    """At the end of training, saves the module, gates, optimizer state and callback records of this rank."""

    def __init__(self, out: Path, records: dict[str, Any]) -> None:
        self.out, self.records = out, records

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        opt_state = {
            f"{names[id(p)]}.{k}": v.detach().clone()
            for p, s in opt.state.items()
            for k, v in s.items()
            if torch.is_tensor(v) and id(p) in names
        }
        fisher = next((c for c in trainer.callbacks if isinstance(c, FisherPruning)), None)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "spec": pl_module.arch_spec.to_dict(),
                "gates": {k: v.detach().clone() for k, v in gated_groups(pl_module.net).items()},
                "optimizer": opt_state,
                "find_unused": trainer.strategy.model.find_unused_parameters,
                "world_size": trainer.world_size,
                "fisher_acc": fisher.state_dict()["accumulator"] if fisher else None,
                **{k: v() for k, v in self.records.items()},
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class Initial(L.Callback):
    """The weights at fit start (after DDP broadcast rank 0's), and a stop after epoch ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.state = stop_after, {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.stop_after:
            trainer.should_stop = True


def blocks_with_state(trainer: L.Trainer, module: Any) -> list[int]:
    """The blocks whose parameters have optimizer state (momentum): the ones that ever trained."""
    opt = trainer.optimizers[0]
    return [
        b
        for b in range(module.arch_spec.num_blocks)
        if any(p in opt.state and opt.state[p] for p in module.net.blocks[b].parameters())
    ]


class BatchNormEval(L.Callback):
    """BatchNorm in eval mode (running statistics): each sample's output depends on that sample alone."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for m in pl_module.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


class InOrder(SyntheticDataModule):
    """Training batches in order (sample ``i`` on rank ``i % 2``), not augmented
    (augmentation draws per rank), in float64."""

    def train_dataloader(self) -> DataLoader:
        ds, t = self._splits["train"], self.trainer
        # rank r reads samples r, r + 2, ...: batch k of both ranks is one process's batch k at twice the size
        shard = DistributedSampler(ds, t.world_size, t.global_rank, shuffle=False)
        shard = shard if t.world_size > 1 else None
        return DataLoader(ds, batch_size=self.batch_size, sampler=shard, collate_fn=_as_batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = self.prepare_batch(batch, train=False)
        return x.double(), y


def data(batch_size: int = 16, in_order: bool = False) -> SyntheticDataModule:
    kind = InOrder if in_order else SyntheticDataModule
    return kind(num_train=160, num_test=64, input_size=16, batch_size=batch_size)


def trainer(out: Path, callbacks: list, strategy: str = "ddp", **kwargs: Any) -> L.Trainer:
    """The tests' tiny trainer on 2 CPU processes."""
    settings: dict[str, Any] = dict(devices=2, strategy=strategy, max_epochs=FIT_EPOCHS, callbacks=callbacks)
    return tiny_trainer(out, **{**settings, **kwargs})


def fisher_fit(out: Path, name: str, ckpt_path: str | None = None) -> None:
    growing = Growing(grow_epochs=[1, 2, 3])
    fisher = FisherPruning(every_n_steps=5, per_step=1, target_fraction=0.6)  # the resume is mid-window
    gc = GarbageCollection(after_prune=True)
    records = {
        "fisher_history": lambda: [list(h) for h in fisher.history],
        "gc_history": lambda: [list(h) for h in gc.history],
        "grow_history": lambda: [list(h) for h in growing.history],
        "find_unused_by_epoch": lambda: unused.by_epoch,
    }
    unused = FindUnused()
    callbacks = [growing, fisher, gc, unused, ModelCheckpoint(out / name / "ckpt", save_top_k=-1)]
    t = trainer(
        out / name,
        [*callbacks, SaveRankState(out / name, records)],
        strategy="ddp_find_unused_parameters_true",
        enable_checkpointing=True,
    )
    torch.manual_seed(0)
    t.fit(tiny_module(seed=0), datamodule=data(), ckpt_path=ckpt_path)


def growing_fit(out: Path, name: str, snip: bool) -> None:
    growing = Growing(grow_epochs=[1, 2, 3])
    pruning = SnipPruning(keep_ratio=0.5, after_epochs=0, criterion_batch_size=16) if snip else None
    initial = Initial(stop_after=2)  # block 3 (growth at epoch 3) never activates
    torch.manual_seed(0)
    module = tiny_module(seed=0)
    records = {
        "initial": lambda: initial.state,
        "active_blocks": lambda: module.active_blocks,
        "history": lambda: [list(h) for h in growing.history],
        "snip_history": lambda: [list(h) for h in pruning.history] if pruning else [],
        "blocks_with_state": lambda: blocks_with_state(t, module),
    }
    callbacks = [growing, *([pruning] if pruning else []), initial, SaveRankState(out / name, records)]
    t = trainer(out / name, callbacks, strategy="ddp_find_unused_parameters_true", max_epochs=4)
    t.fit(module, datamodule=data())


def switch_fit(out: Path, name: str, ckpt_path: str | None = None) -> None:
    switch = SwitchL1(lam=1.0, until_epoch=4)
    gc = GarbageCollection(epochs=None)
    retrain = RetrainFromScratch(epoch=4)  # no seed: drawn at fit start, by rank 0, kept in the checkpoint
    records = {
        "switch_history": lambda: [[e, live] for e, live in switch.history],
        "gc_history": lambda: [list(h) for h in gc.history],
        "restarted": lambda: retrain.restarted,
    }
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(out / name / "ckpt", save_top_k=-1)
    cbs = [switch, gc, retrain, ckpt, SaveRankState(out / name, records)]
    t = trainer(out / name, cbs, max_epochs=5, enable_checkpointing=True)
    t.fit(tiny_module(seed=0), datamodule=data(), ckpt_path=ckpt_path)


def strip_fisher_state(ckpt: Path, dest: Path) -> None:
    """A copy of ``ckpt`` without FisherPruning's state (a resume that forgets where the search was)."""
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if "FisherPruning" not in k}
    torch.save(state, dest)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    out: Path = args.out
    torch.set_num_threads(1)  # two processes on two cores

    growing_fit(out, "growing", snip=False)
    growing_fit(out, "growing_snip", snip=True)
    fisher_fit(out, "fisher")
    rank = torch.distributed.get_rank()
    ckpt = out / "fisher" / "ckpt" / RESUME_FROM
    fisher_fit(out, "fisher_resumed", ckpt_path=str(ckpt))
    stripped = out / f"stripped_rank{rank}.ckpt"  # each rank its own copy: no race on the file
    strip_fisher_state(ckpt, stripped)
    fisher_fit(out, "fisher_stripped", ckpt_path=str(stripped))

    switch_fit(out, "switch")
    switch_fit(out, "switch_resumed", ckpt_path=str(out / "switch" / "ckpt" / SWITCH_RESUME_FROM))

    search = MorphNet(strength=30.0, threshold=0.2, until_epoch=3, expand_epochs=[2], budget_fraction=1.0)
    gc = GarbageCollection()
    records = {
        "expanded": lambda: [list(e) for e in search.expanded],
        "closed": lambda: search.closed,
        "gc_history": lambda: [list(h) for h in gc.history],
    }
    torch.manual_seed(0)
    trainer(out / "morphnet", [search, gc, SaveRankState(out / "morphnet", records)], max_epochs=4).fit(
        tiny_module(seed=0, optimizer={"name": "sgd", "lr": 0.1}), datamodule=data()
    )

    adapt = NetAdapt(
        stop_at="params",
        target_fraction=0.5,
        step_fraction=0.1,
        start_epoch=1,
        iterations_per_epoch=2,
        short_term_batches=2,
        group_fraction=0.5,
    )
    records = {"netadapt_history": lambda: [(h["group"], h["removed"], h["cost"]) for h in adapt.history]}
    holdout = SyntheticDataModule(num_train=208, num_test=64, input_size=16, batch_size=16, holdout_size=48)
    torch.manual_seed(0)
    trainer(out / "netadapt", [adapt, SaveRankState(out / "netadapt", records)], max_epochs=3).fit(
        tiny_module(seed=0), datamodule=holdout
    )

    growing = Growing(grow_epochs=[1, 2, 3])
    snip = SnipPruning(granularity="edge", keep_ratio=0.5, after_epochs=0, criterion_batch_size=16)
    records = {"snip_history": lambda: [list(h) for h in snip.history]}
    t = trainer(
        out / "snip_edge",
        [growing, snip, SaveRankState(out / "snip_edge", records)],
        strategy="ddp_find_unused_parameters_true",
        max_epochs=4,
    )
    torch.manual_seed(0)
    t.fit(tiny_module(seed=0, net={"dense": True}), datamodule=data())

    fisher = FisherPruning(every_n_steps=10_000, target_fraction=0.5)  # accumulates, never prunes
    sums = trainer(
        out / "sums",
        [fisher, BatchNormEval(), SaveRankState(out / "sums", {})],
        precision="64-true",
        max_epochs=1,
        max_steps=SUMS_STEPS,
        limit_val_batches=0,
        use_distributed_sampler=False,  # InOrder shards the training set itself
    )
    sums.fit(tiny_module(seed=0), datamodule=data(SUMS_BATCH, in_order=True))


if __name__ == "__main__":
    main()
