"""The one image reader: every command and the API read image files here, with user-facing errors.

An image whose voxels cannot be read completely is a user error, never a partly zero volume: SimpleITK reads a
truncated NIfTI (``.nii`` or ``.nii.gz``, cut anywhere after the header) without complaint and fills the missing
voxels with zeros, so NIfTI files are checked here for a complete gzip stream and for as many data bytes as
their header promises. Other formats (NRRD, MetaImage, DICOM) fail in SimpleITK itself when cut short. The same
pass counts NaN and ±inf float voxels, which ITK's NIfTI reader silently turns into 0 (a NaN in another format
reaches the image checks, which refuse it): refused here too, so one file's content is treated alike in any format.
A DICOM folder must hold one series: with several, ITK would read whichever series identifier sorts first.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UserError

_NIFTI1_HEADER = 348
_NIFTI2_HEADER = 540
_CHUNK = 1 << 22


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64 voxels


def _nifti_layout(header: bytes) -> tuple[int, int, np.dtype | None] | None:
    """``(vox_offset, bytes the file must hold, float voxel dtype or None)`` of a NIfTI-1/2 single file from its
    header; ``None`` if not NIfTI or the voxels are in another file (a .hdr/.img pair)."""
    for order in ("<", ">"):
        if len(header) >= _NIFTI1_HEADER and struct.unpack(order + "i", header[:4])[0] == _NIFTI1_HEADER:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= _NIFTI2_HEADER and struct.unpack(order + "i", header[:4])[0] == _NIFTI2_HEADER:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
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
    dtype = np.dtype(order + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    return offset, offset + count * max(bitpix, 0) // 8, dtype


class _NonFiniteCounter:
    """Counts NaN and ±inf float voxels in a NIfTI byte stream fed in chunks of any size."""

    def __init__(self, offset: int, end: int, dtype: np.dtype):
        self.offset, self.end, self.dtype, self.position, self.count = offset, end, dtype, 0, 0
        self._carry = b""

    def feed(self, chunk: bytes) -> None:
        start, self.position = self.position, self.position + len(chunk)
        low, high = max(self.offset - start, 0), min(self.end - start, len(chunk))
        if high <= low:
            return
        data = self._carry + chunk[low:high]
        usable = len(data) - len(data) % self.dtype.itemsize
        self._carry = data[usable:]
        self.count += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype=self.dtype))))


def check_nifti(path: Path, role: str) -> None:
    """Raise :class:`UserError` if the NIfTI file ``path`` is cut short (gzip stream or data bytes), or if its
    float voxels hold NaN or ±inf, which ITK's NIfTI reader turns into 0 without a word (other formats keep them,
    and the image checks refuse them there)."""
    compressed = path.name.lower().endswith(".gz")
    counter = None
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as stream:
            header = stream.read(_NIFTI2_HEADER)
            layout = _nifti_layout(header)
            length = len(header)
            if layout is not None and layout[2] is not None:
                counter = _NonFiniteCounter(*layout)
                counter.feed(header)
            if compressed or counter is not None:  # a gzip stream is complete only once read to its end
                while chunk := stream.read(_CHUNK):
                    length += len(chunk)
                    if counter is not None:
                        counter.feed(chunk)
            else:
                length = path.stat().st_size
    except (EOFError, OSError, zlib.error) as error:
        raise UserError(f"The {role} image '{path}' is damaged or cut short ({error}); "
                        "copy or download it again.") from None
    if layout is not None and length < layout[1]:
        raise UserError(f"The {role} image '{path}' is cut short: its header describes {layout[1]} bytes of "
                        f"header and voxels, the file holds {length}{' once decompressed' if compressed else ''}. "
                        "Copy or download it again.")
    if counter is not None and counter.count:
        raise UserError(f"The {role} image contains {counter.count} NaN or infinite voxels; "
                        "replace them (e.g. with 0) first.")


def read_image(path: str | Path, role: str = "input") -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA, DICOM series folder…) completely, or raise :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise UserError(f"The {role} folder '{path}' holds no DICOM series.")
        if len(series) > 1:  # never pick one of them silently (a localizer can sort before the volume)
            listing = "; ".join(f"{uid} ({len(reader.GetGDCMSeriesFileNames(str(path), uid))} files)"
                                for uid in series)
            raise UserError(f"The {role} folder '{path}' holds {len(series)} DICOM series: {listing}. "
                            "Put the series to register in a folder of its own.")
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as error:
            raise UserError(f"Could not read the {role} DICOM series '{path}': "
                            f"{str(error).strip().splitlines()[-1]}") from None
    if not path.is_file():
        raise UserError(f"The {role} image '{path}' does not exist.")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti(path, role)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]  # ITK's last line (for a cut-short .mha: "No such file…")
        raise UserError(f"Could not read the {role} image '{path}': it is damaged, cut short or not an image file "
                        f"this reader knows (ITK: {reason}).") from None
