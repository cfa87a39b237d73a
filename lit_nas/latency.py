"""The latency predictor: per-layer look-up tables summed over an ArchSpec (Liège thesis section 4.5).

A network's latency is predicted as the sum of the latencies of its layers, each read from a table measured
on the device for that layer type at that resolution over a grid of input/output channels:

- ``conv<k>_s<stride>_r<res>[_relu|_relu6]``: a k x k convolution (+ BatchNorm, folded, [+ ReLU or ReLU6,
  fused]) reading a ``res`` x ``res`` map; the 3x3 convs of the stem and the basic cells, the 1x1 projection
  shortcuts, the pointwise (1x1) convs of the mobile cells (expand, project, MobileNetV1's pointwise);
- ``dw<k>_s<stride>_r<res>_<act>``: a depthwise k x k convolution (+ BatchNorm + activation) over ``cin``
  channels (1-D table);
- ``add_r<res>``: a residual addition and its ReLU, over ``cin`` channels; ``addlin_r<res>``: the addition
  of an inverted residual (no activation after it);
- ``se_r<res>``: a Squeeze-and-Excitation gate over ``cin`` channels with ``cout`` hidden units (global
  pooling, two 1x1 convs, sigmoid, the channel scaling);
- ``concat_r<res>``: the concatenation that a dense cell reads, over its total ``cin`` channels;
  ``avgpool<k>_r<res>``: the average pooling of one of its earlier, larger feature maps, over ``cin``;
- ``head_k<kernel>_<mixed|avg>_r<res>_n<classes>``: an exit head (pooling, linear) over ``cin`` channels;

plus the fixed cost of one interpreter invocation (``overhead_ms``).

**Aligned tables** (``cin_step``/``cout_step`` > 1 in a table): the device's kernels compute output (and
often input) channels in tiles, so a layer with 9 channels costs what one with 16 does. Such a table is
measured at multiples of the step, and a layer is read at its channels rounded *up* to the step: the
prediction is exact at every step boundary and constant between boundaries, and between two measured
multiples it is linear in the number of tiles. No smoothing crosses a step (``sigma`` 0). The steps are
measured, not assumed (:func:`detect_step` on a staircase sweep, ``python -m device_bench staircase``).

**Smoothed tables** (steps 1, the format before aligned tables): smoothed with a 2-D Gaussian
(``scipy.ndimage``) and interpolated bilinearly over a coarse grid; kept readable, and measured beside the
aligned ones to compare the two.

A scale fitted on a few whole networks (:func:`fit_scale`) turns the sum of layers into a network's latency.

Pure: numpy, scipy and the ArchSpec. Measuring the tables on a device is ``device_bench.lut``'s job.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lit_nas.align import align_up
from lit_nas.arch import ArchSpec


@dataclass(frozen=True)
class Layer:
    """One layer of a network to look up: its table and channel counts (``cout`` 0 for 1-D tables)."""

    key: str
    cin: int
    cout: int
    config: tuple[tuple[str, Any], ...] = ()  # what the one-layer model is (see keras_mirror.build_layer)


def _conv(k: int, stride: int, res: int, cin: int, cout: int, relu: bool | str) -> Layer:
    # relu: False (no activation), True (ReLU) or an activation name ("relu", "relu6")
    act = "relu" if relu is True else (relu or "")
    key = f"conv{k}_s{stride}_r{res}" + (f"_{act}" if act else "")
    cfg: dict[str, Any] = {"op": "conv", "k": k, "stride": stride, "res": res, "relu": bool(act)}
    if act == "relu6":  # the ReLU tables keep their configuration (and their files) unchanged
        cfg["act"] = act
    return Layer(key, cin, cout, tuple(sorted(cfg.items())))


def _depthwise(k: int, stride: int, res: int, channels: int, act: str) -> Layer:
    cfg = {"op": "dw", "k": k, "stride": stride, "res": res, "act": act}
    return Layer(f"dw{k}_s{stride}_r{res}_{act}", channels, 0, tuple(sorted(cfg.items())))


def _add(res: int, channels: int, relu: bool) -> Layer:
    cfg: dict[str, Any] = {"op": "add", "res": res}
    if not relu:
        cfg["relu"] = False
    return Layer(f"{'add' if relu else 'addlin'}_r{res}", channels, 0, tuple(sorted(cfg.items())))


def _se(res: int, channels: int, hidden: int) -> Layer:
    return Layer(f"se_r{res}", channels, hidden, (("op", "se"), ("res", res)))


def _concat(res: int, channels: int) -> Layer:
    return Layer(f"concat_r{res}", channels, 0, (("op", "concat"), ("res", res)))


def _avgpool(k: int, res: int, channels: int) -> Layer:
    return Layer(f"avgpool{k}_r{res}", channels, 0, (("k", k), ("op", "pool"), ("res", res)))


def dense_input_layers(spec: ArchSpec, i: int) -> list[Layer]:
    """What dense cell ``i`` computes before its first conv (empty for plain nets).

    The average pooling of each larger source it reads (``avgpool``) and their concatenation (``concat``,
    when it reads more than one).
    """
    if not spec.dense:
        return []
    widths, sizes = spec.feature_widths(), spec.feature_sizes()
    reads, res = spec.cell_reads(i), sizes[i]
    layers = [_avgpool(sizes[j] // res, sizes[j], widths[j]) for j in reads if sizes[j] != res]
    if len(reads) > 1:
        layers.append(_concat(res, sum(widths[j] for j in reads)))
    return layers


def cell_layers(spec: ArchSpec, i: int) -> list[Layer]:
    """The layers of cell ``i`` of ``spec`` (see the module docstring for the table keys)."""
    c = spec.cells[i]
    widths, sizes, in_widths = spec.feature_widths(), spec.feature_sizes(), spec.cell_input_widths()
    act = spec.activation
    res, res_out, cin = sizes[i], sizes[i + 1], in_widths[i]
    se = [_se(res_out, c.out, c.se)] if c.se else []
    if c.op == "dwsep":
        return [
            _depthwise(c.kernel, c.stride, res, cin, act),
            _conv(1, 1, res_out, cin, c.out, act),
            *se,
        ]
    if c.op == "inverted":
        layers = [
            _conv(1, 1, res, cin, c.mid, act),
            _depthwise(c.kernel, c.stride, res, c.mid, act),
            _conv(1, 1, res_out, c.mid, c.out, False),
            *se,
        ]
        return [*layers, _add(res_out, c.out, relu=False)] if c.residual else layers
    layers = [
        *dense_input_layers(spec, i),
        _conv(3, c.stride, res, cin, c.mid, act),
        _conv(3, 1, res_out, c.mid, c.out, False),
        *se,
    ]
    if c.projection:
        layers.append(_conv(1, c.stride, res, widths[i], c.out, False))
    return [*layers, _add(res_out, c.out, relu=True)]


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
    widths, sizes = spec.feature_widths(), spec.feature_sizes()
    layers = [_conv(3, 1, spec.input_size, spec.in_channels, spec.stem_width, spec.activation)]
    for b in range(exits[-1] + 1):
        for i in spec.cells_of_block(b):
            layers += cell_layers(spec, i)
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


def _interp2(
    cin_grid: Sequence[int], cout_grid: Sequence[int], table: np.ndarray, cin: float, cout: float
) -> float:
    rows = [float(np.interp(cout, cout_grid, row)) for row in table]
    return float(np.interp(cin, cin_grid, rows))


def table_point(t: dict[str, Any], cin: int, cout: int) -> tuple[int, int]:
    """Where a layer with ``cin -> cout`` channels is read in table ``t``.

    Its channels rounded up to the table's steps (``cin_step``, ``cout_step``; 1 when absent). A count that
    is itself a grid point (such as the image's channels, measured as they are) is read as it is.
    """
    a, b = int(t.get("cin_step", 1)), int(t.get("cout_step", 1))
    cin_at = cin if cin in t["cin"] else align_up(cin, a)
    cout_at = cout if cout in t["cout"] else align_up(cout, b)
    return cin_at, cout_at


def staircase_rss(channels: Sequence[int], ms: Sequence[float], step: int) -> float:
    """Residual sum of squares of the least-squares fit ``ms ~ a + b * ceil(channels / step)``.

    The staircase a tiled kernel draws: constant within a tile, one tile's cost more at each boundary. Step 1
    is the straight line (no tiling).
    """
    c = np.asarray(channels, float)
    y = np.asarray(ms, float)
    x = np.stack([np.ones_like(c), np.ceil(c / step)], axis=1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r = y - x @ coef
    return float(r @ r)


def detect_step(
    channels: Sequence[int],
    ms: Sequence[float],
    candidates: Sequence[int] | None = None,
    margin: float = 0.25,
) -> int:
    """The channel step of a measured staircase: latency against channel count, every other width fixed.

    Each candidate step ``s`` is fitted as ``a + b * ceil(c / s)`` (:func:`staircase_rss`); the step is the
    best fit, unless the straight line (``s = 1``) is within ``margin`` of it (no evidence of tiling). A
    step ``s`` needs at least four tiles in the data (``max(channels) >= 4 s``).

    Args:
        channels: the channel counts measured (e.g. ``1..64``).
        ms: the latency at each.
        candidates: the steps to try (default ``1..max(channels) // 4``).
        margin: how much better than the straight line a staircase must fit (relative residual).

    Returns:
        The step (1: no tiling seen).
    """
    c = [int(v) for v in channels]
    if len(c) != len(ms) or len(c) < 4:
        raise ValueError(f"need >= 4 measured channel counts, one latency each; got {len(c)}, {len(ms)}")
    top = max(c) // 4
    steps = [s for s in (candidates or range(1, top + 1)) if 1 <= s <= top] or [1]
    rss = {s: staircase_rss(c, ms, s) for s in sorted({1, *steps})}
    best = min(rss, key=lambda s: (rss[s], s))
    scale = float(np.var(np.asarray(ms, float)) * len(c)) or 1.0
    # the line wins unless the staircase fits it clearly better (relative to the data's own variation)
    if rss[1] <= (1 + margin) * rss[best] + 1e-12 * scale:
        return 1
    return best


def step_family(config: dict[str, Any] | Sequence[tuple[str, Any]]) -> str:
    """Which staircase a table's steps come from (one sweep per family, ``python -m device_bench staircase``).

    ``conv<k>``, ``dw``, ``add``, ``head``, ``se``, ``concat`` or ``pool``.
    """
    cfg = dict(config)
    op = cfg["op"]
    return f"conv{cfg['k']}" if op == "conv" else op


def channel_step(tables: dict[str, dict[str, Any]]) -> int:
    """The step that aligns every table's axes: the least common multiple of their steps (1 = smoothed)."""
    steps = [int(t.get(k, 1)) for t in tables.values() for k in ("cin_step", "cout_step")]
    return math.lcm(*steps) if steps else 1


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


def work_grid(t: Any) -> np.ndarray:
    """``cin * cout`` (``cout`` 1 for 1-D tables) at every grid point of a table (dict or attributes)."""
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
        sigma: the Gaussian smoothing applied to ``raw_ms`` (0 for aligned tables).
        device: the timing script's description of the device.
        settings: the timing protocol used.
        quality: how quiet the device was while the tables were measured (:func:`measurement_quality`):
            its load average before and after, and the pass-to-pass spread of the entries; each table also
            keeps its entries' ``spread``. Empty for tables measured before the load guard.
    """

    tables: dict[str, dict[str, Any]]
    overhead_ms: float
    sigma: float = 1.0
    device: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The channel step the searches align to (:func:`channel_step`; 1 for smoothed tables)."""
        return channel_step(self.tables)

    @property
    def aligned(self) -> bool:
        """The tables keep the device's channel steps (any ``cin_step``/``cout_step`` recorded)."""
        return any("cin_step" in t or "cout_step" in t for t in self.tables.values())

    def layer_ms(self, layer: Layer) -> float:
        """Latency of one layer, interpolated in its table."""
        t = self.tables.get(layer.key)
        if t is None:
            raise KeyError(
                f"the look-up table has no entry {layer.key!r}; build it for this architecture "
                f"(python -m device_bench lut ...); it has {sorted(self.tables)}"
            )
        cin, cout = table_point(t, layer.cin, layer.cout)
        if t["cin"][-1] < cin or t["cout"][-1] < cout:
            raise KeyError(
                f"{layer.key} with {layer.cin} -> {layer.cout} channels is outside the table (up to "
                f"{t['cin'][-1]} -> {t['cout'][-1]}); rebuild it for the wider network"
            )
        return _interp2(t["cin"], t["cout"], np.asarray(t["ms"]), cin, cout)

    def layers_ms(self, spec: ArchSpec, exits: Sequence[int] | None = None) -> float:
        """Sum of the table latencies of the layers of ``spec`` (no overhead, no calibration)."""
        return sum(self.layer_ms(layer) for layer in spec_layers(spec, exits))

    def block_ms(self, spec: ArchSpec, block: int) -> float:
        """Predicted latency of ``block``'s cells (and the stem in block 0), calibrated, without its exit."""
        layers = [layer for i in spec.cells_of_block(block) for layer in cell_layers(spec, i)]
        if block == 0:
            layers.insert(0, _conv(3, 1, spec.input_size, spec.in_channels, spec.stem_width, spec.activation))
        return self.scale * sum(self.layer_ms(layer) for layer in layers)

    def predict(self, spec: ArchSpec, exits: Sequence[int] | None = None) -> float:
        """Predicted latency in milliseconds of the network up to ``exits`` (default: the full model)."""
        return self.overhead_ms + self.scale * self.layers_ms(spec, exits)

    def resmooth(self, sigma: float) -> LatencyLUT:
        """The same measurements smoothed with another ``sigma``."""
        tables = {
            k: dict(t, ms=smooth(np.asarray(t["raw_ms"]), sigma, work_grid(t)).tolist())
            for k, t in self.tables.items()
        }
        return LatencyLUT(
            tables, self.overhead_ms, sigma, self.device, self.settings, self.scale, self.quality
        )

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
            "quality": self.quality,
            "tables": self.tables,
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, allow_noisy: bool = False) -> LatencyLUT:
        """Read tables written by :meth:`save`, checked (:func:`check_lut_data`, :func:`check_quiet`).

        Args:
            path: the JSON file.
            allow_noisy: read a table measured under load all the same (to inspect it; never to search).

        Raises:
            ValueError: naming the file, the table and the bad value.
            NoisyTableError: the table's own record says the device was busy while it was measured.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"latency table {path} is not JSON ({type(err).__name__}: {err})") from None
        check_lut_data(data, path)
        lut = cls(
            data["tables"],
            float(data["overhead_ms"]),
            float(data["sigma"]),
            data.get("device", {}),
            data.get("settings", {}),
            float(data.get("scale", 1.0)),
            data.get("quality", {}),
        )
        if not allow_noisy:
            check_quiet(lut, path)
        return lut


#: The load guard's limits (:func:`check_quiet`): how much the sum of the entries moves between passes, the
#: entries' pass-to-pass spread weighted by their latency, and the device's 1-minute load average beyond the
#: interpreter's own threads. Calibrated on this repository's x86 host (studies/results/latency_tables).
MAX_PASS_SPREAD = 0.05
MAX_WEIGHTED_SPREAD = 0.25
MAX_EXTRA_LOAD = 0.75


class NoisyTableError(ValueError):
    """A latency table whose own record says it was measured on a busy device."""


def entry_spread(per_pass_ms: Sequence[float]) -> float:
    """Pass-to-pass spread of one entry: ``(max - min) / min`` of its per-pass medians (0 for one pass).

    The passes time every model in a new shuffled order, so a device that is busy for part of the run moves
    some passes and not others; a quiet device repeats itself within a few percent.
    """
    v = np.asarray(per_pass_ms, float)
    if len(v) < 2 or v.min() <= 0:
        return 0.0
    return float((v.max() - v.min()) / v.min())


def measurement_quality(
    per_pass_ms: np.ndarray,
    load_before: Sequence[float],
    load_after: Sequence[float],
    cpus: int,
    threads: int,
) -> dict[str, Any]:
    """The quiet-device record of a table (:attr:`LatencyLUT.quality`).

    Args:
        per_pass_ms: ``(entries, passes)``: each entry's median in each pass.
        load_before: the device's load averages before the passes (:mod:`device_bench.bench_tflite`).
        load_after: and after.
        cpus: the device's CPUs.
        threads: the interpreter's threads.

    Returns:
        ``pass_spread``: ``(max - min) / min`` of the per-pass sums (a device busy during part of the run
        moves some passes, not others); ``weighted_spread``: the entries' spreads (:func:`entry_spread`)
        weighted by their latency (microsecond entries jitter by tens of percent on any machine and weigh
        nothing in a network); the loads, CPUs and threads.
    """
    v = np.asarray(per_pass_ms, float).reshape(len(per_pass_ms), -1)
    spreads = np.array([entry_spread(row) for row in v])
    ms = np.median(v, axis=1) if v.size else np.zeros(0)
    return {
        "pass_spread": entry_spread(v.sum(axis=0)) if v.size else 0.0,
        "weighted_spread": float(ms @ spreads / ms.sum()) if v.size and ms.sum() > 0 else 0.0,
        "load_before": [float(x) for x in load_before],
        "load_after": [float(x) for x in load_after],
        "cpus": int(cpus),
        "threads": int(threads),
    }


def quiet_problems(quality: dict[str, Any]) -> list[str]:
    """What in a table's quality record says the device was busy (empty: quiet, or no record)."""
    if not quality:
        return []
    out = []
    if quality["pass_spread"] > MAX_PASS_SPREAD:
        out.append(
            f"the sum of its entries moved {100 * quality['pass_spread']:.1f}% between passes (a quiet "
            f"device repeats within {100 * MAX_PASS_SPREAD:.0f}%)"
        )
    if quality["weighted_spread"] > MAX_WEIGHTED_SPREAD:
        out.append(
            f"its entries moved {100 * quality['weighted_spread']:.1f}% between passes, weighted by "
            f"latency (limit {100 * MAX_WEIGHTED_SPREAD:.0f}%)"
        )
    # the device's own load, beyond the interpreter's threads, at the start or the end of the run
    spare = quality["cpus"] - quality["threads"]
    for when in ("load_before", "load_after"):
        load = quality[when][0] if quality.get(when) else 0.0
        if load > spare + MAX_EXTRA_LOAD:
            out.append(
                f"the device's load average was {load:.2f} {when.split('_')[1]} the run "
                f"({quality['cpus']} CPUs, {quality['threads']} timing thread(s))"
            )
    return out


def check_quiet(lut: LatencyLUT, path: str | Path = "latency table") -> None:
    """Refuse a table whose measurement record says it was taken on a busy device.

    Raises:
        NoisyTableError: naming each sign of load and how to measure again.
    """
    problems = quiet_problems(lut.quality)
    if problems:
        raise NoisyTableError(
            f"latency table {path} was measured under load: {'; '.join(problems)}. Its milliseconds would "
            "steer a search wrong: measure it again on a quiet device (nothing else running), or pass "
            "allow_noisy to read it anyway"
        )


_LAYER_KEY = re.compile(r"[a-z][a-z0-9_]*")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_lut_data(data: Any, path: str | Path) -> None:
    """Refuse a latency table that would drive a search with wrong numbers, naming what is wrong.

    A table with a NaN, a negative latency or an unsorted channel grid interpolates silently to nonsense
    (``np.interp`` assumes sorted grids), so it is checked when it is read: the keys, the grids (positive,
    strictly increasing integers; ``cout: [0]`` for one-dimensional tables), the table shapes
    (``len(cin) x len(cout)``), the milliseconds (finite, >= 0), ``overhead_ms`` (finite, >= 0),
    ``sigma`` (finite, >= 0) and ``scale`` (finite, > 0).

    Raises:
        ValueError: naming ``path``, the table and the bad value.
    """
    where = f"latency table {path}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object; it holds a {type(data).__name__}")
    for key in ("tables", "overhead_ms", "sigma"):
        if key not in data:
            raise ValueError(f"{where} has no {key!r} (is it a device_bench lut file?)")
    quality = data.get("quality", {})
    need = {"pass_spread", "weighted_spread", "load_before", "load_after", "cpus", "threads"}
    if not isinstance(quality, dict) or (quality and not need <= set(quality)):
        raise ValueError(f"{where}: quality must be empty or hold {sorted(need)}; got {quality!r:.200}")
    for key, low, strict in (("overhead_ms", 0.0, False), ("sigma", 0.0, False), ("scale", 0.0, True)):
        value = data.get(key, 1.0)
        if not _number(value) or value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise ValueError(f"{where}: {key} must be a finite number {bound}; got {value!r}")
    tables = data["tables"]
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{where}: tables must be a non-empty mapping of layer keys to tables")
    for key, t in tables.items():
        if not isinstance(key, str) or not _LAYER_KEY.fullmatch(key):
            raise ValueError(f"{where}: {key!r} is not a layer key (such as 'conv3_s1_r28_relu')")
        if not isinstance(t, dict):
            raise ValueError(f"{where}: table {key!r} must be a mapping; got {type(t).__name__}")
        for grid in ("cin", "cout"):
            values = t.get(grid)
            one_d = grid == "cout" and values == [0]
            if (
                not isinstance(values, list)
                or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
                or (not one_d and (min(values) < 1 or any(b <= a for a, b in itertools.pairwise(values))))
            ):
                raise ValueError(
                    f"{where}: table {key!r} {grid} must be a strictly increasing list of positive "
                    f"integers{' (or [0])' if grid == 'cout' else ''}; got {values!r}"
                )
        for name in ("cin_step", "cout_step"):
            step = t.get(name, 1)
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                raise ValueError(f"{where}: table {key!r} {name} must be a positive integer; got {step!r}")
        rows, cols = len(t["cin"]), len(t["cout"])
        for name in ("ms", "raw_ms", "spread"):
            if name not in t and name != "ms":
                continue
            ms = t.get(name)
            if (
                not isinstance(ms, list)
                or len(ms) != rows
                or not all(isinstance(r, list) and len(r) == cols for r in ms)
            ):
                raise ValueError(
                    f"{where}: table {key!r} {name} must be {rows} x {cols} (len(cin) x len(cout))"
                )
            bad = [v for r in ms for v in r if not _number(v) or v < 0]
            if bad:
                raise ValueError(
                    f"{where}: table {key!r} {name} holds {bad[0]!r}: latencies must be finite and >= 0"
                )


