"""A one-page PNG quality report of a registration: ``write_report(path, fixed, moving, result)``.

The page has three rows — the axial, coronal and sagittal slices through the centre voxel of the fixed image —
and six columns:

1. **fixed**;
2. **moving (before)**: the moving image resampled onto the fixed grid with the identity transform (what the
   two images look like without registration);
3. **warped (after)**: ``result.warped``;
4. **checkerboard** of fixed and warped, each normalised to [0, 1] by its 1st–99th percentile (the warped image
   uses the moving image's percentiles, so the zero padding outside the moving image does not bias them);
5. **warped + folds**: voxels where ``result.jacobian <= 0`` (resampled nearest-neighbour onto the fixed grid)
   painted pure red over the warped image;
6. **IC error**: ``result.ic_error`` (mm, resampled linearly onto the fixed grid, 0 outside its grid) as a
   semi-transparent ``viridis`` heat map over the fixed image in grey, with a colour bar labelled
   "IC error (mm)". The colour range is fixed to ``0 .. max(1 mm, 99th percentile of the IC error)`` so that a
   consistent registration (sub-millimetre error) looks uniformly dark and a bad one stands out.

Geometry of the panels: slices are taken in voxel index space of the fixed image (no reslicing). Each index axis
is matched to the patient axis (LPS) its direction cosine is closest to, which decides which slice is called
axial / coronal / sagittal and which way it is drawn: the horizontal axis of every panel increases towards
patient left (axial, coronal; radiological convention, patient right on the viewer's left) or posterior
(sagittal; the face looks left), and the vertical axis has anterior (axial) or superior (coronal, sagittal) at
the top. Pixels are drawn with their physical size (spacing), so the aspect ratio is correct for anisotropic
voxels. For oblique images the closest patient axis is used, so the planes are only approximately anatomical.

matplotlib is imported inside :func:`write_report` (Agg canvas, no pyplot), so importing this module stays light
and never touches a GUI backend. The file is written atomically: rendered to a temporary file in the target
folder, then moved onto ``path`` (:func:`~ICONRegistrationLib.io.atomic.atomic_path`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..pipeline.metrics import RegistrationMetrics
    from ..pipeline.registration import RegistrationResult

__all__ = ["write_report", "IC_ERROR_MIN_RANGE_MM", "FOLD_COLOR"]

IC_ERROR_MIN_RANGE_MM = 1.0
"""The IC-error colour range is ``0 .. max(IC_ERROR_MIN_RANGE_MM, 99th percentile)`` millimetres."""

FOLD_COLOR = (1.0, 0.0, 0.0)
"""RGB colour of folding voxels (Jacobian determinant ≤ 0) in the fold column."""

_PANEL_INCHES = 2.4      # width of one image column
_DPI = 110
_CHECKER_TILES = 8       # checkerboard squares along the longer side of a slice
_MAX_PERCENTILE_VOXELS = 1 << 21  # percentiles are estimated on a regular subsample of at most ~2 M voxels
_COLUMNS = ("fixed", "moving (before)", "warped (after)", "checkerboard\nfixed / warped", "warped + folds\n(J ≤ 0, red)",
            "IC error over fixed")
_PLANES = ("axial", "coronal", "sagittal")
# For each plane: (patient axis normal to the slice, horizontal patient axis, vertical patient axis), LPS 0/1/2.
_PLANE_AXES = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}


@dataclasses.dataclass(frozen=True)
class _View:
    """One slice of the fixed grid: index axes (0 = x … 2 = z) normal / horizontal / vertical, and flips."""

    plane: str
    normal: int
    horizontal: int
    vertical: int
    index: int
    flip_horizontal: bool
    flip_vertical: bool
    spacing: tuple[float, float]  # (horizontal, vertical) mm per pixel

    def take(self, volume: np.ndarray) -> np.ndarray:
        """The 2-D slice of a ``[z, y, x]`` array on the fixed grid, as ``[vertical, horizontal]``, display-ready
        (row 0 at the top)."""
        # numpy axis of index axis a is 2 - a
        moved = np.moveaxis(volume, (2 - self.normal, 2 - self.vertical, 2 - self.horizontal), (0, 1, 2))
        plane = moved[self.index]
        if self.flip_vertical:
            plane = plane[::-1]
        if self.flip_horizontal:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def extent_mm(self, shape: tuple[int, int]) -> tuple[float, float, float, float]:
        """``imshow`` extent (left, right, bottom, top) in mm for a slice of ``shape`` with origin ``upper``."""
        width = shape[1] * self.spacing[0]
        height = shape[0] * self.spacing[1]
        return (0.0, width, height, 0.0)


def _index_to_patient_axes(direction: np.ndarray) -> list[int]:
    """For each index axis (x, y, z), the patient axis (LPS 0, 1, 2) its direction cosine is closest to.

    Falls back to the identity when the closest axes are not a permutation (strongly oblique images).
    """
    closest = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
    return closest if sorted(closest) == [0, 1, 2] else [0, 1, 2]


def _views(fixed: sitk.Image) -> list[_View]:
    """The axial, coronal and sagittal views through the centre voxel of ``fixed`` (see the module docstring)."""
    direction = np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3)
    size, spacing = fixed.GetSize(), fixed.GetSpacing()
    patient_of_index = _index_to_patient_axes(direction)
    index_of_patient = {p: a for a, p in enumerate(patient_of_index)}
    views = []
    for plane in _PLANES:
        normal_p, horizontal_p, vertical_p = _PLANE_AXES[plane]
        normal, horizontal, vertical = (index_of_patient[normal_p], index_of_patient[horizontal_p],
                                        index_of_patient[vertical_p])
        # Sign of each in-plane index axis along its patient axis (+ = towards L, P or S).
        horizontal_sign = direction[horizontal_p, horizontal] >= 0
        vertical_sign = direction[vertical_p, vertical] >= 0
        # Horizontal: increasing to the right = towards L (axial, coronal) or P (sagittal), i.e. the + LPS sense.
        flip_horizontal = not horizontal_sign
        # Vertical (row 0 at the top): want A at the top (rows increase towards P, +y) for the axial plane and
        # S at the top (rows increase towards I, −z) for coronal and sagittal.
        flip_vertical = vertical_sign if vertical_p == 2 else not vertical_sign
        views.append(_View(plane, normal, horizontal, vertical, size[normal] // 2, flip_horizontal,
                           flip_vertical, (float(spacing[horizontal]), float(spacing[vertical]))))
    return views


def _voxels(image: sitk.Image) -> np.ndarray:
    """A float32 ``[z, y, x]`` copy of a scalar image (vector images: the magnitude)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.linalg.norm(array, axis=-1)
    return array


