"""Apply a transform to an image or a label map (SimpleITK resampling, LPS mm)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..io.transforms import DISPLACEMENT_IMAGE_SUFFIXES, read_displacement_field
from .images import require_finite

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def as_transform(transform: "sitk.Transform | sitk.Image | str | Path") -> sitk.Transform:
    """A SimpleITK transform from a transform, a displacement-field image (LPS mm) or a file path. A transform that
    holds NaN or ±inf anywhere (a field's vectors, another transform's parameters) is refused: resampling through
    it would silently fill those voxels with the default value."""
    if isinstance(transform, sitk.Transform):
        _require_finite_transform(transform, "transform")
        return transform
    if isinstance(transform, sitk.Image):
        if transform.GetNumberOfComponentsPerPixel() != transform.GetDimension():
            raise UserError("A displacement field needs one vector component per dimension.")
        return as_transform(sitk.DisplacementFieldTransform(sitk.Cast(transform, sitk.sitkVectorFloat64)))
    path = Path(transform)
    if not path.is_file():
        raise UserError(f"Transform file '{path}' does not exist.")
    if path.name.lower().endswith(DISPLACEMENT_IMAGE_SUFFIXES):  # the reader has refused NaN and ±inf already
        return sitk.DisplacementFieldTransform(read_displacement_field(path))
    try:
        read = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise UserError(f"Could not read transform '{path}': {str(error).splitlines()[0]}") from None
    _require_finite_transform(read, f"transform file '{path}'")
    return read


def _require_finite_transform(transform: sitk.Transform, source: str) -> None:
    """Raise :class:`UserError` when any part of ``transform`` (composites are walked) holds NaN or ±inf."""
    if isinstance(transform, sitk.CompositeTransform):
        for index in range(transform.GetNumberOfTransforms()):
            _require_finite_transform(transform.GetNthTransform(index), source)
        return
    if isinstance(transform, sitk.DisplacementFieldTransform):
        field = transform.GetDisplacementField()  # keep the image alive while its view is read
        values = sitk.GetArrayViewFromImage(field)
    else:
        values = np.asarray(transform.GetParameters() + transform.GetFixedParameters(), dtype=np.float64)
    require_finite(values, source, "it did not come from a successful registration; register again")


_FEW_VALUES = 32  # an integer image with at most this many distinct values is probably a label map


def warp(image: sitk.Image, transform: "sitk.Transform | sitk.Image | str | Path", reference: sitk.Image,
         interpolator: str = "linear", default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (fixed → moving points).

    Use ``interpolator="nearest"`` for label maps (an image of whole numbers, integer or float, with few distinct
    values warped with another interpolator raises a warning: interpolation invents labels between neighbouring
    ones). The output keeps the input's pixel type; integer voxels are rounded to the nearest value in the type's
    range, not truncated.
    """
    if interpolator not in INTERPOLATORS:
        raise UserError(f"Unknown interpolator '{interpolator}': use {', '.join(INTERPOLATORS)}.")
    if image.GetDimension() != reference.GetDimension():
        raise UserError("The image and the reference must have the same dimension.")
    resolved = as_transform(transform)
    if resolved.GetDimension() != image.GetDimension():
        raise UserError(f"The transform is {resolved.GetDimension()}-D but the image is {image.GetDimension()}-D.")
    voxels = sitk.GetArrayViewFromImage(image).reshape(-1)
    dtype = voxels.dtype
    if interpolator != "nearest":
        sample = voxels[::max(1, voxels.size // 1_000_000)]  # at most a million looked at
        whole = np.issubdtype(dtype, np.integer) or bool(np.all(sample == np.rint(sample)))  # float label maps too
        if whole and len(np.unique(sample)) <= _FEW_VALUES:
            warnings.warn(f"The image has whole-number voxels with at most {_FEW_VALUES} distinct values, like a "
                          f"label map; '{interpolator}' interpolation invents values between neighbouring labels: "
                          "use 'nearest' for label maps.", UserWarning, stacklevel=2)
    if interpolator == "nearest" or not np.issubdtype(dtype, np.integer):
        return sitk.Resample(image, reference, resolved, INTERPOLATORS[interpolator], float(default_value),
                             image.GetPixelID())
    vector = image.GetNumberOfComponentsPerPixel() > 1
    resampled = sitk.Resample(image, reference, resolved, INTERPOLATORS[interpolator], float(default_value),
                              sitk.sitkVectorFloat64 if vector else sitk.sitkFloat64)
    limits = np.iinfo(dtype)
    values = np.clip(np.rint(sitk.GetArrayViewFromImage(resampled)), limits.min, limits.max).astype(dtype)
    result = sitk.GetImageFromArray(values, isVector=vector)
    result.CopyInformation(resampled)
    return result
