"""TFLite vs PyTorch latency per exit, int8 vs fp32, and the accuracy of the latency look-up tables.

    .venv/bin/python benchmarks/export_latency.py [--rounds 5] [--variants 20]

1. The quick-start network (random weights: latency does not depend on them) is exported per exit. For every
   exit, PyTorch eager (only the blocks and the one head that exit needs, ``torch.no_grad``) and the
   tflite-runtime interpreter take turns in the same process, 1 thread each, batch 1: ``--rounds`` rounds of
   ``--runs`` single-image inferences after a warm-up. Printed: the median over rounds of the per-round ratio
   TFLite fp32 / PyTorch (goal <= 0.30) and int8 / fp32.
2. Latency look-up tables for WRN-16-2 on 32x32x3 (CIFAR-10's shape) and ``--variants`` random pruned
   variants of it: the one-layer models, ``--calibration`` whole networks that fit the LUT's scale (as
   ``python -m device_bench lut`` does) and the held-out validation variants are timed in one run of the
   local runner, in shuffled order over several passes, so the machine's drift hits all alike. Printed:
   Pearson r and mean absolute percentage error of predicted vs measured latency of the validation variants
   (goal r >= 0.99, MAPE <= 5%), raw and calibrated, for each smoothing sigma.
"""

import lit_nas  # noqa: F401  isort: skip

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from device_bench.bench_tflite import Model, load_interpreter_class
from device_bench.export import export_tflite, nhwc
from device_bench.lut import (
    fit_scale,
    layer_models,
    lut_from_report,
    pearson_mape,
    pruned_variants,
    variant_models,
)
from device_bench.runners import BenchSettings, LocalRunner
from lit_nas import DataShape, NetConfig, build_net

QUICKSTART = dict(
    kind="resnet_sdn", stage_widths=[16, 32, 64], cells_per_stage=[3, 3, 3], exit_depths=[0.3, 0.6, 0.8, 1.0]
)


@torch.no_grad()
def torch_to_exit(net, x, exit_block: int):
    feats = []
    for b in range(exit_block + 1):
        feats = net.run_block(b, feats, x)
    return net.run_exit(exit_block, feats)


def time_torch(net, x, exit_block: int, runs: int) -> float:
    for _ in range(5):
        torch_to_exit(net, x, exit_block)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        torch_to_exit(net, x, exit_block)
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e3


def time_tflite(model: Model, image: np.ndarray, runs: int) -> float:
    model.set_input(image)
    for _ in range(5):
        model.it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.it.invoke()
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e3


def export_vs_eager(args, tmp: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = DataShape(1, 28, 10)
    net = build_net(NetConfig(**QUICKSTART).build_spec(shape)).eval()
    calib = torch.randn(64, 1, 28, 28)
    result = export_tflite(net, tmp / "quickstart", calib).by_name()
    interpreter, version = load_interpreter_class("tflite_runtime")
    x = torch.randn(1, 1, 28, 28)
    image = nhwc(x)[0]
    print(
        f"1. quick-start network (resnet_sdn 16/32/64 x 3 cells, 4 exits, 28x28x1), batch 1, 1 thread, "
        f"{args.rounds} rounds x {args.runs} runs; torch {torch.__version__}, {version}"
    )
    print(f"{'exit':>4} {'torch ms':>9} {'fp32 ms':>8} {'int8 ms':>8} {'fp32/torch':>10} {'int8/fp32':>9}")
    for b in net.spec.exit_blocks():
        fp = Model(interpreter, str(result[f"exit{b}_fp32"].path), 1)
        q8 = Model(interpreter, str(result[f"exit{b}_int8"].path), 1)
        rows = []
        for _ in range(args.rounds):
            t = time_torch(net, x, b, args.runs)
            f = time_tflite(fp, image, args.runs)
            q = time_tflite(q8, image, args.runs)
            rows.append((t, f, q, f / t, q / f))
        med = [statistics.median(r[i] for r in rows) for i in range(5)]
        print(f"{b:>4} {med[0]:9.3f} {med[1]:8.3f} {med[2]:8.3f} {med[3]:10.3f} {med[4]:9.3f}")


def lut_accuracy(args, tmp: Path) -> None:
    spec = NetConfig(kind="wide_resnet", depth=16, widen_factor=2, exit_depths=[1.0]).build_spec(
        DataShape(3, 32, 10)
    )
    channels = (8, 16, 24, 32, 48, 64, 96, 128)
    t0 = time.perf_counter()
    tables, where, layer_paths = layer_models([spec], tmp / "lut", channels)
    # calibration networks (the scale of measure_lut) and held-out validation networks: different seeds
    calib = pruned_variants(spec, args.calibration, seed=1000)
    calib_paths = variant_models(calib, tmp / "calibration")
    variants = pruned_variants(spec, args.variants, seed=args.seed)
    variant_paths = [
        p.rename(p.with_name(f"val{p.name}")) for p in variant_models(variants, tmp / "variants")
    ]
    built = time.perf_counter() - t0
    settings = BenchSettings(runs=args.lut_runs, passes=args.lut_passes, warmup_s=0.05)
    t0 = time.perf_counter()
    # one shuffled run for layers, calibration and validation networks: the machine's drift hits all alike
    result = LocalRunner().run(layer_paths + calib_paths + variant_paths, settings)
    timed = time.perf_counter() - t0
    print(
        f"\n2. latency look-up tables, WRN-16-2 on 32x32x3: {len(tables)} tables, {len(layer_paths) - 1} "
        f"one-layer models + {len(calib)} calibration + {len(variants)} validation networks (built in "
        f"{built:.0f} s, timed together in {timed:.0f} s, {settings.passes} passes x {settings.runs} runs)"
    )
    rows = []
    for statistic in ("mean", "median"):
        measured = [result.latency_ms(f"valvariant{i:03d}", statistic) for i in range(len(variants))]
        calib_measured = [result.latency_ms(f"variant{i:03d}", statistic) for i in range(len(calib))]
        for sigma in args.sigmas:
            lut = lut_from_report(tables, where, result, sigma, statistic)
            for label, scale in (("raw", 1.0), ("calibrated", fit_scale(lut, calib, calib_measured))):
                lut.scale = scale
                predicted = [lut.predict(s) for s in variants]
                r, mape = pearson_mape(predicted, measured)
                rows.append(
                    dict(
                        statistic=statistic,
                        sigma=sigma,
                        scale=scale,
                        r=r,
                        mape=mape,
                        predicted_ms=predicted,
                        measured_ms=measured,
                    )
                )
                print(
                    f"   {statistic:>6} sigma {sigma:g} {label:>10} (scale {scale:.3f}): "
                    f"Pearson r {r:.4f}  MAPE {mape:.2f}%"
                )
        print(f"   measured validation networks ({statistic}): {min(measured):.3f} .. {max(measured):.3f} ms")
    if args.dump:
        Path(args.dump).write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--variants", type=int, default=20)
    p.add_argument("--calibration", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lut-runs", type=int, default=50)
    p.add_argument("--lut-passes", type=int, default=5)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--skip-lut", action="store_true")
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--dump", help="JSON with every prediction and measurement of part 2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="export_latency_") as tmp:
        if not args.skip_export:
            export_vs_eager(args, Path(tmp))
        if not args.skip_lut:
            lut_accuracy(args, Path(tmp))


if __name__ == "__main__":
    main()
