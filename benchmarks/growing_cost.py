"""What an epoch costs with 1, 2, 3 and 4 of 4 blocks active, next to the FLOPs ratio of those blocks.

Inactive blocks are not run, so an epoch with ``k`` active blocks should cost about the forward FLOPs of the
first ``k`` blocks and their exits. Each round trains one fresh network through a real ``Growing`` run that
activates a block every epoch (short epochs of ``--batches`` batches, no validation), timing each epoch from
before the growth to its end. Rounds are repeated and medians taken, so the k = 1..4 epochs of a round are
measured side by side (this machine's speed drifts between runs). The full-epoch column scales the median to
one pass over the training set.

    python benchmarks/growing_cost.py [--rounds 5] [--batches 30] [--batch-size 128]

Default network (quickstart's) on Fashion-MNIST (synthetic data of the same shape if not installed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import time

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks import Growing
from lit_nas import NetConfig
from lit_nas.data import DEBIAN_FASHION_MNIST, FashionMNISTDataModule, ImageDataModule, SyntheticDataModule
from lit_nas.module import MultiExitModule
from lit_nas.optim import LRScheduleConfig, OptimizerConfig


class EpochTimer(Callback):
    """Wall time of every training epoch, keyed by the number of active blocks (placed before Growing)."""

    def __init__(self) -> None:
        self.times: dict[int, list[float]] = {}
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._t0
        self.times.setdefault(pl_module.active_blocks, []).append(elapsed)


def make_data(batch_size: int) -> ImageDataModule:
    if DEBIAN_FASHION_MNIST.is_dir():
        return FashionMNISTDataModule(batch_size=batch_size, crop_pad=2)
    print("Fashion-MNIST not installed: using synthetic 1x28x28 data")
    return SyntheticDataModule(
        num_train=60000, num_test=256, in_channels=1, input_size=28, batch_size=batch_size, augment=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=30, help="training batches per (short) epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    dm = make_data(args.batch_size)
    dm.setup("fit")
    full_batches = len(dm.train_dataloader())
    timer = EpochTimer()
    costs = None
    for r in range(args.rounds):
        torch.manual_seed(r)
        module = MultiExitModule(
            net=NetConfig(),
            data_shape=dm.data_shape,
            optimizer=OptimizerConfig(lr=0.01),
            lr_schedule=LRScheduleConfig(name="constant"),
        )
        costs = costs or module.costs()
        n = module.arch_spec.num_blocks
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=n,
            limit_train_batches=args.batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, Growing(grow_epochs=list(range(1, n)))],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the per-growth architecture tables
            trainer.fit(module, datamodule=dm)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{t[-1]:.2f}s" for _, t in sorted(timer.times.items()))
        )

    assert costs is not None
    n = len(costs.block_flops)
    full_flops = costs.active_flops(n)
    full_time = statistics.median(timer.times[n])
    print(
        f"\nDefault network, batch {args.batch_size}, {args.batches} batches per timed epoch, median of "
        f"{args.rounds} rounds; full epoch = {full_batches} batches; torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'active':>6} {'fwd MFLOPs/img':>14} {'FLOPs ratio':>11} {'epoch s':>8} {'time ratio':>10} "
        f"{'full epoch s':>12} {'ms/batch':>8}"
    )
    for k in range(1, n + 1):
        t = statistics.median(timer.times[k])
        print(
            f"{k:>6} {costs.active_flops(k) / 1e6:>14.2f} {costs.active_flops(k) / full_flops:>11.3f} "
            f"{t:>8.2f} {t / full_time:>10.3f} {t * full_batches / args.batches:>12.1f} "
            f"{1000 * t / args.batches:>8.1f}"
        )


if __name__ == "__main__":
    main()
