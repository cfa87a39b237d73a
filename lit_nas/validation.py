"""One phrasing for a bad choice, so every callback and config names the value and the valid choices."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def check_choice(
    who: str, argument: str, value: Any, choices: Iterable[Any], error: type[ValueError] = ValueError
) -> None:
    """Raise ``error("<who> <argument> must be one of [...]; got <value>")`` unless ``value`` is one."""
    valid = list(choices)
    if value not in valid:
        raise error(f"{who} {argument} must be one of {valid}; got {value!r}")


def check_target(who: str, fraction: float | None, value: float | None) -> None:
    """A search's stopping target: exactly one of ``target_fraction`` in (0, 1) and ``target_value`` > 0."""
    if (fraction is None) == (value is None):
        raise ValueError(
            f"{who} needs exactly one of target_fraction and target_value; got "
            f"target_fraction={fraction}, target_value={value}"
        )
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"{who} target_fraction must lie in (0, 1); got {fraction}")
    if value is not None and value <= 0:
        raise ValueError(f"{who} target_value must be > 0; got {value}")


def target_of(
    who: str,
    measure: str,
    initial: float,
    fraction: float | None,
    value: float | None,
    fmt: Callable[[float], str] = "{:.4g}".format,
) -> float:
    """The target cost from the start cost ``initial``; fails at fit start when the start already meets it."""
    target = initial * fraction if fraction is not None else float(value)  # type: ignore[arg-type]
    if target >= initial:
        raise ValueError(f"{who} target already met: {measure} is {fmt(initial)}, target_value {fmt(target)}")
    return target
