"""Measuring per-layer latency look-up tables on a device (Liège thesis section 4.5, after NetAdapt).

The predictor itself (``LatencyLUT``, ``spec_layers``, ``channel_latency``, ``fit_scale``) is pure and lives
in :mod:`lit_nas.latency`; this module plans the tables, builds the one-layer models, times them through a
runner and validates the predictor against whole networks.

The tables (one per layer type and resolution, over a grid of input/output channels; their keys are
described in :mod:`lit_nas.latency`) hold the median (or mean) of each layer's timed runs over all passes,
minus the cost of one invocation (``overhead_ms``, measured on a trivial model), smoothed with a 2-D
Gaussian to remove the measurement spikes the thesis saw.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lit_nas.align import align_up
from lit_nas.arch import ArchSpec
from lit_nas.latency import (
    LatencyLUT,
    Layer,
    channel_latency,
    entry_spread,
    fit_scale,
    measurement_quality,
    smooth,
    spec_layers,
    step_family,
    work_grid,
)

__all__ = [  # the predictor's names stay importable from here
    "DEFAULT_CHANNELS",
    "LatencyLUT",
    "Layer",
    "TableSpec",
    "channel_latency",
    "fit_scale",
    "from_measurements",
    "layer_models",
    "measure_lut",
    "pearson_mape",
    "plan_tables",
    "pruned_variants",
    "smooth",
    "spec_layers",
    "validate_lut",
]

#: Default channel grid of the tables (each table also gets its own maximum).
DEFAULT_CHANNELS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


#: An aligned axis measures every multiple of its step up to this many tiles, then the grid's points.
DENSE_TILES = 8


def grid(maximum: int, channels: Sequence[int], step: int = 0) -> list[int]:
    """Grid points of one table axis.

    ``step`` 0 (smoothed tables) or 1 (no tiling seen): the default points below ``maximum``, then
    ``maximum`` itself. ``step`` > 1 (aligned tables): multiples of the step only: every one up to
    ``DENSE_TILES`` tiles (the staircase itself), then the default points rounded up to the step, and
    ``maximum`` rounded up.
    """
    if step <= 1:  # no tiles (a straight line): the grid's points, interpolated linearly
        return sorted({c for c in channels if c < maximum} | {maximum})
    top = align_up(maximum, step)
    tiles = top // step
    dense = {step * i for i in range(1, min(tiles, DENSE_TILES) + 1)}
    return sorted(dense | {align_up(c, step) for c in channels if c < maximum} | {top})


@dataclass
class TableSpec:
    """What to measure for one table: its grids and the one-layer model's configuration."""

    key: str
    config: dict[str, Any]
    cin: list[int]
    cout: list[int]
    cin_step: int = 0  # 0: a smoothed table (no steps); >= 1: aligned to this step
    cout_step: int = 0


#: ``{family: (cin step, cout step)}`` of aligned tables (:func:`lit_nas.latency.step_family`).
Steps = dict[str, tuple[int, int]]


def plan_tables(
    specs: Iterable[ArchSpec], channels: Sequence[int] = DEFAULT_CHANNELS, steps: Steps | None = None
) -> dict[str, TableSpec]:
    """The tables that cover every layer of ``specs`` (and any narrower version of them).

    Each table's grid runs up to the widest layer of its kind; the stem's input channels (the image) are
    never pruned, so a conv whose input is always the image gets that single input width. With ``steps``
    (the device's staircase, :mod:`device_bench.staircase`) the tables are aligned: their grids are
    multiples of their family's steps (a family the staircase did not sweep gets step 1, every channel
    count a boundary).
    """
    maxima: dict[str, list[int]] = {}
    configs: dict[str, dict[str, Any]] = {}
    image: dict[str, set[int]] = {}  # input widths of convs reading the image (never pruned)
    pruned_input: set[str] = set()  # tables some of whose layers read prunable channels
    for spec in specs:
        for i, layer in enumerate(spec_layers(spec)):
            m = maxima.setdefault(layer.key, [0, 0])
            configs[layer.key] = dict(layer.config)
            m[1] = max(m[1], layer.cout)
            if i == 0:  # the stem reads the image
                image.setdefault(layer.key, set()).add(layer.cin)
            else:
                m[0] = max(m[0], layer.cin)
                pruned_input.add(layer.key)
    tables = {}
    for key, (cin, cout) in maxima.items():
        a, b = steps.get(step_family(configs[key]), (1, 1)) if steps is not None else (0, 0)
        cin_grid = sorted(set(grid(cin, channels, a) if key in pruned_input else []) | image.get(key, set()))
        cout_grid = grid(cout, channels, b) if cout else [0]
        tables[key] = TableSpec(key, configs[key], cin_grid, cout_grid, a, b if cout else min(a, 1))
    return tables


