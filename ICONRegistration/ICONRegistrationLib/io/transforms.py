"""Write displacement-field transforms and images in formats ITK, ANTs, elastix and Slicer read.

* ``.h5`` / ``.hdf5`` / ``.tfm`` / ``.txt``: an ITK ``DisplacementFieldTransform`` (``sitk.WriteTransform``),
  vectors in LPS mm, double precision.
* ``.nii`` / ``.nii.gz``: a displacement image with NIfTI intent 1006 (``NIFTI_INTENT_DISPVECT``). The NIfTI
  standard puts those vectors in its RAS world frame; ITK ≥ 5.4 (SimpleITK, Slicer) converts them back to
  LPS when reading, so the file round-trips to the same LPS field.
* ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd``: a vector image in LPS (NRRD kinds ``vector domain domain domain``).

Every file is written under a temporary name in the target folder and renamed when complete.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..frames import flip_lps_ras
from .atomic import atomic_path, file_suffix
from .images import read_image

TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VECTOR_IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DISPLACEMENT_IMAGE_SUFFIXES = NIFTI_SUFFIXES + VECTOR_IMAGE_SUFFIXES
#: image files the project reads (datasets, inputs)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: single-file formats the commands write (a .mhd/.nhdr header and its separate data file cannot be renamed into
#: place as one unit, so they are not offered for output)
WRITABLE_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
WRITABLE_FIELD_SUFFIXES = TRANSFORM_SUFFIXES + WRITABLE_IMAGE_SUFFIXES
NIFTI_INTENT_DISPVECT = 1006
_NIFTI_INTENT_OFFSET = 68  # byte offset of intent_code in a NIfTI-1 header


def _suffix(path: Path) -> str:
    return file_suffix(path).lower()


def check_nifti_geometry(image: sitk.Image, path: str | Path) -> None:
    """Raise :class:`UserError` when ``path`` is a NIfTI file and ``image``'s grid has axes that are not orthonormal
    (a sheared direction matrix): NIfTI keeps only a rotation, so the voxels would be placed elsewhere (an axis
    sheared by 17° put a voxel 7.6 mm away)."""
    if _suffix(Path(path)) not in NIFTI_SUFFIXES:
        return
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    if not np.allclose(direction.T @ direction, np.eye(dimension), atol=1e-4):
        raise UserError(f"'{Path(path).name}': the image's axes are not orthogonal (a sheared direction matrix), "
                        "which NIfTI cannot store; resample the image onto a grid with orthogonal axes first, or "
                        "write .nrrd or .mha where the command lets you choose.")


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write a scalar image atomically (any format SimpleITK knows; NIfTI only for grids with orthogonal axes)."""
    path = Path(path)
    check_nifti_geometry(image, path)
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=compress)
    return path


def _check_field(field: sitk.Image) -> None:
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise UserError(f"A displacement field must be a 3-D image of 3-vectors; this one is "
                        f"{field.GetDimension()}-D with {field.GetNumberOfComponentsPerPixel()} component(s).")


def write_displacement_field(field: sitk.Image, path: str | Path) -> Path:
    """Write a displacement field (vector image, LPS mm) as a transform or displacement image by suffix."""
    _check_field(field)
    path = Path(path)
    check_nifti_geometry(field, path)
    suffix = _suffix(path)
    with atomic_path(path) as temporary:
        if suffix in TRANSFORM_SUFFIXES:
            transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
            sitk.WriteTransform(transform, str(temporary))
        elif suffix in NIFTI_SUFFIXES:
            _write_nifti_dispvect(field, temporary)
        elif suffix in VECTOR_IMAGE_SUFFIXES:
            sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(temporary), useCompression=True)
        else:
            raise UserError(f"Unknown transform file type '{path.name}': use .h5, .tfm, .nii.gz, .nrrd or .mha.")
    return path


def _write_nifti_dispvect(field: sitk.Image, path: Path) -> None:
    """NIfTI-1 with intent 1006 and RAS vector components (LPS x, y negated); geometry from SimpleITK."""
    ras = flip_lps_ras(sitk.GetArrayViewFromImage(field).astype(np.float32))
    image = sitk.GetImageFromArray(ras, isVector=True)
    image.CopyInformation(field)
    plain = path.with_name(path.name.replace(".gz", "") + ".tmp.nii")
    try:
        sitk.WriteImage(image, str(plain), useCompression=False)  # writes intent 1007 (vector)
        data = bytearray(plain.read_bytes())
    finally:
        plain.unlink(missing_ok=True)
    if struct.unpack("<i", data[:4])[0] != 348:
        raise RuntimeError("unexpected NIfTI header written by SimpleITK")
    data[_NIFTI_INTENT_OFFSET:_NIFTI_INTENT_OFFSET + 2] = struct.pack("<h", NIFTI_INTENT_DISPVECT)
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "wb", compresslevel=6) as out:
            out.write(bytes(data))
    else:
        path.write_bytes(bytes(data))


def read_displacement_field(path: str | Path) -> sitk.Image:
    """Read a displacement field written by :func:`write_displacement_field` (or ANTs / Slicer) as LPS mm."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Transform file '{path}' does not exist.")
    if _suffix(path) in TRANSFORM_SUFFIXES:
        try:
            transform = sitk.ReadTransform(str(path))
        except RuntimeError as error:
            raise UserError(f"Could not read the transform file '{path}' (damaged or not a transform): "
                            f"{str(error).strip().splitlines()[-1]}") from None
        if transform.GetName() == "CompositeTransform":
            composite = sitk.CompositeTransform(transform)
            if composite.GetNumberOfTransforms() == 1:
                transform = composite.GetNthTransform(0)
        if transform.GetName() != "DisplacementFieldTransform":
            raise UserError(f"'{path}' holds a {transform.GetName()}, not a displacement field transform.")
        field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    elif _suffix(path) in DISPLACEMENT_IMAGE_SUFFIXES:
        field = read_image(path, "displacement field")
    else:
        raise UserError(f"Unknown transform file type '{path.name}': use .h5, .tfm, .nii.gz, .nrrd or .mha.")
    _check_field(field)
    values = sitk.GetArrayViewFromImage(field)
    if not np.isfinite(values).all():
        raise UserError(f"The displacement field '{path}' holds {int((~np.isfinite(values)).sum())} NaN or "
                        "infinite values: it did not come from a successful registration; register again.")
    return sitk.Cast(field, sitk.sitkVectorFloat64)