def _subsample(array: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil((array.size / _MAX_PERCENTILE_VOXELS) ** (1 / 3))))
    return array[::step, ::step, ::step] if array.ndim == 3 else array.ravel()[::step ** 3]


def _percentile_window(array: np.ndarray) -> tuple[float, float]:
    """(1st, 99th) percentiles of the finite voxels; min/max if those coincide; (0, 1) for a constant array."""
    values = _subsample(array)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, [1, 99]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return low, low + 1.0
    return low, high


def _normalise(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _on_fixed_grid(image: sitk.Image, fixed: sitk.Image, interpolator: int, default: float) -> np.ndarray:
    """``image`` resampled onto ``fixed``'s grid with the identity transform, as float32 ``[z, y, x]``."""
    if _same_grid(image, fixed):
        return _voxels(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorMagnitude(image)
    image = sitk.Cast(image, sitk.sitkFloat32)
    resampled = sitk.Resample(image, fixed, sitk.Transform(), interpolator, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def _checkerboard(view: _View, shape: tuple[int, int], first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Alternate ``first`` / ``second`` in squares of equal physical size (``_CHECKER_TILES`` along the long side)."""
    width_mm, height_mm = shape[1] * view.spacing[0], shape[0] * view.spacing[1]
    tile = max(width_mm, height_mm) / _CHECKER_TILES
    rows = ((np.arange(shape[0]) + 0.5) * view.spacing[1] // tile).astype(int)
    cols = ((np.arange(shape[1]) + 0.5) * view.spacing[0] // tile).astype(int)
    use_first = (rows[:, None] + cols[None, :]) % 2 == 0
    return np.where(use_first, first, second)


def _summary(metrics: "RegistrationMetrics") -> str:
    """The default title: model, folds, IC error and run time."""
    return (f"{metrics.model} — folds: {metrics.folds:d} ({metrics.folds_percent:.3f} %) — IC error mean "
            f"{metrics.ic_error_mean_mm:.2f} mm, p95 {metrics.ic_error_p95_mm:.2f} mm — {metrics.total_seconds:.1f} s")


def write_report(path: "str | os.PathLike[str]", fixed: sitk.Image, moving: sitk.Image,
                 result: "RegistrationResult", title: Optional[str] = None) -> Path:
    """Render the registration quality report of ``result`` as a PNG at ``path`` (written atomically).

    Args:
        path: the PNG to write (its folder is created if needed; an existing file is replaced). The file is
            PNG whatever its suffix.
        fixed, moving: the images given to :func:`~ICONRegistrationLib.register` (3-D, any geometry; not modified).
        result: what :func:`~ICONRegistrationLib.register` returned for them.
        title: the page title; by default a summary of ``result.metrics`` (model, folds and folds %, mean and
            95th-percentile IC error in mm, total seconds).

    Returns:
        The :class:`~pathlib.Path` written.

    See the module docstring for the layout, orientation and colour conventions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    views = _views(fixed)

    fixed_voxels = _voxels(fixed)
    moving_window = _percentile_window(_voxels(moving))
    fixed_n = _normalise(fixed_voxels, _percentile_window(fixed_voxels))
    before_n = _normalise(_on_fixed_grid(moving, fixed, sitk.sitkLinear, moving_window[0]), moving_window)
    warped_n = _normalise(_on_fixed_grid(result.warped, fixed, sitk.sitkLinear, moving_window[0]), moving_window)
    folds = _on_fixed_grid(result.jacobian, fixed, sitk.sitkNearestNeighbor, 1.0) <= 0
    ic_error = _on_fixed_grid(result.ic_error, fixed, sitk.sitkLinear, 0.0)
    ic_values = _subsample(_voxels(result.ic_error))
    ic_values = ic_values[np.isfinite(ic_values)]
    ic_p99 = float(np.percentile(ic_values, 99)) if ic_values.size else 0.0
    ic_norm = Normalize(vmin=0.0, vmax=max(IC_ERROR_MIN_RANGE_MM, ic_p99))

    # Row heights follow each plane's physical aspect ratio (clamped so a very flat slab stays visible).
    ratios = []
    for view in views:
        n_h, n_v = fixed.GetSize()[view.horizontal], fixed.GetSize()[view.vertical]
        ratios.append(float(np.clip((n_v * view.spacing[1]) / (n_h * view.spacing[0]), 0.25, 4.0)))
    n_columns = len(_COLUMNS)
    header, footer = 0.9, 0.1
    fig_width = _PANEL_INCHES * (n_columns + 0.45)
    fig_height = _PANEL_INCHES * sum(ratios) + header + footer
    figure = Figure(figsize=(fig_width, fig_height), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(views), n_columns + 1, width_ratios=[1.0] * n_columns + [0.07],
                               height_ratios=ratios, left=0.03, right=0.95, top=1 - header / fig_height,
                               bottom=footer / fig_height, wspace=0.04, hspace=0.08)

    heat = None
    grey = dict(cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
    for row, view in enumerate(views):
        fixed_s, before_s, warped_s = view.take(fixed_n), view.take(before_n), view.take(warped_n)
        shape = fixed_s.shape
        extent = view.extent_mm(shape)
        fold_rgba = np.zeros(shape + (4,), dtype=np.float32)
        fold_rgba[view.take(folds)] = (*FOLD_COLOR, 1.0)
        panels = [fixed_s, before_s, warped_s, _checkerboard(view, shape, fixed_s, warped_s), warped_s, fixed_s]
        for column, panel in enumerate(panels):
            ax = figure.add_subplot(grid[row, column])
            ax.imshow(panel, extent=extent, origin="upper", aspect="equal", **grey)
            if column == 4:
                ax.imshow(fold_rgba, extent=extent, origin="upper", aspect="equal", interpolation="nearest")
            if column == 5:
                heat = ax.imshow(view.take(ic_error), extent=extent, origin="upper", aspect="equal", cmap="viridis",
                                 norm=ic_norm, alpha=0.6, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_COLUMNS[column], fontsize=9)
            if column == 0:
                axis_name = "xyz"[view.normal]
                ax.set_ylabel(f"{view.plane}\n({axis_name} index {view.index})", fontsize=9)
    colorbar_axes = figure.add_subplot(grid[:, -1])
    colorbar = figure.colorbar(heat, cax=colorbar_axes)
    colorbar.set_label("IC error (mm)", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    figure.suptitle(title if title is not None else _summary(result.metrics), fontsize=11,
                    y=1 - 0.25 / fig_height)

    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        canvas.print_png(stream)
    return path
