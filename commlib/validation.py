"""Argument checks, one place for the library: each raises ``ValueError`` naming the argument, the
allowed range and the value it got (rule 6 of the invariants), and returns the value.

Example::

    >>> from commlib.validation import integer, number
    >>> integer("rank", 4, 1)
    4
    >>> number("momentum", 0.9, low=0, high=1, high_open=True)
    0.9
    >>> integer("bits", 9, 1, 8)
    Traceback (most recent call last):
    ...
    ValueError: bits must be an integer in [1, 8], got 9
    >>> number("alpha", 0, low=0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a finite number > 0, got 0
"""

from __future__ import annotations

import math


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def integer(name: str, value, low: int, high: int | None = None, *, why: str = "") -> int:
    """``value`` must be an ``int`` (not a ``bool``) in ``[low, high]`` (``high=None``: no upper bound)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name} must be an integer {_interval(low, high, False, False)}{why}, got {value!r}")
    return value


def number(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           finite: bool = True, why: str = "") -> float:
    """``value`` must be a real number (``int`` or ``float``, not a ``bool``, not NaN) between
    ``low`` and ``high`` (each inclusive unless ``*_open``; ``None``: unbounded), and finite unless
    ``finite=False``. Returns it as a ``float``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and finite and math.isinf(value):
        ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "a finite number" if finite and (low is None or high is None) else "a number"
        bounds = _interval(low, high, low_open, high_open)
        raise ValueError(f"{name} must be {kind}{' ' + bounds if bounds else ''}{why}, got {value!r}")
    return float(value)


def fraction(name: str, value) -> float:
    """A density or share in ``(0, 1]``."""
    return number(name, value, low=0, high=1, low_open=True)


def flag(name: str, value) -> bool:
    """``value`` must be ``True`` or ``False`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def one_of(name: str, value, allowed):
    """``value`` must be one of ``allowed``, of the same type (so ``1`` is not ``True`` here)."""
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {tuple(allowed)!r}, got {value!r}")
    return value