def from_measurements(
    tables: dict[str, TableSpec],
    ms: dict[str, np.ndarray],
    overhead_ms: float,
    sigma: float,
    spread: dict[str, np.ndarray] | None = None,
    **info: Any,
) -> LatencyLUT:
    """Assemble a :class:`LatencyLUT` from the latency of every grid point (overhead included).

    Aligned tables (``cin_step`` >= 1) are never smoothed: a Gaussian would carry each step's cost into the
    channels below it. ``spread``: each entry's pass-to-pass spread (kept in the table).
    """
    out = {}
    aligned = any(t.cin_step for t in tables.values())
    for key, t in tables.items():
        raw = np.maximum(np.asarray(ms[key], dtype=float) - overhead_ms, 0.0)
        out[key] = {
            "cin": t.cin,
            "cout": t.cout,
            "config": t.config,
            "raw_ms": raw.tolist(),
            "ms": (raw if aligned else smooth(raw, sigma, work_grid(t))).tolist(),
        }
        if aligned:
            out[key].update(cin_step=max(t.cin_step, 1), cout_step=max(t.cout_step, 1))
        if spread is not None:
            out[key]["spread"] = np.asarray(spread[key], float).round(4).tolist()
    return LatencyLUT(out, overhead_ms, 0.0 if aligned else sigma, **info)


