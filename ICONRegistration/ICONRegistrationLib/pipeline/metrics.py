"""Typed results of :func:`~ICONRegistrationLib.pipeline.registration.register`: quality numbers, provenance and
timings (``metrics.json`` is :meth:`RegistrationMetrics.to_dict`). Every reader uses the attributes; a renamed
field fails loudly instead of showing an empty cell."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass
class InverseReport:
    """How ``inverse_field`` was made. ``method``: ``"network"`` (the network's Φ_BA) or ``"exact"`` (numerical
    inverse of the forward field: iterations, round-trip error Φ(Φ⁻¹(y)) − y at the inverse's voxels in voxels and
    mm, the other way round Φ⁻¹(Φ(x)) − x at the forward field's voxels in mm (maximum and mean; see
    :class:`~ICONRegistrationLib.pipeline.inverse.FieldInverse`; with the voxels whose preimage lies outside the
    forward field, where ITK applies no displacement, and the round trip as ITK computes it), tolerance, whether
    it converged and whether the forward field is invertible everywhere). With ``inverse_qa``: folds, % and the
    minimum of the inverse field's Jacobian determinant."""

    method: str
    iterations: Optional[int] = None
    max_error_voxels: Optional[float] = None
    max_error_mm: Optional[float] = None
    forward_first_max_error_mm: Optional[float] = None
    forward_first_mean_error_mm: Optional[float] = None
    outside_field_voxels: Optional[int] = None
    itk_max_error_mm: Optional[float] = None
    tolerance_voxels: Optional[float] = None
    converged: Optional[bool] = None
    invertible: Optional[bool] = None
    folds: Optional[int] = None
    folds_percent: Optional[float] = None
    jacobian_min: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


#: above this share (%) of the fixed field mapped outside the moving image's grid, register warns and the front ends
#: give the IC error inside the overlap beside the mean (the borders alone: 2–7 % on the shared data)
IC_OUTSIDE_WARNING_PERCENT = 20.0


#: register warns when a result's mean IC error is more than this many times the model's own on its validation data
#: (the zoo entry's ``validation.ic_error_mm``; the shipped models' validation registrations vary by about ±10 %)
IC_VALIDATION_WARNING_RATIO = 3.0
#: … or when more than this share (%) of the field folds (det J ≤ 0) and ten times the share on its validation data
FOLD_WARNING_PERCENT = 0.05


@dataclasses.dataclass
class QualitySummary:
    """Fold count (det J ≤ 0, voxels of the field grid) and %, Jacobian determinant statistics (unitless), and the
    inverse-consistency error ‖Φ_BA(Φ_AB(x)) − x‖ mean / 95th percentile / maximum in mm.

    ``ic_outside_percent`` is the share of the field's points x whose image Φ_AB(x) lies outside the moving image's
    network grid (the box of its outermost voxel centres): there the reverse map is not defined (it is extended from its
    border), so the IC error measures the fields of view more than the registration. ``ic_error_overlap_mean_mm``
    is the mean IC error over the other points (``None`` when there are none); the mean, 95th percentile and maximum
    cover every point.
    """

    folds: int
    folds_percent: float
    jacobian_min: float
    jacobian_p1: float
    jacobian_p5: float
    jacobian_median: float
    jacobian_p95: float
    jacobian_p99: float
    jacobian_max: float
    ic_error_mean_mm: float
    ic_error_p95_mm: float
    ic_error_max_mm: float
    ic_outside_percent: float = 0.0
    ic_error_overlap_mean_mm: Optional[float] = None

    def overlap_note(self, digits: int = 3) -> str:
        """``" (N % of the field maps outside the moving image; inside: X mm)"``, the IC error inside the overlap,
        when more than :data:`IC_OUTSIDE_WARNING_PERCENT` of the field maps outside the moving image; else ``""``."""
        if self.ic_outside_percent <= IC_OUTSIDE_WARNING_PERCENT:
            return ""
        inside = (f"{self.ic_error_overlap_mean_mm:.{digits}f} mm" if self.ic_error_overlap_mean_mm is not None
                  else "no overlap")
        return f" ({self.ic_outside_percent:.1f} % of the field maps outside the moving image; inside: {inside})"


