"""The latency look-up tables a callback is given: found from any working directory, checked against the net.

Not an algorithm: the two steps FisherPruning, NetAdapt and MorphNet share.
"""

from __future__ import annotations

from pathlib import Path

from lit_nas.arch import ArchSpec
from lit_nas.latency import LatencyLUT
from lit_nas.paths import REPO_ROOT, in_checkout


def load_lut(who: str, lut: str) -> LatencyLUT:
    """Read the tables at ``lut``: a path, or one relative to the checkout (``configs/luts/...``)."""
    path = in_checkout(lut)  # a shipped table, from any working directory
    if not path.is_file():
        raise ValueError(f"{who} lut {lut!r} does not exist (relative to {Path.cwd()} nor to {REPO_ROOT})")
    return LatencyLUT.load(path)


def lut_for(who: str, setting: str | None, lut: str | None) -> LatencyLUT | None:
    """The tables at ``lut`` when a setting prices latency; ``None`` when none does.

    Args:
        who: the callback, for the message.
        setting: the setting that needs the tables (``"stop_at: latency"``), or ``None``.
        lut: the ``lut`` argument (:func:`load_lut`).

    Raises:
        ValueError: ``setting`` needs tables and ``lut`` is ``None`` or does not exist.
    """
    if setting is None:
        return None
    if lut is None:
        raise ValueError(
            f"{who} {setting} needs lut: the path of latency look-up tables built for this network "
            "(python -m device_bench lut --config ... --out lut.json)"
        )
    return load_lut(who, lut)


def check_covers(who: str, lut: LatencyLUT | None, spec: ArchSpec) -> None:
    """``ValueError`` naming the missing table if ``lut`` cannot price the network ``spec``."""
    if lut is None:
        return
    try:
        lut.predict(spec)
    except KeyError as err:
        raise ValueError(f"{who}: the latency look-up tables do not cover this network: {err}") from err
