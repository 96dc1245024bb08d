"""Reference registrations measured in the same run as the networks: identity and multi-resolution demons."""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk


def identity_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """No registration: physical points map to themselves (images as stored, e.g. affinely pre-aligned)."""
    return sitk.Transform(3, sitk.sitkIdentity)


def _normalized(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    low, high = np.percentile(array, [1, 99])
    scaled = sitk.GetImageFromArray(np.clip((array - low) / max(high - low, 1e-6), 0, 1).astype(np.float32))
    scaled.CopyInformation(image)
    return scaled


def demons(fixed: sitk.Image, moving: sitk.Image, *, levels: tuple[int, ...] = (4, 2, 1),
           iterations: tuple[int, ...] = (60, 40, 20), smoothing_sigma: float = 1.5) -> sitk.Transform:
    """Diffeomorphic demons (Vercauteren et al. 2009), multi-resolution (shrink factors ``levels``), on intensities
    normalised to the 1st–99th percentiles, with the moving histogram matched to the fixed one.

    Returns a ``DisplacementFieldTransform`` on the fixed grid (fixed → moving points, like the networks').
    """
    fixed_n, moving_n = _normalized(fixed), _normalized(moving)
    moving_n = sitk.HistogramMatching(moving_n, fixed_n, numberOfHistogramLevels=128, numberOfMatchPoints=15)
    moving_on_fixed = sitk.Resample(moving_n, fixed_n, sitk.Transform(), sitk.sitkLinear, 0.0)
    field = None
    for shrink, steps in zip(levels, iterations):
        level_fixed = sitk.Shrink(fixed_n, [shrink] * 3) if shrink > 1 else fixed_n
        level_fixed = sitk.SmoothingRecursiveGaussian(level_fixed, 0.5 * shrink * min(fixed.GetSpacing())) \
            if shrink > 1 else level_fixed
        level_moving = sitk.Resample(moving_on_fixed, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
        if field is None:
            initial = sitk.Image(level_fixed.GetSize(), sitk.sitkVectorFloat64, 3)
            initial.CopyInformation(level_fixed)
        else:
            initial = sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                    sitk.sitkVectorFloat64)
        registration = sitk.DiffeomorphicDemonsRegistrationFilter()
        registration.SetNumberOfIterations(steps)
        registration.SetSmoothDisplacementField(True)
        registration.SetStandardDeviations(smoothing_sigma)
        registration.SetUseImageSpacing(True)
        field = registration.Execute(level_fixed, level_moving, initial)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)


BASELINES = {"identity": identity_transform, "demons": demons}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start
