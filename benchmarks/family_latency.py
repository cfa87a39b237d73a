"""TFLite latency of whole networks from configs, side by side in one timing run (the mobile table).

    .venv/bin/python benchmarks/family_latency.py quickstart mobilenet_v1_fast mobilenet_v2_fast mnasnet_fast

Each config's network (``model.init_args.net``, Fashion-MNIST's 28x28x1, 10 classes) gets random weights
(latency does not depend on them; int8 is calibrated on random images), is exported to TFLite (full model,
fp32 and int8) and timed by the local runner (1 interpreter thread, batch 1) in one run, in shuffled order
over ``--passes`` passes, so the machine's drift hits all alike. Printed: parameters, MFLOPs (to the last
exit, all heads on the way) and the mean latency of each.
"""

import lit_nas  # noqa: F401  isort: skip

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from device_bench.pipeline import time_full_models
from device_bench.runners import BenchSettings
from lit_nas import DataShape, NetConfig, build_net
from lit_nas.cost import count_costs
from lit_nas.paths import resolve_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    shape = DataShape(1, 28, 10)
    torch.manual_seed(0)
    calib = torch.randn(64, 1, 28, 28)
    nets = {}
    for name in args.configs:
        cfg = yaml.safe_load(resolve_config(name).read_text())["model"]["init_args"]["net"]
        nets[Path(name).stem] = build_net(NetConfig(**cfg).build_spec(shape)).eval()
    with tempfile.TemporaryDirectory(prefix="lit_nas_families_") as tmp:
        settings = BenchSettings(runs=args.runs, passes=args.passes)
        latency, report = time_full_models(nets, calib, tmp, settings)
    print(
        f"full models, local runner on {report.report.get('machine', '?')}, 1 thread, batch 1, "
        f"{args.runs} runs x {args.passes} passes"
    )
    print(f"{'config':<22} {'params':>9} {'MFLOPs':>7} {'fp32 ms':>8} {'int8 ms':>8}")
    for name, net in nets.items():
        costs = count_costs(net)
        mflops = costs.early_exit_costs(net.spec.exit_blocks())[-1] / 1e6
        ms = [latency[(name, p)] for p in ("fp32", "int8")]
        print(f"{name:<22} {costs.total_params:>9,} {mflops:>7.2f} {ms[0]:>8.3f} {ms[1]:>8.3f}")


if __name__ == "__main__":
    main()
