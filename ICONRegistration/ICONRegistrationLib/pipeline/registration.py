"""``register(fixed, moving, model)``: SimpleITK images in, displacement fields, warped image and QA maps out.

Directions: ``Φ_AB`` (A = moving, B = fixed) maps fixed points to moving points, the resampling direction of
ITK, elastix and ANTs (a "from parent" transform in Slicer). The forward field is ``Φ_AB(x) − x`` in LPS mm on
an oriented grid over the fixed image; the inverse field is ``Φ_BA(y) − y`` on a grid over the moving image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
import warnings
from numbers import Real
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..core import native_sampler
from ..core.coordinates import compose, identity_map, map_to_displacement, sample_at, vector_length
from ..core.inversion import InversionWarning, symmetrize_maps
from ..core.losses import make_similarity
from ..core.objective import both_directions
from ..device import device_description
from ..errors import UserError
from ..models.spec import MAX_REFINEMENTS, ModelSpec, are_flip_axes
from ..models.weights import LoadedModel, load_model
from ..models.zoo import DEFAULT_MODEL
from ..progress import ProgressCallback, report
from .grid import Grid, add_linear_, apply_affine
from .images import image_array, mask_array, require_finite
from .instance_optimization import (FIELD_LEARNING_RATE, IO_MODES, WEIGHTS_LEARNING_RATE, optimize_fields,
                                    optimize_instance)
from .inverse import invert_field
from .metrics import (IC_OUTSIDE_WARNING_PERCENT, InverseReport, QualitySummary, RegistrationMetrics,
                      out_of_domain_warnings)
from .preprocessing import check_modality, normalize_intensities
from .qa import field_jacobian, physical_jacobian, summarize_quality

FIELD_GRIDS = ("network", "fixed")
IO_GRIDS = ("network", "fixed")  # where field-mode instance optimisation compares the images
IO_GRID_MAX_REFINEMENT = 2  # the "fixed" similarity grid has at most this many times the network grid's voxels per axis
_SLAB_VOXELS = 1 << 22  # resample the warped image in slabs of ~4 M voxels to bound memory


@dataclasses.dataclass
class RegistrationResult:
    """What :func:`register` returns (all SimpleITK images, LPS mm).

    * ``forward_field``: displacement ``Φ_AB(x) − x`` (vector float64) on a grid over the fixed image; as an
      ITK ``DisplacementFieldTransform`` it resamples the moving image onto the fixed one.
    * ``inverse_field``: ``Φ_BA(y) − y`` on a grid over the moving image (resamples fixed onto moving).
    * ``warped``: the moving image resampled on the fixed image's own grid (float32).
    * ``jacobian``: det ∂Φ_AB/∂x on the forward field's grid (unitless, ≤ 0 = folding).
    * ``ic_error``: ‖Φ_BA(Φ_AB(x)) − x‖ in mm on the forward field's grid.
    * ``metrics``: :class:`~ICONRegistrationLib.pipeline.metrics.RegistrationMetrics` — folds, Jacobian and
      IC-error statistics, seconds per stage, device, model, weight sha256 (``metrics.json`` is its ``to_dict``).
    """

    forward_field: sitk.Image
    inverse_field: sitk.Image
    warped: sitk.Image
    jacobian: sitk.Image
    ic_error: sitk.Image
    metrics: RegistrationMetrics

    def forward_transform(self) -> sitk.DisplacementFieldTransform:
        """The forward field as an ITK transform (moving → fixed resampling)."""
        return sitk.DisplacementFieldTransform(sitk.Image(self.forward_field))

    def inverse_transform(self) -> sitk.DisplacementFieldTransform:
        """The inverse field as an ITK transform (fixed → moving resampling)."""
        return sitk.DisplacementFieldTransform(sitk.Image(self.inverse_field))


class _StageTimer:
    def __init__(self, device: Optional[torch.device] = None):
        self.seconds: dict[str, float] = {}
        self.device = device

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _predict_both_directions(net: torch.nn.Module, image_A: torch.Tensor, image_B: torch.Tensor,
                             progress: Optional[ProgressCallback], flips: Sequence[int] = (),
                             refinements: int = 0) -> torch.Tensor:
    """``[Φ_AB; Φ_BA]`` on the identity grid: one prediction, or with ``flips`` (tensor axes of the network grid)
    the mean over every combination of those flips of both images (``2^k`` predictions, each flipped back:
    the result is then exactly equivariant to those flips). Averaging maps averages displacements.

    Each of ``refinements`` refines both directions recursively, as the network's own two-step modules do: the
    moving image warped by the map so far is registered to the fixed image again (with the same flips) and the
    correction is composed on the inside, ``Φ ← Φ ∘ Ψ[A ∘ Φ, B]``."""
    grid = identity_map(image_A.shape[2:], device=image_A.device)  # once: every prediction is on this grid
    subsets = [axes for k in range(len(flips) + 1) for axes in itertools.combinations(sorted(flips), k)]
    parts = len(subsets) * (refinements + 1)
    maps = None
    for step in range(refinements + 1):
        if maps is None:
            predict = functools.partial(_predict_once, net, image_A, image_B)  # both directions of one pair
        else:  # register each warped moving image to its fixed image again, as the two-step modules do
            warped = sample_at(torch.cat([image_A, image_B]), maps, padding="border")
            predict = functools.partial(_predict_pairs, net, (warped[:1], warped[1:]), (image_B, image_A))
        correction = None
        for index, axes in enumerate(subsets):
            dims = [axis + 2 for axis in axes]
            part = predict(grid, dims, progress, (step * len(subsets) + index) / parts, parts)
            if dims:  # back to the unflipped grid: reverse the axes and mirror their coordinates (x ↦ 1 − x)
                part = part.flip(dims)
                for axis in axes:
                    part[:, axis] = 1.0 - part[:, axis]
            correction = part if correction is None else correction.add_(part)
            if step * len(subsets) + index + 1 < parts:  # the last part's 1.0 comes once the stage is done
                report(progress, "network", (step * len(subsets) + index + 1) / parts)
        if len(subsets) > 1:
            correction.div_(len(subsets))
        maps = correction if maps is None else compose(maps, correction)
    return maps


def _predict_once(net: torch.nn.Module, image_A: torch.Tensor, image_B: torch.Tensor, grid: torch.Tensor,
                  dims: Sequence[int], progress: Optional[ProgressCallback], start: float, parts: int
                  ) -> torch.Tensor:
    """``[Φ_AB; Φ_BA]`` of one network prediction on ``grid`` (the identity map), both images flipped along tensor
    ``dims`` first (the maps are returned on the flipped grid): both from one pass for a network that is inverse
    consistent by construction, else by :func:`_predict_pairs`."""
    if dims:
        image_A, image_B = image_A.flip(list(dims)), image_B.flip(list(dims))
    with torch.no_grad():
        if hasattr(net, "forward_and_inverse"):  # inverse consistent by construction: both from one pass
            return both_directions(net, image_A, image_B)(grid)
    return _predict_pairs(net, (image_A, image_B), (image_B, image_A), grid, (), progress, start, parts)


def _predict_pairs(net: torch.nn.Module, moving: Sequence[torch.Tensor], fixed: Sequence[torch.Tensor],
                   grid: torch.Tensor, dims: Sequence[int], progress: Optional[ProgressCallback], start: float,
                   parts: int) -> torch.Tensor:
    """``[Φ_0; Φ_1]``, the maps of ``moving[i]`` → ``fixed[i]`` (two ``[1, 1, *S]`` images each) on ``grid``, all
    images flipped along tensor ``dims`` first: one batch of two on a GPU, one pair after the other on a CPU
    (where a batch of two costs as much, with twice the peak memory)."""
    if dims:
        moving = [image.flip(list(dims)) for image in moving]
        fixed = [image.flip(list(dims)) for image in fixed]
    with torch.no_grad():
        if moving[0].device.type != "cpu":
            return net(torch.cat(list(moving)), torch.cat(list(fixed)))(grid)
        first = net(moving[0], fixed[0])(grid)
        report(progress, "network", start + 0.5 / parts)
        return torch.cat([first, net(moving[1], fixed[1])(grid)])


@contextlib.contextmanager
def _memory_errors_as_user_errors(device: torch.device, stage: str = "network") -> Iterator[None]:
    """Out of memory in a stage of :func:`register` as a :class:`UserError` that says what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if stage == "network":
            raise UserError(f"Out of memory on {device.type} while running the network; close other GPU programs, "
                            "use device 'cpu', or use fewer instance-optimisation iterations.") from None
        raise UserError(f"Out of memory on {device.type} in the {stage} stage (the images or the field grid are "
                        "large); close other GPU programs, use field grid 'network', or use device 'cpu'.") from None


