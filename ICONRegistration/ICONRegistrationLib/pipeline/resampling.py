"""Apply a transform to an image or a label map (SimpleITK resampling, LPS mm)."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..errors import UserError
from ..io.transforms import DISPLACEMENT_IMAGE_SUFFIXES, read_displacement_field

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def as_transform(transform: "sitk.Transform | sitk.Image | str | Path") -> sitk.Transform:
    """A SimpleITK transform from a transform, a displacement-field image (LPS mm) or a file path."""
    if isinstance(transform, sitk.Transform):
        return transform
    if isinstance(transform, sitk.Image):
        if transform.GetNumberOfComponentsPerPixel() != transform.GetDimension():
            raise UserError("A displacement field needs one vector component per dimension.")
        return sitk.DisplacementFieldTransform(sitk.Cast(transform, sitk.sitkVectorFloat64))
    path = Path(transform)
    if not path.is_file():
        raise UserError(f"Transform file '{path}' does not exist.")
    if path.name.lower().endswith(DISPLACEMENT_IMAGE_SUFFIXES):
        return as_transform(read_displacement_field(path))
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise UserError(f"Could not read transform '{path}': {str(error).splitlines()[0]}") from None


def warp(image: sitk.Image, transform: "sitk.Transform | sitk.Image | str | Path", reference: sitk.Image,
         interpolator: str = "linear", default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (fixed → moving points).

    Use ``interpolator="nearest"`` for label maps; the output keeps the input's pixel type.
    """
    if interpolator not in INTERPOLATORS:
        raise UserError(f"Unknown interpolator '{interpolator}': use {', '.join(INTERPOLATORS)}.")
    if image.GetDimension() != reference.GetDimension():
        raise UserError("The image and the reference must have the same dimension.")
    return sitk.Resample(image, reference, as_transform(transform), INTERPOLATORS[interpolator],
                         float(default_value), image.GetPixelID())
