"""Per-layer latency look-up tables and the latency predictor (Liège thesis section 4.5, after NetAdapt).

A network's latency is predicted as the sum of the latencies of its layers, each read from a table measured
on the device for that layer type at that resolution over a grid of input/output channels:

- ``conv<k>_s<stride>_r<res>[_relu]``: a k x k convolution (+ BatchNorm, folded, [+ ReLU, fused]) reading a
  ``res`` x ``res`` map; the 3x3 convs of the stem and the cells, the 1x1 projection shortcuts;
- ``add_r<res>``: a residual addition and its ReLU, over ``cin`` channels;
- ``head_k<kernel>_<mixed|avg>_r<res>_n<classes>``: an exit head (pooling, linear) over ``cin`` channels;

plus the fixed cost of one interpreter invocation (``overhead_ms``, measured on a trivial model and
subtracted from every layer's measurement). Tables hold the median (or mean) of each layer's timed runs over
all passes and are smoothed with a 2-D Gaussian (``scipy.ndimage``) to remove the measurement spikes the
thesis saw; between grid points the predictor interpolates bilinearly, and a scale fitted on a few whole
networks (:func:`fit_scale`) turns the sum of layers into a network's latency. Squeeze-and-Excitation and
dense concatenation/pooling are not in the tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lit_nas.arch import ArchSpec

#: Default channel grid of the tables (each table also gets its own maximum).
DEFAULT_CHANNELS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Layer:
    """One layer of a network to look up: its table and channel counts (``cout`` 0 for 1-D tables)."""

    key: str
    cin: int
    cout: int
    config: tuple[tuple[str, Any], ...] = ()  # what the one-layer model is (see keras_mirror.build_layer)


def _conv(k: int, stride: int, res: int, cin: int, cout: int, relu: bool) -> Layer:
    key = f"conv{k}_s{stride}_r{res}" + ("_relu" if relu else "")
    cfg = {"op": "conv", "k": k, "stride": stride, "res": res, "relu": relu}
    return Layer(key, cin, cout, tuple(sorted(cfg.items())))


def spec_layers(spec: ArchSpec, exits: Sequence[int] | None = None) -> list[Layer]:
    """The layers computed to produce ``exits`` (default: every active exit, the full model).

    The network runs up to the deepest exit asked for; only the heads of ``exits`` are computed, as in the
    exported per-exit and full models.
    """
    exits = list(spec.exit_blocks()) if exits is None else sorted(exits)
    if not exits:
        raise ValueError("no exit to predict the latency of")
    bad = [e for e in exits if e not in spec.exit_blocks()]
    if bad:
        raise ValueError(f"exits {bad} are not active exits; valid choices: {spec.exit_blocks()}")
    widths, sizes, in_widths = spec.feature_widths(), spec.feature_sizes(), spec.cell_input_widths()
    layers = [_conv(3, 1, spec.input_size, spec.in_channels, spec.stem_width, relu=True)]
    for b in range(exits[-1] + 1):
        for i in spec.cells_of_block(b):
            c = spec.cells[i]
            layers.append(_conv(3, c.stride, sizes[i], in_widths[i], c.mid, relu=True))
            layers.append(_conv(3, 1, sizes[i + 1], c.mid, c.out, relu=False))
            if c.projection:
                layers.append(_conv(1, c.stride, sizes[i], widths[i], c.out, relu=False))
            cfg = {"op": "add", "res": sizes[i + 1]}
            layers.append(Layer(f"add_r{sizes[i + 1]}", c.out, 0, tuple(sorted(cfg.items()))))
        if b in exits:
            feat = spec.cells_of_block(b)[-1] + 1
            final = b == spec.num_blocks - 1
            size = sizes[feat]
            kernel = max(1, size // (1 if final else spec.exit_pool))
            mixed = not final
            cfg = {"op": "head", "res": size, "kernel": kernel, "mixed": mixed, "classes": spec.num_classes}
            key = f"head_k{kernel}_{'mixed' if mixed else 'avg'}_r{size}_n{spec.num_classes}"
            layers.append(Layer(key, widths[feat], 0, tuple(sorted(cfg.items()))))
    return layers


def grid(maximum: int, channels: Sequence[int]) -> list[int]:
    """Grid points of one table axis: the default points below ``maximum``, then ``maximum`` itself."""
    return sorted({c for c in channels if c < maximum} | {maximum})


@dataclass
class TableSpec:
    """What to measure for one table: its grids and the one-layer model's configuration."""

    key: str
    config: dict[str, Any]
    cin: list[int]
    cout: list[int]


