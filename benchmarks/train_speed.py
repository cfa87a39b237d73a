"""Training step time per network family and option, relative to today's fp32 step, in one interleaved run.

For each study family (the quick start's ResNet, WRN-16-1, the dense net, MobileNetV2; each as its shipped
config builds it) one training step of ``MultiExitModule``'s objective (forward through every exit, summed
losses, backward, SGD) is timed under each option, round-robin, so every option sees the same machine:

- ``fp32``: today (float32, NCHW);
- ``channels_last``: weights and activations in the channels-last memory format;
- ``bf16``: autocast to bfloat16 (Lightning's ``precision: bf16-mixed``), float32 weights;
- ``bf16+cl``: both; ``compile`` and ``cl+compile`` (``torch.compile`` of the network) with ``--compile``.

It also prints the training FLOP rate (3x the forward FLOPs of every exit, per second) over the matmul rate
of the same dtype (a 1024x1024 GEMM, timed in the same rounds), and whether this CPU runs bfloat16 natively
(oneDNN's check): without it, bfloat16 is emulated and slow, and the fast path there is fp32.

    python benchmarks/train_speed.py [--threads 1] [--batch-size 128] [--steps 8] [--compile]

Goal (issue #33): >= 2x today's throughput on the quick-start net, >= 0.7 of the same-dtype matmul rate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import torch
import yaml

from lit_nas.arch import DataShape
from lit_nas.cost import count_costs
from lit_nas.module import MultiExitModule
from lit_nas.nets.recipe import NetConfig
from lit_nas.objectives import exit_weights, multi_exit_loss
from lit_nas.optim import LRScheduleConfig, OptimizerConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAMILIES = {
    "ResNet (quick start)": "quickstart.yaml",
    "WRN-16-1": "fisher_fast.yaml",
    "dense": "dense_iterative_fast.yaml",
    "MobileNetV2": "mobilenet_v2_fast.yaml",
}
#: option -> (channels_last, bf16 autocast, torch.compile)
OPTIONS = {
    "fp32": (False, False, False),
    "channels_last": (True, False, False),
    "bf16": (False, True, False),
    "bf16+cl": (True, True, False),
    "compile": (False, False, True),
    "cl+compile": (True, False, True),
}


def bf16_native() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX); otherwise it is emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def net_config(config: str) -> NetConfig:
    """The network of a shipped config (``model.init_args.net``)."""
    raw = yaml.safe_load((CONFIGS / config).read_text())
    return NetConfig(**raw["model"]["init_args"]["net"])


class Step:
    """One family's training step under one option, on its own copy of the network and optimizer."""

    def __init__(self, net: NetConfig, option: str, batch: int) -> None:
        cl, self.bf16, comp = OPTIONS[option]
        torch.manual_seed(0)
        self.module = MultiExitModule(
            net=net,
            data_shape=DataShape(1, 28, 10),
            optimizer=OptimizerConfig(lr=0.01),
            lr_schedule=LRScheduleConfig(name="constant"),
        )
        self.net = self.module.net.train()
        if cl:
            self.net.to(memory_format=torch.channels_last)
        self.opt = self.module.optimizer_config.build(self.module.param_groups())
        self.forward: Callable = torch.compile(self.net) if comp else self.net
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 1, 28, 28, generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(self.x)
            weights = exit_weights(self.module.exit_loss, self.net.spec.num_blocks, out.exits, 0, 1)
            loss, _ = multi_exit_loss(out, self.y, weights)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def matmul(dtype: torch.dtype, n: int = 1024) -> Callable[[], float]:
    """A timed ``n x n`` GEMM in ``dtype``; returns its FLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)

    def run() -> float:
        t0 = time.perf_counter()
        a @ b
        return 2 * n**3 / (time.perf_counter() - t0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per option (after 2 warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = [o for o in OPTIONS if args.compile or not OPTIONS[o][2]]
    native = "native" if bf16_native() else "EMULATED (no AVX512-BF16/AMX)"
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, {args.steps} steps "
        f"per option, interleaved; bfloat16 {native} on this CPU"
    )
    gemm = {"fp32": matmul(torch.float32), "bf16": matmul(torch.bfloat16)}
    print(f"\n| family | fwd MFLOPs/img | {' | '.join(options)} | best | rate / same-dtype matmul |")
    print("|---|---|" + "---|" * len(options) + "---|---|")
    for family in args.families:
        net = net_config(FAMILIES[family])
        steps = {o: Step(net, o, args.batch_size) for o in options}
        costs = count_costs(steps["fp32"].net)
        flops = sum(costs.block_flops) + sum(costs.exit_flops.values())
        times: dict[str, list[float]] = {o: [] for o in options}
        rates: dict[str, list[float]] = {k: [] for k in gemm}
        for r in range(args.steps + 2):
            for o in options:
                dt = steps[o]()
                if r >= 2:
                    times[o].append(dt)
            for k, g in gemm.items():
                rates[k].append(g())
        med = {o: statistics.median(t) for o, t in times.items()}
        best = min(med, key=med.get)
        cells = " | ".join(f"{med[o] / med['fp32']:.2f}" for o in options)
        shares = []
        for o in dict.fromkeys(("fp32", best)):
            dtype = "bf16" if OPTIONS[o][1] else "fp32"
            rate, peak = 3 * flops * args.batch_size / med[o], statistics.median(rates[dtype])
            shares.append(f"{o}: {rate / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s {dtype} = {rate / peak:.2f}")
        print(
            f"| {family} | {flops / 1e6:.1f} | {cells} | {best} ({med['fp32'] / med[best]:.2f}x) | "
            f"{'; '.join(shares)} |"
        )
    print("\nCells: median step time over fp32's (lower is faster); fp32 is today's step; best: the fastest.")


if __name__ == "__main__":
    main()
