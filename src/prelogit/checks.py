"""Input validation shared by every entry point.

Every check raises :class:`ParameterError` naming the parameter, the allowed range and the value
received, so that bad input stops a run before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class ParameterError(ValueError):
    """A parameter is missing, of the wrong type or out of range."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Require ``value`` to be a finite number (an int when ``integer``) inside the given bounds."""
    kind = "an integer" if integer else "a number"
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ParameterError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if not _is_number(value) or not math.isfinite(value):
        raise ParameterError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    lo_txt = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi_txt = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
    if low is not None and (value < low or (low_open and value == low)):
        raise ParameterError(f"{name} must be {allowed}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ParameterError(f"{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Require ``value`` to be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_aisp_params(*, sigma: float, lam: float, alpha: float, alpha_mode: str, n: int, K: int,
                      tau: int, B: int = 1) -> None:
    """Validate the AISP hyper-parameters (spec sections 3-5) in one place."""
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("lam", lam, low=0, low_open=True)
    check_number("alpha", alpha, low=0, high=1)
    check_choice("alpha_mode", alpha_mode, ("mppi", "step"))
    check_number("n", n, low=1, integer=True)
    check_number("K", K, low=1, integer=True)
    check_number("tau", tau, low=0, integer=True)
    check_number("B", B, low=1, integer=True)
