"""Training-step time after garbage collection, next to the same widths built natively and to the gated net.

Four networks train side by side on the same batches:

- ``collected``: a network whose channel gates switched off about half of every channel group, then
  garbage-collected (``lit_nas.surgery.collect_gated``: sliced in place, the same Parameter objects); its
  (now all-live) gates still multiply every gated BatchNorm output, as while a pruning callback runs;
- ``folded``: the collected network with its gates folded into the BatchNorms (``fold_gates``), as after
  the search;
- ``native``: a fresh network built from the collected ArchSpec (the same widths, never sliced);
- ``gated``: the uncollected network, full width, its gates multiplying half of the channels by 0.

The variants take turns step by step on the same batch (shuffled order), and the median of the per-batch
ratios is reported (this machine's speed drifts by more than some of the effects measured). A step is
forward, backward over every exit's loss and an SGD (Nesterov, weight decay) step.

    python benchmarks/gc_speed.py [--rounds 5] [--steps 20] [--batch-size 128] [--keep 0.5] [--widen 1]

Network: WRN-16-k with 4 exits on 1x28x28; k = 1 is shrinknet_fast.yaml's SDN (16/32/64 channels, 2 cells
per stage) and fisher_fast.yaml's WRN-16-1 with exits.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import torch
from interleave import (
    median_ratio,
    random_batches,
    time_interleaved,
)  # benchmarks/interleave.py (the script's folder)
from torch import nn

from lit_nas import DataShape, NetConfig, build_net
from lit_nas.gates import attach_gates
from lit_nas.surgery import collect_gated, fold_gates


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(lg, y) for lg in net(x).logits)


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of each group's channels kept")
    parser.add_argument("--widen", type=int, default=1, help="k of WRN-16-k")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    recipe = NetConfig(kind="wide_resnet", depth=16, widen_factor=args.widen)
    gated = build_net(recipe.build_spec(DataShape(1, 28, 10)))
    gates = attach_gates(gated, [g.name for g in gated.channel_groups()])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gates.values():
            n = gate.numel()
            gate[torch.randperm(n, generator=g)[: n - math.ceil(args.keep * n)]] = 0
    # a few gated steps first, so the collection slices real optimizer state (momentum buffers)
    opt_gated = optimizer(gated)
    x0, y0 = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    for _ in range(3):
        opt_gated.zero_grad(set_to_none=True)
        loss_of(gated, x0, y0).backward()
        opt_gated.step()
    collected = copy.deepcopy(gated)
    opt_collected = optimizer(collected)
    opt_collected.load_state_dict(copy.deepcopy(opt_gated.state_dict()))
    removed = collect_gated(collected, [opt_collected])
    native = build_net(collected.spec)
    folded = copy.deepcopy(collected)
    opt_folded = optimizer(folded)
    opt_folded.load_state_dict(copy.deepcopy(opt_collected.state_dict()))  # gates last: the rest lines up
    fold_gates(folded)
    full = sum(p.numel() for n, p in gated.named_parameters() if not n.startswith("gates"))
    kept = sum(p.numel() for n, p in collected.named_parameters() if not n.startswith("gates"))
    print(
        f"WRN-16-{args.widen}: {sum(removed.values())} channels collected in {len(removed)} groups, "
        f"parameters "
        f"{full:,} -> {kept:,}; batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}"
    )
    nets = {"collected": collected, "folded": folded, "native": native, "gated": gated}
    opts = {"collected": opt_collected, "folded": opt_folded, "native": optimizer(native), "gated": opt_gated}

    batches = random_batches(args.steps, args.batch_size)

    def step(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        opts[name].zero_grad(set_to_none=True)
        loss_of(nets[name], *batch).backward()
        opts[name].step()

    times = time_interleaved(list(nets), batches, step, args.rounds)

    def ratio(a: str, b: str) -> float:
        return median_ratio(times, a, b)

    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n{len(times['native'])} steps per variant; median step time:")
    for name in nets:
        print(f"  {name:10s} {med[name] * 1e3:8.2f} ms")
    print("median of the per-batch ratios:")
    print(f"  collected / native: {ratio('collected', 'native'):.3f} (goal <= 1.10)")
    print(f"  folded / native:    {ratio('folded', 'native'):.3f}")
    print(f"  collected / gated:  {ratio('collected', 'gated'):.3f}")
    print(f"  gated / native:     {ratio('gated', 'native'):.3f}")


if __name__ == "__main__":
    main()
