"""Training throughput: Lightning vs a plain PyTorch loop, and the data pipeline's share of a step.

Measured side by side in one run on the default network (quickstart's) and Fashion-MNIST (synthetic data of
the same shape when the dataset is not installed). Both loops use the same network, optimizer, loss, batches
and on-device augmentation; the Lightning run also does everything MultiExitModule does per step (per-exit
metrics and logging). The two are interleaved step by step (see ``Paired``): this machine's speed drifts
between runs by more than the overhead we measure, so back-to-back runs could not resolve it.

    python benchmarks/throughput.py [--steps 100] [--warmup 5] [--batch-size 128]

Goals (issue #2): Lightning overhead <= 5%, data pipeline <= 5% of a training step.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import lightning as L
import torch

from lit_nas import NetConfig
from lit_nas.data import DEBIAN_FASHION_MNIST, FashionMNISTDataModule, ImageDataModule, SyntheticDataModule
from lit_nas.module import MultiExitModule
from lit_nas.objectives import exit_weights, multi_exit_loss
from lit_nas.optim import LRScheduleConfig, OptimizerConfig


def make_data(batch_size: int) -> ImageDataModule:
    if DEBIAN_FASHION_MNIST.is_dir():
        dm: ImageDataModule = FashionMNISTDataModule(batch_size=batch_size, crop_pad=2)
    else:
        print("Fashion-MNIST not installed: using synthetic 1x28x28 data")
        dm = SyntheticDataModule(
            num_train=20000, num_test=256, in_channels=1, input_size=28, batch_size=batch_size, augment=True
        )
    dm.setup()
    return dm


def make_module(dm: ImageDataModule) -> MultiExitModule:
    torch.manual_seed(0)
    return MultiExitModule(
        net=NetConfig(),
        data_shape=dm.data_shape,
        optimizer=OptimizerConfig(lr=0.02),
        lr_schedule=LRScheduleConfig(name="constant"),
    )


class PlainLoop:
    """A hand-written training step doing what the Lightning step does for training, on its own copy."""

    def __init__(self, dm: ImageDataModule) -> None:
        self.dm = dm
        self.module = make_module(dm)
        self.net = self.module.net.train()
        self.opt = self.module.optimizer_config.build(self.module.param_groups())
        self.batches = iter(dm.train_dataloader())

    def step(self) -> tuple[float, float]:
        """Run one step; return (seconds for the whole step, seconds for fetching + preparing the batch)."""
        t0 = time.perf_counter()
        x, y = self.dm.prepare_batch(next(self.batches), train=True, epoch=0)
        t1 = time.perf_counter()
        out = self.net(x)
        cfg = self.module.exit_loss
        loss, _ = multi_exit_loss(out, y, exit_weights(cfg, self.net.spec.num_blocks, out.exits, 0, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, t1 - t0


class Paired(L.Callback):
    """Between two Lightning steps, run one plain step; time both.

    A Lightning step is the interval from one ``on_train_batch_start`` to the next (data fetch, transfer
    hooks, forward, backward, optimizer, logging: everything Lightning does per step) minus the plain step
    run inside that interval. Interleaving step by step means both see the same machine conditions.
    """

    def __init__(self, plain: PlainLoop, warmup: int) -> None:
        self.plain, self.warmup = plain, warmup
        self.last: float | None = None
        self.inside = 0.0
        self.lightning: list[float] = []
        self.plain_steps: list[float] = []
        self.data: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None and batch_idx > self.warmup:
            self.lightning.append(now - self.last - self.inside)
        self.last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t0 = time.perf_counter()
        step, data = self.plain.step()
        self.inside = time.perf_counter() - t0
        if batch_idx >= self.warmup:
            self.plain_steps.append(step)
            self.data.append(data)


def run(dm: ImageDataModule, steps: int, warmup: int) -> Paired:
    """One Lightning fit of ``warmup + steps + 1`` batches with a plain step after each."""
    module = make_module(dm)
    paired = Paired(PlainLoop(dm), warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=warmup + steps + 1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[paired],
    )
    trainer.fit(module, datamodule=dm)
    return paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    dm = make_data(args.batch_size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.steps} paired steps after {args.warmup} warm-up steps"
    )
    r = run(dm, args.steps, args.warmup)
    light, plain, data = sum(r.lightning), sum(r.plain_steps), sum(r.data)
    per_step = [a / b - 1 for a, b in zip(r.lightning, r.plain_steps)]
    overhead = light / plain - 1
    share = data / plain
    n = len(r.lightning)
    print(f"plain PyTorch loop : {n * args.batch_size / plain:8.1f} images/s ({plain / n * 1e3:.1f} ms/step)")
    print(f"Lightning          : {n * args.batch_size / light:8.1f} images/s ({light / n * 1e3:.1f} ms/step)")
    verdict = "OK" if overhead <= 0.05 else "MISSED"
    print(
        f"Lightning overhead : {overhead:+.2%} of step time over {n} paired steps "
        f"(median per step {statistics.median(per_step):+.2%}; goal <= 5%): {verdict}"
    )
    verdict = "OK" if share <= 0.05 else "MISSED"
    print(
        f"data pipeline      : {data / n * 1e3:.2f} ms/batch = {share:.2%} of a step (goal <= 5%): {verdict}"
    )


if __name__ == "__main__":
    main()
