"""Datasets on disk: which images (and label maps) a folder or a CSV lists, and the validation split.

A neutral module: training and evaluation both use it and do not import each other.
A dataset folder holds ``images/`` (and optionally ``labels/`` with the same file names), or is a flat folder of
images. A CSV has a header with ``image`` and optionally ``label`` columns (paths relative to the CSV).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError
from .io.transforms import IMAGE_SUFFIXES

@dataclasses.dataclass
class VolumeEntry:
    image: Path
    label: Optional[Path] = None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def list_volumes(source: str | Path) -> list[VolumeEntry]:
    """Entries of a dataset folder (``images/`` [+ ``labels/``], or flat) or a CSV (``image``[, ``label``])."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "image" not in rows[0]:
            raise UserError(f"CSV '{source}' needs a header with an 'image' column (and optionally 'label').")
        entries = []
        for row in rows:
            image = (source.parent / row["image"]).resolve()
            label = (source.parent / row["label"]).resolve() if row.get("label") else None
            entries.append(VolumeEntry(image, label))
    elif source.is_dir():
        image_dir = source / "images" if (source / "images").is_dir() else source
        label_dir = source / "labels"
        entries = [VolumeEntry(p, (label_dir / p.name) if (label_dir / p.name).is_file() else None)
                   for p in sorted(image_dir.iterdir()) if _is_image(p)]
    else:
        raise UserError(f"'{source}' is neither a dataset folder nor a CSV file.")
    if not entries:
        raise UserError(f"No images found in '{source}'.")
    for entry in entries:
        if not entry.image.is_file():
            raise UserError(f"Image '{entry.image}' listed in '{source}' does not exist.")
    return entries


def split_validation(entries: Sequence[VolumeEntry], fraction: float) -> tuple[list, list]:
    """The last ``fraction`` of the entries (in listing order) for validation, the rest for training.
    ``fraction`` outside [0, 1] (or NaN) is a :class:`UserError`: it used to give a silently wrong split."""
    if not 0 <= fraction <= 1:
        raise UserError(f"The fraction of the volumes set aside (--val-fraction, --last-fraction) must be from 0 to "
                        f"1, got {fraction}.")
    count = int(round(len(entries) * fraction))
    if fraction > 0 and count == 0:
        count = 1
    return list(entries[:len(entries) - count]), list(entries[len(entries) - count:])


