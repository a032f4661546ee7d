"""Checks of given values: integers, numbers in a range, repeated ids.

One message shape for all of them, ``NAME must be EXPECTED, got VALUE; HINT``, e.g.
``tile_px must be an integer >= 1, got 0; use the model's tile size, e.g. 224``. A bool is not
a number here (``True`` is an ``int`` to Python, never a tile size); NumPy scalars are.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from .errors import ConfigError


def is_int(value: object) -> bool:
    """Return whether ``value`` is a Python or NumPy integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Return whether ``value`` is a finite Python or NumPy real number (not a bool)."""
    real = isinstance(value, int | float | np.integer | np.floating)
    return real and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]


def check_int(
    name: str, value: object, minimum: int, hint: str = "", *, maximum: int | None = None
) -> int:
    """Return ``value`` as an int if it is an integer in ``[minimum, maximum]``.

    Raises:
        ConfigError: ``name must be an integer >= minimum, got value; hint`` (or ``in
            [minimum, maximum]``).
    """
    if is_int(value) and minimum <= value and (maximum is None or value <= maximum):  # type: ignore[operator]
        return int(value)  # type: ignore[call-overload]
    raise ConfigError(_message(name, value, "an integer", minimum, maximum, False, False, hint))


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
    kind: str = "",
) -> float:
    """Return ``value`` as a float if it is a finite number between ``low`` and ``high``.

    Args:
        name: what the value is, as the user knows it (``"overlap"``).
        value: the given value.
        low, high: the bounds; None is no bound.
        low_open, high_open: exclude the bound itself (``(0, 1]``, ``> 0``).
        hint: the fix, after a semicolon.
        kind: a noun before the range in the message (``"a number"``), or nothing.

    Raises:
        ConfigError: ``name must be in [low, high], got value; hint`` (or ``>= low``, ``< high``…).
    """
    if is_number(value):
        x = float(value)  # type: ignore[arg-type]
        above = low is None or (x > low if low_open else x >= low)
        below = high is None or (x < high if high_open else x <= high)
        if above and below:
            return x
    raise ConfigError(_message(name, value, kind, low, high, low_open, high_open, hint))


def repeated(items: Iterable[str]) -> list[str]:
    """Return the items that occur more than once, sorted (empty if all are distinct)."""
    return sorted(item for item, n in Counter(items).items() if n > 1)


def _message(
    name: str,
    value: object,
    kind: str,
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
    hint: str,
) -> str:
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    elif low is not None:
        span = f"{'>' if low_open else '>='} {_num(low)}"
    elif high is not None:
        span = f"{'<' if high_open else '<='} {_num(high)}"
    else:
        span = ""
    expected = " ".join(part for part in (kind, span) if part) or "a number"
    return f"{name} must be {expected}, got {value!r}" + (f"; {hint}" if hint else "")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
