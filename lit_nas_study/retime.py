"""Time every network of a study again, all in one quiet run: the latency its report should compare.

    python study.py retime studies/latency_search_wrn.yaml [--runs 50] [--passes 3]

A study's trials time their networks (DeviceBench) while other trials train on the other cores, so their
latencies carry the load of the moment. This script rebuilds each finished trial's final network from the
ArchSpec in its record (random weights: latency does not depend on them; int8 calibrated on random images),
exports each distinct architecture once (full model, fp32 and int8, one TensorFlow process), and times them
all with the local runner (1 interpreter thread, batch 1) in one run, in shuffled order over ``--passes``
passes, so drift hits every network alike. Run it with nothing else on the machine. It writes
``studies/results/NAME/retimed.json``, which ``python study.py report`` then uses as the latency of
the trials it names, and prints each point's mean latency.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from device_bench.pipeline import time_full_models
from device_bench.runners import BenchSettings
from lit_nas import ArchSpec, build_net
from lit_nas_study.report import RETIMED
from lit_nas_study.runner import Study
from lit_nas_study.spec import FOUND, StudySpec


def _mean_sd(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")


def retime(
    spec: StudySpec,
    results_root: Path,
    runs: int = 50,
    passes: int = 3,
    precisions: tuple[str, ...] = ("fp32", "int8"),
) -> Path:
    """Time every finished trial's network again in one quiet run; write and return ``retimed.json``.

    Args:
        spec: the study.
        results_root: where its records are (``studies/results``).
        runs: timed runs per network and pass.
        passes: passes over all networks, each in a new shuffled order.
        precisions: ``fp32`` and/or ``int8`` (fp32 alone where int8 conversion fails, e.g. dense nets).
    """
    study = Study(spec, results_root)
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
    settings = BenchSettings(runs=runs, passes=passes, warmup_s=0.5)
    with tempfile.TemporaryDirectory(prefix="lit_nas_retime_") as tmp:
        latency, report = time_full_models(nets, calib, tmp, settings, precisions=precisions)
    machine = report.report.get("machine", "?")
    out = {
        "runner": "local runner, 1 interpreter thread",
        "settings": f"{runs} runs x {passes} passes",
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
    return path