def _field_image(displacement_mm: torch.Tensor, grid: Grid) -> sitk.Image:
    """``[1, 3 (x, y, z), D, H, W]`` displacement → sitk vector float64 image on ``grid`` (one copy)."""
    array = np.empty((*grid.shape, 3), dtype=np.float64)
    vectors = displacement_mm[0].detach().permute(1, 2, 3, 0)
    if vectors.device.type == "cuda":  # reorder and widen on the GPU, then one contiguous copy to the host
        try:
            vectors = torch.empty(array.shape, dtype=torch.float64, device=vectors.device).copy_(vectors)
        except torch.OutOfMemoryError:  # no room for the float64 copy: widen on the host instead
            torch.cuda.empty_cache()
    torch.from_numpy(array).copy_(vectors)  # on a CPU: all threads, not one
    return grid.apply_to(sitk.GetImageFromArray(array, isVector=True))


def _scalar_image(values: torch.Tensor, grid: Grid) -> sitk.Image:
    return grid.apply_to(sitk.GetImageFromArray(values.reshape(grid.shape).detach().cpu().float().numpy()))


def _qa_kernel_applies(displacement: torch.Tensor, back_displacement: Optional[torch.Tensor]) -> bool:
    """Whether :func:`native_sampler.qa_fields` takes these displacements: float32 ``[1, 3, *S]`` on a CPU with the
    compiled library loaded (and the same for the reverse displacement, if any)."""
    fields = [displacement] + ([] if back_displacement is None else [back_displacement])
    return (all(f.dtype == torch.float32 and f.dim() == 5 and f.shape[:2] == (1, 3) for f in fields)
            and native_sampler.kernels_eligible(displacement)
            and (back_displacement is None or back_displacement.device == displacement.device))


