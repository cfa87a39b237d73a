"""Time and evaluate exported models on a device and on the host: what ``DeviceBench`` runs after fit.

Latency comes from the configured runner (the device). Accuracy is measured on the host with the same
interpreter (tflite-runtime, in its own process), on the test images. The expected latency under early exit
at confidence threshold ``q`` is ``sum_e f_e(q) * latency(exit e)``, where ``f_e(q)`` is the fraction of
*validation* images whose first exit with max softmax >= q is ``e`` (the last exit takes the rest), measured
on the exported full model of the same precision, and ``latency(exit e)`` is the latency of the network up to
exit ``e``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from device_bench.export import ExportResult, load_manifest, nhwc, run_tf_side, write_bundle
from device_bench.runners import BenchReport, BenchSettings, LocalRunner, Runner
from lit_nas.early_exit import early_exit
from lit_nas.nets.base import MultiExitNet


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def expected_latency(
    val_outputs: dict[str, np.ndarray],
    val_labels: np.ndarray,
    latencies_ms: dict[str, float],
    thresholds: Sequence[float],
) -> list[dict[str, Any]]:
    """Expected latency and accuracy under confidence-threshold early exit.

    Args:
        val_outputs: ``{"exit<b>": (N, classes)}`` logits of the full model on validation images.
        val_labels: ``(N,)`` labels.
        latencies_ms: ``{"exit<b>": latency}`` of the network up to each exit.
        thresholds: confidence thresholds q.

    Returns:
        One row per threshold: ``q``, ``expected_latency_ms``, ``accuracy``, ``exit_fractions`` (depth
        order), ``latency_fraction`` (relative to the last exit's latency).
    """
    names = sorted(val_outputs, key=lambda n: int(n[4:]))
    probs = [softmax(val_outputs[n]) for n in names]
    conf = torch.as_tensor(np.stack([p.max(axis=1) for p in probs], axis=1))
    correct = torch.as_tensor(np.stack([p.argmax(axis=1) == val_labels for p in probs], axis=1))
    costs = [latencies_ms[n] for n in names]
    rows = []
    for r in early_exit(conf, correct, costs, costs[-1], list(thresholds)):
        rows.append(
            {
                "q": r.threshold,
                "expected_latency_ms": r.avg_flops,  # early_exit averages whatever cost it is given
                "latency_fraction": r.cost_fraction,
                "accuracy": r.accuracy,
                "exit_fractions": list(r.exit_fractions),
            }
        )
    return rows


def measure(
    exported: ExportResult,
    runner: Runner,
    settings: BenchSettings,
    test: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    thresholds: Sequence[float],
    host: Runner | None = None,
) -> dict[str, Any]:
    """Time every exported model on ``runner`` and measure accuracies on the host.

    Args:
        exported: the models (:func:`~device_bench.export.export_tflite`).
        runner: the device.
        settings: timing protocol.
        test: normalised NCHW test images and labels (accuracy).
        val: normalised NCHW validation images and labels (early-exit fractions).
        thresholds: early-exit confidence thresholds.
        host: runner for the accuracy passes (default: this machine).

    Returns:
        The report (JSON-able): ``exits`` rows (exit, precision, latency, accuracy, size), ``early_exit``
        rows per precision, ``int8_vs_fp32`` agreement, the device's description and the files.
    """
    precisions = tuple(dict.fromkeys(m.precision for m in exported.models))
    paths = [m.path for m in exported.models]
    timing = runner.run(paths, settings)
    host = host or LocalRunner()
    no_timing = BenchSettings(passes=0, interpreter=settings.interpreter)
    test_x, test_y = nhwc(test[0]), test[1].numpy()
    exit_models = [m for m in exported.models if m.model != "full"]
    # accuracy is per exit model; the full models compute the same exits and only serve early exit (val)
    on_test = host.run([m.path for m in exit_models], no_timing, inputs=test_x).outputs
    # the model computing every exit: "full", or the exit's own model in a single-exit network
    full = {
        p: max((m for m in exported.models if m.precision == p), key=lambda m: len(m.outputs)).name
        for p in precisions
    }
    on_val = host.run(
        [exported.by_name()[full[p]].path for p in precisions], no_timing, inputs=nhwc(val[0])
    ).outputs

    rows = []
    for m in exit_models:
        (out,) = m.outputs
        stats = timing.report["models"][m.name]
        rows.append(
            {
                "exit": int(out[4:]),
                "precision": m.precision,
                "latency_ms": stats["mean_ms"],
                "median_ms": stats["median_ms"],
                "std_ms": stats["std_ms"],
                "accuracy": float((on_test[m.name][out].argmax(axis=1) == test_y).mean()),
                "bytes": m.bytes,
            }
        )
    rows.sort(key=lambda r: (r["exit"], r["precision"]))
    report: dict[str, Any] = {
        "device": {k: timing.report.get(k) for k in ("machine", "system", "python", "interpreter", "numpy")},
        "runner": runner.describe(),
        "settings": {k: timing.report.get(k) for k in ("runs", "passes", "warmup_s", "sleep_s", "threads")},
        "tensorflow": exported.tensorflow,
        "test_images": len(test_y),
        "val_images": len(val[1]),
        "exits": rows,
        "full": {
            m.name: dict(timing.report["models"][m.name], bytes=m.bytes)
            for m in exported.models
            if m.model == "full"
        },
        "early_exit": {},
        "files": {m.name: str(m.path) for m in exported.models},
    }
    val_y = val[1].numpy()
    for p in precisions:
        lat = {f"exit{r['exit']}": r["latency_ms"] for r in rows if r["precision"] == p}
        report["early_exit"][p] = expected_latency(on_val[full[p]], val_y, lat, thresholds)
    if set(precisions) == {"fp32", "int8"}:
        agree, drop = {}, {}
        for m in exit_models:
            if m.precision != "int8":
                continue
            (out,) = m.outputs
            fp = on_test[f"{m.model}_fp32"][out]
            q8 = on_test[m.name][out]
            agree[out] = float((fp.argmax(axis=1) == q8.argmax(axis=1)).mean())
            drop[out] = float((fp.argmax(axis=1) == test_y).mean() - (q8.argmax(axis=1) == test_y).mean())
        report["int8_vs_fp32"] = {"top1_agreement": agree, "accuracy_drop": drop}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The per-exit latency/accuracy table and the early-exit rows, as plain text."""
    lines = [
        f"Device benchmark on {report['runner']} ({report['device'].get('machine')}, "
        f"{report['device'].get('interpreter')}, {report['settings'].get('threads')} thread(s)):"
    ]
    lines.append(f"{'exit':>4} {'precision':>9} {'latency ms':>11} {'± std':>7} {'test acc':>9} {'KiB':>7}")
    for r in report["exits"]:
        lines.append(
            f"{r['exit']:>4} {r['precision']:>9} {r['latency_ms']:11.3f} {r['std_ms']:7.3f} "
            f"{r['accuracy']:9.4f} {r['bytes'] / 1024:7.1f}"
        )
    for p, rows in report["early_exit"].items():
        lines.append(
            f"early exit ({p}): "
            + ", ".join(
                f"q={r['q']:g}: {r['expected_latency_ms']:.3f} ms ({r['latency_fraction']:.2f}x), "
                f"acc {r['accuracy']:.4f}"
                for r in rows
            )
        )
    if report.get("error"):
        lines.append(f"device error: {report['error']}")
    return "\n".join(lines)


def plot_latency_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Latency vs test accuracy of every exit and of early exit, one colour per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, p in enumerate(dict.fromkeys(r["precision"] for r in report["exits"])):
        rows = [r for r in report["exits"] if r["precision"] == p]
        color = f"C{i}"
        ax.plot(
            [r["latency_ms"] for r in rows],
            [r["accuracy"] for r in rows],
            "o-",
            color=color,
            label=f"exits ({p})",
        )
        for r in rows:
            ax.annotate(
                str(r["exit"]),
                (r["latency_ms"], r["accuracy"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
            )
        ee = report["early_exit"].get(p, [])
        ax.plot(
            [r["expected_latency_ms"] for r in ee],
            [r["accuracy"] for r in ee],
            "x--",
            color=color,
            label=f"early exit, val acc ({p})",
        )
    ax.set_xlabel(f"latency (ms) on {report['runner']} [{report['device'].get('machine')}]")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def time_full_models(
    nets: dict[str, MultiExitNet],
    calibration: Tensor,
    out_dir: str | Path,
    settings: BenchSettings,
    runner: Runner | None = None,
    precisions: tuple[str, ...] = ("fp32", "int8"),
) -> tuple[dict[tuple[str, str], float], BenchReport]:
    """Export each network's full model (``precisions``) and time them all in one run of ``runner``.

    One run, in the runner's shuffled order over ``settings.passes`` passes, so the machine's drift hits all
    networks alike: the only fair way to compare them.

    Args:
        nets: networks in eval mode, by name (used in file names: letters, digits, ``_``).
        calibration: NCHW images for the int8 calibration.
        out_dir: where the ``.tflite`` files are written.
        settings: timing settings.
        runner: where to time them (default: the local runner).
        precisions: which of ``fp32`` and ``int8`` to export and time.

    Returns:
        Mean latency in ms by ``(name, precision)``, and the runner's report.
    """
    out_dir = Path(out_dir)
    bundles = {
        name: write_bundle(net, out_dir / name, calibration, precisions, per_exit=False)
        for name, net in nets.items()
    }
    run_tf_side(list(bundles.values()))  # one TensorFlow start-up for all of them
    paths = {}
    for name, bundle in bundles.items():
        result = load_manifest(bundle).by_name()
        for precision in precisions:
            target = out_dir / f"{name}_{precision}.tflite"
            Path(result[f"full_{precision}"].path).rename(target)
            paths[(name, precision)] = target
    report = (runner or LocalRunner()).run(list(paths.values()), settings)
    return {key: report.latency_ms(path.stem) for key, path in paths.items()}, report
