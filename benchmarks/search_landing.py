"""Where latency searches land: each found network's measured latency against its target, in one timing run.

    .venv/bin/python benchmarks/search_landing.py --lut configs/luts/wrn16_1_fast_local.json \
        --target 0.5 --round-to 8 runs/netadapt_aligned runs/morphnet_aligned runs/fisher_aligned

Each run's start network is rebuilt from its config (``lit_nas_config.yaml``), the network found from the
ArchSpec of its last checkpoint (gates folded: what ``found_arch.yaml`` says). All of them are exported
(fp32, random weights: latency does not depend on them) and timed by the local runner in one shuffled run
(1 thread, batch 1), so the machine's drift hits all alike. Printed per run: whether every channel group is
a multiple of ``--round-to`` (or narrower than one step), the predicted and the measured latency as a
fraction of the start network's, and how far the measured fraction lies from ``--target``.
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
from lit_nas.align import unaligned
from lit_nas.latency import LatencyLUT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (their config, checkpoints/last.ckpt)")
    p.add_argument("--lut", required=True, help="the tables the searches used")
    p.add_argument("--target", type=float, required=True, help="the latency fraction the searches aimed at")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--runs-per-pass", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    lut = LatencyLUT.load(args.lut)
    specs: dict[str, ArchSpec] = {}
    for i, run in enumerate(map(Path, args.runs)):
        config = yaml.safe_load((run / "lit_nas_config.yaml").read_text())
        found = MultiExitModule.spec_from_checkpoint(run / "checkpoints" / "last.ckpt")
        shape = DataShape(found.in_channels, found.input_size, found.num_classes)
        net_cfg = {k: v for k, v in config["model"]["init_args"]["net"].items() if v is not None}
        specs.setdefault("start", NetConfig(**net_cfg).build_spec(shape))
        specs[f"run{i}"] = ArchSpec.from_dict({**found.to_dict(), "gated": {}})
    torch.manual_seed(0)
    start = specs["start"]
    calib = torch.randn(8, start.in_channels, start.input_size, start.input_size)
    nets = {name: build_net(spec).eval() for name, spec in specs.items()}
    settings = BenchSettings(runs=args.runs_per_pass, passes=args.passes, warmup_s=0.5, sleep_s=0.0)
    with tempfile.TemporaryDirectory(prefix="lit_nas_landing_") as tmp:
        latency, report = time_full_models(nets, calib, tmp, settings, precisions=("fp32",))
    rep = report.report
    load = rep.get("load", {})
    print(
        f"local runner on {rep.get('machine')} ({rep.get('interpreter')}), 1 thread, batch 1, fp32, "
        f"{args.runs_per_pass} runs x {args.passes} passes, load before/after {load.get('before')} / "
        f"{load.get('after')}"
    )
    base_ms, base_pred = latency[("start", "fp32")], lut.predict(start)
    print(f"start network: measured {base_ms:.3f} ms, predicted {base_pred:.3f} ms")
    print(f"{'run':<40} {'aligned':>7} {'predicted':>9} {'measured':>8} {'vs target':>9}")
    for i, run in enumerate(args.runs):
        spec = specs[f"run{i}"]
        sizes = {g.name: g.size for g in build_net(spec).channel_groups()}
        bad = unaligned(sizes, args.round_to)
        pred = lut.predict(spec) / base_pred
        meas = latency[(f"run{i}", "fp32")] / base_ms
        print(
            f"{Path(run).name:<40} {'yes' if not bad else 'NO':>7} {pred:>9.3f} {meas:>8.3f} "
            f"{100 * (meas - args.target) / args.target:>+8.1f}%" + (f"  unaligned: {bad}" if bad else "")
        )


if __name__ == "__main__":
    main()
