"""How well the latency predictors predict networks they were not fitted on, the way the field reports it.

    .venv/bin/python benchmarks/predictor_accuracy.py \
        --staircase studies/results/latency_tables/staircase_x86_64.json \
        [--out studies/results/latency_tables] [--runs 50] [--passes 3] [--warmup-s 0.1]

The held-out networks are every distinct architecture the committed studies trained (``summary.arch`` of
``studies/results/*/trials``: networks found by Fisher, NetAdapt, MorphNet and SNIP (filter and edge, dense
nets included), the width-scaled WRN/ResNet baselines, the mobile families), plus WRN-16-1 scaled to
unaligned widths. The calibration networks (random pruned variants of WRN-16-1, the dense net and
MobileNetV2) fit each predictor's one scale factor and are not scored.

In **one shuffled run** (the thesis protocol, local runner, 1 thread) it times the one-layer models of two
kinds of tables covering every network (aligned to the staircase's steps, and today's Gaussian-smoothed
tables), the calibration networks and the held-out networks. Printed and written (``accuracy.md``,
``accuracy.json``): for each predictor (aligned tables, smoothed tables, MFLOPs alone), the share of
held-out networks predicted within +-10% of measured (nn-Meter's figure), Spearman's rank correlation
(HELP's), and the mean absolute percentage error; and the same figures for the measurement against
itself (each pass against the median of the others: the machine's run-to-run noise, the ceiling).
"""

import lit_nas  # noqa: F401  isort: skip

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

from device_bench.lut import measure_luts, pruned_variants
from device_bench.runners import BenchSettings, LocalRunner
from device_bench.staircase import load_staircase, steps_of
from lit_nas import ArchSpec, DataShape, NetConfig
from lit_nas.cost import spec_cost
from lit_nas.paths import REPO_ROOT

SHAPE = DataShape(1, 28, 10)
WRN = NetConfig(kind="wide_resnet", depth=16, widen_factor=1, exit_depths=[0.25, 0.5, 0.75, 1.0])


def held_out() -> list[tuple[str, ArchSpec]]:
    """``(label, spec)`` of every distinct network of the committed study records, and unaligned WRNs."""
    seen: dict[str, tuple[str, ArchSpec]] = {}
    pattern = str(REPO_ROOT / "studies/results/*/trials/*/*/*.json")
    for f in sorted(glob.glob(pattern)):
        rec = json.loads(Path(f).read_text())
        arch = (rec.get("summary") or {}).get("arch")
        if not arch:
            continue
        spec = ArchSpec.from_dict({**arch, "gated": {}})
        key = json.dumps(spec.to_dict(), sort_keys=True)
        parts = Path(f).parts
        study, family, point = parts[-5], parts[-3], parts[-2]
        config = point.split(",")[0].split("-")[0].removeprefix("config=").removesuffix(".yaml")
        label = f"{study}/{config if family == 'search' else family}"
        seen.setdefault(key, (label, spec))
    from lit_nas.nets.recipe import scale_widths

    base = {"kind": "wide_resnet", "depth": 16, "widen_factor": 1, "exit_depths": [0.25, 0.5, 0.75, 1.0]}
    for m in (0.5625, 0.6875, 0.8125, 0.9375):
        spec = NetConfig(**scale_widths(base, m)).build_spec(SHAPE)
        seen.setdefault(json.dumps(spec.to_dict(), sort_keys=True), (f"wrn16_1 x{m} (unaligned)", spec))
    return list(seen.values())


def calibration() -> list[ArchSpec]:
    """Random pruned variants of the three families' base networks: they fit the scales, never scored."""
    dense = NetConfig(stage_widths=[16, 32, 64], cells_per_stage=[2, 2, 2], exit_depths=[1.0], dense=True)
    mb = NetConfig(
        kind="mobilenet_v2", stage_widths=[16, 24, 32], cells_per_stage=[1, 2, 2], exit_depths=[1.0]
    )
    out = []
    for i, cfg in enumerate((WRN, dense, mb)):
        out += pruned_variants(cfg.build_spec(SHAPE), 2, seed=500 + i)
    return out


