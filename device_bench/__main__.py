"""``python -m device_bench {export,time,lut,lut-check}``: the device tools without a training run.

- ``export CKPT --out DIR``: a checkpoint to ``.tflite`` files (per exit + full; int8 calibrated on
  ``--data`` training images);
- ``time MODEL.tflite ... [--runner ssh --host pi]``: the thesis's timing protocol, JSON out;
- ``staircase [--config YAML | --arch SPEC | --ckpt CKPT] --out staircase.json [--plot PNG]``: latency
  against channels 1..64 for each layer family (that network's, or all), and the channel steps detected;
- ``lut (--config YAML | --arch SPEC | --ckpt CKPT) --out lut.json``: per-layer latency look-up tables
  covering that network and every narrower version of it, aligned to the device's channel steps (measured
  first, or read from ``--staircase``; ``--smoothed``: the older Gaussian-smoothed tables);
- ``lut-check --lut lut.json (--config | --arch | --ckpt) [--variants 20]``: Pearson r and mean abs % error
  of the predictor over random pruned variants, measured as whole models.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import lit_nas  # noqa: F401  (first: makes torchvision importable next to a CPU torch)
from device_bench.runners import INTERPRETERS, RUNNERS, BenchSettings, make_runner
from lit_nas.arch import ArchSpec, DataShape
from lit_nas.nets.recipe import NetConfig
from lit_nas.paths import resolve_config
from lit_nas.yamlfile import load_yaml

DATA = {"fashion_mnist": "lit_nas.data.FashionMNISTDataModule", "cifar10": "lit_nas.data.CIFAR10DataModule"}


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def spec_from_args(args: argparse.Namespace) -> ArchSpec:
    """The architecture named by ``--arch``, ``--ckpt`` or ``--config``."""
    from lit_nas.module import MultiExitModule

    if args.arch:
        return ArchSpec.load(args.arch)
    if args.ckpt:
        from lit_nas.runs import check_checkpoint

        check_checkpoint(args.ckpt, "measured")
        return MultiExitModule.spec_from_checkpoint(args.ckpt)
    path = resolve_config(args.config)
    config = load_yaml(path, "config")
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a mapping of keys; it holds a {type(config).__name__}")
    model = config.get("model", {}).get("init_args", {})
    if model.get("arch_spec"):
        return ArchSpec.load(model["arch_spec"])
    data = config.get("data", {}).get("class_path", DATA["fashion_mnist"])
    shape: DataShape = _class(data).SHAPE
    return NetConfig(**model.get("net", {})).build_spec(shape)


def _add_arch(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--config", help="training config (configs/NAME or a path): its model.net and data")
    g.add_argument("--arch", help="an ArchSpec file (found_arch.yaml)")
    g.add_argument("--ckpt", help="a lit_nas checkpoint")


def _add_runner(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="local", choices=RUNNERS)
    p.add_argument("--host", help="ssh: a ~/.ssh/config Host or [user@]host[:port]")
    p.add_argument("--ssh-config", help="ssh: an ssh_config file instead of ~/.ssh/config")
    p.add_argument("--remote-python", default="python3", help="ssh: the device's Python")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--sleep-s", type=float, default=None, help="default: 10 over ssh, 0 locally")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--interpreter",
        default="tflite_runtime",
        choices=INTERPRETERS,
        help="the device's runtime: tflite_runtime (<= Python 3.11) or ai_edge_litert (LiteRT)",
    )


def _runner(args: argparse.Namespace):
    kwargs = {"python": args.remote_python} if args.runner == "ssh" else {}
    runner = make_runner(args.runner, host=args.host, ssh_config=args.ssh_config, **kwargs)
    settings = BenchSettings(
        runs=args.runs,
        passes=args.passes,
        warmup_s=args.warmup_s,
        sleep_s=args.sleep_s,
        threads=args.threads,
        interpreter=args.interpreter,
    )
    return runner, settings


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m device_bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint -> .tflite files")
    e.add_argument("ckpt")
    e.add_argument("--out", required=True)
    e.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    e.add_argument("--data", choices=sorted(DATA), default="fashion_mnist", help="int8 calibration images")
    e.add_argument("--data-root", help="the dataset's directory (default: the datamodule's)")
    e.add_argument("--calib-images", type=int, default=200)

    t = sub.add_parser("time", help="time .tflite files with a runner")
    t.add_argument("models", nargs="+")
    t.add_argument("--out", help="JSON report (default: stdout)")
    _add_runner(t)

    st = sub.add_parser("staircase", help="latency against channel count per layer family; the steps")
    _add_arch(st, required=False)
    st.add_argument("--out", required=True, help="the staircase record (JSON)")
    st.add_argument("--plot", help="a PNG of every sweep")
    st.add_argument("--max-channels", type=int, default=64)
    st.add_argument("--fixed", type=int, nargs="+", default=[32], help="the other axis's widths")
    st.add_argument("--work-dir", help="where the one-layer models go (default: a temporary directory)")
    _add_runner(st)

    lut = sub.add_parser("lut", help="build per-layer latency look-up tables")
    _add_arch(lut)
    lut.add_argument("--out", required=True)
    lut.add_argument("--channels", type=int, nargs="+", default=None, help="grid of channel counts")
    kind = lut.add_mutually_exclusive_group()
    kind.add_argument(
        "--staircase", help="align to the steps of this staircase record (default: measure one)"
    )
    kind.add_argument("--smoothed", action="store_true", help="Gaussian-smoothed tables, no steps (older)")
    lut.add_argument("--sigma", type=float, default=1.0, help="--smoothed: smoothing in grid steps (0: off)")
    lut.add_argument(
        "--calibration",
        type=int,
        default=5,
        help="pruned variants timed whole to fit the LUT's scale (0: none)",
    )
    lut.add_argument("--work-dir", help="where the one-layer models go (default: a temporary directory)")
    _add_runner(lut)

    chk = sub.add_parser("lut-check", help="predicted vs measured latency over random pruned variants")
    _add_arch(chk)
    chk.add_argument("--lut", required=True)
    chk.add_argument("--variants", type=int, default=20)
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--out", help="JSON with every prediction and measurement")
    _add_runner(chk)

    args = p.parse_args(argv)
    if args.command == "export":
        from device_bench.export import export_tflite
        from lit_nas.module import MultiExitModule
        from lit_nas.runs import check_checkpoint

        check_checkpoint(args.ckpt, "exported")
        module = MultiExitModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
        calib = None
        if "int8" in args.precisions:
            kwargs = {"root": args.data_root} if args.data_root else {}
            dm = _class(DATA[args.data])(**kwargs)
            dm.setup("fit")
            calib = dm.criterion_batches(1, args.calib_images, seed=7)[0][0]
        result = export_tflite(module.net, args.out, calib, tuple(args.precisions))
        for m in result.models:
            print(f"{m.path}  {m.bytes / 1024:.1f} KiB")
        return 0
    runner, settings = _runner(args)
    if args.command == "time":
        report = runner.run(args.models, settings).report
        text = json.dumps(report, indent=1)
        Path(args.out).write_text(text) if args.out else print(text)
        return 0

    from device_bench import lut as lut_mod
    from device_bench import staircase as st_mod

    if args.command == "staircase":
        has_arch = args.config or args.arch or args.ckpt
        configs = st_mod.spec_sweeps([spec_from_args(args)]) if has_arch else st_mod.DEFAULT_SWEEPS
        with tempfile.TemporaryDirectory(prefix="lit_nas_staircase_") as tmp:
            record = st_mod.measure_staircase(
                configs, args.work_dir or tmp, runner, settings, args.max_channels, args.fixed
            )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(st_mod.describe(record))
        if args.plot:
            print(f"plot: {st_mod.plot(record, args.plot)}")
        return 0
    spec = spec_from_args(args)
    if args.command == "lut":
        channels = tuple(args.channels) if args.channels else lut_mod.DEFAULT_CHANNELS
        with tempfile.TemporaryDirectory(prefix="lit_nas_lut_") as tmp:
            steps = None
            if args.staircase:
                steps = st_mod.steps_of(st_mod.load_staircase(args.staircase))
            elif not args.smoothed:  # the device's own steps first, for this network's families
                record = st_mod.measure_staircase(
                    st_mod.spec_sweeps([spec]), args.work_dir or tmp, runner, settings
                )
                print(st_mod.describe(record))
                steps = st_mod.steps_of(record)
            table = lut_mod.measure_lut(
                [spec],
                args.work_dir or tmp,
                runner,
                settings,
                channels,
                args.sigma,
                args.calibration,
                steps=steps,
            )
        table.save(args.out)
        kind = f"aligned, step {table.step}" if table.aligned else "smoothed"
        print(
            f"{args.out}: {len(table.tables)} tables ({kind}), "
            f"scale {table.scale:.3f}; predicted latency of the network {table.predict(spec):.3f} ms on "
            f"{table.device.get('machine')}"
        )
        return 0
    table = lut_mod.LatencyLUT.load(args.lut)
    variants = lut_mod.pruned_variants(spec, args.variants, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="lit_nas_lutcheck_") as tmp:
        res = lut_mod.validate_lut(table, variants, tmp, runner, settings)
    print(f"{args.variants} pruned variants: Pearson r {res['r']:.4f}, MAPE {res['mape']:.2f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with a refused input reported as one line (``LIT_NAS_TRACEBACK=1`` shows where)."""
    import os

    from lit_nas.runs import RunFailure

    try:
        return main(argv)
    except (RunFailure, ValueError, FileNotFoundError) as err:
        if os.environ.get("LIT_NAS_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
