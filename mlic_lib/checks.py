"""Small value tests shared by the profile sections' checks (``psd.check_options``, ``ltml.check_options``, ...)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["number", "whole_list"]


def number(v: Any, whole: bool = False) -> float | None:
    """``v`` as a finite real number (Python or NumPy; a whole one if ``whole``), else ``None`` (``True`` and
    ``False`` are not numbers here)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if math.isfinite(x) and (not whole or x.is_integer()) else None


def whole_list(v: Any, low: int) -> bool:
    """Whether ``v`` is a non-empty list of whole numbers ``>= low``."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(
        (x := number(r, whole=True)) is not None and x >= low for r in v)