def figures(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Share within +-10%, Spearman's rho, MAPE (%)."""
    err = (predicted - measured) / measured
    return {
        "within_10pct": float(np.mean(np.abs(err) <= 0.10)),
        "spearman": float(stats.spearmanr(predicted, measured).statistic),
        "mape": float(np.mean(np.abs(err)) * 100),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--staircase", required=True, help="the staircase record whose steps align the tables")
    p.add_argument("--out", default=str(REPO_ROOT / "studies/results/latency_tables"))
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--warmup-s", type=float, default=0.1)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nets = held_out()
    calib = calibration()
    specs = [s for _, s in nets] + calib
    steps = steps_of(load_staircase(args.staircase))
    settings = BenchSettings(runs=args.runs, passes=args.passes, warmup_s=args.warmup_s, sleep_s=0.0)
    print(f"{len(nets)} held-out networks, {len(calib)} calibration networks; steps {steps}", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lit_nas_predictor_") as tmp:
        luts, result = measure_luts(
            specs,
            tmp,
            LocalRunner(),
            settings,
            {"aligned": steps, "smoothed": None},
            calibration=0,
            networks=calib + [s for _, s in nets],
        )
    wall = time.time() - t0
    models = result.report["models"]

    def ms(i: int) -> float:
        return result.latency_ms(f"variant{i:03d}", "median")

    calib_ms = np.array([ms(i) for i in range(len(calib))])
    held_ms = np.array([ms(len(calib) + j) for j in range(len(nets))])
    rows = {}
    for kind, lut in luts.items():
        layers = np.array([lut.layers_ms(s) for s in calib])
        lut.scale = float(layers @ (calib_ms - lut.overhead_ms) / (layers @ layers))
        lut.save(out / f"tables_{kind}.json")
        rows[f"{kind} tables"] = np.array([lut.predict(s) for _, s in nets])
    mflops_c = np.array([spec_cost(s, "flops") for s in calib])
    factor = float(mflops_c @ calib_ms / (mflops_c @ mflops_c))
    rows["MFLOPs alone"] = factor * np.array([spec_cost(s, "flops") for _, s in nets])
    # the machine against itself: each pass's median against the median of the other passes
    per_pass = np.array(
        [models[f"variant{len(calib) + j:03d}"]["per_pass_median_ms"] for j in range(len(nets))]
    )
    noise = []
    for k in range(per_pass.shape[1]):
        rest = np.median(np.delete(per_pass, k, axis=1), axis=1)
        noise.append(figures(per_pass[:, k], rest))
    result_rows = {name: figures(pred, held_ms) for name, pred in rows.items()}
    result_rows["measurement vs itself (pass vs other passes, mean)"] = {
        key: float(np.mean([n[key] for n in noise])) for key in noise[0]
    }
    device = result.report
    header = (
        f"{len(nets)} held-out networks on {device.get('machine')} ({device.get('interpreter')}, local "
        f"runner, 1 thread, {args.runs} runs x {args.passes} passes, one shuffled run of "
        f"{len(models)} models, {wall / 60:.1f} min; load before/after {device.get('load', {}).get('before')}"
        f" / {device.get('load', {}).get('after')})"
    )
    lines = [header, "", "| predictor | within +-10% | Spearman | MAPE |", "|---|---|---|---|"]
    for name, f in result_rows.items():
        lines.append(f"| {name} | {100 * f['within_10pct']:.1f}% | {f['spearman']:.3f} | {f['mape']:.1f}% |")
    text = "\n".join(lines)
    print(text)
    (out / "accuracy.md").write_text(text + "\n")
    detail = {
        "header": header,
        "figures": result_rows,
        "networks": [
            {
                "label": label,
                "measured_ms": float(m),
                **{name: float(pred[j]) for name, pred in rows.items()},
                "mflops": spec_cost(s, "flops"),
            }
            for j, ((label, s), m) in enumerate(zip(nets, held_ms))
        ],
        "scales": {kind: lut.scale for kind, lut in luts.items()} | {"ms_per_mflop": factor},
        "quality": {kind: lut.quality for kind, lut in luts.items()},
    }
    (out / "accuracy.json").write_text(json.dumps(detail, indent=1))


if __name__ == "__main__":
    main()
