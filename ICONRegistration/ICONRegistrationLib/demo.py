"""``iconreg demo``: register a bundled sample pair offline with its model and summarise the result.

The sample pairs live in ``Resources/SampleData`` of the repository (``$ICONREG_SAMPLE_DATA`` overrides): the
default pair's ``sample.json`` in the folder itself, further pairs (other anatomies) in subfolders with their own
``sample.json``. Each names the images, their label maps, the modality, the anatomy, the model that ships for
them and, for a synthetic pair, the ground-truth transform (fixed → moving points).
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


_PATH_KEYS = ("fixed", "moving", "fixed_label", "moving_label", "ground_truth_transform")


def _read_sample(description_file: Path) -> dict:
    description = json.loads(description_file.read_text(encoding="utf-8"))
    for key in _PATH_KEYS:
        if description.get(key):
            description[key] = description_file.parent / description[key]
    return description


def sample_pairs() -> list[dict]:
    """Every sample pair, paths made absolute: the default (``sample.json`` in the sample folder) first, then one
    per subfolder with a ``sample.json``, by folder name."""
    folder = sample_data_dir()
    files = [folder / "sample.json"] + sorted(folder.glob("*/sample.json"))
    return [_read_sample(path) for path in files]


def sample_pair(anatomy: Optional[str] = None) -> dict:
    """The default sample pair, or with ``anatomy`` the first pair showing it (``UserError`` if none does)."""
    pairs = sample_pairs()
    if anatomy is None:
        return pairs[0]
    for pair in pairs:
        if pair.get("anatomy") in (None, anatomy):
            return pair
    have = ", ".join(sorted({str(pair.get("anatomy")) for pair in pairs}))
    raise UserError(
        f"The sample pairs in '{sample_data_dir()}' show the {have}; no {anatomy} pair is there: run "
        f"'iconreg register' on your own images, or point ICONREG_SAMPLE_DATA at a folder with a sample.json "
        f"for a {anatomy} pair.")


def _model_anatomy(model: str) -> Optional[str]:
    from .models.zoo import resolve_spec

    return resolve_spec(model).extra.get("anatomy")


def run_demo(out: str | Path, *, model: Optional[str] = None, device: str = "auto", io_iterations: int = 0,
             progress: Optional[ProgressCallback] = None) -> dict:
    """Register the sample pair, write the usual outputs to ``out`` and return a summary (also ``demo.json``)."""
    from .evaluation.metrics import dice_per_label, label_values, mean_std
    from .io import check_output_folder, result_folder, write_result
    from .io.results import write_json
    from .pipeline.registration import register

    out = check_output_folder(out)

    sample = sample_pair(_model_anatomy(model) if model else None)
    name = model or sample["model"]
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
    fixed_label = read_image(sample["fixed_label"], "fixed label") if sample.get("fixed_label") else None
    if fixed_label is not None and sample.get("moving_label"):
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
    if sample.get("ground_truth_transform"):
        from .evaluation.metrics import transform_error_mm

        truth = sitk.ReadTransform(str(sample["ground_truth_transform"]))
        if fixed_label is not None:
            inside, where = fixed_label, "inside the fixed labels"
        else:
            inside, where = sitk.Cast(fixed > 0, sitk.sitkUInt8), "where the fixed image is above 0"
        before_mm = transform_error_mm(sitk.Transform(3, sitk.sitkIdentity), truth, fixed, inside)
        after_mm = transform_error_mm(result.forward_transform(), truth, fixed, inside)
        summary.update({"error_to_truth_before_mm": before_mm[0], "error_to_truth_mm": after_mm[0],
                        "error_to_truth_p95_mm": after_mm[1]})
        lines.append(f"Distance to the known transform {where}: {before_mm[0]:.2f} mm before → "
                     f"{after_mm[0]:.2f} mm mean ({after_mm[1]:.2f} mm 95th) after.")
    lines.append(f"Folded voxels: {metrics.folds} ({metrics.folds_percent:.4f} %); inverse-consistency "
                 f"error {metrics.ic_error_mean_mm:.4f} mm mean, {metrics.ic_error_p95_mm:.4f} mm 95th.")
    with result_folder(out) as staging:
        written = write_result(result, staging, fixed=fixed, moving=moving)  # report.png only with matplotlib
        summary["outputs"] = sorted([path.name for path in written.values()] + ["demo.json"])
        lines.append(f"Wrote {', '.join(summary['outputs'])} to {out}/.")
        summary["text"] = "\n".join(lines)
        write_json(summary, staging / "demo.json")
    return summary
