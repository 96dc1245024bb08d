"""Label overlap on arrays: the one Dice used by training's validation and by evaluation (a neutral module)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) of two boolean arrays (NaN when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else math.nan


def dice_scores(warped: np.ndarray, fixed: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice of each label value between two label arrays of one shape (NaN for a label absent from both)."""
    return {int(label): dice(warped == label, fixed == label) for label in labels}
