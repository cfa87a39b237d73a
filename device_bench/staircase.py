"""The device's channel staircase: latency against channel count, one layer type at a time.

The kernels behind TFLite's CPU path (XNNPACK) compute channels in tiles: the fp32 convolution/GEMM
micro-kernels pack output channels in blocks (8 on ARM NEON), depthwise kernels step in tiles with a
narrower remainder, so 9 channels cost what 16 do. Which steps a device has is measured here, not assumed:
each layer family is timed at every channel count ``1..max_channels`` on one axis, the other width fixed,
in one shuffled run (the thesis protocol), and :func:`lit_nas.latency.detect_step` reads the step off the
data. ``python -m device_bench staircase`` prints and plots it; ``python -m device_bench lut`` builds
tables aligned to the steps it finds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lit_nas.arch import ArchSpec
from lit_nas.latency import detect_step, spec_layers, staircase_rss, step_family

#: The families swept when no network is named: conv 3x3 at stride 1 and 2, pointwise, depthwise, the
#: residual addition, an exit head, Squeeze-and-Excitation, the dense concatenation and pooling.
DEFAULT_SWEEPS: dict[str, dict[str, Any]] = {
    "conv3_s1": {"op": "conv", "k": 3, "stride": 1, "res": 16, "relu": True},
    "conv3_s2": {"op": "conv", "k": 3, "stride": 2, "res": 16, "relu": True},
    "conv1_s1": {"op": "conv", "k": 1, "stride": 1, "res": 16, "relu": False},
    "dw3_s1": {"op": "dw", "k": 3, "stride": 1, "res": 16, "act": "relu"},
    "add": {"op": "add", "res": 16},
    "head": {"op": "head", "res": 8, "kernel": 8, "mixed": False, "classes": 10},
    "se": {"op": "se", "res": 16},
    "concat": {"op": "concat", "res": 16},
    "pool": {"op": "pool", "k": 2, "res": 16},
}

#: Ops whose table has one channel axis (``cin``; ``cout`` is 0).
ONE_AXIS = ("dw", "add", "head", "concat", "pool")


@dataclass
class Sweep:
    """One staircase: a layer configuration timed at ``channels`` on ``axis``, the other width ``fixed``."""

    name: str
    config: dict[str, Any]
    axis: str  # "cin" or "cout"
    fixed: int  # the other axis's width (0 for one-axis ops)
    channels: list[int]
    ms: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    step: int = 0
    rss: dict[int, float] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The table family whose steps this sweep measures (:func:`lit_nas.latency.step_family`)."""
        return step_family(self.config)

    def model(self, c: int) -> dict[str, Any]:
        """The one-layer model of channel count ``c`` (:func:`device_bench.lut.layer_config`)."""
        from device_bench.lut import layer_config

        if self.config["op"] in ONE_AXIS:
            return layer_config(self.config, c, 0)
        cin, cout = (c, self.fixed) if self.axis == "cin" else (self.fixed, c)
        return layer_config(self.config, cin, cout)


def plan_sweeps(
    configs: dict[str, dict[str, Any]], max_channels: int = 64, fixed: Sequence[int] = (32,)
) -> list[Sweep]:
    """Every staircase to time.

    Each two-axis config on ``cout`` and on ``cin`` at each ``fixed`` width, each one-axis config once. The
    concatenation is swept over its total width (even counts: two equal halves).
    """
    if max_channels < 8:
        raise ValueError(f"max_channels must be >= 8 to see a step; got {max_channels}")
    sweeps = []
    for name, cfg in configs.items():
        if cfg["op"] == "concat":
            sweeps.append(Sweep(name, cfg, "cin", 0, list(range(2, 2 * max_channels + 1, 2))))
        elif cfg["op"] in ONE_AXIS:
            sweeps.append(Sweep(name, cfg, "cin", 0, list(range(1, max_channels + 1))))
        else:
            for axis in ("cout", "cin"):
                for w in fixed:
                    sweeps.append(Sweep(name, cfg, axis, w, list(range(1, max_channels + 1))))
    return sweeps


def spec_sweeps(specs: Iterable[ArchSpec]) -> dict[str, dict[str, Any]]:
    """One configuration per table family that ``specs`` use (the family's first table), to sweep."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        for layer in spec_layers(spec):
            cfg = dict(layer.config)
            out.setdefault(step_family(cfg), cfg)
    return out


def write_models(sweeps: Sequence[Sweep], root: Path) -> dict[str, tuple[int, int]]:
    """Write the plan of every sweep's one-layer models into ``root``; returns ``{model: (sweep, point)}``."""
    layers: dict[str, dict[str, Any]] = {}
    where: dict[str, tuple[int, int]] = {}
    for s_i, s in enumerate(sweeps):
        for k, c in enumerate(s.channels):
            name = f"s{s_i}_{k}"
            layers[name] = s.model(c)
            where[name] = (s_i, k)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"layers": layers}))
    return where


def read_result(sweeps: Sequence[Sweep], where: dict[str, tuple[int, int]], result: Any) -> None:
    """Fill each sweep's medians, spreads and detected step from a timing run."""
    from lit_nas.latency import entry_spread

    for s in sweeps:
        s.ms = [0.0] * len(s.channels)
        s.spread = [0.0] * len(s.channels)
    models = result.report["models"]
    for name, (s_i, k) in where.items():
        sweeps[s_i].ms[k] = result.latency_ms(name, "median")
        sweeps[s_i].spread[k] = entry_spread(models[name].get("per_pass_median_ms", []))
    for s in sweeps:
        detect(s)