def _sample_fields(displacement: torch.Tensor, back_displacement: Optional[torch.Tensor], own: Grid, other: Grid,
                   field_grid: Grid, with_jacobian: bool = True
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Displacement (mm), Jacobian, IC error (mm) of Φ on ``field_grid``, and where Φ leaves ``other``'s box.

    ``displacement`` is Φ − Id on ``own``'s network grid (unit cube of ``own`` → unit cube of ``other``),
    ``back_displacement`` that of the reverse map; without it the IC error is not computed (``None``), and
    without ``with_jacobian`` neither is the Jacobian. The last item (bool ``[1, 1, *field_grid.shape]``, with the
    IC error) marks the points whose image Φ(x) lies outside ``other``'s network grid (the box of its outermost voxel
    centres), where the reverse map is only extended from its border.
    """
    offset = np.array(other.origin) - np.array(own.origin)
    if field_grid == own and _qa_kernel_applies(displacement, back_displacement):
        # the same quantities in one compiled pass over the grid (no identity map, no temporaries)
        displacement_mm, ic_error, outside = native_sampler.qa_fields(
            displacement, back_displacement, torch.as_tensor(other.unit_matrix), torch.as_tensor(offset),
            torch.as_tensor(own.unit_matrix))
        jacobian = physical_jacobian(displacement_mm, field_grid.index_matrix) if with_jacobian else None
        return displacement_mm, jacobian, ic_error, outside
    if field_grid == own:
        where = identity_map(own.shape, device=displacement.device)
        moved = displacement
    else:
        where = own.unit_coordinates_of(field_grid, device=displacement.device)
        moved = sample_at(displacement, where, padding="border")
    # Φ(x) − x in mm = U_other·(where + moved) − U_own·where + (origin_other − origin_own)
    mapped = where + moved
    displacement_mm = add_linear_(apply_affine(other.unit_matrix, offset, mapped), -own.unit_matrix, where)
    jacobian = physical_jacobian(displacement_mm, field_grid.index_matrix) if with_jacobian else None
    ic_error = outside = None
    if back_displacement is not None:
        # Φ_back(Φ(x)) − x = moved + back(mapped), in unit coordinates of ``own``
        round_trip = moved + sample_at(back_displacement, mapped, padding="border")
        residual = apply_affine(own.unit_matrix, np.zeros(3), round_trip)
        ic_error = vector_length(residual)
        outside = ((mapped < 0) | (mapped > 1)).any(dim=1, keepdim=True)
    return displacement_mm, jacobian, ic_error, outside


def _exact_inverse(forward_field: sitk.Image, grid: Grid) -> tuple[sitk.Image, InverseReport]:
    """The numerical inverse of ``forward_field`` on ``grid`` and its report. A folding field is inverted
    approximately; the report says so (``invertible`` False) instead of a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InversionWarning)
        exact = invert_field(forward_field, grid.reference_image(), allow_folds=True)
    solved = exact.report
    return exact.field, InverseReport("exact", iterations=solved.iterations,
                                      max_error_voxels=solved.max_error_voxels, max_error_mm=exact.max_error_mm,
                                      forward_first_max_error_mm=exact.forward_first_max_error_mm,
                                      forward_first_mean_error_mm=exact.forward_first_mean_error_mm,
                                      outside_field_voxels=exact.outside_field_voxels,
                                      itk_max_error_mm=exact.itk_max_error_mm,
                                      tolerance_voxels=solved.tolerance_voxels, converged=solved.converged,
                                      invertible=solved.invertible)


