"""Quality maps of a registration: Jacobian determinant and inverse-consistency error, and their summary."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..core.coordinates import displacement_jacobian_determinant
from .metrics import QualitySummary
from .percentile import percentile, percentiles


def physical_jacobian(displacement_mm: torch.Tensor, index_matrix: np.ndarray) -> torch.Tensor:
    """det ∂T(x)/∂x (unitless) of ``T(x) = x + u(x)`` sampled on a grid: ``displacement_mm`` ``[1, 3, *S]`` is u in
    mm (LPS), ``index_matrix`` the grid's physical step per tensor axis (columns). ≤ 0 means the transform folds."""
    return displacement_jacobian_determinant(displacement_mm.float(), torch.as_tensor(index_matrix))


def summarize_quality(jacobian: np.ndarray, ic_error_mm: np.ndarray,
                      ic_outside: Optional[np.ndarray] = None) -> QualitySummary:
    """Fold count and %, Jacobian min / percentiles / max, IC error mean / 95th / max (mm); with ``ic_outside``
    (bool, same points: the forward map leaves the other image's box there) also the share of such points and the
    mean IC error over the rest (:class:`QualitySummary`)."""
    jacobian = jacobian.ravel()
    ic_error_mm = ic_error_mm.ravel()
    outside = np.zeros(ic_error_mm.shape, dtype=bool) if ic_outside is None else ic_outside.ravel()
    inside_count = int(outside.size - outside.sum())
    folds = int((jacobian <= 0).sum())
    # NumPy's percentiles by banded selection, one sorted sample for the Jacobian's five (about 45 ms for 175³ with
    # the compiled band on two threads, against 97 ms for np.percentile's one partition of the whole map)
    jacobian_percentiles = percentiles(jacobian, (1, 5, 50, 95, 99))
    ic_p95 = percentile(ic_error_mm, 95)
    return QualitySummary(
        folds=folds, folds_percent=100.0 * folds / max(jacobian.size, 1), jacobian_min=float(jacobian.min()),
        jacobian_p1=jacobian_percentiles[0], jacobian_p5=jacobian_percentiles[1],
        jacobian_median=jacobian_percentiles[2], jacobian_p95=jacobian_percentiles[3],
        jacobian_p99=jacobian_percentiles[4], jacobian_max=float(jacobian.max()),
        ic_error_mean_mm=float(ic_error_mm.mean()), ic_error_p95_mm=float(ic_p95),
        ic_error_max_mm=float(ic_error_mm.max()), ic_outside_percent=100.0 * float(outside.mean()),
        ic_error_overlap_mean_mm=float(ic_error_mm[~outside].mean()) if inside_count else None)


def field_jacobian(field: "sitk.Image") -> "sitk.Image":
    """Jacobian determinant of the transform ``x ↦ x + u(x)`` of a displacement field (LPS mm), on its grid."""
    import SimpleITK as sitk

    from .grid import Grid

    from .images import require_finite

    grid = Grid.of_image(field)
    vectors = sitk.GetArrayFromImage(field)
    require_finite(vectors, "displacement field", "it did not come from a successful registration; register again")
    displacement = torch.as_tensor(vectors, dtype=torch.float32).permute(3, 0, 1, 2)[None]
    determinant = physical_jacobian(displacement, grid.index_matrix)
    return grid.apply_to(sitk.GetImageFromArray(determinant[0, 0].numpy()))
