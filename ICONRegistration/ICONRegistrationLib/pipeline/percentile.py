"""``percentile(values, q)``: NumPy's ``np.percentile(values, q)`` (linear method), the same value (bit for bit but for
the sign of a zero), several times faster on large volumes.

``np.percentile`` partitions the whole array (every voxel moved, one core) and also finds its minimum and maximum.
For one ``q`` only a narrow band of values matters: a strided sample of about 2^16 values brackets the wanted
ranks; one pass counts the values below the band and gathers the band, and only the band (typically < 1 % of a
volume) is partitioned; where the package's compiled library is loaded, one compiled kernel counts and gathers the
band in two passes. Whenever the band does not hold the wanted ranks (unlucky sample, many equal values), or
the values are not finite, or the array is small, it falls back to ``np.percentile`` itself, so the result is
always NumPy's.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable

import numpy as np

_SAMPLE = 1 << 16  # values in the strided sample
_SMALL = 1 << 18  # below this many values np.percentile is already fast
_NATIVE_MODULE = __name__.rsplit(".", 2)[0] + ".core.native_sampler"  # used only once something imported it


def percentile(values: np.ndarray, q: float) -> float:
    """``float(np.percentile(values, q))`` for an array of any shape and ``0 ≤ q ≤ 100`` (a number; its NumPy type,
    if any, is kept as NumPy's own call would keep it). The banded selection serves float32 arrays of 2^18 to 2^24
    values and float64 arrays of at least 2^18; NumPy itself answers otherwise."""
    return percentiles(values, [q])[0]


def percentiles(values: np.ndarray, qs: "list[float] | tuple[float, ...]") -> list[float]:
    """``[percentile(values, q) for q in qs]``, the strided sample sorted once for all of them."""
    flat = np.asarray(values).reshape(-1)

    @functools.cache  # sorted on first use: small arrays and out-of-range quantiles never need it
    def sorted_sample() -> np.ndarray:
        return np.sort(flat[::max(1, flat.size // _SAMPLE)])
    return [_one_percentile(flat, q, sorted_sample) for q in qs]


def _one_percentile(flat: np.ndarray, q: float, sorted_sample: Callable[[], np.ndarray]) -> float:
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
    band = _band_values(flat, previous, sorted_sample())
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


def _band_values(flat: np.ndarray, rank: int, sample: np.ndarray) -> "tuple[int, np.ndarray] | None":
    """``(number of values below the band, the values in the band)`` for a band that surely holds the values of
    sorted ranks ``rank`` and ``rank + 1``, bracketed by ``sample`` (the sorted strided sample of ``flat``);
    ``None`` when the sample's band misses them or a value is not finite."""
    count = flat.size
    if not (np.isfinite(sample[0]) and np.isfinite(sample[-1])):
        return None
    size = sample.size
    fraction = rank / (count - 1)
    centre = fraction * (size - 1)
    margin = int(math.ceil(8.0 * math.sqrt(size * fraction * (1.0 - fraction)))) + 16  # ≫ the sample's spread
    low = sample[max(0, int(math.floor(centre)) - margin)]
    high = sample[min(size - 1, int(math.ceil(centre)) + margin)]
    compiled = _compiled_band(flat, low, high)
    if compiled is not None:
        below, inside, above = compiled
    else:
        inside_mask = flat >= low
        inside_mask &= flat <= high
        inside = flat[inside_mask]
        below = int(np.count_nonzero(flat < low))
        above = int(np.count_nonzero(flat > high))
    if not (below <= rank and rank + 1 < below + inside.size):
        return None
    if below + inside.size + above != count:  # NaN values: let NumPy decide
        return None
    return below, inside


def _compiled_band(flat: np.ndarray, low, high) -> "tuple[int, np.ndarray, int] | None":
    """The band's counts and values in two compiled passes (``core.native_sampler.band_of``), or ``None`` where that
    does not apply: the compiled library's module not imported already (this never imports torch or the network
    code: the Slicer form's modality guess stays NumPy only), the library not built, or an array torch cannot share
    (read-only, non-contiguous, non-native byte order)."""
    torch = sys.modules.get("torch")
    native_sampler = sys.modules.get(_NATIVE_MODULE)
    if (torch is None or native_sampler is None or not flat.flags.writeable or not flat.flags.c_contiguous
            or not flat.dtype.isnative):
        return None
    values = torch.from_numpy(flat)
    if not native_sampler.kernels_eligible(values):
        return None
    below, band, above = native_sampler.band_of(values, float(low), float(high))
    return below, band.numpy(), above
