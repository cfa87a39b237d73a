"""What keeping SNIP masks applied costs per training step, next to a dense step and to pruning hooks.

Three copies of one network train side by side on the same batches:

- ``dense``: no masks (the reference);
- ``lit_nas``: masks as buffers, gradients masked before and weights re-masked after every optimizer step,
  through the module's own hooks (``MultiExitModule.on_before_optimizer_step`` and
  ``lit_nas.masks.apply_masks``, what ``MultiExitModule.optimizer_step`` runs);
- ``torch_prune``: the same masks through ``torch.nn.utils.prune.custom_from_mask`` (a forward pre-hook that
  recomputes ``weight = weight_orig * weight_mask`` on every forward: Lightning's ``ModelPruning`` approach).

The variants take turns step by step on the same batch (shuffled order), and the median of the per-batch
ratios is reported: this machine's speed drifts by more than the effect measured. The masking alone (what a
masked step adds) is also timed in isolation. The masks keep
``--keep`` of every block's conv and linear weights (exactly, as SNIP's per-block ranking does).

    python benchmarks/mask_overhead.py [--rounds 7] [--steps 20] [--batch-size 128] [--widths 8 16 32]

Default network: dense_iterative_fast.yaml's (dense, 8/16/32) on 1x28x28 inputs, 4 exits, all active.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import torch
from interleave import (
    median_ratio,
    random_batches,
    time_interleaved,
)  # benchmarks/interleave.py (the script's folder)
from torch import nn
from torch.nn.utils import prune

from lit_nas import DataShape, NetConfig
from lit_nas.masks import apply_masks, masked_pairs
from lit_nas.module import MultiExitModule
from lit_nas.snip import snip_block_masks


def make_module(widths: list[int], dense: bool) -> MultiExitModule:
    torch.manual_seed(0)
    return MultiExitModule(net=NetConfig(stage_widths=widths, dense=dense), data_shape=DataShape(1, 28, 10))


def block_masks(module: MultiExitModule, keep: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = {}
    for ws in module.prunable_weights().values():
        scores = {n: torch.rand(p.shape, generator=g) for n, p in ws.items()}
        masks.update(snip_block_masks(scores, round(keep * sum(p.numel() for p in ws.values()))))
    return masks


def optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def loss_of(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(lg, y) for lg in module(x).logits)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--plain", action="store_true", help="plain ResNet instead of the dense network")
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, ours, hooked = (make_module(args.widths, not args.plain) for _ in range(3))
    masks = block_masks(ours, args.keep)
    ours.set_masks(masks)  # buffers + zeroed weights (no trainer: no optimizer state yet)
    for name, mask in masks.items():
        module_name = name.rsplit(".", 1)[0]
        prune.custom_from_mask(hooked.get_submodule(module_name), "weight", mask)
    pairs = masked_pairs(ours)
    opts = {"dense": optimizer(dense), "lit_nas": optimizer(ours), "torch_prune": optimizer(hooked)}
    models = {"dense": dense, "lit_nas": ours, "torch_prune": hooked}
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    print(
        f"{'dense' if not args.plain else 'plain'} ResNet widths {args.widths}, batch {args.batch_size}, "
        f"{len(masks)} masked weights, {kept:.3f} kept, {args.threads} threads, {torch.__version__}"
    )

    batches = random_batches(args.steps, args.batch_size)

    def step(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        model, opt = models[name], opts[name]
        opt.zero_grad(set_to_none=True)
        loss_of(model, *batch).backward()
        if name == "lit_nas":
            ours.on_before_optimizer_step(opt)  # masks the gradients
        opt.step()
        if name == "lit_nas":
            apply_masks(pairs)  # what MultiExitModule.optimizer_step does after the step

    times = time_interleaved(list(models), batches, step, args.rounds)
    # the masking alone, timed in isolation: what a masked step adds to a dense one
    for p, _ in pairs:
        p.grad = torch.ones_like(p)
    t0 = time.perf_counter()
    for _ in range(200):
        ours.on_before_optimizer_step(opts["lit_nas"])
        apply_masks(pairs)
    masking = (time.perf_counter() - t0) / 200

    # the masks held: pruned weights are exactly zero in both masked variants
    for name, mask in masks.items():
        w_ours = dict(ours.named_parameters())[name]
        w_hook = hooked.get_submodule(name.rsplit(".", 1)[0]).weight
        if torch.any(w_ours[mask == 0] != 0) or torch.any(w_hook[mask == 0] != 0):
            raise SystemExit(f"a pruned weight of {name} is not zero")
    ratio = {n: median_ratio(times, n, "dense") for n in models}
    med = {n: statistics.median(t) for n, t in times.items()}
    n = len(times["dense"])
    print(f"\n{n} steps per variant; median step time, median of the per-batch ratios to dense:")
    for name in models:
        print(f"  {name:12s} {med[name] * 1e3:8.2f} ms   {ratio[name]:.3f}")
    print(f"\nlit_nas masked / dense step time: {ratio['lit_nas']:.3f} (goal <= 1.03)")
    print(f"torch.nn.utils.prune hooks / dense: {ratio['torch_prune']:.3f}")
    print(
        f"masking alone (gradients + weights, timed in isolation): {masking * 1e6:.0f} us = "
        f"{masking / med['dense'] * 100:.2f}% of a dense step"
    )


if __name__ == "__main__":
    main()