def _resize_table(source: int, target: int, start: int = 0, stop: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the box-aligned linear resize of an axis of ``source`` voxels to ``target`` voxels
    (``align_corners=False``, edges clamped) reads for the target voxels ``start``…``stop``: the lower and the upper
    source index (int64) and the upper one's weight (float64)."""
    rows = torch.arange(start, target if stop is None else stop, dtype=torch.float64)
    position = ((rows + 0.5) * (source / target) - 0.5).clamp_(min=0.0)
    lower = position.floor().long().clamp_(max=source - 1)
    upper = (lower + 1).clamp_(max=source - 1)
    return lower, upper, position - lower


def _resize_slab(field: torch.Tensor, shape: tuple[int, int, int], slab: slice) -> torch.Tensor:
    """Rows ``slab`` of ``F.interpolate(field, size=shape, mode="trilinear", align_corners=False)``.

    The network grid over the fixed image covers its box along the same axes, so sampling a network-grid field at
    the fixed image's voxels is exactly this box-aligned resize (edges clamped, as border padding). Done
    separably — rows along the first axis by hand, the other two by a bilinear ``F.interpolate`` — it is several
    times cheaper than ``grid_sample`` at every voxel, and a slab of rows bounds the memory.
    """
    lower, upper, weight = _resize_table(field.shape[2], shape[0], slab.start, slab.stop)
    lower, upper = lower.to(field.device), upper.to(field.device)
    weight = weight.to(field.dtype).to(field.device).view(1, 1, -1, 1, 1)
    blended = torch.lerp(field.index_select(2, lower), field.index_select(2, upper), weight)
    channels = field.shape[1]
    planes = blended.reshape(1, channels * len(lower), *field.shape[3:])  # rows become channels: a 2-D resize
    resized = F.interpolate(planes, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    return resized.view(1, channels, len(lower), *shape[1:])


def _warp_moving(moving: np.ndarray, displacement: torch.Tensor, grid_B: Grid, grid_A: Grid, fixed_grid: Grid,
                 moving_grid: Grid) -> np.ndarray:
    """The moving image (original intensities) resampled through Φ_AB = Id + ``displacement`` on the fixed grid.

    ``grid_B`` must be the network grid placed over the fixed image (same axes, see :func:`_resize_slab`).
    """
    assert grid_B.source_axes == (0, 1, 2) and not any(grid_B.flipped)
    device = displacement.device
    moving_tensor = torch.as_tensor(moving, device=device)[None, None]
    to_moving = grid_A.unit_affine_to(moving_grid)  # network unit cube of A -> moving image's unit cube
    # ITK's rule: a point within half a voxel of the outer voxel centres is inside (edge value), else 0;
    # in unit coordinates, |u − ½| ≤ ½ + ½ / (N − 1) along every axis.
    half_width = torch.as_tensor([0.5 + 0.5 / max(n - 1, 1) for n in moving_grid.shape], device=device)
    out = np.empty(fixed_grid.shape, dtype=np.float32)
    out_tensor = torch.from_numpy(out)  # the same memory: copies into it use every thread
    if (moving_tensor.dtype == torch.float32 and displacement.dtype == torch.float32 and min(moving.shape) >= 2
            and native_sampler.kernels_eligible(moving_tensor)):
        # the same steps per voxel (to float rounding) in one compiled pass, a row at a time: no coordinate,
        # field or mask temporaries
        tables = [_resize_table(n, m) for n, m in zip(displacement.shape[2:], fixed_grid.shape)]
        matrices = (*grid_B.index_affine_of(fixed_grid), *to_moving)
        native_sampler.warp_image(out_tensor, moving_tensor[0, 0], displacement, tables,
                                  *(torch.as_tensor(m, dtype=torch.float64) for m in matrices), half_width.double())
        return out
    rows = max(1, _SLAB_VOXELS // (fixed_grid.shape[1] * fixed_grid.shape[2]))
    for start in range(0, fixed_grid.shape[0], rows):
        slab = slice(start, min(start + rows, fixed_grid.shape[0]))
        where = grid_B.unit_coordinates_of(fixed_grid, device=device, slab=slab)
        unit = apply_affine(*to_moving, where + _resize_slab(displacement, fixed_grid.shape, slab))
        values = sample_at(moving_tensor, unit, padding="border")[0, 0]
        inside = ((unit - 0.5).abs_() <= half_width.view(1, 3, 1, 1, 1)).all(dim=1)[0]
        out_tensor[slab] = values.masked_fill_(~inside, 0.0)
    return out


def _keeping_warnings(function: Callable[..., RegistrationResult]) -> Callable[..., RegistrationResult]:
    """``function`` (:func:`register`) with the texts of the ``UserWarning`` warnings it gave in its result's
    ``metrics.warnings`` (each once, in order). Every warning still reaches the caller's filters and handlers as
    given (category, text, source line), after the call, also when it raises."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs) -> RegistrationResult:
        given: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                try:
                    result = function(*args, **kwargs)
                finally:
                    given = list(caught)
        finally:
            for warning in given:  # one registry: a repeated warning is shown once, as Python's "default" does
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                                       registry=_GIVEN_WARNINGS, source=warning.source)
        said = [str(w.message) for w in given if issubclass(w.category, UserWarning)]
        result.metrics.warnings = list(dict.fromkeys(said))
        return result

    return wrapper


_GIVEN_WARNINGS: dict = {}  # warnings' own registry for the warnings register passes on


@_keeping_warnings
def register(fixed: sitk.Image, moving: sitk.Image, model: "str | Path | ModelSpec | LoadedModel" = DEFAULT_MODEL, *,
             fixed_modality: Optional[str], moving_modality: Optional[str], fixed_mask: Optional[sitk.Image] = None,
             moving_mask: Optional[sitk.Image] = None, io_iterations: int = 0, io_similarity: Optional[str] = None,
             device: str = "auto", progress: Optional[ProgressCallback] = None, weights: "str | Path | None" = None,
             field_grid: str = "network", io_learning_rate: Optional[float] = None, inverse_qa: bool = False,
             exact_inverse: bool = False, random_weights: bool = False, io_mode: str = "fields",
             io_grid: str = "network", flips: Optional[Sequence[int]] = None,
             symmetric: bool = False, refinements: Optional[int] = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a pretrained inverse-consistent network.

    Args:
        fixed, moving: 3-D scalar SimpleITK images of any geometry (oblique, flipped, anisotropic, any size). Each
            is resampled over its own box onto the network grid (uniGradICON's convention): the network accounts
            for an offset between the boxes, so fields of view far more different than in training (a crop padded
            on one side) are best cropped or padded to similar boxes first.
        model: a zoo name (``iconreg models list``), a spec JSON path, a :class:`ModelSpec`, or a
            :class:`LoadedModel` from :func:`load_model` (reused as is: ``weights`` and ``device`` are ignored).
        fixed_modality, moving_modality: ``"ct"``, ``"mri"`` or ``"auto"`` (guessed from intensities).
        fixed_mask, moving_mask: optional label images; non-zero voxels are kept (input masking, and loss
            masking during instance optimisation).
        io_iterations: Adam steps of instance optimisation (0 = network prediction only).
        io_mode: ``"fields"`` (default) optimises the two displacement fields from the network's prediction;
            ``"weights"`` fine-tunes the network's weights on the pair (about 30–100× the cost per step on a
            CPU). See :mod:`~ICONRegistrationLib.pipeline.instance_optimization`.
        io_learning_rate: Adam's step size for instance optimisation (default: 0.1 voxel for ``"fields"``,
            2e-5 for ``"weights"``).
        io_similarity: similarity for instance optimisation (default: the model's).
        io_grid: where the field mode compares the images: ``"network"`` (default; the network grid) or
            ``"fixed"`` (a grid over the same boxes as fine as the fixed image, at most twice the network grid's
            voxels per axis, :func:`similarity_grid_shape`). The fields stay on the network grid; ``"fixed"``
            sees detail the network grid smooths away, at several times the cost per step (LPBA40 brains on the
            2 mm grid: 12 steps reach Dice 0.715 in 30 s, 40 network-grid steps 0.722 in 16 s). ``"fixed"`` with
            ``io_mode="weights"`` (which fine-tunes the network on its own grid) is a :class:`UserError`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        progress: ``callback(stage, fraction)``; returning ``False`` cancels (raises ``Cancelled``).
        weights: a weights file overriding the model's.
        field_grid: ``"network"`` (the network grid over each image; default) or ``"fixed"`` (the fixed / moving
            images' own grids) for the fields and QA maps.
        inverse_qa: also compute the inverse field's Jacobian (``metrics["inverse"]``: folds, minimum). Off by
            default: the forward Jacobian and IC-error maps already flag folding and inconsistency.
        exact_inverse: make ``inverse_field`` the numerical inverse of ``forward_field`` (fixed-point inversion to
            0.01 voxel, :func:`~ICONRegistrationLib.pipeline.inverse.invert_field`) instead of the network's Φ_BA,
            so that moving a segmentation there and back is exact up to that tolerance whatever the model's
            inverse consistency. ``metrics["inverse"]`` reports iterations and the round-trip error; a folding
            forward field is inverted approximately and reported (``invertible: false``).
        random_weights: skip loading weights (architecture tests and benchmarks only).
        flips: tensor axes of the network grid (0, 1, 2) to average the prediction over: the network runs on
            every combination of these flips of both images (``2^k`` times the network's time) and the flipped
            predictions, mapped back, are averaged; instance optimisation starts from that mean. ``None``
            (default): the model's ``test_time_flips`` (``[]`` = one prediction), or none with
            ``io_mode="weights"``, which optimises the network itself; ``[]``: one prediction. Use only axes the
            model was trained to flip.
        symmetric: make the network's two directions consistent before anything else uses them: Φ_AB becomes the
            mean of Φ_AB and the exact inverse of Φ_BA (fixed-point inversion on the network grid), and Φ_BA
            likewise, so swapping fixed and moving swaps the result and forward and inverse agree to second order
            (IC error 0.052 mm instead of 0.456 mm for ``gradicon-hippocampus`` on its 82 validation
            registrations). A network trained with a label loss can fit each direction's labels at the expense of
            the other's inverse; this gives up that part (Dice 0.820 → 0.795 there; demons 0.753). With instance
            optimisation, the field mode starts from the symmetric prediction; the weights mode symmetrises its
            optimised network's.
        refinements: how many times the network refines its own prediction (0…3; ``None``, the default: the model's
            ``test_time_refinements``, 0 for every zoo model). Each refinement registers the moving image warped so
            far to the fixed image again, in both directions, and composes the correction inside the map so far
            (``Φ ← Φ ∘ Ψ[A ∘ Φ, B]``, as the networks' own two-step modules do), with the same flips: one more
            prediction each. The result is refined before ``symmetric`` and instance optimisation use it. A network
            that stops short of the full deformation gains Dice (``gradicon-hippocampus``: 0.820 → 0.828 with one
            refinement), but the two directions are refined separately, so the IC error grows (0.46 → 0.81 mm);
            with ``symmetric=True`` the consistent Dice rises (0.795 → 0.803, IC error 0.12 mm).

    Raises:
        UserError: for inputs or settings a user can fix; nothing is written in that case.
    """
    inputs = _check_inputs(fixed, moving, fixed_mask, moving_mask, fixed_modality, moving_modality)
    if int(io_iterations) < 0:
        raise UserError("io_iterations must be 0 (no instance optimisation) or a positive number of steps.")
    if io_mode not in IO_MODES:
        raise UserError(f"io_mode must be one of {', '.join(IO_MODES)}, not '{io_mode}'.")
    if field_grid not in FIELD_GRIDS:
        raise UserError(f"field_grid must be one of {', '.join(FIELD_GRIDS)}, not '{field_grid}'.")
    if io_grid not in IO_GRIDS:
        raise UserError(f"io_grid must be one of {', '.join(IO_GRIDS)}, not '{io_grid}'.")
    flips = _check_flips(flips, io_iterations, io_mode)
    if not isinstance(symmetric, bool):
        raise UserError(f"symmetric must be True or False, not {symmetric!r}.")
    _check_refinements(refinements, io_iterations, io_mode)
    if io_learning_rate is not None and (isinstance(io_learning_rate, bool) or not isinstance(io_learning_rate, Real)
                                         or not 0 < io_learning_rate < float("inf")):  # 0 used to mean the default
        raise UserError(f"io_learning_rate must be a finite number > 0, or None for the mode's default, not "
                        f"{io_learning_rate!r}.")
    if io_grid != "network" and io_iterations and io_mode == "weights":
        raise UserError(f"io_grid '{io_grid}' is where the 'fields' mode of instance optimisation compares the "
                        "images; the 'weights' mode fine-tunes the network on its own grid, so use "
                        "io_grid='network' or io_mode='fields'.")
    if io_similarity is not None:
        try:
            make_similarity(io_similarity)
        except ValueError as error:
            raise UserError(f"io_similarity: {error}.") from None

    timer = _StageTimer()
    start = time.perf_counter()
    with timer("load"):
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            try:
                loaded = load_model(model, weights, device=device, progress=progress, random_weights=random_weights)
            except torch.OutOfMemoryError:
                raise UserError("Out of memory while loading the model onto the device; close other GPU programs "
                                "or use device 'cpu'.") from None
    timer.device = loaded.device
    if flips is None:
        flips = [] if io_iterations and io_mode == "weights" else list(loaded.spec.test_time_flips)
    if refinements is None:
        refinements = 0 if io_iterations and io_mode == "weights" else loaded.spec.test_time_refinements
    similarity_name = io_similarity or loaded.spec.similarity.get("name")
    if io_iterations and inputs.fixed_modality != inputs.moving_modality and similarity_name in ("lncc", "ssd"):
        warnings.warn(f"Instance optimisation compares a {inputs.fixed_modality.upper()} image with a "
                      f"{inputs.moving_modality.upper()} image by {similarity_name}, which assumes one modality; "
                      "use io_similarity 'squared_lncc' or 'mind_ssc' (or a multi-modal model such as "
                      "multigradicon).", UserWarning, stacklevel=2)
    with timer("preprocessing"), _memory_errors_as_user_errors(loaded.device, "preprocessing"):
        pair = _prepare(inputs, fixed, moving, loaded)
        similarity_pair = (_similarity_pair(inputs, fixed, moving, pair, loaded)
                           if io_iterations and io_mode == "fields" and io_grid == "fixed" else pair)
    report(progress, "preprocessing", 1.0)
    with timer("network"), _memory_errors_as_user_errors(loaded.device):
        maps, history = _predict_and_optimise(pair, loaded, int(io_iterations), io_mode, io_similarity,
                                              io_learning_rate, progress, similarity_pair, flips, symmetric,
                                              refinements)
        io_similarity_shape = (list(similarity_pair.grid_B.shape)
                               if io_iterations and io_mode == "fields" else None)
        del similarity_pair
    # Φ − Id of both directions, once: QA and export sample these (trilinear, border), as evaluate_map does.
    displacement_AB, displacement_BA = map_to_displacement(maps).split(1)
    del maps
    fixed_field_grid = pair.grid_B if field_grid == "network" else Grid.of_image(fixed)
    moving_field_grid = pair.grid_A if field_grid == "network" else Grid.of_image(moving)
    with timer("qa"), torch.no_grad(), _memory_errors_as_user_errors(loaded.device, "quality-map"):
        forward_mm, jacobian, ic_error, quality = _fields_and_qa(displacement_AB, displacement_BA, pair,
                                                                 fixed_field_grid)
    for message in out_of_domain_warnings(quality, loaded.spec.name, loaded.spec.extra.get("validation"),
                                          loaded.spec.extra.get("use", "")):
        warnings.warn(message, UserWarning, stacklevel=2)
    report(progress, "quality maps", 1.0)
    with timer("export"), torch.no_grad(), _memory_errors_as_user_errors(loaded.device, "export"):
        forward_field, inverse_field, inverse_report = _export_fields(
            forward_mm, displacement_BA, pair, fixed_field_grid, moving_field_grid, exact_inverse, inverse_qa)
        warped, jacobian_image, ic_image = _export_images(inputs, displacement_AB, pair, fixed, moving, jacobian,
                                                          ic_error, fixed_field_grid)
    report(progress, "export", 1.0)

    timer.seconds["total"] = time.perf_counter() - start
    metrics = RegistrationMetrics(
        **dataclasses.asdict(quality), model=loaded.spec.name, weights_sha256=loaded.weights_sha256,
        weights_file=str(loaded.weights_path) if loaded.weights_path else None,
        device=device_description(loaded.device), network_shape=list(pair.grid_B.shape), field_grid=field_grid,
        fixed_modality=inputs.fixed_modality, moving_modality=inputs.moving_modality,
        io_iterations=int(io_iterations), io_mode=io_mode if io_iterations else None, io_objective=history,
        io_similarity_shape=io_similarity_shape, flips=list(flips), symmetric=symmetric,
        refinements=refinements, inverse=inverse_report, seconds={k: round(v, 4) for k, v in timer.seconds.items()})
    return RegistrationResult(forward_field, inverse_field, warped, jacobian_image, ic_image, metrics)


def _check_flips(flips: Optional[Sequence[int]], io_iterations: int, io_mode: str) -> Optional[list[int]]:
    """``flips`` as a sorted list of distinct axes 0–2 (``None`` stays ``None``: the model decides)."""
    if flips is None:
        return None
    axes = list(flips) if isinstance(flips, (list, tuple)) else None
    if axes is None or any(isinstance(a, bool) or not isinstance(a, int) for a in axes) or not are_flip_axes(axes):
        raise UserError(f"flips must be a list of distinct tensor axes 0, 1, 2 of the network grid, not {flips!r}.")
    if axes and io_iterations and io_mode == "weights":
        raise UserError("flips average the network's predictions; instance optimisation in the 'weights' mode "
                        "replaces them by the fine-tuned network's, so use flips=[] or io_mode='fields'.")
    return sorted(axes)


def _check_refinements(refinements: Optional[int], io_iterations: int, io_mode: str) -> None:
    """``refinements`` is ``None`` (the model decides) or a whole number 0…:data:`MAX_REFINEMENTS`."""
    if refinements is None:
        return
    if (isinstance(refinements, bool) or not isinstance(refinements, int)
            or not 0 <= refinements <= MAX_REFINEMENTS):
        raise UserError(f"refinements must be a whole number from 0 to {MAX_REFINEMENTS}, not {refinements!r}.")
    if refinements and io_iterations and io_mode == "weights":
        raise UserError("refinements apply the network again to its own result; instance optimisation in the "
                        "'weights' mode replaces that by the fine-tuned network's, so use refinements=0 or "
                        "io_mode='fields'.")


# ----- the stages of register(); each checks its output --------------------------------------------------------

@dataclasses.dataclass
class _Inputs:
    """Checked inputs: voxels ``[z, y, x]`` float32, masks (binary float32) and resolved modalities."""

    fixed_voxels: np.ndarray
    moving_voxels: np.ndarray
    fixed_mask: Optional[np.ndarray]
    moving_mask: Optional[np.ndarray]
    fixed_modality: str
    moving_modality: str


@dataclasses.dataclass
class _NetworkPair:
    """Both images (and masks) on their network grids ``[1, 1, *S]``, and those grids (B over fixed, A over
    moving)."""

    image_A: torch.Tensor
    image_B: torch.Tensor
    mask_A: Optional[torch.Tensor]
    mask_B: Optional[torch.Tensor]
    grid_A: Grid
    grid_B: Grid


def _check_inputs(fixed, moving, fixed_mask, moving_mask, fixed_modality, moving_modality) -> _Inputs:
    """Stage 0: every input is a usable 3-D scalar image (finite, non-constant), masks overlap their images."""
    fixed_voxels = image_array(fixed, "fixed")
    moving_voxels = image_array(moving, "moving")
    return _Inputs(fixed_voxels, moving_voxels,
                   mask_array(fixed_mask, fixed, "fixed") if fixed_mask is not None else None,
                   mask_array(moving_mask, moving, "moving") if moving_mask is not None else None,
                   check_modality(fixed_modality, fixed_voxels, "fixed"),
                   check_modality(moving_modality, moving_voxels, "moving"))


def _prepare(inputs: _Inputs, fixed: sitk.Image, moving: sitk.Image, loaded: LoadedModel) -> _NetworkPair:
    """Stage 1 (prepare): intensities normalised by the model's rules, both images on their network grids (the
    moving grid's axes matched to the fixed one's). Checked: finite network inputs."""
    grid_B = Grid.over_image(fixed, loaded.spec.input_shape)
    grid_A = Grid.over_image(moving, loaded.spec.input_shape, align_to=grid_B)
    return _images_on_grids(inputs, grid_A, grid_B, loaded)


def _mask_on_grid(mask: np.ndarray, grid: Grid, device, role: str) -> torch.Tensor:
    """A binary mask on ``grid``: the voxels whose centre the trilinearly resampled mask covers at least half.
    (Every voxel with any interpolation weight used to count as inside, growing the mask by up to one voxel.)"""
    inside = grid.to_network(mask, device) >= 0.5
    if not bool(inside.any()):
        raise UserError(f"The {role} mask covers no voxel of the {'×'.join(map(str, grid.shape))} grid the "
                        "similarity is computed on; use a larger mask, or none.")
    return inside.float()


def _images_on_grids(inputs: _Inputs, grid_A: Grid, grid_B: Grid, loaded: LoadedModel) -> _NetworkPair:
    """Both normalised images (and masks) resampled onto ``grid_A`` (over moving) and ``grid_B`` (over fixed)."""
    rules, device = loaded.spec.preprocessing, loaded.device
    # One after the other, in this thread: normalising in worker threads was 0.05 s faster at 175³, but glibc
    # keeps their large freed temporaries in per-thread arenas the network cannot reuse (+0.3 GB peak memory).
    image_B = grid_B.to_network(normalize_intensities(inputs.fixed_voxels, inputs.fixed_modality, rules,
                                                      inputs.fixed_mask, "fixed"), device)
    image_A = grid_A.to_network(normalize_intensities(inputs.moving_voxels, inputs.moving_modality, rules,
                                                      inputs.moving_mask, "moving"), device)
    mask_B = _mask_on_grid(inputs.fixed_mask, grid_B, device, "fixed") if inputs.fixed_mask is not None else None
    mask_A = _mask_on_grid(inputs.moving_mask, grid_A, device, "moving") if inputs.moving_mask is not None else None
    for role, tensor in (("fixed", image_B), ("moving", image_A)):
        require_finite(tensor, f"intensity normalisation of the {role} image",
                       f"the {role} image's intensities cannot be scaled; convert it to a normal intensity range")
    return _NetworkPair(image_A, image_B, mask_A, mask_B, grid_A, grid_B)


def similarity_grid_shape(fixed: sitk.Image, network_grid: Grid) -> tuple[int, int, int]:
    """The ``io_grid="fixed"`` similarity grid: along each axis of ``network_grid`` (placed over ``fixed``) as
    many voxels as ``fixed`` has along that axis, but at least the network grid's and at most
    ``IO_GRID_MAX_REFINEMENT`` times as many."""
    image_shape = fixed.GetSize()[::-1]  # tensor order
    return tuple(int(min(max(image_shape[axis], n), IO_GRID_MAX_REFINEMENT * n))
                 for axis, n in zip(network_grid.source_axes, network_grid.shape))


def _similarity_pair(inputs: _Inputs, fixed: sitk.Image, moving: sitk.Image, pair: _NetworkPair,
                     loaded: LoadedModel) -> _NetworkPair:
    """Stage 1b (``io_grid="fixed"``): both images on the similarity grids over the same boxes as the network
    grids (:func:`similarity_grid_shape`); the network pair itself when those are the network grids."""
    shape = similarity_grid_shape(fixed, pair.grid_B)
    if shape == pair.grid_B.shape:
        return pair
    grid_B = Grid.over_image(fixed, list(shape))
    grid_A = Grid.over_image(moving, list(shape), align_to=grid_B)
    if (grid_A.source_axes, grid_A.flipped) != (pair.grid_A.source_axes, pair.grid_A.flipped):
        raise AssertionError("the similarity grid's axes differ from the network grid's")  # a bug, not a user error
    return _images_on_grids(inputs, grid_A, grid_B, loaded)


def _predict_and_optimise(pair: _NetworkPair, loaded: LoadedModel, io_iterations: int, io_mode: str,
                          io_similarity: Optional[str], io_learning_rate: Optional[float],
                          progress: Optional[ProgressCallback], similarity_pair: Optional[_NetworkPair] = None,
                          flips: Sequence[int] = (), symmetric: bool = False, refinements: int = 0
                          ) -> tuple[torch.Tensor, list[float]]:
    """Stages 2–3 (predict, optimise): ``[Φ_AB; Φ_BA]`` on the fixed network grid (averaged over ``flips``,
    made consistent by :func:`_symmetrize` when ``symmetric``) and
    the instance-optimisation objective per step; the field mode compares the images of ``similarity_pair``
    (default ``pair``: the network grids). Checked: finite maps (the message blames the weights, or the
    optimisation's divergence)."""
    spec, device = loaded.spec, loaded.device
    history: list[float] = []
    if io_iterations and io_mode == "weights":
        similarity = make_similarity(**({"name": io_similarity} if io_similarity else spec.similarity))
        transform, history = optimize_instance(
            loaded.net, pair.image_A, pair.image_B, iterations=io_iterations, similarity=similarity,
            lmbda=spec.lmbda, penalty=spec.penalty, learning_rate=io_learning_rate or WEIGHTS_LEARNING_RATE,
            mask_A=pair.mask_A, mask_B=pair.mask_B, progress=progress)
        with torch.no_grad():
            maps = transform(identity_map(pair.grid_B.shape, device=device))  # [Φ_AB; Φ_BA]
            if symmetric:
                maps = _symmetrize(maps)
    else:
        report(progress, "network", 0.0)
        maps = _predict_both_directions(loaded.net, pair.image_A, pair.image_B, progress, flips, refinements)
        if symmetric or not io_iterations:  # the network's own output (the QA stage checks what follows)
            require_finite(maps, "network", f"the weights of '{spec.name}' are damaged or do not fit the model "
                           "(reinstall them), or the inputs are not images this model was trained for")
        if symmetric:
            maps = _symmetrize(maps)
        report(progress, "network", 1.0)  # once, before instance optimisation starts its own stage
        if not io_iterations:
            return maps, history
        similarity = make_similarity(**({"name": io_similarity} if io_similarity else spec.similarity))
        images = similarity_pair or pair
        maps, history = optimize_fields(maps, images.image_A, images.image_B, iterations=io_iterations,
                                        similarity=similarity, lmbda=spec.lmbda, mask_A=images.mask_A,
                                        mask_B=images.mask_B, learning_rate=io_learning_rate or FIELD_LEARNING_RATE,
                                        progress=progress)
    require_finite(maps, f"instance optimisation ({io_mode})",
                   "it diverged: use fewer iterations or a smaller io_learning_rate, or check the network's own "
                   "prediction without instance optimisation")
    return maps, history


def _symmetrize(maps: torch.Tensor) -> torch.Tensor:
    """``[Φ_AB; Φ_BA]`` → each the mean of itself and the inverse of the other
    (:func:`~ICONRegistrationLib.core.inversion.symmetrize_displacements`). An inversion that stops short of its
    tolerance is warned about (:class:`InversionWarning`); a direction that folds at a few points still inverts
    elsewhere, and the result's own folds and IC error are in the QA maps and metrics."""
    with torch.no_grad():
        symmetric, reports = symmetrize_maps(maps)
    for direction, inversion in zip(("Φ_AB", "Φ_BA"), reports):
        if not inversion.converged:
            warnings.warn(f"Symmetric prediction: the network's {direction} was inverted only to "
                          f"{inversion.max_error_voxels:.3g} network voxels after {inversion.iterations} steps "
                          "(it may fold there); the symmetric result is approximate (see the IC-error map).",
                          InversionWarning, stacklevel=3)
    return symmetric


def _fields_and_qa(displacement_AB: torch.Tensor, displacement_BA: torch.Tensor, pair: _NetworkPair,
                   field_grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QualitySummary]:
    """Stage 4 (fields, QA): the forward displacement (mm), its Jacobian and the IC error (mm) on ``field_grid``,
    and their summary. Checked: all finite."""
    forward_mm, jacobian, ic_error, outside = _sample_fields(displacement_AB, displacement_BA, pair.grid_B,
                                                             pair.grid_A, field_grid)
    for name, tensor in (("forward field", forward_mm), ("Jacobian map", jacobian),
                         ("inverse-consistency map", ic_error)):
        require_finite(tensor, f"quality-map stage ({name})", "this is a bug: please report it with the inputs")
    quality = summarize_quality(jacobian.cpu().numpy(), ic_error.cpu().numpy(), outside.cpu().numpy())
    if quality.ic_outside_percent > IC_OUTSIDE_WARNING_PERCENT:
        warnings.warn("The fields of view differ: where the fixed image's field maps outside the moving image's box "
                      "the transform is extrapolated, and the IC error there measures that, not the registration"
                      f"{quality.overlap_note(3)}.", UserWarning, stacklevel=3)
    return forward_mm, jacobian, ic_error, quality


def _export_fields(forward_mm: torch.Tensor, displacement_BA: torch.Tensor, pair: _NetworkPair,
                   fixed_field_grid: Grid, moving_field_grid: Grid, exact_inverse: bool, inverse_qa: bool
                   ) -> tuple[sitk.Image, sitk.Image, InverseReport]:
    """Stage 5a (export): forward and inverse fields as SimpleITK images, and how the inverse was made. Checked:
    a finite inverse."""
    forward_field = _field_image(forward_mm, fixed_field_grid)
    if exact_inverse:
        inverse_field, inverse_report = _exact_inverse(forward_field, moving_field_grid)
        require_finite(sitk.GetArrayFromImage(inverse_field), "exact inverse",
                       "this is a bug: please report it with the inputs")
    else:
        inverse_mm, _, _, _ = _sample_fields(displacement_BA, None, pair.grid_A, pair.grid_B, moving_field_grid,
                                          with_jacobian=False)
        require_finite(inverse_mm, "inverse field", "this is a bug: please report it with the inputs")
        inverse_field = _field_image(inverse_mm, moving_field_grid)
        inverse_report = InverseReport("network")
    if inverse_qa:
        inverse_values = sitk.GetArrayFromImage(field_jacobian(inverse_field))
        inverse_folds = int((inverse_values <= 0).sum())
        inverse_report.folds = inverse_folds
        inverse_report.folds_percent = 100.0 * inverse_folds / inverse_values.size
        inverse_report.jacobian_min = float(inverse_values.min())
    return forward_field, inverse_field, inverse_report


def _export_images(inputs: _Inputs, displacement_AB: torch.Tensor, pair: _NetworkPair, fixed: sitk.Image,
                   moving: sitk.Image, jacobian: torch.Tensor, ic_error: torch.Tensor, field_grid: Grid
                   ) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Stage 5b (export): the warped moving image on the fixed image's grid, the Jacobian and IC-error maps.
    Checked: a finite warped image."""
    fixed_grid = Grid.of_image(fixed)
    warped_voxels = _warp_moving(inputs.moving_voxels, displacement_AB, pair.grid_B, pair.grid_A, fixed_grid,
                                 Grid.of_image(moving))
    require_finite(warped_voxels, "warped-image stage", "this is a bug: please report it with the inputs")
    warped = fixed_grid.apply_to(sitk.GetImageFromArray(warped_voxels))
    return warped, _scalar_image(jacobian, field_grid), _scalar_image(ic_error, field_grid)