def plan_tables(
    specs: Iterable[ArchSpec], channels: Sequence[int] = DEFAULT_CHANNELS
) -> dict[str, TableSpec]:
    """The tables that cover every layer of ``specs`` (and any narrower version of them).

    Each table's grid runs up to the widest layer of its kind; the stem's input channels (the image) are
    never pruned, so a conv whose input is always the image gets that single input width.
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
        cin_grid = sorted(set(grid(cin, channels) if key in pruned_input else []) | image.get(key, set()))
        cout_grid = grid(cout, channels) if cout else [0]
        tables[key] = TableSpec(key, configs[key], cin_grid, cout_grid)
    return tables


def _interp2(
    cin_grid: Sequence[int], cout_grid: Sequence[int], table: np.ndarray, cin: float, cout: float
) -> float:
    rows = [float(np.interp(cout, cout_grid, row)) for row in table]
    return float(np.interp(cin, cin_grid, rows))


def smooth(table: np.ndarray, sigma: float, work: np.ndarray | None = None) -> np.ndarray:
    """2-D Gaussian smoothing (1-D for one-row/one-column tables); ``sigma`` in grid steps, 0 = off.

    With ``work`` (e.g. ``cin * cout`` at each grid point) the *latency per unit of work* is smoothed and
    multiplied back: latency grows steeply with the channels, and smoothing it directly would pull every
    value towards its cheaper neighbours (and the widest corner furthest), while the cost per unit of work
    varies slowly; a table exactly proportional to ``work`` is left unchanged.
    """
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return table.copy()
    sig = [0.0 if n == 1 else sigma for n in table.shape]
    if work is None:
        return gaussian_filter(table, sigma=sig, mode="nearest")
    return gaussian_filter(table / work, sigma=sig, mode="nearest") * work


def _work(t: dict[str, Any] | TableSpec) -> np.ndarray:
    cin = np.asarray(t["cin"] if isinstance(t, dict) else t.cin, float)
    cout = np.asarray(t["cout"] if isinstance(t, dict) else t.cout, float)
    return np.outer(cin, np.where(cout > 0, cout, 1.0))


@dataclass
class LatencyLUT:
    """Latency look-up tables of one device, and the predictor.

    Attributes:
        tables: ``{key: {"cin": grid, "cout": grid, "ms": smoothed table, "raw_ms": measured table}}``.
        overhead_ms: the cost of one invocation, counted once per model.
        scale: whole-network calibration: the predicted sum of layer latencies is multiplied by it (fitted
            on a few whole networks timed with the layers, :func:`fit_scale`; 1 = uncalibrated). A network
            runs somewhat slower than its layers alone (its weights and activations do not all stay in
            cache), which the thesis also saw as a scaling factor between prediction and measurement.
        sigma: the Gaussian smoothing applied to ``raw_ms``.
        device: the timing script's description of the device.
        settings: the timing protocol used.
    """

    tables: dict[str, dict[str, Any]]
    overhead_ms: float
    sigma: float = 1.0
    device: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0

    def layer_ms(self, layer: Layer) -> float:
        """Latency of one layer, interpolated in its table."""
        t = self.tables.get(layer.key)
        if t is None:
            raise KeyError(
                f"the look-up table has no entry {layer.key!r}; build it for this architecture "
                f"(python -m device_bench lut ...); it has {sorted(self.tables)}"
            )
        if t["cin"][-1] < layer.cin or t["cout"][-1] < layer.cout:
            raise KeyError(
                f"{layer.key} with {layer.cin} -> {layer.cout} channels is outside the table (up to "
                f"{t['cin'][-1]} -> {t['cout'][-1]}); rebuild it for the wider network"
            )
        return _interp2(t["cin"], t["cout"], np.asarray(t["ms"]), layer.cin, layer.cout)

    def layers_ms(self, spec: ArchSpec, exits: Sequence[int] | None = None) -> float:
        """Sum of the table latencies of the layers of ``spec`` (no overhead, no calibration)."""
        return sum(self.layer_ms(layer) for layer in spec_layers(spec, exits))

    def predict(self, spec: ArchSpec, exits: Sequence[int] | None = None) -> float:
        """Predicted latency in milliseconds of the network up to ``exits`` (default: the full model)."""
        return self.overhead_ms + self.scale * self.layers_ms(spec, exits)

    def resmooth(self, sigma: float) -> LatencyLUT:
        """The same measurements smoothed with another ``sigma``."""
        tables = {
            k: dict(t, ms=smooth(np.asarray(t["raw_ms"]), sigma, _work(t)).tolist())
            for k, t in self.tables.items()
        }
        return LatencyLUT(tables, self.overhead_ms, sigma, self.device, self.settings, self.scale)

    def save(self, path: str | Path) -> Path:
        """Write the tables as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "overhead_ms": self.overhead_ms,
            "sigma": self.sigma,
            "device": self.device,
            "settings": self.settings,
            "scale": self.scale,
            "tables": self.tables,
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyLUT:
        """Read tables written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        return cls(
            data["tables"],
            data["overhead_ms"],
            data["sigma"],
            data["device"],
            data["settings"],
            data.get("scale", 1.0),
        )


def from_measurements(
    tables: dict[str, TableSpec], ms: dict[str, np.ndarray], overhead_ms: float, sigma: float, **info: Any
) -> LatencyLUT:
    """Assemble a :class:`LatencyLUT` from the mean latency of every grid point (overhead included)."""
    out = {}
    for key, t in tables.items():
        raw = np.maximum(np.asarray(ms[key], dtype=float) - overhead_ms, 0.0)
        out[key] = {
            "cin": t.cin,
            "cout": t.cout,
            "config": t.config,
            "raw_ms": raw.tolist(),
            "ms": smooth(raw, sigma, _work(t)).tolist(),
        }
    return LatencyLUT(out, overhead_ms, sigma, **info)


def pearson_mape(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """Pearson correlation and mean absolute percentage error of predictions against measurements."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if len(p) < 2:
        raise ValueError("need at least two points")
    r = float(np.corrcoef(p, m)[0, 1])
    mape = float(np.mean(np.abs(p - m) / m) * 100)
    return r, mape


