"""Time every network of a study again, all in one quiet run: the latency its report should compare.

    .venv/bin/python benchmarks/retime_study.py studies/latency_search_wrn.yaml [--runs 50] [--passes 3]

A study's trials time their networks (DeviceBench) while other trials train on the other cores, so their
latencies carry the load of the moment. This script rebuilds each finished trial's final network from the
ArchSpec in its record (random weights: latency does not depend on them; int8 calibrated on random images),
exports each distinct architecture once (full model, fp32 and int8, one TensorFlow process), and times them
all with the local runner (1 interpreter thread, batch 1) in one run, in shuffled order over ``--passes``
passes, so drift hits every network alike. Run it with nothing else on the machine. It writes
``studies/results/NAME/retimed.json``, which ``python -m lit_nas.study report`` then uses as the latency of
the trials it names, and prints each point's mean latency.
"""

import lit_nas  # noqa: F401  isort: skip

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from device_bench.pipeline import time_full_models
from device_bench.runners import BenchSettings
from lit_nas import ArchSpec, build_net
from lit_nas.study.report import RETIMED
from lit_nas.study.runner import RESULTS_ROOT, Study
from lit_nas.study.spec import FOUND, StudySpec


def _mean_sd(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="the study's YAML (studies/NAME.yaml)")
    p.add_argument("--results", type=Path, default=RESULTS_ROOT)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument(
        "--precisions",
        default="fp32,int8",
        help="comma-separated (default fp32,int8; fp32 alone where int8 conversion fails, e.g. dense nets)",
    )
    args = p.parse_args()
    spec = StudySpec.load(args.spec)
    study = Study(spec, args.results)
    records = [r for r in study.records() if r.get("status") == "done" and r["family"] != FOUND]
    archs: dict[str, ArchSpec] = {}  # one export per distinct architecture (baselines repeat over seeds)
    arch_of: dict[str, str] = {}
    for rec in records:
        arch = {**rec["summary"]["arch"], "gated": {}}
        key = json.dumps(arch, sort_keys=True)
        archs.setdefault(key, ArchSpec.from_dict(arch))
        arch_of[rec["id"]] = key
    names = {key: f"net{i:03d}" for i, key in enumerate(archs)}
    torch.manual_seed(0)
    first = next(iter(archs.values()))
    calib = torch.randn(64, first.in_channels, first.input_size, first.input_size)
    nets = {names[k]: build_net(a).eval() for k, a in archs.items()}
    settings = BenchSettings(runs=args.runs, passes=args.passes, warmup_s=0.5)
    precisions = tuple(args.precisions.split(","))
    with tempfile.TemporaryDirectory(prefix="lit_nas_retime_") as tmp:
        latency, report = time_full_models(nets, calib, tmp, settings, precisions=precisions)
    machine = report.report.get("machine", "?")
    out = {
        "runner": "local runner, 1 interpreter thread",
        "settings": f"{args.runs} runs x {args.passes} passes",
        "machine": machine,
        "trials": {
            tid: {prec: latency[(names[key], prec)] for prec in precisions} for tid, key in arch_of.items()
        },
    }
    path = study.results.parent / RETIMED
    path.write_text(json.dumps(out, indent=1, sort_keys=True))
    print(
        f"{spec.name}: {len(records)} trials, {len(archs)} distinct networks, timed in one run on {machine}"
    )
    by_point: dict[str, list[dict[str, float]]] = defaultdict(list)
    for rec in records:
        by_point[rec["id"].rsplit("/", 1)[0]].append(out["trials"][rec["id"]])
    for point, ms in by_point.items():
        figures = ", ".join(f"{q} {_mean_sd([m[q] for m in ms])} ms" for q in precisions)
        print(f"  {point}: {figures} (n={len(ms)})")
    print(path)


if __name__ == "__main__":
    main()
