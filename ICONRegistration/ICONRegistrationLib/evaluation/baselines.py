"""Reference registrations measured in the same run as the networks: identity, multi-resolution demons and, when
their packages are installed (``pip install -e '.[baselines]'``), ANTs SyN (antspyx) and elastix (itk-elastix).

Every baseline returns a transform from fixed to moving physical points (LPS mm), the networks' convention; the
deformable ones return a ``DisplacementFieldTransform`` on the fixed image's grid, so that folds are counted on it.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..pipeline.grid import Grid


def identity_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """No registration: physical points map to themselves (images as stored, e.g. affinely pre-aligned)."""
    return sitk.Transform(3, sitk.sitkIdentity)


def _normalized(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    low, high = np.percentile(array, [1, 99])
    scaled = sitk.GetImageFromArray(np.clip((array - low) / max(high - low, 1e-6), 0, 1).astype(np.float32))
    scaled.CopyInformation(image)
    return scaled


def box_alignment(fixed: sitk.Image, moving: sitk.Image) -> sitk.AffineTransform:
    """The affine map from fixed to moving points that takes the fixed image's box onto the moving image's, axes
    matched as the networks match them (:meth:`~ICONRegistrationLib.pipeline.grid.Grid.over_image`): the
    alignment every network starts from. The identity for two images on one grid (LPBA40's volumes)."""
    grid_B = Grid.over_image(fixed, (2, 2, 2))
    grid_A = Grid.over_image(moving, (2, 2, 2), align_to=grid_B)
    matrix = grid_A.unit_matrix @ np.linalg.inv(grid_B.unit_matrix)  # mm offsets in the fixed box → in the moving box
    translation = np.array(grid_A.origin) - matrix @ np.array(grid_B.origin)
    return sitk.AffineTransform(tuple(matrix.ravel()), tuple(translation))


def _coarse_grid(image: sitk.Image, shrink: int) -> sitk.Image:
    """An empty image on ``image``'s grid coarsened ``shrink`` times along each axis: each coarse voxel centred on
    its block of fine voxels. (``sitk.Shrink`` keeps one voxel of each block but labels it with the block's centre,
    half a fine voxel away for even factors: demons then found a shift of that size between identical images.)"""
    spacing = np.array(image.GetSpacing()) * shrink
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ (0.5 * (shrink - 1) * np.array(image.GetSpacing()))
    reference = sitk.Image([max(1, -(-n // shrink)) for n in image.GetSize()], sitk.sitkFloat32)
    reference.SetSpacing(tuple(spacing))
    reference.SetOrigin(tuple(origin))
    reference.SetDirection(image.GetDirection())
    return reference


def demons(fixed: sitk.Image, moving: sitk.Image, *, levels: tuple[int, ...] = (4, 2, 1),
           iterations: tuple[int, ...] = (60, 40, 20), smoothing_sigma: float = 1.5) -> sitk.Transform:
    """Diffeomorphic demons (Vercauteren et al. 2009), multi-resolution (shrink factors ``levels``), on intensities
    normalised to the 1st–99th percentiles, with the moving histogram matched to the fixed one, started from the
    networks' box-to-box alignment (:func:`box_alignment`). At each coarse level both images are smoothed alike
    (Gaussian, σ = half the shrink factor in voxels) and then sampled on the coarsened fixed grid
    (:func:`_coarse_grid`).

    Returns a ``DisplacementFieldTransform`` on the fixed grid (fixed → moving points, like the networks').
    """
    fixed_n, moving_n = _normalized(fixed), _normalized(moving)
    moving_n = sitk.HistogramMatching(moving_n, fixed_n, numberOfHistogramLevels=128, numberOfMatchPoints=15)
    start = box_alignment(fixed, moving)
    moving_on_fixed = sitk.Resample(moving_n, fixed_n, start, sitk.sitkLinear, 0.0)
    field = None
    for shrink, steps in zip(levels, iterations):
        if shrink > 1:
            sigma = 0.5 * shrink * min(fixed.GetSpacing())  # mm
            coarse = _coarse_grid(fixed_n, shrink)
            level_fixed, level_moving = (sitk.Resample(sitk.SmoothingRecursiveGaussian(image, sigma), coarse,
                                                       sitk.Transform(), sitk.sitkLinear, 0.0)
                                         for image in (fixed_n, moving_on_fixed))
        else:
            level_fixed, level_moving = fixed_n, moving_on_fixed
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
    # the moving image was read through the box alignment: x ↦ start(x + u(x)) (the last transform listed acts first)
    return _field_on_fixed_grid(sitk.CompositeTransform([start, sitk.DisplacementFieldTransform(field)]), fixed)


#: baseline name → (module it imports, package that provides it) for the baselines outside the core dependencies
OPTIONAL_PACKAGES = {"ants-syn": ("ants", "antspyx"), "elastix": ("itk", "itk-elastix")}


def _optional_package(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"This baseline needs the package '{package}': pip install -e '.[baselines]' "
                        f"(or pip install {package}).") from None


def check_installed(names) -> None:
    """Raise a ``UserError`` naming the install command if a baseline in ``names`` lacks its package."""
    for name in names:
        if name in OPTIONAL_PACKAGES:
            _optional_package(*OPTIONAL_PACKAGES[name])


def _field_on_fixed_grid(transform: sitk.Transform, fixed: sitk.Image) -> sitk.DisplacementFieldTransform:
    """``transform`` (fixed → moving points) sampled at the fixed image's voxel centres as a displacement field
    (returned as it is when it already is one on exactly that grid, as transformix's field is)."""
    if isinstance(transform, sitk.DisplacementFieldTransform):
        own = transform.GetDisplacementField()
        if (own.GetSize() == fixed.GetSize() and np.allclose(own.GetOrigin(), fixed.GetOrigin())
                and np.allclose(own.GetSpacing(), fixed.GetSpacing())
                and np.allclose(own.GetDirection(), fixed.GetDirection())):
            return transform
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _to_ants(image: sitk.Image, ants):
    """A float32 ANTsImage with ``image``'s geometry (ANTs arrays are in ITK index order x, y, z)."""
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).transpose(2, 1, 0)
    return ants.from_numpy(np.ascontiguousarray(array), origin=list(image.GetOrigin()),
                           spacing=list(image.GetSpacing()),
                           direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3))


def ants_syn(fixed: sitk.Image, moving: sitk.Image, *, transform_type: str = "SyN",
             iterations: tuple[int, ...] = (40, 20, 0), seed: int = 1) -> sitk.Transform:
    """ANTs SyN (Avants et al. 2008) through antspyx with its default recipe (``ants.registration(fixed, moving,
    "SyN")``: an affine stage, then SyN with Mattes mutual information at shrink factors 4, 2, 1 and ``iterations``
    per level; antspyx's defaults are (40, 20, 0)) and a fixed random seed for its metric sampling (on several
    threads ANTs still differs slightly from run to run).

    ANTs' forward transforms (warp, then affine in its list) are composed as ``ants.apply_transforms`` composes
    them (:func:`ants_transform`) and sampled on the fixed grid: a ``DisplacementFieldTransform`` from fixed to
    moving points.
    """
    ants = _optional_package(*OPTIONAL_PACKAGES["ants-syn"])
    with tempfile.TemporaryDirectory(prefix="iconreg-ants-") as folder:
        result = ants.registration(_to_ants(fixed, ants), _to_ants(moving, ants), type_of_transform=transform_type,
                                   reg_iterations=tuple(iterations), random_seed=seed,
                                   outprefix=os.path.join(folder, "syn_"), verbose=False)
        return _field_on_fixed_grid(ants_transform(result["fwdtransforms"]), fixed)


def ants_transform(paths: "list[str]") -> sitk.Transform:
    """The transform that ``ants.apply_transforms(fixed, moving, paths)`` resamples with (fixed → moving points):
    ANTs' transform list (``.nii.gz`` displacement fields, ``.mat`` affine files), composed in the order that
    reproduces ANTs' own resampling (a SimpleITK ``CompositeTransform`` of the reversed list)."""
    transforms = []
    for path in paths:
        if str(path).endswith((".nii", ".nii.gz")):
            transforms.append(sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64)))
        else:
            transforms.append(sitk.ReadTransform(str(path)))
    return sitk.CompositeTransform(transforms[::-1])


def to_itk_image(image: sitk.Image, itk):
    """A float32 ITK Python image with ``image``'s voxels and geometry (for itk-elastix)."""
    converted = itk.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))))
    converted.SetOrigin(image.GetOrigin())
    converted.SetSpacing(image.GetSpacing())
    converted.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return converted