def detect(s: Sweep) -> Sweep:
    """Set ``s.step`` (and the fit of every candidate step) from its measurements."""
    s.step = detect_step(s.channels, s.ms)
    s.rss = {k: staircase_rss(s.channels, s.ms, k) for k in range(1, max(s.channels) // 4 + 1)}
    return s


def measure_staircase(
    configs: dict[str, dict[str, Any]],
    out_dir: str | Path,
    runner: Any,
    settings: Any,
    max_channels: int = 64,
    fixed: Sequence[int] = (32,),
    python: str | None = None,
) -> dict[str, Any]:
    """Time every sweep of ``configs`` in one shuffled run and detect the steps.

    Returns:
        The staircase record (:func:`steps_of` reads it): the sweeps, the steps per family, the device and
        the run's load record.
    """
    from device_bench.export import load_manifest, run_tf_side

    sweeps = plan_sweeps(configs, max_channels, fixed)
    root = Path(out_dir) / "staircase"
    where = write_models(sweeps, root)
    run_tf_side([root], python)
    result = runner.run([m.path for m in load_manifest(root).models], settings)
    read_result(sweeps, where, result)
    report = result.report
    return {
        "device": {k: report.get(k) for k in ("machine", "system", "python", "interpreter")},
        "settings": {k: report.get(k) for k in ("runs", "passes", "warmup_s", "sleep_s", "threads")},
        "load": report.get("load", {}),
        "steps": family_steps(sweeps),
        "sweeps": [dict(asdict(s), rss={str(k): v for k, v in s.rss.items()}) for s in sweeps],
    }


def family_steps(sweeps: Iterable[Sweep]) -> dict[str, list[int]]:
    """``{family: [cin step, cout step]}`` of a measured staircase.

    Each axis's step is the least common multiple of its sweeps' (strides, fixed widths), so a table aligned
    to it keeps every boundary any of them showed.
    """
    axes: dict[str, dict[str, list[int]]] = {}
    for s in sweeps:
        axes.setdefault(s.family, {"cin": [], "cout": []})[s.axis].append(s.step)
    out = {}
    for fam, ax in axes.items():
        one_axis = not ax["cout"]
        out[fam] = [math.lcm(*ax["cin"]) if ax["cin"] else 1, 1 if one_axis else math.lcm(*ax["cout"])]
    return out


def steps_of(record: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The ``steps`` argument of :func:`device_bench.lut.plan_tables` from a staircase record."""
    return {fam: (int(a), int(b)) for fam, (a, b) in record["steps"].items()}


def load_staircase(path: str | Path) -> dict[str, Any]:
    """A staircase record written by ``python -m device_bench staircase --out``."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "steps" not in data or "sweeps" not in data:
        raise ValueError(f"{path} is not a staircase record (python -m device_bench staircase --out ...)")
    return data


def describe(record: dict[str, Any]) -> str:
    """The record as a table a person reads: each sweep's step, and how much better it fits than a line."""
    lines = [
        f"device: {record['device'].get('machine')} {record['device'].get('interpreter')}, "
        f"{record['settings'].get('runs')} runs x {record['settings'].get('passes')} passes, "
        f"load before/after {record['load'].get('before')} / {record['load'].get('after')}",
        f"{'sweep':<10} {'axis':<5} {'fixed':>5} {'step':>4} {'fit vs line':>11} {'ms at 1':>8} "
        f"{'ms at max':>9} {'spread':>7}",
    ]
    for s in record["sweeps"]:
        rss = {int(k): v for k, v in s["rss"].items()}
        ratio = rss.get(s["step"], 0.0) / rss[1] if rss.get(1) else 0.0
        lines.append(
            f"{s['name']:<10} {s['axis']:<5} {s['fixed']:>5} {s['step']:>4} {ratio:>11.3f} "
            f"{s['ms'][0]:>8.4f} {s['ms'][-1]:>9.4f} {100 * float(np.median(s['spread'])):>6.1f}%"
        )
    steps = ", ".join(f"{f} {a}x{b}" for f, (a, b) in sorted(record["steps"].items()))
    lines.append(f"steps (cin x cout) per family: {steps}")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: str | Path, only: Sequence[str] | None = None) -> Path:
    """One panel per sweep: latency against channels, the detected step's boundaries as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in record["sweeps"] if not only or s["name"] in only]
    cols = min(3, len(sweeps))
    rows = -(-len(sweeps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, s in zip(axes.ravel(), sweeps):
        c, ms = np.asarray(s["channels"]), np.asarray(s["ms"]) * 1e3
        ax.plot(c, ms, ".-", lw=0.8, ms=3)
        if s["step"] > 1:
            for b in range(s["step"], int(c.max()) + 1, s["step"]):
                ax.axvline(b + 0.5, color="0.8", lw=0.6, zorder=0)
        other = f", {'cout' if s['axis'] == 'cin' else 'cin'} {s['fixed']}" if s["fixed"] else ""
        ax.set_title(f"{s['name']}: {s['axis']}{other}; step {s['step']}", fontsize=9)
        ax.set_xlabel(f"{s['axis']} channels", fontsize=8)
        ax.set_ylabel("median latency (µs)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(sweeps) :]:
        ax.axis("off")
    dev = record["device"]
    fig.suptitle(f"Channel staircase: {dev.get('machine')}, {dev.get('interpreter')}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
