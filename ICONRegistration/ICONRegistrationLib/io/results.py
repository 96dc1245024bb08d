"""Write a :class:`RegistrationResult` to a folder: the files ``iconreg register`` produces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import SimpleITK as sitk

from .transforms import atomic_path, write_displacement_field, write_image

if TYPE_CHECKING:
    from ..pipeline.registration import RegistrationResult

RESULT_FILES = ("transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz", "metrics.json")


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def report_available() -> bool:
    """Whether matplotlib, which ``report.png`` needs (the optional ``report`` extra), is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def write_result(result: "RegistrationResult", folder: str | Path, *, fixed: Optional[sitk.Image] = None,
                 moving: Optional[sitk.Image] = None, report: bool = True) -> dict[str, Path]:
    """Write transform.h5, inverse.h5, warped/jacobian/ic_error .nii.gz, metrics.json and report.png.

    ``report.png`` needs ``fixed`` and ``moving`` and matplotlib (without it the report is skipped, see
    :func:`report_available`). Returns the paths written by name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {
        "transform": write_displacement_field(result.forward_field, folder / "transform.h5"),
        "inverse": write_displacement_field(result.inverse_field, folder / "inverse.h5"),
        "warped": write_image(result.warped, folder / "warped.nii.gz"),
        "jacobian": write_image(result.jacobian, folder / "jacobian.nii.gz"),
        "ic_error": write_image(result.ic_error, folder / "ic_error.nii.gz"),
        "metrics": write_json(result.metrics.to_dict(), folder / "metrics.json"),
    }
    if report and fixed is not None and moving is not None and report_available():
        from .report import write_report  # matplotlib is only needed here
        written["report"] = write_report(folder / "report.png", fixed, moving, result)
    return written
