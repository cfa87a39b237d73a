"""What the DDP support of the channel searches costs: Fisher's per-step all-reduce, find_unused, a rewrap.

Two CPU processes (gloo, 1 thread each) train WRN-16-1 with 4 exits on 1x28x28 side by side, in three
variants that take turns step by step on the same batch (the same shuffled order on both ranks):

- ``ddp``: plain DDP (what a Fisher search runs on once growing is over, without the signal);
- ``ddp+fisher``: the same, with FisherPruning's accumulator hooked in and its sums and counts all-reduced
  after every step (``lit_nas.fisher.FisherAccumulator(reduce=...)``, as the callback does under DDP);
- ``ddp+fisher_local``: the accumulator without the all-reduce (what the signal itself costs);
- ``find_unused``: DDP with ``find_unused_parameters=True`` (what Growing drops after the last block).

Then half of the channels are gated off and collected, and the DDP wrapper rebuilt over the smaller
parameters several times (``callbacks.distributed.release`` and a new wrapper, as ``rewrap_ddp`` does):
its cost is printed in steps.

    python benchmarks/ddp_overhead.py [--rounds 3] [--steps 20] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import socket
import statistics
import sys
import time

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from interleave import median_ratio, random_batches, time_interleaved  # benchmarks/ (the script's folder)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from callbacks.distributed import release, sum_over_ranks
from lit_nas import DataShape, NetConfig, build_net
from lit_nas.fisher import FisherAccumulator
from lit_nas.gates import attach_gates
from lit_nas.surgery import collect_gated


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(lg, y) for lg in net(x).logits)


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective that never completes fails after 2 minutes instead of hanging the benchmark
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = build_net(NetConfig(kind="wide_resnet", depth=16, widen_factor=1).build_spec(DataShape(1, 28, 10)))
    groups = [g.name for g in base.channel_groups()]
    attach_gates(base, groups)
    nets = {name: copy.deepcopy(base) for name in ("ddp", "ddp+fisher", "ddp+fisher_local", "find_unused")}
    wrapped = {n: DDP(net, find_unused_parameters=n == "find_unused") for n, net in nets.items()}
    opts = {n: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for n, net in nets.items()}
    acc = FisherAccumulator(nets["ddp+fisher"], groups, reduce=sum_over_ranks)
    local = FisherAccumulator(nets["ddp+fisher_local"], groups)  # the signal without the all-reduce
    acc.attach()
    local.attach()
    batches = random_batches(args.steps, args.batch_size, seed=1 + rank)  # each rank its own share

    def step(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        opts[name].zero_grad(set_to_none=True)
        loss_of(wrapped[name], *batch).backward()
        if name == "ddp+fisher":
            acc.end_step()
        elif name == "ddp+fisher_local":
            local.end_step()
        opts[name].step()

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if rank else sys.stdout):
        times = time_interleaved(list(nets), batches, step, args.rounds)  # rank 0 prints the rounds

    # a collection of half of every group, then the rewrap: release the old reducer, wrap anew
    net = nets["ddp"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in attach_gates(net, groups).values():
            n = gate.numel()
            gate[torch.randperm(n, generator=g)[: n - math.ceil(n / 2)]] = 0
    collect_gated(net, [opts["ddp"]])
    rewraps = []
    for _ in range(args.rewraps):
        dist.barrier()
        t0 = time.perf_counter()
        wrapped["ddp"] = DDP(release(wrapped.pop("ddp")))  # what rewrap_ddp does, without Lightning
        rewraps.append(time.perf_counter() - t0)
    after = []
    for batch in batches:  # the smaller network still trains under the new wrapper
        t0 = time.perf_counter()
        step("ddp", batch)
        after.append(time.perf_counter() - t0)
    if rank == 0:
        med = {n: statistics.median(t) for n, t in times.items()}
        print(
            f"\n2 processes (gloo), 1 thread each, batch {args.batch_size} per process, "
            f"torch {torch.__version__}"
        )
        print(f"{len(times['ddp'])} steps per variant; median step time:")
        for name in nets:
            print(f"  {name:17s} {med[name] * 1e3:8.2f} ms")
        print("median of the per-batch ratios:")
        print(f"  ddp+fisher / ddp:  {median_ratio(times, 'ddp+fisher', 'ddp'):.3f}")
        print(
            f"  ddp+fisher / ddp+fisher_local (the all-reduce): "
            f"{median_ratio(times, 'ddp+fisher', 'ddp+fisher_local'):.3f}"
        )
        print(f"  find_unused / ddp: {median_ratio(times, 'find_unused', 'ddp'):.3f}")
        rw = statistics.median(rewraps)
        print(
            f"rewrap after collecting half the channels: median {rw * 1e3:.1f} ms over {len(rewraps)} = "
            f"{rw / med['ddp']:.2f} full-width steps; then {statistics.median(after) * 1e3:.2f} ms per step"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rewraps", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
