"""The one LPS ↔ RAS conversion.

ITK, SimpleITK and every transform file this package writes use LPS millimetres (x → left, y → posterior,
z → superior); MRML (Slicer) and the NIfTI world frame use RAS (x → right, y → anterior). The two frames
differ by negating x and y, which is its own inverse, so one function converts both ways.
"""

from __future__ import annotations

import numpy as np

#: diag(−1, −1, 1): multiplies LPS points, vectors or direction matrices into RAS, and RAS into LPS.
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0])


def flip_lps_ras(values: np.ndarray) -> np.ndarray:
    """Points or vectors with x, y, z along the last axis, LPS → RAS or RAS → LPS (negate x and y).

    A 3×3 direction matrix (columns = axes) is flipped by applying this to its transpose, or use
    ``LPS_RAS_FLIP @ direction``.
    """
    values = np.asarray(values)
    sign = np.ones(values.shape[-1], dtype=values.dtype if values.dtype.kind == "f" else float)
    sign[:2] = -1.0
    return values * sign