def elastix_parameters(itk, resolutions: int = 4, grid_spacing_mm: float = 10.0, iterations: int = 256):
    """elastix's default affine and B-spline parameter maps with ``resolutions`` levels, a final control-point
    spacing of ``grid_spacing_mm`` and ``iterations`` per level."""
    parameters = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        parameter_map = parameters.GetDefaultParameterMap(kind, resolutions, grid_spacing_mm)
        parameter_map["MaximumNumberOfIterations"] = [str(iterations)]
        parameters.AddParameterMap(parameter_map)
    return parameters


def elastix_transform(result_parameters, moving_itk, itk) -> sitk.DisplacementFieldTransform:
    """elastix's result transform (fixed → moving points) as transformix samples it: a displacement field on the
    grid the result parameters name (the fixed image's). Transformix's files go to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="iconreg-transformix-") as folder:  # it writes deformationField.nii
        field = itk.transformix_deformation_field(moving_itk, result_parameters, output_directory=folder)
    displacement = sitk.GetImageFromArray(itk.array_from_image(field).astype(np.float64), isVector=True)
    displacement.SetOrigin(tuple(float(v) for v in field.GetOrigin()))
    displacement.SetSpacing(tuple(float(v) for v in field.GetSpacing()))
    displacement.SetDirection(tuple(float(v) for v in itk.array_from_matrix(field.GetDirection()).ravel()))
    return sitk.DisplacementFieldTransform(displacement)


def elastix_bspline(fixed: sitk.Image, moving: sitk.Image, *, resolutions: int = 4,
                    grid_spacing_mm: float = 10.0, iterations: int = 256) -> sitk.Transform:
    """elastix (Klein et al. 2010) through itk-elastix: its default affine map, then its default B-spline map
    (Mattes mutual information, adaptive stochastic gradient descent) with ``resolutions`` levels, a final control
    point spacing of ``grid_spacing_mm`` and ``iterations`` per level (:func:`elastix_parameters`).

    The B-spline transform, composed with the affine one, is sampled by transformix
    (:func:`elastix_transform`): a ``DisplacementFieldTransform`` on the fixed grid from fixed to moving points.
    """
    itk = _optional_package(*OPTIONAL_PACKAGES["elastix"])
    moving_itk = to_itk_image(moving, itk)
    _, result_parameters = itk.elastix_registration_method(
        to_itk_image(fixed, itk), moving_itk, parameter_object=elastix_parameters(itk, resolutions, grid_spacing_mm,
                                                                                  iterations), log_to_console=False)
    return _field_on_fixed_grid(elastix_transform(result_parameters, moving_itk, itk), fixed)


BASELINES = {"identity": identity_transform, "demons": demons, "ants-syn": ants_syn, "elastix": elastix_bspline}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start
