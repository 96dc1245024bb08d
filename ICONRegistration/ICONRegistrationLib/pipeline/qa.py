"""Quality maps of a registration: Jacobian determinant and inverse-consistency error, and their summary."""

from __future__ import annotations

import numpy as np
import torch

from ..core.coordinates import jacobian_determinant


def physical_jacobian(positions_mm: torch.Tensor, index_matrix: np.ndarray) -> torch.Tensor:
    """det ∂T(x)/∂x (unitless) of a transform sampled on a grid: ``positions_mm`` ``[1, 3, *S]`` are T(x) in mm,
    ``index_matrix`` the grid's physical step per tensor axis (columns). ≤ 0 means the transform folds."""
    return jacobian_determinant(positions_mm.double(), torch.as_tensor(index_matrix)).float()


def summarize(jacobian: np.ndarray, ic_error_mm: np.ndarray) -> dict:
    """Fold count and %, Jacobian min / percentiles / max, IC error mean / 95th / max (mm)."""
    jacobian = jacobian.ravel()
    ic_error_mm = ic_error_mm.ravel()
    folds = int((jacobian <= 0).sum())
    percentiles = np.percentile(jacobian, [1, 5, 50, 95, 99])
    return {
        "folds": folds,
        "folds_percent": 100.0 * folds / max(jacobian.size, 1),
        "jacobian_min": float(jacobian.min()),
        "jacobian_p1": float(percentiles[0]),
        "jacobian_p5": float(percentiles[1]),
        "jacobian_median": float(percentiles[2]),
        "jacobian_p95": float(percentiles[3]),
        "jacobian_p99": float(percentiles[4]),
        "jacobian_max": float(jacobian.max()),
        "ic_error_mean_mm": float(ic_error_mm.mean()),
        "ic_error_p95_mm": float(np.percentile(ic_error_mm, 95)),
        "ic_error_max_mm": float(ic_error_mm.max()),
    }


def field_jacobian(field: "sitk.Image") -> "sitk.Image":
    """Jacobian determinant of the transform ``x ↦ x + u(x)`` of a displacement field (LPS mm), on its grid."""
    import SimpleITK as sitk

    from ..core.coordinates import identity_map
    from .grid import Grid

    grid = Grid.of_image(field)
    displacement = torch.as_tensor(sitk.GetArrayFromImage(field), dtype=torch.float64).permute(3, 0, 1, 2)[None]
    points = grid.unit_to_physical(identity_map(grid.shape, dtype=torch.float64))
    determinant = physical_jacobian(points + displacement, grid.index_matrix)
    return grid.apply_to(sitk.GetImageFromArray(determinant[0, 0].numpy()))
