"""Channel alignment: the one rule every channel search shares when the device computes channels in tiles.

A kernel that computes output channels in tiles of ``step`` charges 9 channels what it charges 16
(:mod:`lit_nas.latency`, aligned tables), so a search that leaves a group unaligned pays for channels it
does not have. With ``round_to: step`` every search ends each channel group at a multiple of the step, or
narrower than one step where it started so. Rounding *up* is free in latency (the tile is paid for anyway)
and keeps channels, so surgeries that choose channels to remove round their kept counts up; searches that
move a width in steps (NetAdapt, MorphNet's expansion, Fisher's units) move in whole steps.

Pure: integers and tensors; no callback, no table.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any


def align_up(n: int, step: int) -> int:
    """``n`` rounded up to a multiple of ``step`` (``n`` itself for step 1)."""
    return -(-n // step) * step


def align_down(n: int, step: int) -> int:
    """``n`` rounded down to a multiple of ``step``, but never below ``min(n, step)``."""
    return max(n // step * step, min(n, step))


def is_aligned(n: int, step: int) -> bool:
    """A multiple of ``step``, or narrower than one step."""
    return n % step == 0 or n < step


def aligned_keep(kept: int, size: int, step: int) -> int:
    """How many of a group's ``size`` channels to keep when a search chose to keep ``kept``.

    Rounded up to the step; when that is the whole (unaligned) group although channels were to go, down to
    the step below instead, so a group the search touched always ends aligned. ``size`` when none go.
    """
    if kept >= size:
        return size
    up = align_up(max(kept, 1), step)
    return up if up < size or size % step == 0 else align_down(size, step)


def collected_width(live: int, size: int, round_to: int) -> int:
    """The width a group of ``size`` channels with ``live`` open ones has once collected.

    Its live channels, rounded up to ``round_to`` with silent ones (at most ``size``), and never 0: a group
    with none open keeps one silent channel.
    """
    return max(1, min(size, align_up(live, round_to)))


def smaller_sizes(size: int, step: int) -> list[int]:
    """The aligned sizes a group of ``size`` channels can shrink to, widest first.

    ``size - 1 .. 1`` for step 1; for a larger step its multiples below ``size``, down to one step.
    """
    if step <= 1:
        return list(range(size - 1, 0, -1))
    return list(range((size - 1) // step * step, 0, -step))


def check_round_to(who: str, round_to: Any) -> None:
    """``ValueError`` naming ``round_to`` unless it is ``None`` (the table's step) or an integer >= 1."""
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise ValueError(
            f"{who} round_to must be a positive integer (8: every group a multiple of 8 channels) or null "
            f"(the latency table's step, 1 without a table); got {round_to!r}"
        )


def resolve_round_to(round_to: int | None, lut: Any | None) -> int:
    """The step a search aligns to: ``round_to``, else the table's (:attr:`LatencyLUT.step`), else 1."""
    if round_to is not None:
        return round_to
    return int(lut.step) if lut is not None else 1


def unaligned(sizes: Mapping[str, int], step: int) -> dict[str, int]:
    """The groups (and their sizes) that are neither a multiple of ``step`` nor narrower than one step."""
    return {g: n for g, n in sizes.items() if not is_aligned(n, step)}


def align_removal(
    removed: Sequence[tuple[str, int]] | Sequence[Hashable],
    sizes: Mapping[str, int],
    step: int,
    extra: Mapping[str, Sequence[int]] | None = None,
) -> list:
    """``removed`` adjusted so every group it touches keeps an aligned count (:func:`aligned_keep`).

    ``removed``: ``(group, channel)`` units, lowest ranked first. Rounding up puts the group's last-ranked
    removals back; where a group must round down, ``extra`` (its remaining channels, lowest ranked first,
    by group) supplies the further ones; without it the group's removals are put back whole.
    """
    if step <= 1:
        return list(removed)
    by_group: dict[str, list[int]] = {}
    for i, (g, _) in enumerate(removed):  # type: ignore[misc]
        by_group.setdefault(g, []).append(i)
    drop: set[int] = set()
    more: list = []
    for g, idx in by_group.items():
        kept = sizes[g] - len(idx)
        target = aligned_keep(kept, sizes[g], step)
        if target >= kept:  # put the last-ranked removals back
            back = target - kept
            drop.update(idx[len(idx) - back :] if back > 0 else [])
        else:
            spare = [k for k in (extra or {}).get(g, []) if (g, k) not in set(removed)]
            if len(spare) >= kept - target:
                more += [(g, k) for k in spare[: kept - target]]
            else:
                drop.update(idx)
    return [u for i, u in enumerate(removed) if i not in drop] + more
