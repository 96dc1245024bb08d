"""Input checks and SimpleITK ↔ array conversion for the pipeline (inputs are never modified)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import UserError


def image_array(image: sitk.Image, role: str) -> np.ndarray:
    """Validate a 3-D scalar image and return its voxels as float32 ``[z, y, x]`` (a copy).

    Raises :class:`UserError` for anything that is not a non-empty, finite, non-constant 3-D scalar image.
    """
    if not isinstance(image, sitk.Image):
        raise UserError(f"The {role} image must be a SimpleITK image, got {type(image).__name__}.")
    _reject_label_map(image, f"{role} image")
    dimension = image.GetDimension()
    if dimension != 3:
        raise UserError(f"The {role} image is {dimension}-D; registration needs a 3-D volume "
                        "(extract one volume of a 4-D series first).")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"The {role} image has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                        "(vector or colour); convert it to a scalar (grey-level) volume first.")
    if image.GetNumberOfPixels() == 0 or min(image.GetSize()) < 2:
        raise UserError(f"The {role} image is empty or flat (size {image.GetSize()}); "
                        "it needs at least 2 voxels along every axis.")
    if "complex" in image.GetPixelIDTypeAsString():
        raise UserError(f"The {role} image has complex voxels; use its magnitude.")
    source = sitk.GetArrayViewFromImage(image)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes ±inf here, and is reported below
        array = source.astype(np.float32, copy=True)  # one copy, from the image's memory
    low, high = float(array.min()), float(array.max())  # NaN if any voxel is NaN, ±inf if any is infinite
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = ~np.isfinite(array)
        if np.isfinite(source[bad]).all():
            raise UserError(f"The {role} image has {int(bad.sum())} voxels beyond the float32 range (±3.4e38), "
                            "which the networks compute in; rescale the image before registering.")
        raise UserError(f"The {role} image contains {int(bad.sum())} NaN or infinite voxels; "
                        "replace them (e.g. with 0) before registering.")
    if high == low:
        raise UserError(f"The {role} image is constant (every voxel is {low:g}); there is nothing to register.")
    return array


def _reject_label_map(image: sitk.Image, what: str) -> None:
    """SimpleITK's run-length label-map pixel types (``sitkLabelUInt8``…) abort the whole process when their voxels
    are read as an array; refuse them with a way out."""
    if image.GetPixelIDTypeAsString().startswith("label"):
        raise UserError(f"The {what} is a SimpleITK label map ({image.GetPixelIDTypeAsString()}); convert it to "
                        "an ordinary image first, e.g. sitk.LabelMapToLabel(image).")


def mask_array(mask: sitk.Image, image: sitk.Image, role: str) -> np.ndarray:
    """A binary float32 mask ``[z, y, x]`` on ``image``'s grid (resampled nearest-neighbour if needed)."""
    if not isinstance(mask, sitk.Image):
        raise UserError(f"The {role} mask must be a SimpleITK image, got {type(mask).__name__}.")
    _reject_label_map(mask, f"{role} mask")
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"The {role} mask must be a 3-D scalar label image.")
    same_grid = (mask.GetSize() == image.GetSize()
                 and np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
                 and np.allclose(mask.GetSpacing(), image.GetSpacing(), rtol=1e-5)
                 and np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5))
    if not same_grid:
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    array = (sitk.GetArrayFromImage(mask) != 0).astype(np.float32)
    if not array.any():
        raise UserError(f"The {role} mask is empty where it overlaps the {role} image.")
    return array


def require_finite(values, stage: str, suspect: str) -> None:
    """Raise :class:`UserError` if ``values`` (a torch tensor or numpy array, a stage's output) holds NaN or ±inf.

    The message names the stage and what to suspect, so that no stage passes a non-finite result on (a NaN
    transform would otherwise be written with "0 folds").
    """
    import torch  # the pipeline imports torch anyway; this module's other helpers need only numpy

    # A finite sum means every value is finite (a NaN or ±inf propagates into it); it takes one fast pass.
    # Only when the sum is not finite are the values counted (a sum can also overflow on huge finite values).
    if isinstance(values, torch.Tensor):
        if values.numel() == 0 or bool(torch.isfinite(values.sum())):
            return
        bad = int((~torch.isfinite(values)).sum())
        total = values.numel()
    else:
        array = np.asarray(values)
        with np.errstate(over="ignore", invalid="ignore"):
            total_sum = array.sum()
        if array.size == 0 or bool(np.isfinite(total_sum)):
            return
        bad = int((~np.isfinite(array)).sum())
        total = array.size
    if bad:
        raise UserError(f"The {stage} produced {bad} NaN or infinite values out of {total}; {suspect}. "
                        "Nothing was written.")
