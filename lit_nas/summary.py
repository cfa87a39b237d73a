"""What a run found, as plain data: the network as it would ship, its costs, accuracies and timings.

``summary.json`` (written by ``callbacks.RunSummary``) is the one record a study reads back per trial, so
everything in it is JSON: numbers, strings, lists and dicts. The network is counted *as it would ship*: the
channels whose gates are exactly 0 collected, the gates folded into the BatchNorms, masked weights zeroed
(the counts of :mod:`lit_nas.cost`, which the TFLite export and the latency tables also start from).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lit_nas.cost import count_costs
from lit_nas.early_exit import EarlyExitResult
from lit_nas.gates import fold_gates
from lit_nas.latency import LatencyLUT
from lit_nas.masks import apply_masks, masked_pairs
from lit_nas.nets.base import MultiExitNet
from lit_nas.surgery import collect_gated

#: version of the summary's layout; a study refuses summaries of another one
SUMMARY_VERSION = 1


def shipped_net(net: MultiExitNet) -> MultiExitNet:
    """A copy of ``net`` as it would ship: dead channels collected, gates folded, masked weights zeroed."""
    out = copy.deepcopy(net).cpu().float().eval()
    apply_masks(masked_pairs(out))
    collect_gated(out)
    fold_gates(out)
    return out


def network_figures(net: MultiExitNet, lut: LatencyLUT | None = None) -> dict[str, Any]:
    """Parameters, MFLOPs per exit, nonzero parameters (with masks) and LUT latency of the shipped network.

    Args:
        net: the trained network (left untouched).
        lut: a latency look-up table; with it, ``lut_latency_ms`` per exit (the model up to that exit).

    Returns:
        ``params`` (all active blocks and exits), ``mflops`` per exit (``{"<block>": MFLOPs}``, the network
        up to that exit and its own head), ``mflops_full`` (every active block and head), ``nonzero_params``
        (``None`` without masks), ``lut_latency_ms`` per exit (``None`` without a table) and ``arch``
        (the shipped ArchSpec as a dict).
    """
    ship = shipped_net(net)
    spec = ship.spec
    costs = count_costs(ship)
    exits = spec.exit_blocks()
    active = spec.active_blocks
    pairs = masked_pairs(ship)
    zeros = sum(int((mask == 0).sum()) for _, mask in pairs)
    return {
        "params": costs.active_params(active),
        "nonzero_params": costs.active_params(active) - zeros if pairs else None,
        "mflops": {str(b): costs.flops_to_exit(b) / 1e6 for b in exits},
        "mflops_full": costs.active_flops(active) / 1e6,
        "lut_latency_ms": {str(b): lut.predict(spec, [b]) for b in exits} if lut is not None else None,
        "arch": spec.to_dict(),
    }


def test_figures(metrics: Mapping[str, Any], exits: Sequence[int]) -> dict[str, float | None]:
    """Per-exit test accuracy (``{"<block>": acc}``) from the logged ``test/acc_exit<b>`` metrics."""
    out: dict[str, float | None] = {}
    for b in exits:
        value = metrics.get(f"test/acc_exit{b}")
        out[str(b)] = None if value is None else float(value)
    return out


def early_exit_figures(results: Sequence[EarlyExitResult]) -> list[dict[str, Any]]:
    """The early-exit table (accuracy and cost per confidence threshold) as rows of plain numbers."""
    return [
        {
            "q": r.threshold,
            "accuracy": r.accuracy,
            "mflops": r.avg_flops / 1e6,
            "cost_fraction": r.cost_fraction,
            "exit_fractions": [float(f) for f in r.exit_fractions],
        }
        for r in results
    ]


def device_figures(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """DeviceBench's per-exit latency and accuracy (``{"<precision>": {"<block>": {...}}}``), or ``None``."""
    if report is None:
        return None
    out: dict[str, Any] = {"runner": report.get("runner"), "error": report.get("error"), "exits": {}}
    for r in report.get("exits", []):
        out["exits"].setdefault(r["precision"], {})[str(r["exit"])] = {
            "latency_ms": r["latency_ms"],
            "std_ms": r.get("std_ms"),
            "accuracy": r["accuracy"],
        }
    return out


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def flat_metrics(summary: Mapping[str, Any], prefix: str = "summary") -> dict[str, float]:
    """The numeric leaves of ``summary`` as ``prefix/a/b`` keys (for a logger's run summary)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out