@dataclasses.dataclass
class RegistrationMetrics(QualitySummary):
    """:class:`QualitySummary` plus what produced the result: model, sha256 of the weight bytes loaded, device,
    network grid, field grid, modalities, instance optimisation (iterations, mode, objective per step), the flips
    the prediction was averaged over, whether it was symmetrised, the inverse
    (:class:`InverseReport`), seconds per stage (``load``, ``preprocessing``, ``network``, ``qa``, ``export``,
    ``total``) and the texts of the warnings the registration gave (``warnings``: modality guesses, fields of view,
    inversion, a result far from the model's validation numbers), so that a saved result keeps them."""

    model: str = ""
    weights_sha256: Optional[str] = None
    weights_file: Optional[str] = None
    device: str = ""
    network_shape: list[int] = dataclasses.field(default_factory=list)
    field_grid: str = "network"
    fixed_modality: str = ""
    moving_modality: str = ""
    io_iterations: int = 0
    io_mode: Optional[str] = None
    io_similarity_shape: Optional[list[int]] = None  # the field mode's similarity grid (io_grid), [D, H, W]
    io_objective: list[float] = dataclasses.field(default_factory=list)
    flips: list[int] = dataclasses.field(default_factory=list)  # network-grid axes the prediction was averaged over
    symmetric: bool = False  # the two directions were made consistent (register(symmetric=True))
    refinements: int = 0  # recursive refinements of the network's prediction (register(refinements=…))
    inverse: InverseReport = dataclasses.field(default_factory=lambda: InverseReport("network"))
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)  # what register warned about (UserWarning texts)

    @property
    def total_seconds(self) -> float:
        return float(self.seconds.get("total", float("nan")))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``metrics.json``): a flat object with ``inverse`` and ``seconds`` nested."""
        data = dataclasses.asdict(self)
        data["inverse"] = self.inverse.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RegistrationMetrics":
        """Read :meth:`to_dict`'s form back (unknown keys are an error: they mean a different version)."""
        values = dict(data)
        values["inverse"] = InverseReport(**values.get("inverse", {"method": "network"}))
        return cls(**values)


def out_of_domain_warnings(quality: QualitySummary, model: str, validation: Optional[dict[str, Any]],
                           use: str = "") -> list[str]:
    """What ``quality`` says against the model's own validation numbers (``validation``: a zoo entry's record
    with ``ic_error_mm`` and ``folds_percent``, mm and %; ``None`` or missing numbers: nothing to compare with).

    A network asked to register images unlike its training data (another anatomy, field of view or contrast) still
    returns a smooth-looking field; its two directions then disagree, or it folds, far more than on its validation
    pairs. Returns one message per sign: a mean IC error above :data:`IC_VALIDATION_WARNING_RATIO` × the validation
    mean (inside the overlap when the fields of view differ, see :meth:`QualitySummary.overlap_note`), and folds
    above :data:`FOLD_WARNING_PERCENT` % and ten times the validation share. ``use`` (the zoo entry's "for" text)
    is named in the messages."""
    if not validation:
        return []
    what = f" (it is for: {use})" if use else ""
    advice = ("these images may be unlike the ones it was trained for" + what +
              "; check the result where the maps show it, or choose another model ('iconreg models list').")
    said = []
    reference = validation.get("ic_error_mm")
    observed = quality.ic_error_mean_mm
    if quality.ic_outside_percent > IC_OUTSIDE_WARNING_PERCENT and quality.ic_error_overlap_mean_mm is not None:
        observed = quality.ic_error_overlap_mean_mm  # the border's extrapolation has its own warning
    if isinstance(reference, (int, float)) and reference > 0 and observed > IC_VALIDATION_WARNING_RATIO * reference:
        said.append(f"The inverse-consistency error (mean {observed:.3g} mm) is {observed / reference:.1f}× what "
                    f"{model} shows on its validation data ({reference:.3g} mm): " + advice)
    reference = validation.get("folds_percent")
    if isinstance(reference, (int, float)) and quality.folds_percent > max(FOLD_WARNING_PERCENT, 10 * reference):
        said.append(f"{quality.folds_percent:.3f} % of the field folds (det J ≤ 0), against {reference:.4f} % for "
                    f"{model} on its validation data: " + advice)
    return said
