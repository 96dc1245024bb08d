"""The one image reader: every command and the API read image files here, with user-facing errors.

An image whose voxels cannot be read completely is a user error, never a partly zero volume: SimpleITK reads a
truncated NIfTI (``.nii`` or ``.nii.gz``, cut anywhere after the header) without complaint and fills the missing
voxels with zeros, so NIfTI files are checked here for a complete gzip stream and for as many data bytes as
their header promises. Other formats (NRRD, MetaImage, DICOM) fail in SimpleITK itself when cut short.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import SimpleITK as sitk

from ..errors import UserError

_NIFTI1_HEADER = 348
_NIFTI2_HEADER = 540
_CHUNK = 1 << 22


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (``vox_offset`` + voxels) from its header; ``None`` if not NIfTI."""
    for order in ("<", ">"):
        if len(header) >= _NIFTI1_HEADER and struct.unpack(order + "i", header[:4])[0] == _NIFTI1_HEADER:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= _NIFTI2_HEADER and struct.unpack(order + "i", header[:4])[0] == _NIFTI2_HEADER:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    count = 1
    for size in dims[1:1 + max(min(dims[0], 7), 0)]:
        count *= max(int(size), 1)
    if offset <= 0:  # a .hdr/.img pair: the voxels are in another file
        return None
    return offset + count * max(bitpix, 0) // 8


def check_nifti_complete(path: Path, role: str) -> None:
    """Raise :class:`UserError` if the NIfTI file ``path`` is cut short (gzip stream or data bytes)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        if compressed:
            with gzip.open(path, "rb") as stream:
                header = stream.read(_NIFTI2_HEADER)
                length = len(header)
                while True:
                    chunk = stream.read(_CHUNK)
                    if not chunk:
                        break
                    length += len(chunk)
        else:
            with path.open("rb") as stream:
                header = stream.read(_NIFTI2_HEADER)
            length = path.stat().st_size
    except (EOFError, OSError, zlib.error) as error:
        raise UserError(f"The {role} image '{path}' is damaged or cut short ({error}); "
                        "copy or download it again.") from None
    expected = _nifti_expected_bytes(header)
    if expected is not None and length < expected:
        raise UserError(f"The {role} image '{path}' is cut short: its header describes {expected} bytes of "
                        f"header and voxels, the file holds {length}{' once decompressed' if compressed else ''}. "
                        "Copy or download it again.")


def read_image(path: str | Path, role: str = "input") -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA, DICOM series folder…) completely, or raise :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise UserError(f"The {role} folder '{path}' holds no DICOM series.")
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as error:
            raise UserError(f"Could not read the {role} DICOM series '{path}': "
                            f"{str(error).strip().splitlines()[-1]}") from None
    if not path.is_file():
        raise UserError(f"The {role} image '{path}' does not exist.")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_complete(path, role)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UserError(f"Could not read the {role} image '{path}': {str(error).strip().splitlines()[-1]}") from None