def fit_scale(lut: LatencyLUT, specs: Sequence[ArchSpec], measured_ms: Sequence[float]) -> float:
    """Least-squares factor ``s`` with ``measured ~ overhead + s * sum of layer latencies``.

    Fitted on whole networks timed in the same run as the layers.
    """
    p = np.array([lut.layers_ms(s) for s in specs])
    m = np.asarray(measured_ms, float) - lut.overhead_ms
    if not len(p) or float(p @ p) <= 0:
        raise ValueError("need at least one network with a positive predicted latency")
    return float(p @ m / (p @ p))


def channel_latency(lut: LatencyLUT, net: Any) -> dict[str, float]:
    """Predicted latency one channel of each channel group of ``net`` costs (for ``FisherPruning``).

    ``net`` must be collected (no dead channels): the difference between the predicted latency of its
    architecture and that with one channel fewer in the group. Never below a microsecond fraction, so a
    ratio ``Delta loss / Delta latency`` stays finite where the table is flat.
    """
    base = lut.predict(net.spec)
    out = {}
    for g in net.channel_groups():
        if g.size <= 1:
            out[g.name] = math.inf  # never pruned (a group keeps one channel); no finite cost needed
            continue
        out[g.name] = max(base - lut.predict(net.resized_spec(g.name, g.size - 1)), 1e-6)
    return out


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

    tables = plan_tables(specs, channels)
    layers: dict[str, dict[str, Any]] = {"overhead": {"op": "add", "res": 1, "cin": 1, "cout": 1}}
    where: dict[str, tuple[str, int, int]] = {}
    for t_i, t in enumerate(tables.values()):
        for i, cin in enumerate(t.cin):
            for j, cout in enumerate(t.cout):
                name = f"t{t_i}_{i}_{j}"
                layers[name] = dict(t.config, cin=cin, cout=cout if cout else cin)
                where[name] = (t.key, i, j)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"layers": layers}))
    run_tf_side([root], python)
    return tables, where, [m.path for m in load_manifest(root).models]


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
    for name, (key, i, j) in where.items():
        ms[key][i, j] = result.latency_ms(name, statistic)
    report = result.report
    device = {k: report.get(k) for k in ("machine", "system", "python", "interpreter")}
    setting = {k: report.get(k) for k in ("runs", "passes", "warmup_s", "sleep_s", "threads")}
    setting["statistic"] = statistic
    overhead = result.latency_ms("overhead", statistic)
    return from_measurements(tables, ms, overhead, sigma, device=device, settings=setting)


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
    """
    tables, where, paths = layer_models(specs, Path(out_dir) / "layers", channels, python)
    calib_specs = pruned_variants(specs[0], calibration, seed=1000) if calibration else []
    calib_paths = variant_models(calib_specs, Path(out_dir) / "calibration", python) if calib_specs else []
    result = runner.run(paths + calib_paths, settings)  # one shuffled run: the same conditions for both
    lut = lut_from_report(tables, where, result, sigma, statistic)
    if calib_specs:
        measured = [result.latency_ms(f"variant{i:03d}", statistic) for i in range(len(calib_specs))]
        lut.scale = fit_scale(lut, calib_specs, measured)
    return lut


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
    from device_bench.export import load_manifest, run_tf_side, write_bundle
    from lit_nas.nets import build_net

    root = Path(out_dir)
    bundles = [
        write_bundle(build_net(s), root / f"variant{i:03d}", precisions=("fp32",), per_exit=False)
        for i, s in enumerate(specs)
    ]
    run_tf_side(bundles, python)
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
