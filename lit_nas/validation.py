"""One phrasing for a bad choice, so every callback and config names the value and the valid choices."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(
    who: str, argument: str, value: Any, choices: Iterable[Any], error: type[ValueError] = ValueError
) -> None:
    """Raise ``error("<who> <argument> must be one of [...]; got <value>")`` unless ``value`` is one."""
    valid = list(choices)
    if value not in valid:
        raise error(f"{who} {argument} must be one of {valid}; got {value!r}")
