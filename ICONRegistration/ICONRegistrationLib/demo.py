"""``iconreg demo``: register the bundled sample pair offline with its model and summarise the result.

The sample pair lives in ``Resources/SampleData`` of the repository (``$ICONREG_SAMPLE_DATA`` overrides); its
``sample.json`` names the images, their label maps, the modality and the model that ships for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import SimpleITK as sitk

from .errors import UserError
from .progress import ProgressCallback


def sample_data_dir() -> Path:
    """The folder with ``sample.json`` (repository ``Resources/SampleData`` unless ``$ICONREG_SAMPLE_DATA``)."""
    override = os.environ.get("ICONREG_SAMPLE_DATA")
    folder = Path(override) if override else Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
    if not (folder / "sample.json").is_file():
        raise UserError(f"No sample data at '{folder}' (sample.json missing); run from a checkout of the "
                        "repository or set ICONREG_SAMPLE_DATA.")
    return folder


def sample_pair() -> dict:
    """``sample.json`` with paths made absolute."""
    folder = sample_data_dir()
    description = json.loads((folder / "sample.json").read_text())
    for key in ("fixed", "moving", "fixed_label", "moving_label"):
        if description.get(key):
            description[key] = folder / description[key]
    return description


def _check_anatomy(model: str, sample: dict) -> None:
    """A model trained for one anatomy (zoo ``anatomy``) is not demonstrated on a sample pair of another."""
    from .models.zoo import resolve_spec

    wanted = resolve_spec(model).extra.get("anatomy")
    have = sample.get("anatomy")
    if wanted and have and wanted != have:
        raise UserError(
            f"The sample pair in '{sample_data_dir()}' shows the {have}; model '{model}' is for the {wanted}. "
            f"No {wanted} pair ships with the project (LPBA40 may not be redistributed, and no openly licensed "
            f"{wanted} pair was available): run 'iconreg register --model {model}' on your own images, or point "
            f"ICONREG_SAMPLE_DATA at a folder with a sample.json for a {wanted} pair.")


def run_demo(out: str | Path, *, model: Optional[str] = None, device: str = "auto", io_iterations: int = 0,
             progress: Optional[ProgressCallback] = None) -> dict:
    """Register the sample pair, write the usual outputs to ``out`` and return a summary (also ``demo.json``)."""
    from .evaluation.metrics import dice_per_label, label_values, mean_std
    from .io import check_output_folder, result_folder, write_result
    from .io.results import write_json
    from .pipeline.registration import register

    out = check_output_folder(out)

    sample = sample_pair()
    name = model or sample["model"]
    _check_anatomy(name, sample)
    from .io.images import read_image
    fixed, moving = read_image(sample["fixed"], "fixed"), read_image(sample["moving"], "moving")
    result = register(fixed, moving, name, fixed_modality=sample.get("modality", "auto"),
                      moving_modality=sample.get("modality", "auto"), io_iterations=io_iterations,
                      device=device, progress=progress)
    metrics = result.metrics
    summary = {"model": metrics.model, "device": metrics.device, "folds": metrics.folds,
               "folds_percent": metrics.folds_percent, "ic_error_mean_mm": metrics.ic_error_mean_mm,
               "ic_error_p95_mm": metrics.ic_error_p95_mm, "seconds": metrics.total_seconds}
    lines = [f"Registered {Path(sample['moving']).name} to {Path(sample['fixed']).name} with {metrics.model} "
             f"on {metrics.device} in {summary['seconds']:.2f} s."]
    if sample.get("fixed_label") and sample.get("moving_label"):
        fixed_label = read_image(sample["fixed_label"], "fixed label")
        moving_label = read_image(sample["moving_label"], "moving label")
        labels = label_values(fixed_label, moving_label)
        before = dice_per_label(sitk.Resample(moving_label, fixed_label, sitk.Transform(),
                                              sitk.sitkNearestNeighbor, 0.0), fixed_label, labels)
        after = dice_per_label(sitk.Resample(moving_label, fixed_label, result.forward_transform(),
                                             sitk.sitkNearestNeighbor, 0.0), fixed_label, labels)
        summary.update({"dice_before": mean_std(before.values())[0], "dice_after": mean_std(after.values())[0],
                        "dice_per_label_after": {str(k): v for k, v in after.items()}})
        lines.append(f"Dice (labels {', '.join(map(str, labels))}): {summary['dice_before']:.3f} before → "
                     f"{summary['dice_after']:.3f} after.")
    lines.append(f"Folded voxels: {metrics.folds} ({metrics.folds_percent:.4f} %); inverse-consistency "
                 f"error {metrics.ic_error_mean_mm:.4f} mm mean, {metrics.ic_error_p95_mm:.4f} mm 95th.")
    with result_folder(out) as staging:
        written = write_result(result, staging, fixed=fixed, moving=moving)  # report.png only with matplotlib
        summary["outputs"] = sorted([path.name for path in written.values()] + ["demo.json"])
        lines.append(f"Wrote {', '.join(summary['outputs'])} to {out}/.")
        summary["text"] = "\n".join(lines)
        write_json(summary, staging / "demo.json")
    return summary
