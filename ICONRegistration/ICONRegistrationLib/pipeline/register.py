"""``register(fixed, moving, model)``: SimpleITK images in, displacement fields, warped image and QA maps out.

Directions: ``Φ_AB`` (A = moving, B = fixed) maps fixed points to moving points, the resampling direction of
ITK, elastix and ANTs (a "from parent" transform in Slicer). The forward field is ``Φ_AB(x) − x`` in LPS mm on
an oriented grid over the fixed image; the inverse field is ``Φ_BA(y) − y`` on a grid over the moving image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..core.coordinates import evaluate_map, identity_map, warp as sample_at
from ..core.losses import make_similarity
from ..device import device_description
from ..errors import UserError
from ..models.spec import ModelSpec
from ..models.weights import LoadedModel, load_model
from ..models.zoo import DEFAULT_MODEL
from ..progress import ProgressCallback, report
from .grid import Grid
from .images import image_array, mask_array
from .instance_optimization import optimize_instance
from .preprocessing import check_modality, normalize_intensities
from .qa import physical_jacobian, summarize

FIELD_GRIDS = ("network", "fixed")
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
    * ``metrics``: folds, Jacobian and IC-error statistics, seconds per stage, device, model, weight sha256.
    """

    forward_field: sitk.Image
    inverse_field: sitk.Image
    warped: sitk.Image
    jacobian: sitk.Image
    ic_error: sitk.Image
    metrics: dict

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


@contextlib.contextmanager
def _memory_errors_as_user_errors(device: torch.device) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise UserError(f"Out of memory on {device.type} while running the network; close other GPU programs, "
                        "use device 'cpu', or use fewer instance-optimisation iterations.") from None


def _field_image(displacement_mm: torch.Tensor, grid: Grid) -> sitk.Image:
    """``[1, 3 (x, y, z), D, H, W]`` displacement → sitk vector float64 image on ``grid``."""
    array = displacement_mm[0].permute(1, 2, 3, 0).detach().cpu().double().numpy()
    return grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=True))


def _scalar_image(values: torch.Tensor, grid: Grid) -> sitk.Image:
    return grid.apply_to(sitk.GetImageFromArray(values.reshape(grid.shape).detach().cpu().float().numpy()))


