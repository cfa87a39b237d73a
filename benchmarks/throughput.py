"""Training throughput: Lightning vs a plain PyTorch loop, and the data pipeline's share of a step.

Measured side by side in one run on the default network (quickstart's) and Fashion-MNIST (synthetic data of
the same shape when the dataset is not installed). Both loops use the same network, optimizer, loss, batches
and on-device augmentation; the Lightning run also does everything MultiExitModule does per step (per-exit
metrics and logging). Rounds alternate A/B to spread machine noise over both; medians are reported.

    python benchmarks/throughput.py [--steps 30] [--rounds 3] [--batch-size 128]

Goals (issue #2): Lightning overhead <= 5%, data pipeline <= 5% of a training step.
"""

from __future__ import annotations

import argparse
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


def plain_loop(dm: ImageDataModule, steps: int, warmup: int) -> float:
    """Images/s of a hand-written loop doing what the Lightning step does for training."""
    module = make_module(dm)
    net, cfg = module.net, module.exit_loss
    opt = module.optimizer_config.build(module.param_groups())
    net.train()
    it = iter(dm.train_dataloader())
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x, y = dm.prepare_batch(next(it), train=True, epoch=0)
        out = net(x)
        loss, _ = multi_exit_loss(out, y, exit_weights(cfg, net.spec.num_blocks, out.exits, 0, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * dm.batch_size / (time.perf_counter() - start)


class _Clock(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.batches = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.batches = batch_idx + 1 - self.warmup


def lightning_loop(dm: ImageDataModule, steps: int, warmup: int) -> float:
    """Images/s of MultiExitModule under the Trainer (no validation, checkpointing or progress bar)."""
    module = make_module(dm)
    clock = _Clock(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=dm)
    return clock.batches * dm.batch_size / (clock.end - clock.start)


def data_only(dm: ImageDataModule, steps: int) -> float:
    """Seconds per batch of loading + on-device augmentation + normalisation alone."""
    it = iter(dm.train_dataloader())
    dm.prepare_batch(next(it), train=True)
    start = time.perf_counter()
    for _ in range(steps):
        dm.prepare_batch(next(it), train=True, epoch=0)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    dm = make_data(args.batch_size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.steps} timed steps x {args.rounds} rounds"
    )
    plain, light, data = [], [], []
    for r in range(args.rounds):
        plain.append(plain_loop(dm, args.steps, args.warmup))
        light.append(lightning_loop(dm, args.steps, args.warmup))
        data.append(data_only(dm, args.steps))
        print(
            f"round {r}: plain {plain[-1]:7.1f} img/s   lightning {light[-1]:7.1f} img/s   "
            f"data {data[-1] * 1e3:6.2f} ms/batch"
        )
    p, lt, d = statistics.median(plain), statistics.median(light), statistics.median(data)
    step = args.batch_size / p
    overhead = p / lt - 1
    share = d / step
    print(f"\nplain PyTorch loop : {p:8.1f} images/s ({step * 1e3:.1f} ms/step)")
    print(f"Lightning          : {lt:8.1f} images/s")
    print(
        f"Lightning overhead : {overhead * 100:+.2f}% of step time (goal <= 5%): "
        f"{'OK' if overhead <= 0.05 else 'MISSED'}"
    )
    print(
        f"data pipeline      : {d * 1e3:.2f} ms/batch = {share * 100:.2f}% of a training step (goal <= 5%): "
        f"{'OK' if share <= 0.05 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