def fit_scale(lut: LatencyLUT, specs: Sequence[ArchSpec], measured_ms: Sequence[float]) -> float:
    """Least-squares factor ``s`` with ``measured ~ overhead + s * sum of layer latencies``.

    Fitted on whole networks timed in the same run as the layers.
    """
    p = np.array([lut.layers_ms(s) for s in specs])
    m = np.asarray(measured_ms, float) - lut.overhead_ms
    if not len(p) or float(p @ p) <= 0:
        raise ValueError("need at least one network with a positive predicted latency")
    return float(p @ m / (p @ p))


def channel_latency(lut: LatencyLUT, net: Any, step: int = 1) -> dict[str, float]:
    """Predicted latency one channel of each channel group of ``net`` costs (for ``FisherPruning``).

    ``net`` must be collected (no dead channels): the difference between the predicted latency of its
    architecture and that with ``step`` channels fewer in the group (down to one step: the aligned size
    below), per channel. With aligned tables one channel alone saves nothing until a whole tile goes, so the
    searches that move in steps price a step. Never below a microsecond fraction, so a ratio
    ``Delta loss / Delta latency`` stays finite where the table is flat.
    """
    base = lut.predict(net.spec)
    out = {}
    for g in net.channel_groups():
        if g.size <= 1:
            out[g.name] = math.inf  # never pruned (a group keeps one channel); no finite cost needed
            continue
        # the next aligned size below (an unaligned group first drops to its own multiple of the step)
        smaller = max(1, (g.size - 1) // step * step) if step > 1 else g.size - 1
        saved = base - lut.predict(net.resized_spec(g.name, smaller))
        out[g.name] = max(saved / (g.size - smaller), 1e-6)
    return out
