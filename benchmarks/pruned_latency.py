"""Measured latency of a pruned network next to the network it was pruned from, in one timing run.

    .venv/bin/python benchmarks/pruned_latency.py --run runs/fisher_mobilenet_v2_fast_s0 \
        [--lut configs/luts/mobilenet_v2_fast_local.json] [--runs 50] [--passes 3]

The start network is rebuilt from the run's config (``lit_nas_config.yaml``: ``model.init_args.net``), the
pruned one from the ArchSpec of its last checkpoint. Both get random weights (latency does not depend on
them; int8 is calibrated on random images) and are exported to TFLite (full model, fp32 and int8), then
timed by the local runner (1 interpreter thread, batch 1) in one run, in shuffled order over ``--passes``
passes, so the machine's drift hits both alike. Printed: the mean latency of each and the ratio pruned /
start, with the look-up tables' predictions when ``--lut`` is given.
"""

import lit_nas  # noqa: F401  isort: skip

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from device_bench.pipeline import time_full_models
from device_bench.runners import BenchSettings
from lit_nas import ArchSpec, DataShape, MultiExitModule, NetConfig, build_net
from lit_nas.latency import LatencyLUT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run directory (its config, checkpoints/)")
    p.add_argument("--ckpt", help="the pruned checkpoint (default: RUN/checkpoints/last.ckpt)")
    p.add_argument("--lut", help="latency look-up tables to compare the predictions with")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    run = Path(args.run)
    config = yaml.safe_load((run / "lit_nas_config.yaml").read_text())
    pruned_spec = MultiExitModule.spec_from_checkpoint(args.ckpt or run / "checkpoints" / "last.ckpt")
    shape = DataShape(pruned_spec.in_channels, pruned_spec.input_size, pruned_spec.num_classes)
    net_cfg = dict(config["model"]["init_args"]["net"])
    start_spec = NetConfig(**{k: v for k, v in net_cfg.items() if v is not None}).build_spec(shape)
    specs = {"start": start_spec, "pruned": ArchSpec.from_dict({**pruned_spec.to_dict(), "gated": {}})}
    torch.manual_seed(0)
    calib = torch.randn(64, shape.in_channels, shape.input_size, shape.input_size)
    nets = {name: build_net(spec).eval() for name, spec in specs.items()}
    with tempfile.TemporaryDirectory(prefix="lit_nas_pruned_") as tmp:
        settings = BenchSettings(runs=args.runs, passes=args.passes, warmup_s=0.5)
        latency, report = time_full_models(nets, calib, tmp, settings)
    lut = LatencyLUT.load(args.lut) if args.lut else None
    machine = report.report.get("machine", "?")
    print(
        f"{run.name}: full model, local runner on {machine}, 1 thread, batch 1, "
        f"{args.runs} runs x {args.passes} passes"
    )
    params = {n: sum(p.numel() for p in net.parameters()) for n, net in nets.items()}
    print(f"params: start {params['start']:,}, pruned {params['pruned']:,}")
    for precision in ("fp32", "int8"):
        ms = {n: latency[(n, precision)] for n in specs}
        line = (
            f"{precision}: start {ms['start']:.3f} ms, pruned {ms['pruned']:.3f} ms, "
            f"pruned / start {ms['pruned'] / ms['start']:.3f}"
        )
        if lut is not None and precision == "fp32":
            pred = {n: lut.predict(s) for n, s in specs.items()}
            line += (
                f" | LUT predicted: start {pred['start']:.3f} ms, pruned {pred['pruned']:.3f} ms, "
                f"pruned / start {pred['pruned'] / pred['start']:.3f}"
            )
        print(line)


if __name__ == "__main__":
    main()
