"""Label-overlap and surface-distance metrics on SimpleITK label maps (physical units, mm)."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from ..overlap import dice_scores


def label_values(*label_maps: sitk.Image) -> list[int]:
    """Non-zero labels present in every given label map, sorted."""
    common = None
    for label_map in label_maps:
        values = set(int(v) for v in np.unique(sitk.GetArrayViewFromImage(label_map))) - {0}
        common = values if common is None else common & values
    return sorted(common or [])


def dice_per_label(warped: sitk.Image, fixed: sitk.Image, labels: list[int]) -> dict[int, float]:
    """Dice of each label between two label maps on the same grid."""
    return dice_scores(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(fixed), labels)


def _surface_distances(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Distances (mm) from every boundary voxel of ``source`` to the boundary of ``target``."""
    contour = sitk.GetArrayFromImage(sitk.LabelContour(source, fullyConnected=True)) > 0  # a view would outlive it
    distance = sitk.Abs(sitk.SignedMaurerDistanceMap(target, insideIsPositive=False, squaredDistance=False,
                                                     useImageSpacing=True))
    return sitk.GetArrayViewFromImage(distance)[contour]


def hd95(a: sitk.Image, b: sitk.Image) -> float:
    """95th-percentile Hausdorff distance (mm) of two binary masks on one grid: the larger of the two directed
    95th percentiles of boundary-to-boundary distances (MONAI's convention). NaN if either mask is empty."""
    if not sitk.GetArrayViewFromImage(a).any() or not sitk.GetArrayViewFromImage(b).any():
        return math.nan
    return float(max(np.percentile(_surface_distances(a, b), 95), np.percentile(_surface_distances(b, a), 95)))


def _union_box(a: np.ndarray, b: np.ndarray, margin: int = 2) -> "tuple[list[int], list[int]] | None":
    """Index and size (SimpleITK x, y, z order) of the box around both masks, ``margin`` voxels wider (clipped)."""
    union = a | b
    if not union.any():
        return None
    lower, upper = [], []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        present = np.flatnonzero(union.any(axis=other))
        lower.append(max(int(present[0]) - margin, 0))
        upper.append(min(int(present[-1]) + margin + 1, union.shape[axis]))
    return [int(v) for v in reversed(lower)], [int(u - v) for u, v in zip(reversed(upper), reversed(lower))]


def _box_diagonal_mm(image: sitk.Image) -> float:
    """Length (mm) of the diagonal of ``image``'s box (voxel size times voxel count along each axis)."""
    return float(np.linalg.norm(np.array(image.GetSize()) * np.array(image.GetSpacing())))


def hd95_per_label(warped: sitk.Image, fixed: sitk.Image, labels: list[int]) -> dict[int, float]:
    """HD95 (mm) of each label. Each pair of masks is cropped to the box around both (plus a margin), which gives
    the same distances (both surfaces lie inside it) at a fraction of the cost for small structures.

    A label of the fixed map that the warping lost entirely scores the diagonal of the fixed image's box (no
    distance inside the image is larger), so a method is never rewarded for losing a structure (its Dice is 0);
    a label absent from the fixed map is NaN (not scored)."""
    warped_array, fixed_array = sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(fixed)
    scores = {}
    for label in labels:
        mask_a, mask_b = warped_array == label, fixed_array == label
        if mask_b.any() and not mask_a.any():
            scores[label] = _box_diagonal_mm(fixed)
            continue
        box = _union_box(mask_a, mask_b)
        if box is None or not mask_a.any() or not mask_b.any():
            scores[label] = math.nan
            continue
        index, size = box
        images = []
        for mask, reference in ((mask_a, warped), (mask_b, fixed)):
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            image.CopyInformation(reference)
            images.append(sitk.RegionOfInterest(image, size, index))
        scores[label] = hd95(*images)
    return scores


def mean_std(values) -> tuple[float, float]:
    """Mean and (population) standard deviation ignoring NaN; (NaN, NaN) when nothing is left."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std())


def transform_error_mm(transform: sitk.Transform, truth: sitk.Transform, reference: sitk.Image,
                       mask: sitk.Image) -> tuple[float, float]:
    """Mean and 95th percentile (mm) of ‖transform(x) − truth(x)‖ over the voxel centres x of ``reference`` where
    ``mask`` (on the same grid) is non-zero. Both transforms map fixed to moving physical points (ITK's convention),
    so this is the registration error against a known answer; ``sitk.Transform()`` for ``transform`` gives the
    error before registration."""
    same_grid = mask.GetSize() == reference.GetSize() and all(
        np.allclose(getattr(mask, name)(), getattr(reference, name)(), atol=1e-4)
        for name in ("GetOrigin", "GetSpacing", "GetDirection"))
    if not same_grid:
        raise ValueError("the mask must be on the reference image's grid (size, origin, spacing and direction)")
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        return math.nan, math.nan
    grid = (reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    fields = [sitk.GetArrayFromImage(sitk.TransformToDisplacementField(t, sitk.sitkVectorFloat64, *grid))
              for t in (transform, truth)]
    error = np.linalg.norm(fields[0][inside] - fields[1][inside], axis=-1)
    return float(error.mean()), float(np.percentile(error, 95))
