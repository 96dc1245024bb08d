"""``evaluate(pairs, model)``: the network and the baselines on labelled pairs, per pair and mean ± std.

For each pair and method the moving label map is warped nearest-neighbour onto the fixed image's grid through
the method's transform (fixed → moving points), then compared with the fixed label map: Dice per label and
their mean, HD95 (mm, mean over labels), % voxels with Jacobian ≤ 0, inverse-consistency error (mm; networks
only) and seconds. Methods: ``model`` (network prediction), ``model+io`` (with instance optimisation, when
asked), ``identity`` and ``demons`` (multi-resolution diffeomorphic demons), all on the same pairs in one run.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..io.atomic import atomic_path
from ..io.images import read_image
from ..io.results import write_json
from ..pipeline.qa import field_jacobian
from ..pipeline.resampling import warp
from ..progress import ProgressCallback, report
from .baselines import BASELINES, check_installed, timed
from .machine_load import BUSY_SHARE, LoadMeter
from .metrics import dice_per_label, hd95_per_label, label_values, mean_std

if TYPE_CHECKING:
    from ..pipeline.metrics import RegistrationMetrics


@dataclasses.dataclass
class LabelledPair:
    fixed: Path
    moving: Path
    fixed_label: Path
    moving_label: Path

    @property
    def name(self) -> str:
        return f"{_stem(self.moving)}→{_stem(self.fixed)}"


def _stem(path: Path) -> str:
    from ..io.transforms import IMAGE_SUFFIXES

    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_pairs(source: str | Path, *, pairing: str = "consecutive", last_fraction: float = 0.0,
               both_directions: bool = True) -> list[LabelledPair]:
    """Pairs from a CSV (``fixed,moving,fixed_label,moving_label``) or a dataset folder (``images/``, ``labels/``).

    For a folder, ``last_fraction`` keeps only the last part of the sorted listing (a validation split),
    ``pairing`` is ``consecutive`` (i, i+1) or ``all`` (every unordered pair), each in both directions unless
    ``both_directions`` is False. A CSV lists its pairs itself: those three options with a CSV are a
    :class:`UserError`, not silently ignored.
    """
    from ..datasets import list_volumes, split_validation

    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        ignored = [option for option, given in (("--last-fraction", last_fraction != 0),
                                                ("--pairing all", pairing != "consecutive"),
                                                ("--one-direction", not both_directions)) if given]
        if ignored:
            raise UserError(f"{', '.join(ignored)} choose{'s' if len(ignored) == 1 else ''} pairs of a dataset "
                            f"folder; the CSV '{source}' lists its pairs itself: leave "
                            f"{'it' if len(ignored) == 1 else 'them'} out or edit the CSV.")
        with source.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        needed = {"fixed", "moving", "fixed_label", "moving_label"}
        if not rows or not needed <= set(rows[0]):
            raise UserError(f"CSV '{source}' needs the columns {', '.join(sorted(needed))}.")
        pairs = [LabelledPair(*((source.parent / row[k]).resolve() for k in ("fixed", "moving", "fixed_label",
                                                                            "moving_label"))) for row in rows]
        for number, pair in enumerate(pairs, start=2):  # line 1 is the header
            for path in (pair.fixed, pair.moving, pair.fixed_label, pair.moving_label):
                if not path.is_file():
                    raise UserError(f"'{path}', named on line {number} of '{source}', does not exist.")
        return pairs
    entries = list_volumes(source)
    if last_fraction != 0:  # split_validation refuses a fraction outside [0, 1] (or NaN)
        entries = split_validation(entries, last_fraction)[1]
    if any(e.label is None for e in entries):
        raise UserError(f"Every image in '{source}' needs a label map in labels/ for evaluation.")
    if pairing == "consecutive":
        index_pairs = [(i, i + 1) for i in range(len(entries) - 1)]
    elif pairing == "all":
        index_pairs = list(itertools.combinations(range(len(entries)), 2))
    else:
        raise UserError("pairing must be 'consecutive' or 'all'.")
    pairs = []
    for i, j in index_pairs:
        a, b = entries[i], entries[j]
        pairs.append(LabelledPair(b.image, a.image, b.label, a.label))  # a moving, b fixed
        if both_directions:
            pairs.append(LabelledPair(a.image, b.image, a.label, b.label))
    if not pairs:
        raise UserError(f"'{source}' gives no pairs to evaluate (need at least two images).")
    return pairs


def _jacobian_folds_percent(transform: sitk.Transform) -> float:
    """% of a baseline's field voxels with det J ≤ 0 (deformable baselines return a field on the fixed grid; the
    identity has none)."""
    if not isinstance(transform, sitk.DisplacementFieldTransform):
        if transform.GetTransformEnum() != sitk.sitkIdentity:
            raise TypeError(f"a baseline returned a {transform.GetName()}; folds are counted on displacement fields")
        return 0.0
    # field_jacobian reads the grid's direction; ITK's DisplacementFieldJacobianDeterminant ignores it (with the
    # hippocampus crops' direction diag(−1, −1, 1) it counted a stretch as folds and a fold as none)
    determinant = sitk.GetArrayFromImage(field_jacobian(transform.GetDisplacementField()))
    return 100.0 * float((determinant <= 0).mean())


@dataclasses.dataclass
class EvaluationRow:
    """One registration of one pair by one method. Dice is the mean over the labels present in both the fixed and
    the moving label maps (and per label, keyed by the label value as a string); HD95 in mm, the mean over labels
    (a label the warping lost counts as the fixed box's diagonal); the folds are % voxels
    with det J ≤ 0; the IC error (mm) exists for networks only (NaN otherwise); ``seconds`` the registration's
    wall time; ``other_load_share`` the share of the machine's CPU that other processes used meanwhile (``None``
    where unknown); ``flips`` the network-grid axes a network's prediction was averaged over (``None`` for the
    classical baselines); ``ic_error_in_labels_mm`` the mean IC error (mm) over the voxels of the IC map that lie
    inside the fixed image's labels (label > 0, nearest neighbour), where a label-aware model's two directions
    disagree most (NaN for the baselines); ``symmetric`` whether a network's two directions were made consistent
    (``register(symmetric=True)``); ``refinements`` how many times a network's prediction was refined
    recursively (``register(refinements=…)``; ``None`` for the baselines)."""

    pair: str
    method: str
    dice_mean: float
    hd95_mm: float
    seconds: float
    dice: dict[str, float]
    jacobian_nonpositive_percent: float
    ic_error_mean_mm: float = math.nan
    ic_error_p95_mm: float = math.nan
    other_load_share: Optional[float] = None
    flips: Optional[list[int]] = None
    ic_error_in_labels_mm: float = math.nan
    symmetric: Optional[bool] = None
    refinements: Optional[int] = None

    @property
    def busy(self) -> bool:
        """Timed while other processes used more than :data:`BUSY_SHARE` of the machine."""
        return (self.other_load_share or 0.0) > BUSY_SHARE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_inside_labels(values: sitk.Image, label: sitk.Image) -> float:
    """Mean of the scalar image ``values`` over its voxels whose centres fall inside ``label > 0`` (the label map
    resampled onto ``values``' grid by nearest neighbour, physical space); NaN when none does."""
    on_grid = warp(label, sitk.Transform(), values, interpolator="nearest")
    inside = sitk.GetArrayViewFromImage(on_grid) > 0
    if not inside.any():
        return math.nan
    return float(sitk.GetArrayViewFromImage(values)[inside].mean())


def _score(method: str, transform: sitk.Transform, pair: LabelledPair, fixed: sitk.Image, fixed_label: sitk.Image,
           moving_label: sitk.Image, seconds: float, meter: LoadMeter,
           metrics: "Optional[RegistrationMetrics]" = None) -> EvaluationRow:
    warped = sitk.Resample(moving_label, fixed_label, transform, sitk.sitkNearestNeighbor, 0.0,
                           moving_label.GetPixelID())
    labels = label_values(fixed_label, moving_label)
    dices = dice_per_label(warped, fixed_label, labels)
    distances = hd95_per_label(warped, fixed_label, labels)
    row = EvaluationRow(pair=pair.name, method=method, dice_mean=mean_std(dices.values())[0],
                        hd95_mm=mean_std(distances.values())[0], seconds=seconds,
                        dice={str(k): v for k, v in dices.items()}, jacobian_nonpositive_percent=0.0,
                        other_load_share=meter.sample.other_share)
    if metrics is not None:  # the network's own QA maps
        row.jacobian_nonpositive_percent = metrics.folds_percent
        row.ic_error_mean_mm, row.ic_error_p95_mm = metrics.ic_error_mean_mm, metrics.ic_error_p95_mm
        row.flips = list(metrics.flips)
        row.symmetric = metrics.symmetric
        row.refinements = metrics.refinements
    else:
        row.jacobian_nonpositive_percent = _jacobian_folds_percent(transform)
    return row


SUMMARY_METRICS = ("dice_mean", "hd95_mm", "jacobian_nonpositive_percent", "ic_error_mean_mm", "ic_error_p95_mm",
                   "seconds", "ic_error_in_labels_mm")


@dataclasses.dataclass
class MethodSummary:
    """Mean and standard deviation over one method's rows of each of :data:`SUMMARY_METRICS` (NaNs ignored),
    and the mean Dice of each label."""

    pairs: int
    dice_mean: tuple[float, float]
    hd95_mm: tuple[float, float]
    jacobian_nonpositive_percent: tuple[float, float]
    ic_error_mean_mm: tuple[float, float]
    ic_error_p95_mm: tuple[float, float]
    seconds: tuple[float, float]
    ic_error_in_labels_mm: tuple[float, float]
    dice_per_label: dict[str, float]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclasses.dataclass
class EvaluationReport:
    """What :func:`evaluate` measured: the model and its instance-optimisation settings, every row, and the
    summary per method in the order methods first appear. ``to_dict`` is ``evaluation.json``."""

    model: str
    weights_sha256: Optional[str]
    io_iterations: int
    io_mode: Optional[str]
    io_grid: Optional[str]
    io_learning_rate: Optional[float]
    rows: list[EvaluationRow]

    @property
    def summary(self) -> dict[str, MethodSummary]:
        return summarize_methods(self.rows)

    @property
    def busy_rows(self) -> list[str]:
        return busy_rows(self.rows)

    def to_dict(self) -> dict:
        return {"model": self.model, "weights_sha256": self.weights_sha256, "io_iterations": self.io_iterations,
                "io_mode": self.io_mode, "io_grid": self.io_grid, "io_learning_rate": self.io_learning_rate,
                "pairs": [row.to_dict() for row in self.rows],
                "summary": {method: values.to_dict() for method, values in self.summary.items()},
                "busy_rows": self.busy_rows}


def evaluate(pairs: Sequence[LabelledPair], model: "str | object", *, io_iterations: int = 0,
             io_mode: str = "fields", io_grid: str = "network", io_learning_rate: Optional[float] = None,
             baselines: Sequence[str] = ("identity", "demons"), device: str = "auto",
             modality: str = "auto", flips: Optional[Sequence[int]] = None, symmetric: bool = False,
             refinements: Optional[int] = None, progress: Optional[ProgressCallback] = None) -> EvaluationReport:
    """Evaluate ``model`` (zoo name, spec path or ``LoadedModel``) and ``baselines`` on ``pairs``.

    With ``io_iterations`` the model is also run with instance optimisation (``io_mode``, ``io_grid``,
    ``io_learning_rate``, see
    :func:`~ICONRegistrationLib.pipeline.registration.register`), as the method ``model+io``. ``flips`` (the
    model's ``test_time_flips`` when ``None``), ``symmetric`` and ``refinements`` (the model's
    ``test_time_refinements`` when ``None``) apply to both model methods; each row records them.
    Returns an :class:`EvaluationReport` (its ``to_dict()`` is ``evaluation.json``).
    """
    from ..models.weights import LoadedModel, load_model
    from ..pipeline.registration import register

    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise UserError(f"Unknown baseline(s) {', '.join(sorted(unknown))}: use {', '.join(BASELINES)}.")
    check_installed(baselines)  # before the first registration, not after the network's
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    rows = []
    for index, pair in enumerate(pairs):
        fixed, moving = read_image(pair.fixed, "fixed"), read_image(pair.moving, "moving")
        fixed_label = read_image(pair.fixed_label, "fixed label")
        moving_label = read_image(pair.moving_label, "moving label")
        runs = [("model", 0)] + ([("model+io", io_iterations)] if io_iterations else [])
        for method, iterations in runs:
            with LoadMeter() as meter:
                result = register(fixed, moving, loaded, fixed_modality=modality, moving_modality=modality,
                                  io_iterations=iterations, io_mode=io_mode, io_grid=io_grid,
                                  io_learning_rate=io_learning_rate, flips=flips, symmetric=symmetric,
                                  refinements=refinements)
            row = _score(method, result.forward_transform(), pair, fixed, fixed_label, moving_label,
                         result.metrics.total_seconds, meter, result.metrics)
            row.ic_error_in_labels_mm = mean_inside_labels(result.ic_error, fixed_label)
            rows.append(row)
        for name in baselines:
            with LoadMeter() as meter:
                transform, seconds = timed(BASELINES[name], fixed, moving)
            rows.append(_score(name, transform, pair, fixed, fixed_label, moving_label, seconds, meter))
        report(progress, "evaluation", (index + 1) / len(pairs))
    return EvaluationReport(model=loaded.spec.name, weights_sha256=loaded.weights_sha256,
                            io_iterations=io_iterations, io_mode=io_mode if io_iterations else None,
                            io_grid=io_grid if io_iterations else None,
                            io_learning_rate=io_learning_rate if io_iterations else None, rows=rows)


def busy_rows(rows: Sequence[EvaluationRow]) -> list[str]:
    """``"pair method"`` of the rows timed while other processes used more than
    :data:`~ICONRegistrationLib.evaluation.machine_load.BUSY_SHARE` of the machine (their seconds are inflated)."""
    return [f"{row.pair} {row.method}" for row in rows if row.busy]


def busy_warning(evaluation: EvaluationReport) -> str:
    """A sentence for reports whose seconds were (partly) measured on a busy machine, else ``""``."""
    busy = evaluation.busy_rows
    if not busy:
        return ""
    return (f"Warning: {len(busy)} of {len(evaluation.rows)} registrations were timed while other processes "
            f"used more than {BUSY_SHARE:.0%} of the machine's CPU (first: {', '.join(busy[:3])}); their seconds "
            "are inflated (Dice, HD95, folds and IC error are not affected). Rerun on an idle machine for timings.")


def summarize_methods(rows: Sequence[EvaluationRow]) -> dict[str, MethodSummary]:
    """``{method: MethodSummary}`` in the order methods first appear."""
    summary: dict[str, MethodSummary] = {}
    for method in dict.fromkeys(row.method for row in rows):
        selected = [row for row in rows if row.method == method]
        statistics = {metric: tuple(mean_std(getattr(row, metric) for row in selected)) for metric in SUMMARY_METRICS}
        labels = sorted({k for row in selected for k in row.dice}, key=int)
        summary[method] = MethodSummary(
            pairs=len(selected), **statistics,
            dice_per_label={k: mean_std(row.dice.get(k, math.nan) for row in selected)[0] for k in labels})
    return summary


def _cell(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(evaluation: EvaluationReport) -> str:
    """The summary as a markdown table (mean ± std over pairs)."""
    header = ("| method | pairs | Dice | HD95 (mm) | % det J ≤ 0 | IC error mean (mm) | IC error 95th (mm) | seconds "
              "| IC error in the fixed labels (mm) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [header]
    for method, values in evaluation.summary.items():
        lines.append(f"| {method} | {values.pairs} | {_cell(*values.dice_mean, 3)} | "
                     f"{_cell(*values.hd95_mm, 2)} | {_cell(*values.jacobian_nonpositive_percent, 4)} | "
                     f"{_cell(*values.ic_error_mean_mm, 4)} | {_cell(*values.ic_error_p95_mm, 4)} | "
                     f"{_cell(*values.seconds, 2)} | {_cell(*values.ic_error_in_labels_mm, 4)} |")
    return "\n".join(lines) + "\n"


def write_evaluation(evaluation: EvaluationReport, out_dir: str | Path) -> tuple[Path, Path]:
    """``evaluation.json`` and ``evaluation.md`` in ``out_dir`` (each written atomically; the command line writes
    them into a :func:`~ICONRegistrationLib.io.atomic.result_folder`)."""
    out_dir = Path(out_dir)

    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    json_path = write_json(clean(evaluation.to_dict()), out_dir / "evaluation.json")
    markdown_path = out_dir / "evaluation.md"
    with atomic_path(markdown_path) as temporary:
        warning = busy_warning(evaluation)
        flips = sorted({tuple(row.flips) for row in evaluation.rows if row.flips})
        settings = "; predictions averaged over flips of network axes " + " / ".join(
            str(list(f)) for f in flips) if flips else ""
        refinements = sorted({row.refinements for row in evaluation.rows if row.refinements})
        if refinements:
            settings += "; refinements " + " / ".join(map(str, refinements))
        if any(row.symmetric for row in evaluation.rows):
            settings += "; symmetric predictions"
        temporary.write_text(f"Model `{evaluation.model}`, {len(evaluation.rows)} rows{settings}\n\n"
                             + markdown_table(evaluation) + (f"\n{warning}\n" if warning else ""), encoding="utf-8")
    return json_path, markdown_path
