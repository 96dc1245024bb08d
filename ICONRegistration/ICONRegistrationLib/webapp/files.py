"""Which files the browser front end may read: images under ``--data-dir`` and checked uploads.

No trame, no MRML: plain paths and the engine's own image checks, so every rule here is tested directly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import SimpleITK as sitk

from ..errors import UserError
from ..io.atomic import file_suffix
from ..io.images import read_image

#: image files a page may pick under ``--data-dir`` (header + data pairs read their companion from the same folder)
DATA_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: single-file formats an upload may use (a header/data pair cannot arrive as one upload)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DEFAULT_MAX_UPLOAD_MB = 512


def _suffix(name: str, allowed: tuple[str, ...]) -> str | None:
    """The file name's suffix (lower case) when it is one of ``allowed``, else ``None``."""
    suffix = file_suffix(Path(name)).lower()
    return suffix if suffix in allowed else None


def resolve_data_file(data_dir: str | Path, relative: str) -> Path:
    """The file ``relative`` (a path relative to ``data_dir``, as :func:`list_data_files` gives it), or
    :class:`UserError` for anything that could leave the folder: absolute paths, ``..`` components, symbolic
    links (of the file or of a folder on the way) that resolve outside ``data_dir``, missing files."""
    if not relative or not isinstance(relative, str):
        raise UserError("Choose a file.")
    root = Path(data_dir).resolve(strict=True)
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise UserError(f"'{relative}' is an absolute path; only files under the data folder can be opened.")
    if any(part == ".." for part in re.split(r"[\\/]", relative)):
        raise UserError(f"'{relative}' leaves the data folder; only files under it can be opened.")
    try:
        resolved = (root / candidate).resolve(strict=True)
    except (OSError, RuntimeError):
        raise UserError(f"'{relative}' does not exist in the data folder.") from None
    if not resolved.is_relative_to(root):
        raise UserError(f"'{relative}' is a link to a place outside the data folder; it cannot be opened.")
    if not resolved.is_file():
        raise UserError(f"'{relative}' is not a file.")
    if _suffix(resolved.name, DATA_SUFFIXES) is None:
        raise UserError(f"'{relative}' is not an image file ({', '.join(DATA_SUFFIXES)}).")
    return resolved


def list_data_files(data_dir: str | Path, limit: int = 2000) -> list[str]:
    """Relative POSIX paths of the image files under ``data_dir`` (sorted; links leaving the folder skipped)."""
    root = Path(data_dir).resolve(strict=True)
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):  # links to folders are not followed
        subfolders.sort()
        for name in sorted(files):
            if _suffix(name, DATA_SUFFIXES) is None:
                continue
            path = Path(folder) / name
            if path.resolve().is_relative_to(root):
                found.append(path.relative_to(root).as_posix())
            if len(found) >= limit:
                return found
    return found


def safe_upload_name(name: str) -> str:
    """The base name of an uploaded file, reduced to letters, digits, ``.``, ``-`` and ``_``."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned or "upload"


def save_upload(name: str, content: bytes, folder: str | Path, role: str,
                max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20) -> tuple[Path, sitk.Image]:
    """Write an uploaded file into ``folder`` and check it before anything runs: size at most ``max_bytes``, a
    single-file image format, readable completely, and a usable 3-D scalar volume (the engine's own input check).

    Returns the saved path and the image; a bad upload raises :class:`UserError` and leaves no file behind.
    """
    from ..pipeline.images import image_array

    size = len(content)
    if size > max_bytes:
        raise UserError(f"The {role} upload '{name}' is {size / 2**20:.1f} MB; the limit is "
                        f"{max_bytes / 2**20:.0f} MB (start the app with --max-upload-mb to change it).")
    if size == 0:
        raise UserError(f"The {role} upload '{name}' is empty.")
    safe = safe_upload_name(name)
    if _suffix(safe, UPLOAD_SUFFIXES) is None:
        raise UserError(f"The {role} upload '{name}' is not a single-file 3-D image; upload "
                        f"{', '.join(UPLOAD_SUFFIXES)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{role}-{safe}"
    path.write_bytes(content)
    try:
        image = read_image(path, role)
        image_array(image, role)  # 3-D, scalar, finite, not constant
    except UserError as error:
        path.unlink(missing_ok=True)
        raise UserError(str(error).replace(str(path), name)) from None
    return path, image
