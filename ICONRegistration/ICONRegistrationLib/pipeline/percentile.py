"""``percentile(values, q)``: NumPy's ``np.percentile(values, q)`` (linear method), the same value (bit for bit but for
the sign of a zero), several times faster on large volumes.

``np.percentile`` partitions the whole array (every voxel moved, one core) and also finds its minimum and maximum.
For one ``q`` only a narrow band of values matters: a strided sample of about 2^16 values brackets the wanted
ranks; one pass counts the values below the band and gathers the band, and only the band (typically < 1 % of a
volume) is partitioned. Whenever the band does not hold the wanted ranks (unlucky sample, many equal values), or
the values are not finite, or the array is small, it falls back to ``np.percentile`` itself, so the result is
always NumPy's.
"""

from __future__ import annotations

import math

import numpy as np

_SAMPLE = 1 << 16  # values in the strided sample
_SMALL = 1 << 18  # below this many values np.percentile is already fast


def percentile(values: np.ndarray, q: float) -> float:
    """``float(np.percentile(values, q))`` for an array of any shape and ``0 ≤ q ≤ 100`` (a number; its NumPy type,
    if any, is kept as NumPy's own call would keep it). The banded selection serves float32 arrays of 2^18 to 2^24
    values and float64 arrays of at least 2^18; NumPy itself answers otherwise."""
    flat = np.asarray(values).reshape(-1)
    count = flat.size
    # NumPy does the index arithmetic below in float32 for float32 arrays: beyond 2^24 values it is inexact
    inexact_index = flat.dtype == np.float32 and count > (1 << 24)
    if count < _SMALL or flat.dtype not in (np.float32, np.float64) or inexact_index or not 0.0 <= float(q) <= 100.0:
        return float(np.percentile(flat, q))
    # NumPy's own arithmetic (numpy/lib/_function_base_impl.py, method "linear"): q / 100 in the array's dtype,
    # virtual index (n − 1)·q, neighbours floor and floor + 1, weight = the fractional part, in that dtype too.
    quantile = np.true_divide(q, flat.dtype.type(100))
    virtual = (count - 1) * quantile
    if not virtual < count - 1:
        return float(np.percentile(flat, q))
    previous = int(np.floor(virtual))
    gamma = np.asarray(virtual - previous, dtype=np.asarray(virtual).dtype)
    band = _band_values(flat, previous)
    if band is None:
        return float(np.percentile(flat, q))
    below, inside = band
    lower_rank, upper_rank = previous - below, previous + 1 - below
    parts = np.partition(inside, [lower_rank, upper_rank])
    a, b = parts[lower_rank], parts[upper_rank]
    difference = np.subtract(b, a)
    result = np.add(a, difference * gamma)
    if gamma >= 0.5:
        result = np.asarray(np.subtract(b, difference * (1 - gamma))).astype(np.asarray(result).dtype)
    # Partitioning treats −0.0 and 0.0 as equal and may pick either, in NumPy's call and in this one: a zero
    # result is equal to NumPy's but its sign bit may differ.
    return float(result)


def _band_values(flat: np.ndarray, rank: int) -> "tuple[int, np.ndarray] | None":
    """``(number of values below the band, the values in the band)`` for a band that surely holds the values of
    sorted ranks ``rank`` and ``rank + 1``; ``None`` when the sample's band misses them or a value is not finite."""
    count = flat.size
    stride = max(1, count // _SAMPLE)
    sample = np.sort(flat[::stride])
    if not (np.isfinite(sample[0]) and np.isfinite(sample[-1])):
        return None
    size = sample.size
    fraction = rank / (count - 1)
    centre = fraction * (size - 1)
    margin = int(math.ceil(8.0 * math.sqrt(size * fraction * (1.0 - fraction)))) + 16  # ≫ the sample's spread
    low = sample[max(0, int(math.floor(centre)) - margin)]
    high = sample[min(size - 1, int(math.ceil(centre)) + margin)]
    inside_mask = flat >= low
    inside_mask &= flat <= high
    inside = flat[inside_mask]
    below = int(np.count_nonzero(flat < low))
    if not (below <= rank and rank + 1 < below + inside.size):
        return None
    if below + inside.size + int(np.count_nonzero(flat > high)) != count:  # NaN values: let NumPy decide
        return None
    return below, inside