def _sample_fields(phi_outer: torch.Tensor, phi_back: torch.Tensor, own: Grid, other: Grid,
                   field_grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Displacement (mm), Jacobian and IC error (mm) of Φ = ``phi_outer`` on ``field_grid``.

    ``phi_outer`` maps ``own``'s unit cube to ``other``'s; ``phi_back`` the reverse (both sampled maps).
    """
    if field_grid == own:
        where = identity_map(own.shape, device=phi_outer.device)
    else:
        where = own.unit_coordinates_of(field_grid, device=phi_outer.device)
    mapped = evaluate_map(phi_outer, where)
    positions = other.unit_to_physical(mapped)
    points = own.unit_to_physical(where)
    round_trip = evaluate_map(phi_back, mapped)
    unit_matrix = torch.as_tensor(own.unit_matrix, dtype=where.dtype, device=where.device)
    ic_error = torch.einsum("rc,bc...->br...", unit_matrix, round_trip - where).norm(dim=1)
    jacobian = physical_jacobian(positions, field_grid.index_matrix)
    return positions - points, jacobian, ic_error


def _warp_moving(moving: np.ndarray, phi_AB: torch.Tensor, grid_B: Grid, grid_A: Grid, fixed_grid: Grid,
                 moving_grid: Grid) -> np.ndarray:
    """The moving image (original intensities) resampled through Φ_AB on the fixed image's own grid."""
    device = phi_AB.device
    moving_tensor = torch.as_tensor(moving, device=device)[None, None]
    out = np.empty(fixed_grid.shape, dtype=np.float32)
    rows = max(1, _SLAB_VOXELS // (fixed_grid.shape[1] * fixed_grid.shape[2]))
    for start in range(0, fixed_grid.shape[0], rows):
        slab = slice(start, min(start + rows, fixed_grid.shape[0]))
        where = grid_B.unit_coordinates_of(fixed_grid, device=device, slab=slab)
        positions = grid_A.unit_to_physical(evaluate_map(phi_AB, where))
        unit = moving_grid.physical_to_unit(positions)
        values = sample_at(moving_tensor, unit, padding="border")[0, 0]
        # ITK's rule: a point within half a voxel of the outer voxel centres is inside (edge value), else 0.
        extent = torch.as_tensor(moving_grid.shape, dtype=unit.dtype, device=device).view(1, 3, 1, 1, 1) - 1
        index = unit * extent
        inside = ((index >= -0.5) & (index <= extent + 0.5)).all(dim=1)[0]
        out[slab] = torch.where(inside, values, torch.zeros_like(values)).cpu().numpy()
    return out


def register(fixed: sitk.Image, moving: sitk.Image, model: "str | Path | ModelSpec | LoadedModel" = DEFAULT_MODEL, *,
             fixed_modality: Optional[str], moving_modality: Optional[str], fixed_mask: Optional[sitk.Image] = None,
             moving_mask: Optional[sitk.Image] = None, io_iterations: int = 0, io_similarity: Optional[str] = None,
             device: str = "auto", progress: Optional[ProgressCallback] = None, weights: "str | Path | None" = None,
             field_grid: str = "network", io_learning_rate: float = 2e-5,
             random_weights: bool = False) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a pretrained inverse-consistent network.

    Args:
        fixed, moving: 3-D scalar SimpleITK images of any geometry (oblique, flipped, anisotropic, any size).
        model: a zoo name (``iconreg models list``), a spec JSON path, a :class:`ModelSpec`, or a
            :class:`LoadedModel` from :func:`load_model` (reused as is: ``weights`` and ``device`` are ignored).
        fixed_modality, moving_modality: ``"ct"``, ``"mri"`` or ``"auto"`` (guessed from intensities).
        fixed_mask, moving_mask: optional label images; non-zero voxels are kept (input masking, and loss
            masking during instance optimisation).
        io_iterations: Adam steps of instance optimisation (0 = network prediction only).
        io_similarity: similarity for instance optimisation (default: the model's).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        progress: ``callback(stage, fraction)``; returning ``False`` cancels (raises ``Cancelled``).
        weights: a weights file overriding the model's.
        field_grid: ``"network"`` (the network grid over each image; default) or ``"fixed"`` (the fixed / moving
            images' own grids) for the fields and QA maps.
        random_weights: skip loading weights (architecture tests and benchmarks only).

    Raises:
        UserError: for inputs or settings a user can fix; nothing is written in that case.
    """
    fixed_voxels = image_array(fixed, "fixed")
    moving_voxels = image_array(moving, "moving")
    fixed_mask_voxels = mask_array(fixed_mask, fixed, "fixed") if fixed_mask is not None else None
    moving_mask_voxels = mask_array(moving_mask, moving, "moving") if moving_mask is not None else None
    fixed_modality = check_modality(fixed_modality, fixed_voxels, "fixed")
    moving_modality = check_modality(moving_modality, moving_voxels, "moving")
    if int(io_iterations) < 0:
        raise UserError("io_iterations must be 0 (no instance optimisation) or a positive number of steps.")
    if field_grid not in FIELD_GRIDS:
        raise UserError(f"field_grid must be one of {', '.join(FIELD_GRIDS)}, not '{field_grid}'.")

    timer = _StageTimer()
    start = time.perf_counter()
    with timer("load"):
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            loaded = load_model(model, weights, device=device, progress=progress, random_weights=random_weights)
    spec, torch_device = loaded.spec, loaded.device
    timer.device = torch_device
    similarity = make_similarity(**({"name": io_similarity} if io_similarity else spec.similarity))

    with timer("preprocessing"):
        rules = spec.preprocessing
        grid_B = Grid.over_image(fixed, spec.input_shape)
        grid_A = Grid.over_image(moving, spec.input_shape, align_to=grid_B)
        image_B = grid_B.to_network(normalize_intensities(fixed_voxels, fixed_modality, rules, fixed_mask_voxels,
                                                          "fixed"), torch_device)
        image_A = grid_A.to_network(normalize_intensities(moving_voxels, moving_modality, rules,
                                                          moving_mask_voxels, "moving"), torch_device)
        mask_B = grid_B.to_network(fixed_mask_voxels, torch_device) if fixed_mask_voxels is not None else None
        mask_A = grid_A.to_network(moving_mask_voxels, torch_device) if moving_mask_voxels is not None else None
    report(progress, "preprocessing", 1.0)

    history: list[float] = []
    with timer("network"), _memory_errors_as_user_errors(torch_device):
        if io_iterations:
            transform, history = optimize_instance(
                loaded.net, image_A, image_B, iterations=int(io_iterations), similarity=similarity,
                lmbda=spec.lmbda, learning_rate=io_learning_rate, mask_A=mask_A, mask_B=mask_B, progress=progress)
        else:
            report(progress, "network", 0.0)
            with torch.no_grad():
                transform = loaded.net(torch.cat([image_A, image_B]), torch.cat([image_B, image_A]))
        with torch.no_grad():
            maps = transform(identity_map(grid_B.shape, device=torch_device))  # [Φ_AB; Φ_BA]
    report(progress, "network", 1.0)
    phi_AB, phi_BA = maps[:1], maps[1:]

    with timer("qa"), torch.no_grad():
        fixed_field_grid = grid_B if field_grid == "network" else Grid.of_image(fixed)
        moving_field_grid = grid_A if field_grid == "network" else Grid.of_image(moving)
        forward_mm, jacobian, ic_error = _sample_fields(phi_AB, phi_BA, grid_B, grid_A, fixed_field_grid)
        inverse_mm, inverse_jacobian, inverse_ic = _sample_fields(phi_BA, phi_AB, grid_A, grid_B, moving_field_grid)
        jacobian_np, ic_np = jacobian.cpu().numpy(), ic_error.cpu().numpy()
        metrics = summarize(jacobian_np, ic_np)
        inverse_summary = summarize(inverse_jacobian.cpu().numpy(), inverse_ic.cpu().numpy())
    report(progress, "quality maps", 1.0)

    with timer("export"), torch.no_grad():
        forward_field = _field_image(forward_mm, fixed_field_grid)
        inverse_field = _field_image(inverse_mm, moving_field_grid)
        fixed_grid = Grid.of_image(fixed)
        warped_voxels = _warp_moving(moving_voxels, phi_AB, grid_B, grid_A, fixed_grid, Grid.of_image(moving))
        warped = fixed_grid.apply_to(sitk.GetImageFromArray(warped_voxels))
        jacobian_image = _scalar_image(jacobian, fixed_field_grid)
        ic_image = _scalar_image(ic_error, fixed_field_grid)
    report(progress, "export", 1.0)

    timer.seconds["total"] = time.perf_counter() - start
    metrics.update({
        "inverse": {k: inverse_summary[k] for k in ("folds", "folds_percent", "jacobian_min", "ic_error_mean_mm",
                                                    "ic_error_p95_mm", "ic_error_max_mm")},
        "model": spec.name,
        "weights_sha256": loaded.weights_sha256,
        "weights_file": str(loaded.weights_path) if loaded.weights_path else None,
        "device": device_description(torch_device),
        "network_shape": list(grid_B.shape),
        "field_grid": field_grid,
        "fixed_modality": fixed_modality,
        "moving_modality": moving_modality,
        "io_iterations": int(io_iterations),
        "io_objective": history,
        "seconds": {k: round(v, 4) for k, v in timer.seconds.items()},
    })
    return RegistrationResult(forward_field, inverse_field, warped, jacobian_image, ic_image, metrics)
