"""The exact inverse of a displacement-field transform (LPS mm), sampled on any reference grid.

A field ``u`` on grid T represents ``Φ(x) = x + u(x)``, the ITK resampling direction (fixed points → moving
points). Its inverse ``Φ⁻¹(y) = y + w(y)`` is found at the voxel centres ``y`` of a reference image (usually the
moving image) by the fixed-point inversion layer of :mod:`ICONRegistrationLib.core.inversion`, in T's unit-cube
coordinates, so the tolerance is in voxels of T. Outside T's box ``u`` is border-extended, as the rest of this
package does. ITK instead applies no displacement at points more than half a voxel outside the field's box: where
a reference voxel's preimage lies out there, an ITK user's round trip through the written files misses by the
inverse's own displacement there. :class:`FieldInverse` counts those voxels and reports the round trip as ITK
computes it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import SimpleITK as sitk
import torch

from ..core.coordinates import identity_map, sample_at
from ..core.inversion import InversionReport, InversionWarning, invert_displacement
from ..errors import UserError
from .grid import Grid, apply_affine
from .images import require_finite
from .qa import field_jacobian


@dataclasses.dataclass
class FieldInverse:
    """``field``: the inverse displacement (vector float64, LPS mm) on the reference grid; ``report``: iterations,
    maximum round-trip error (voxels of the input field's grid), convergence and the input's folds (grid points
    with det J ≤ 0); ``max_error_mm``: that error in mm, the largest ‖Φ(Φ⁻¹(y)) − y‖ over the reference grid's
    voxel centres y (what the iteration solves). The other way round, ``forward_first_max_error_mm`` and
    ``forward_first_mean_error_mm``: ‖Φ⁻¹(Φ(x)) − x‖ over the input field's voxel centres x whose image Φ(x) lies
    in the reference grid's box, with Φ⁻¹ read from the sampled inverse by trilinear interpolation, as ITK reads
    it (moving a segmentation there and back); ``None`` when no Φ(x) lies in the box. It includes the
    interpolation error of the sampled inverse, so it is larger where the field varies fast between the
    reference's voxels."""

    field: sitk.Image
    report: InversionReport
    max_error_mm: float
    forward_first_max_error_mm: float | None = None
    forward_first_mean_error_mm: float | None = None
    #: reference voxels whose preimage Φ⁻¹(y) lies more than half a voxel outside the input field's box, where ITK
    #: applies no displacement (this package border-extends the field)
    outside_field_voxels: int = 0
    #: the largest ‖Φ(Φ⁻¹(y)) − y‖ (mm) over the reference voxels with Φ applied as ITK applies the written field
    #: (no displacement outside its box): ``max_error_mm`` when ``outside_field_voxels`` is 0
    itk_max_error_mm: float | None = None

    def to_dict(self) -> dict:
        """The report for JSON (``iconreg invert`` prints it): iterations, errors (voxels, mm), tolerance,
        convergence, folds and invertibility."""
        data = {**self.report.to_dict(), "max_error_mm": self.max_error_mm,
                "forward_first_max_error_mm": self.forward_first_max_error_mm,
                "forward_first_mean_error_mm": self.forward_first_mean_error_mm,
                "outside_field_voxels": self.outside_field_voxels, "itk_max_error_mm": self.itk_max_error_mm}
        data.pop("backward_iterations")
        return data


def _forward_first_errors_mm(displacement: torch.Tensor, inverse: torch.Tensor, grid: Grid,
                             target: Grid) -> tuple[float | None, float | None]:
    """Max and mean of ‖Φ⁻¹(Φ(x)) − x‖ in mm over ``grid``'s voxel centres x with Φ(x) inside ``target``'s box.

    ``displacement`` ``[1, 3, *grid.shape]`` and ``inverse`` ``[1, 3, *target.shape]`` are both displacements in
    ``grid``'s unit-cube coordinates (``inverse`` sampled at ``target``'s voxel centres)."""
    matrix, offset = grid.unit_affine_to(target)
    with torch.no_grad():
        mapped = identity_map(grid.shape, dtype=displacement.dtype) + displacement  # Φ(x), grid's unit coordinates
        in_target = apply_affine(matrix, offset, mapped)  # the same points in target's unit coordinates
        inside = ((in_target >= -1e-6) & (in_target <= 1 + 1e-6)).all(dim=1)[0]
        if not bool(inside.any()):
            return None, None
        residual = displacement + sample_at(inverse, in_target, padding="border")
        error = apply_affine(grid.unit_matrix, np.zeros(3), residual).norm(dim=1)[0][inside]
    return float(error.max()), float(error.mean())


def invert_field(field: sitk.Image, reference: sitk.Image, *, tolerance: float = 0.01, max_iterations: int = 200,
                 allow_folds: bool = False, dtype: torch.dtype = torch.float32) -> FieldInverse:
    """The inverse of the displacement-field transform ``field`` on the grid of ``reference``.

    Raises :class:`UserError` when ``field`` folds (Jacobian determinant ≤ 0 somewhere: no inverse exists there)
    unless ``allow_folds``; in that case, and when the iteration stops above ``tolerance`` voxels, the report says
    so (``report.invertible`` is False) and :class:`~ICONRegistrationLib.core.inversion.InversionWarning` is issued.
    """
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise UserError("Only 3-D displacement fields (three components per voxel) can be inverted.")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise UserError(f"The inversion tolerance must be a number of voxels > 0, got {tolerance}.")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise UserError(f"The inversion needs at least one iteration (max_iterations ≥ 1), got {max_iterations}; "
                        "with none it would return its initial guess as the inverse.")
    if reference.GetDimension() != 3:
        raise UserError("The reference image for the inverse must be 3-D.")
    require_finite(sitk.GetArrayFromImage(field), "displacement field to invert",
                   "it did not come from a successful registration; register again")
    determinant = sitk.GetArrayFromImage(field_jacobian(field))  # a copy: a view would outlive its image
    folds = int((determinant <= 0).sum())
    if folds and not allow_folds:
        raise UserError(f"The transform folds at {folds} voxels (Jacobian determinant ≤ 0, minimum "
                        f"{float(determinant.min()):.3f}), so it has no inverse there. Use a transform without folds, "
                        "or allow folds to get an approximate inverse with a warning.")
    grid = Grid.of_image(field)
    target = Grid.of_image(reference)
    unit = grid.unit_matrix  # unit-cube coordinates (tensor order) -> mm offsets
    to_unit = np.linalg.inv(unit)
    vectors = torch.as_tensor(sitk.GetArrayFromImage(field), dtype=dtype).permute(3, 0, 1, 2)[None]  # LPS mm
    displacement = apply_affine(to_unit, np.zeros(3), vectors)
    points = grid.unit_coordinates_of(target, dtype=dtype)
    with torch.no_grad():
        inverse, report = invert_displacement(displacement, points, tolerance=tolerance,
                                              max_iterations=max_iterations, check_folds=False, warn=False)
    report.folds = folds
    # Round-trip error in mm at the solution: Φ(y + w) − y = w + u(y + w), mapped to mm.
    preimage = points + inverse
    residual_unit = inverse + sample_at(displacement, preimage, padding="border")
    residual_mm = apply_affine(unit, np.zeros(3), residual_unit).norm(dim=1)
    max_error_mm = float(residual_mm.max())
    inverse_mm = apply_affine(unit, np.zeros(3), inverse)
    # ITK: no displacement where the preimage is over half a voxel outside the field's box, so Φ(y + w) − y = w there;
    # its buffer is the continuous index range [−0.5, size − 0.5), the upper face excluded (ties counted as ITK does)
    margin = torch.as_tensor([0.5 / max(n - 1, 1) for n in grid.shape], dtype=inverse.dtype).view(1, 3, 1, 1, 1)
    outside = ((preimage < -margin - 1e-9) | (preimage >= 1 + margin - 1e-9)).any(dim=1)
    itk_residual = torch.where(outside, inverse_mm.norm(dim=1), residual_mm)
    outside_voxels, itk_max_error_mm = int(outside.sum()), float(itk_residual.max())
    require_finite(inverse_mm, "inversion", "the field is too irregular to invert; check it with 'iconreg jacobian'")
    forward_first = _forward_first_errors_mm(displacement, inverse, grid, target)
    array = np.ascontiguousarray(inverse_mm[0].permute(1, 2, 3, 0).numpy().astype(np.float64))
    result = target.apply_to(sitk.GetImageFromArray(array, isVector=True))
    outcome = FieldInverse(result, report, max_error_mm, *forward_first, outside_voxels, itk_max_error_mm)
    if not report.invertible:
        problems = []
        if folds:
            problems.append(f"the input folds at {folds} voxels")
        if not report.converged:
            problems.append(f"the iteration stopped after {report.iterations} steps at {report.max_error_voxels:.3g} "
                            f"voxels (tolerance {tolerance:g})")
        warnings.warn("Inverse transform is approximate: " + "; ".join(problems) + ".", InversionWarning,
                      stacklevel=2)
    return outcome
