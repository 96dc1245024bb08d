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


def hd95_per_label(warped: sitk.Image, fixed: sitk.Image, labels: list[int]) -> dict[int, float]:
    return {label: hd95(sitk.Cast(warped == label, sitk.sitkUInt8), sitk.Cast(fixed == label, sitk.sitkUInt8))
            for label in labels}


def mean_std(values) -> tuple[float, float]:
    """Mean and (population) standard deviation ignoring NaN; (NaN, NaN) when nothing is left."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std())
