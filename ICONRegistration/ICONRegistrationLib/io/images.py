"""Reading images from files with user-facing errors."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..errors import UserError


def read_image(path: str | Path, role: str = "input") -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA, DICOM series folder…) or raise :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise UserError(f"The {role} folder '{path}' holds no DICOM series.")
        reader.SetFileNames(files)
        return reader.Execute()
    if not path.is_file():
        raise UserError(f"The {role} image '{path}' does not exist.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UserError(f"Could not read the {role} image '{path}': {str(error).strip().splitlines()[-1]}") from None
