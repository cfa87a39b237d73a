"""What a run found, as plain data: the network as it would ship, its costs, accuracies and timings.

``summary.json`` (written by ``callbacks.RunSummary``) is the one record a study reads back per trial, so
everything in it is JSON: numbers, strings, lists and dicts. The network is counted *as it would ship*: the
channels whose gates are exactly 0 collected, the gates folded into the BatchNorms, masked weights zeroed
(the counts of :mod:`lit_nas.cost`, which the TFLite export and the latency tables also start from).
"""

# no ``from __future__ import annotations``: TypedDict reads NotRequired from evaluated annotations
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from typing_extensions import NotRequired

from lit_nas.cost import count_costs
from lit_nas.early_exit import EarlyExitResult
from lit_nas.gates import fold_gates
from lit_nas.latency import LatencyLUT
from lit_nas.masks import apply_masks, masked_pairs
from lit_nas.nets.base import MultiExitNet
from lit_nas.surgery import collect_gated

#: version of the summary's layout; a study refuses summaries of another one (:func:`check_summary`)
SUMMARY_VERSION = 1


class NetworkFigures(TypedDict):
    """The shipped network's counts (:func:`network_figures`); per-exit maps are keyed by block index."""

    params: int
    nonzero_params: int | None
    mflops: dict[str, float]
    mflops_full: float
    lut_latency_ms: dict[str, float] | None
    arch: dict[str, Any]


class EarlyExitRow(TypedDict):
    """One confidence threshold of the early-exit table (:func:`early_exit_figures`)."""

    q: float
    accuracy: float
    mflops: float
    cost_fraction: float
    exit_fractions: list[float]


class DeviceFigures(TypedDict):
    """DeviceBench's timings (:func:`device_figures`).

    ``exits[precision][block]`` holds ``latency_ms``, ``std_ms`` and ``accuracy``.
    """

    runner: str | None
    error: str | None
    exits: dict[str, dict[str, dict[str, float | None]]]


class Summary(NetworkFigures):
    """``summary.json``: what one run found, written by ``callbacks.RunSummary`` and read by the studies.

    Attributes:
        version: :data:`SUMMARY_VERSION` of the writer.
        config: the config the run was started with.
        overrides: the command-line overrides after it.
        seed: ``seed_everything``.
        tested: whether the test ran (the summary is written at fit end, then again after the test).
        test_acc: per-exit test accuracy (``None`` before the test).
        early_exit: the early-exit table (``None`` before the test).
        checkpoint: the checkpoint tested.
        best_epoch: that checkpoint's epoch.
        epochs: epochs trained.
        device: DeviceBench's figures, ``None`` without the callback.
        wall_s: seconds of ``fit`` (split into ``search`` and ``retrain``), ``test`` and ``after_fit``.
        cpu_s: this process's CPU seconds, split the same way (absent from early version-1 summaries).
        found_arch: the ``found_arch.yaml`` a search wrote, else ``None``.
        found_masks: the ``found_masks.pt`` beside it, else ``None``.
    """

    version: int
    config: str | None
    overrides: list[str]
    seed: int | None
    tested: bool
    test_acc: dict[str, float | None] | None
    early_exit: list[EarlyExitRow] | None
    checkpoint: str | None
    best_epoch: int | None
    epochs: int
    device: DeviceFigures | None
    wall_s: dict[str, float]
    cpu_s: NotRequired[dict[str, float]]  # absent from the version-1 summaries written before it came
    found_arch: str | None
    found_masks: str | None


class SummaryError(ValueError):
    """A ``summary.json`` of another layout version, or without the keys of this one."""


def check_summary(data: Mapping[str, Any], source: str) -> Summary:
    """``data`` typed as a :class:`Summary` once its version and keys are this code's.

    Args:
        data: a parsed ``summary.json``.
        source: where it was read, for the message.

    Raises:
        SummaryError: its version is not :data:`SUMMARY_VERSION` (the message names both), or a key is
            missing.
    """
    version = data.get("version")
    if version != SUMMARY_VERSION:
        raise SummaryError(
            f"{source} is a run summary of version {version!r}; this code reads version {SUMMARY_VERSION} "
            "(rerun the trial, or read it with the lit_nas that wrote it)"
        )
    missing = sorted(Summary.__required_keys__ - set(data))
    if missing:
        raise SummaryError(f"{source} is a run summary without {missing}")
    return data  # type: ignore[return-value]


def shipped_net(net: MultiExitNet) -> MultiExitNet:
    """A copy of ``net`` as it would ship: dead channels collected, gates folded, masked weights zeroed."""
    out = copy.deepcopy(net).cpu().float().eval()
    apply_masks(masked_pairs(out))
    collect_gated(out)
    fold_gates(out)
    return out


def network_figures(net: MultiExitNet, lut: LatencyLUT | None = None) -> NetworkFigures:
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
    return NetworkFigures(
        params=costs.active_params(active),
        nonzero_params=costs.active_params(active) - zeros if pairs else None,
        mflops={str(b): costs.flops_to_exit(b) / 1e6 for b in exits},
        mflops_full=costs.active_flops(active) / 1e6,
        lut_latency_ms={str(b): lut.predict(spec, [b]) for b in exits} if lut is not None else None,
        arch=spec.to_dict(),
    )


def test_figures(metrics: Mapping[str, Any], exits: Sequence[int]) -> dict[str, float | None]:
    """Per-exit test accuracy (``{"<block>": acc}``) from the logged ``test/acc_exit<b>`` metrics."""
    out: dict[str, float | None] = {}
    for b in exits:
        value = metrics.get(f"test/acc_exit{b}")
        out[str(b)] = None if value is None else float(value)
    return out


def early_exit_figures(results: Sequence[EarlyExitResult]) -> list[EarlyExitRow]:
    """The early-exit table (accuracy and cost per confidence threshold) as rows of plain numbers."""
    return [
        EarlyExitRow(
            q=r.threshold,
            accuracy=r.accuracy,
            mflops=r.avg_flops / 1e6,
            cost_fraction=r.cost_fraction,
            exit_fractions=[float(f) for f in r.exit_fractions],
        )
        for r in results
    ]


def device_figures(report: Mapping[str, Any] | None) -> DeviceFigures | None:
    """DeviceBench's per-exit latency and accuracy (``{"<precision>": {"<block>": {...}}}``), or ``None``."""
    if report is None:
        return None
    out = DeviceFigures(runner=report.get("runner"), error=report.get("error"), exits={})
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