def pearson_mape(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """Pearson correlation and mean absolute percentage error of predictions against measurements."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if len(p) < 2:
        raise ValueError("need at least two points")
    r = float(np.corrcoef(p, m)[0, 1])
    mape = float(np.mean(np.abs(p - m) / m) * 100)
    return r, mape


def layer_models(
    specs: Iterable[ArchSpec],
    out_dir: str | Path,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    python: str | None = None,
) -> tuple[dict[str, TableSpec], dict[str, tuple[str, int, int]], list[Path]]:
    """Write the one-layer model of every grid point of the tables covering ``specs``.

    Returns:
        The tables, where each model's measurement goes (``{model name: (table, cin index, cout index)}``,
        plus ``overhead``, a trivial model), and the model files.
    """
    from device_bench.export import load_manifest, run_tf_side

    tables, where, root = _layer_bundle(specs, out_dir, channels)
    run_tf_side([root], python)
    return tables, where, [m.path for m in load_manifest(root).models]


def layer_config(config: dict[str, Any], cin: int, cout: int) -> dict[str, Any]:
    """The one-layer model of a table entry (:func:`device_bench.keras_mirror.build_layer`)."""
    if config["op"] == "concat":  # the entry is the total: two halves of cin // 2
        return dict(config, cin=max(1, cin // 2), cout=max(1, cin // 2))
    return dict(config, cin=cin, cout=cout if cout else cin)


def _layer_bundle(
    specs: Iterable[ArchSpec], out_dir: str | Path, channels: Sequence[int], steps: Steps | None = None
) -> tuple[dict[str, TableSpec], dict[str, tuple[str, int, int]], Path]:
    """The bundle of :func:`layer_models`, not yet converted: its tables, model places and directory."""
    tables = plan_tables(specs, channels, steps)
    root = Path(out_dir)
    return tables, _write_layers({"lut": tables}, root)["lut"], root


def _write_layers(
    plans: Mapping[str, dict[str, TableSpec]], root: Path
) -> dict[str, dict[str, tuple[str, int, int]]]:
    """Write the one-layer model plan of every table of ``plans`` (``{kind: tables}``) into ``root``.

    A layer two kinds both need is one model. Returns, per kind, where each model's measurement goes
    (``{model: (table, cin index, cout index)}``); ``overhead`` is a trivial model (one invocation's cost).
    """
    layers: dict[str, dict[str, Any]] = {"overhead": {"op": "add", "res": 1, "cin": 1, "cout": 1}}
    where: dict[str, dict[str, tuple[str, int, int]]] = {kind: {} for kind in plans}
    names: dict[str, str] = {}  # a layer's configuration -> its model
    for kind, tables in plans.items():
        for t in tables.values():
            for i, cin in enumerate(t.cin):
                for j, cout in enumerate(t.cout):
                    cfg = layer_config(t.config, cin, cout)
                    name = names.setdefault(json.dumps(cfg, sort_keys=True), f"m{len(names)}")
                    layers[name] = cfg
                    where[kind][name] = (t.key, i, j)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"layers": layers}))
    return where


def lut_from_report(
    tables: dict[str, TableSpec],
    where: dict[str, tuple[str, int, int]],
    result: Any,
    sigma: float = 1.0,
    statistic: str = "median",
) -> LatencyLUT:
    """Assemble the tables from a timing run of :func:`layer_models`' files (a ``BenchReport``).

    ``statistic``: ``median`` (default) or ``mean`` of each model's timed runs. The median ignores the
    occasional preempted run, the positive spikes the thesis saw in its tables.
    """
    ms = {t.key: np.zeros((len(t.cin), len(t.cout))) for t in tables.values()}
    spread = {t.key: np.zeros((len(t.cin), len(t.cout))) for t in tables.values()}
    models = result.report["models"]
    passes = []
    for name, (key, i, j) in where.items():
        ms[key][i, j] = result.latency_ms(name, statistic)
        per_pass = models[name].get("per_pass_median_ms") or [ms[key][i, j]]
        spread[key][i, j] = entry_spread(per_pass)
        passes.append(per_pass)
    report = result.report
    device = {k: report.get(k) for k in ("machine", "system", "python", "interpreter")}
    setting = {k: report.get(k) for k in ("runs", "passes", "warmup_s", "sleep_s", "threads")}
    setting["statistic"] = statistic
    overhead = result.latency_ms("overhead", statistic)
    load = report.get("load", {})
    quality = measurement_quality(
        np.array(passes),
        load.get("before", []),
        load.get("after", []),
        load.get("cpus", 1),
        report.get("threads", 1),
    )
    return from_measurements(
        tables, ms, overhead, sigma, spread, device=device, settings=setting, quality=quality
    )


def measure_lut(
    specs: Sequence[ArchSpec],
    out_dir: str | Path,
    runner: Any,
    settings: Any,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    sigma: float = 1.0,
    calibration: int = 5,
    statistic: str = "median",
    python: str | None = None,
    steps: Steps | None = None,
) -> LatencyLUT:
    """Build the one-layer models of every table for ``specs``, time them with ``runner``, assemble the LUT.

    Args:
        specs: architectures the tables must cover (and every narrower version of them).
        out_dir: where the one-layer models go.
        runner: a :class:`~device_bench.runners.Runner` (the device).
        settings: its :class:`~device_bench.runners.BenchSettings` (the mean over its passes is stored).
        channels: channel grid of the tables.
        sigma: Gaussian smoothing, in grid steps.
        calibration: random pruned variants of ``specs[0]`` timed as whole networks in the same run, to fit
            :attr:`LatencyLUT.scale` (0: no calibration, scale 1).
        statistic: ``median`` or ``mean`` of each model's timed runs.
        python: Python of the TensorFlow environment.
        steps: the device's channel steps per family (:func:`device_bench.staircase.steps_of`): aligned
            tables, never smoothed; ``None``: smoothed tables over ``channels``.
    """
    luts, _ = measure_luts(
        specs, out_dir, runner, settings, {"lut": steps}, channels, sigma, calibration, statistic, python
    )
    return luts["lut"]


def measure_luts(
    specs: Sequence[ArchSpec],
    out_dir: str | Path,
    runner: Any,
    settings: Any,
    kinds: Mapping[str, Steps | None],
    channels: Sequence[int] = DEFAULT_CHANNELS,
    sigma: float = 1.0,
    calibration: int = 5,
    statistic: str = "median",
    python: str | None = None,
    networks: Sequence[ArchSpec] = (),
) -> tuple[dict[str, LatencyLUT], Any]:
    """:func:`measure_lut` for several kinds of tables at once, and whole networks, in one shuffled run.

    A layer that two kinds both need is converted and timed once. The whole networks (``calibration``
    pruned variants of ``specs[0]`` first, then ``networks``) are the report's ``variant<i>``.

    Args:
        specs: architectures the tables must cover (and every narrower version of them).
        out_dir: where the models go.
        runner: the device's runner.
        settings: its timing protocol.
        kinds: ``{name: steps}``: aligned tables for a staircase's steps, smoothed ones for ``None``.
        channels: the tables' channel grid (rounded to the steps in aligned tables).
        sigma: the smoothed tables' Gaussian, in grid steps.
        calibration: pruned variants of ``specs[0]`` timed whole, to fit each kind's scale (0: none).
        statistic: ``median`` or ``mean`` of each model's timed runs.
        python: Python of the TensorFlow environment.
        networks: more whole networks to time in the same run (to compare predictions with).

    Returns:
        The tables of each kind (their scales fitted on the calibration variants) and the timing report.
    """
    from device_bench.export import load_manifest, run_tf_side

    plans = {kind: plan_tables(specs, channels, steps) for kind, steps in kinds.items()}
    root = Path(out_dir) / "layers"
    where = _write_layers(plans, root)
    calib_specs = pruned_variants(specs[0], calibration, seed=1000) if calibration else []
    bundles = _variant_bundles([*calib_specs, *networks], Path(out_dir) / "networks")
    run_tf_side([root, *bundles], python)  # one TensorFlow start-up for the layers and the networks
    paths = [m.path for m in load_manifest(root).models]
    result = runner.run(paths + _variant_paths(bundles), settings)  # the same conditions for all
    luts = {}
    for kind, tables in plans.items():
        luts[kind] = lut_from_report(tables, where[kind], result, sigma, statistic)
        if calib_specs:
            measured = [result.latency_ms(f"variant{i:03d}", statistic) for i in range(len(calib_specs))]
            luts[kind].scale = fit_scale(luts[kind], calib_specs, measured)
    return luts, result


def pruned_variants(spec: ArchSpec, n: int, seed: int = 0, low: float = 0.25) -> list[ArchSpec]:
    """``n`` random narrower versions of ``spec``, as a pruning run visits them.

    Each variant draws an overall keep fraction ``f`` in ``[low, 1]``; every channel group then keeps
    ``f`` times a factor in ``[0.75, 1.25]`` of its channels (at most all, at least one).
    """
    from lit_nas.nets import build_net

    if n < 1 or not 0 < low <= 1:
        raise ValueError(f"need n >= 1 and low in (0, 1]; got n={n}, low={low}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        net = build_net(spec)
        f = rng.uniform(low, 1.0)
        for g in net.channel_groups():
            keep = min(g.size, max(1, round(g.size * f * rng.uniform(0.75, 1.25))))
            net = build_net(net.resized_spec(g.name, keep))
        out.append(net.spec)
    return out


def variant_models(specs: Sequence[ArchSpec], out_dir: str | Path, python: str | None = None) -> list[Path]:
    """Export the full fp32 model of each spec (random weights) as ``variant<i>.tflite``."""
    from device_bench.export import run_tf_side

    bundles = _variant_bundles(specs, out_dir)
    run_tf_side(bundles, python)
    return _variant_paths(bundles)


def _variant_bundles(specs: Sequence[ArchSpec], out_dir: str | Path) -> list[Path]:
    from device_bench.export import write_bundle
    from lit_nas.nets import build_net

    root = Path(out_dir)
    return [
        write_bundle(build_net(s), root / f"variant{i:03d}", precisions=("fp32",), per_exit=False)
        for i, s in enumerate(specs)
    ]


def _variant_paths(bundles: Sequence[Path]) -> list[Path]:
    """The converted ``variant<i>.tflite`` of each bundle, renamed so a timing report names it."""
    from device_bench.export import load_manifest

    paths = []
    for i, b in enumerate(bundles):
        (model,) = load_manifest(b).models
        paths.append(model.path.replace(model.path.with_name(f"variant{i:03d}.tflite")))
    return paths


def compare(lut: LatencyLUT, specs: Sequence[ArchSpec], result: Any) -> dict[str, Any]:
    """Predicted vs measured latency of the :func:`variant_models` of ``specs`` in a timing run."""
    statistic = lut.settings.get("statistic", "mean")
    measured = [result.latency_ms(f"variant{i:03d}", statistic) for i in range(len(specs))]
    predicted = [lut.predict(s) for s in specs]
    r, mape = pearson_mape(predicted, measured)
    return {"r": r, "mape": mape, "predicted_ms": predicted, "measured_ms": measured}


def validate_lut(
    lut: LatencyLUT,
    specs: Sequence[ArchSpec],
    out_dir: str | Path,
    runner: Any,
    settings: Any,
    python: str | None = None,
) -> dict[str, Any]:
    """Measure the full fp32 models of ``specs`` and compare with the predictions.

    Returns:
        ``{"r": Pearson r, "mape": mean abs % error, "predicted_ms": [...], "measured_ms": [...]}``.
    """
    paths = variant_models(specs, out_dir, python)
    return compare(lut, specs, runner.run(paths, settings))
