"""Coordinate maps on the network grid.

Convention (the icon_registration one, so official checkpoints load unchanged):

* A *map* is a tensor ``[B, d, *S]`` of coordinates in ``[0, 1]`` whose channel ``c`` is the coordinate
  along tensor axis ``2 + c`` (``(z, y, x)`` for a ``[B, C, D, H, W]`` volume). Voxel ``i`` of an axis with
  ``N`` voxels sits at ``i / (N - 1)``.
* A map ``Φ_AB`` satisfies ``I_A ∘ Φ_AB ≈ I_B``: it takes fixed-image (B) coordinates to moving-image (A)
  coordinates, the resampling direction of ITK.
* Images are sampled at coordinates trilinearly with ``grid_sample(align_corners=True)`` semantics.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import native_sampler

_IDENTITY_TAG = "is_identity_grid"


def identity_map(shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The identity map ``[1, d, *shape]`` with voxel centres at ``i / (N - 1)``.

    The returned tensor is tagged so that a displacement-field transform evaluated on exactly this grid
    can add its displacements without interpolating (the same values, computed faster).
    """
    shape = [int(n) for n in shape]
    axes = []
    for n in shape:
        step = torch.tensor(1.0 / (n - 1) if n > 1 else 0.0, dtype=dtype)
        axes.append(torch.arange(n, dtype=dtype) * step)
    grids = torch.meshgrid(*axes, indexing="ij")
    result = torch.stack(grids, dim=0)[None].to(device)
    return mark_identity(result)


def mark_identity(coordinates: torch.Tensor) -> torch.Tensor:
    """Tag ``coordinates`` as an identity grid (see :func:`is_identity`)."""
    setattr(coordinates, _IDENTITY_TAG, coordinates._version)
    return coordinates


def is_identity(coordinates: torch.Tensor) -> bool:
    """Whether ``coordinates`` is an unmodified grid from :func:`identity_map` (a tag, not a numerical test).

    The tag remembers the tensor's version counter, so an in-place change (``grid += 0.1``) clears it.
    """
    version = getattr(coordinates, _IDENTITY_TAG, None)
    return version is not None and version == coordinates._version


def sample_at(image: torch.Tensor, coordinates: torch.Tensor, *, padding: str = "border",
         mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` ``[B, C, *S]`` at ``coordinates`` ``[B', d, *T]`` (map convention above).

    ``padding`` is ``"border"`` (repeat edge values) or ``"zeros"``; ``mode`` is ``"bilinear"``
    (trilinear in 3-D) or ``"nearest"``. A batch of 1 on either side is broadcast to the other.
    Returns ``[max(B, B'), C, *T]``.
    """
    if native_sampler.eligible(image, coordinates, mode, padding):  # compiled CPU sampler, same numbers
        return native_sampler.sample(image, coordinates, padding)
    grid = grid_sample_grid(coordinates)
    if grid.shape[0] == 1 and image.shape[0] > 1:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    elif image.shape[0] == 1 and grid.shape[0] > 1:
        image = image.expand(grid.shape[0], *image.shape[1:])
    if grid.dtype != image.dtype:
        grid = grid.to(image.dtype)
    chunks = _sampling_chunks(image, grid)
    if chunks > 1:
        return _grid_sample_in_chunks(image, grid, chunks, mode=mode, padding=padding)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def grid_sample_grid(coordinates: torch.Tensor) -> torch.Tensor:
    """``grid_sample``'s grid for ``coordinates`` ``[B, d, *T]``: the last axis ordered (x, y, z), in [−1, 1]
    (``align_corners=True``): our (z, y, x) channels, reversed, stacked last (one contiguous copy), then 2c − 1.
    The compiled sampler forms the same values (``core/native_sampler.py``)."""
    dimension = coordinates.shape[1]
    return torch.stack([coordinates[:, c] for c in reversed(range(dimension))], dim=-1).mul_(2.0).sub_(1.0)


_MIN_POINTS_PER_CHUNK = 1 << 14


def _sampling_chunks(image: torch.Tensor, grid: torch.Tensor) -> int:
    """How many pieces to cut a batch-1 CPU sampling into: PyTorch's CPU ``grid_sample`` (forward and backward)
    runs one thread per batch element, so a single large sampling would use one core only."""
    if image.device.type != "cpu" or image.shape[0] != 1 or grid.shape[0] != 1:
        return 1
    points = grid[0, ..., 0].numel()
    return max(1, min(torch.get_num_threads(), points // _MIN_POINTS_PER_CHUNK))


def _grid_sample_in_chunks(image: torch.Tensor, grid: torch.Tensor, chunks: int, *, mode: str,
                           padding: str) -> torch.Tensor:
    """``grid_sample`` of a batch-1 image at a batch-1 grid as ``chunks`` batch elements (same values).

    The points are cut into equal pieces (the last one padded by repeating points) and the image is
    broadcast to them without a copy, so each thread samples one piece; the gradient of the image sums the
    pieces' contributions.
    """
    dimension = grid.shape[-1]
    out_shape = grid.shape[1:-1]
    points = grid.reshape(-1, dimension)
    total = points.shape[0]
    padded = -(-total // chunks) * chunks
    if padded != total:
        points = torch.cat([points, points[:padded - total]])
    pieces = points.reshape(chunks, padded // chunks, *[1] * (dimension - 1), dimension)
    sampled = F.grid_sample(image.expand(chunks, *image.shape[1:]), pieces, mode=mode, padding_mode=padding,
                            align_corners=True)  # [chunks, C, P, 1, …]
    channels = image.shape[1]
    flat = sampled.reshape(chunks, channels, -1).transpose(0, 1).reshape(channels, padded)[:, :total]
    return flat.reshape(1, channels, *out_shape)


def voxel_scale(shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Voxels per unit-cube unit along each axis, ``N − 1`` (1 for single-voxel axes), shaped ``[1, d, 1, …]`` so
    that ``map_units * voxel_scale(shape)`` is in voxels."""
    sizes = [max(int(n) - 1, 1) for n in shape]
    return torch.tensor(sizes, dtype=dtype, device=device).view(1, len(sizes), *[1] * len(sizes))


def vector_length(field: torch.Tensor) -> torch.Tensor:
    """Euclidean length over the channel axis: ``[B, C, *S]`` → ``[B, *S]`` (a new tensor).

    Summed channel by channel: ``Tensor.norm(dim=1)`` takes a slow strided path on a CPU (65 ms against 1 ms for
    3×80×96×80 on one core).
    """
    squared = field[:, 0].square()
    for channel in range(1, field.shape[1]):
        squared.addcmul_(field[:, channel], field[:, channel])
    return squared.sqrt_()


def resample_displacement(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A unit-cube displacement ``[B, d, *S]`` evaluated on another grid of the same cube (trilinear, border)."""
    if tuple(displacement.shape[2:]) == tuple(shape):
        return displacement
    return sample_at(displacement, identity_map(shape, dtype=displacement.dtype, device=displacement.device))


def box_resample_displacement(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Φ − Id given on grids ``S`` as Φ − Id on grids of shape ``shape`` over the same physical boxes.

    Unlike :func:`resample_displacement` (two grids of one unit cube), the grids here are placed as
    ``Grid.over_image`` places a network grid: voxel ``i`` of ``N`` at ``(i + 0.5) / N`` of the box along each
    axis, so a finer grid's corner voxels lie inside the coarse grid's. ``displacement`` ``[B, d, *S]`` takes
    points of a box-S grid (unit-cube units of S) to points of another box-S grid; the result ``[B, d, *shape]``
    does the same between the two boxes' ``shape`` grids, in their unit-cube units. Trilinear (``interpolate``
    with ``align_corners=False`` is exactly this placement), edge values continued as ``sample_at``'s border
    padding does. Differentiable.
    """
    shape = tuple(int(n) for n in shape)
    source = tuple(displacement.shape[2:])
    if source == shape:
        return displacement
    if len(shape) != len(source):
        raise ValueError(f"shape {shape} has {len(shape)} axes, the displacement {len(source)}")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    resized = F.interpolate(displacement, size=shape, mode=mode, align_corners=False)
    # A unit-cube step of S is (N_S − 1) voxels of S = (N_S − 1)·N_T / N_S voxels of T = that / (N_T − 1) units of T.
    factors = [(s - 1) * t / (s * (t - 1)) if s > 1 and t > 1 else 1.0 for s, t in zip(source, shape)]
    return resized * torch.tensor(factors, dtype=resized.dtype, device=resized.device).view(
        1, len(shape), *[1] * len(shape))


def map_to_displacement(coordinate_map: torch.Tensor) -> torch.Tensor:
    """``Φ − Id`` on the map's own grid (units of the map: the unit cube)."""
    return coordinate_map - identity_map(coordinate_map.shape[2:], dtype=coordinate_map.dtype,
                                         device=coordinate_map.device)


def displacement_to_map(displacement: torch.Tensor) -> torch.Tensor:
    """``Id + u`` for a displacement ``u`` on its own grid."""
    return displacement + identity_map(displacement.shape[2:], dtype=displacement.dtype,
                                       device=displacement.device)


def evaluate_map(coordinate_map: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Evaluate the transform that ``coordinate_map`` samples on its grid at arbitrary ``coordinates``.

    The displacement is interpolated trilinearly with border padding, so outside the grid the edge
    displacement continues (as icon_registration does).
    """
    if is_identity(coordinates) and coordinates.shape[2:] == coordinate_map.shape[2:]:
        return coordinate_map.expand(max(coordinate_map.shape[0], coordinates.shape[0]), *coordinate_map.shape[1:])
    return coordinates + sample_at(map_to_displacement(coordinate_map), coordinates, padding="border")


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Sampled maps ``outer ∘ inner`` on ``inner``'s grid: ``(outer ∘ inner)(x) = outer(inner(x))``."""
    return evaluate_map(outer, inner)


def _finite_difference(field: torch.Tensor, axis: int) -> torch.Tensor:
    """Derivative along tensor ``axis`` per index step: central inside, one-sided at the two ends. Differentiable
    when ``field`` needs a gradient (the same numbers; otherwise written into one buffer)."""
    n = field.shape[axis]
    if n >= 2 and field.requires_grad and torch.is_grad_enabled():
        parts = [field.narrow(axis, 1, 1) - field.narrow(axis, 0, 1)]
        if n > 2:
            parts.append((field.narrow(axis, 2, n - 2) - field.narrow(axis, 0, n - 2)) * 0.5)
        parts.append(field.narrow(axis, n - 1, 1) - field.narrow(axis, n - 2, 1))
        return torch.cat(parts, dim=axis)
    out = torch.empty_like(field)
    if n < 2:
        return out.zero_()
    torch.sub(field.narrow(axis, 1, 1), field.narrow(axis, 0, 1), out=out.narrow(axis, 0, 1))
    torch.sub(field.narrow(axis, n - 1, 1), field.narrow(axis, n - 2, 1), out=out.narrow(axis, n - 1, 1))
    if n > 2:
        middle = out.narrow(axis, 1, n - 2)
        torch.sub(field.narrow(axis, 2, n - 2), field.narrow(axis, 0, n - 2), out=middle)
        middle.mul_(0.5)
    return out


def jacobian_matrix(positions: torch.Tensor) -> torch.Tensor:
    """∂positions/∂index: ``[B, d, d, *S]`` with entry ``[:, r, c]`` = ∂position_r / ∂(index along axis c)."""
    dimension = positions.shape[1]
    columns = [_finite_difference(positions, 2 + axis) for axis in range(dimension)]
    return torch.stack(columns, dim=2)


def _determinant(matrices: torch.Tensor) -> torch.Tensor:
    """Determinant over dims 1, 2 of ``[B, d, d, *S]`` (closed form; avoids a batched LU per voxel)."""
    m = matrices
    if m.shape[1] == 2:
        return m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    if m.shape[1] == 3:
        return _determinant_of_columns(m[:, :, 0], m[:, :, 1], m[:, :, 2])
    return m[:, 0, 0]


def _determinant_of_columns(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """det[a b c] = a · (b × c) per voxel, for column vectors ``[B, 3, *S]``; few full-size temporaries."""
    determinant = a[:, 0] * (b[:, 1] * c[:, 2]).sub_(b[:, 2] * c[:, 1])
    determinant.sub_(a[:, 1] * (b[:, 0] * c[:, 2]).sub_(b[:, 2] * c[:, 0]))
    return determinant.add_(a[:, 2] * (b[:, 0] * c[:, 1]).sub_(b[:, 1] * c[:, 0]))


def jacobian_determinant(positions: torch.Tensor, grid_matrix: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Jacobian determinant ``[B, 1, *S]`` of the transform whose values on a grid are ``positions``.

    ``positions`` ``[B, d, *S]`` holds the transformed position of every grid point (any unit, e.g. a map in
    the unit cube or physical millimetres). ``grid_matrix`` relates index steps to the same unit: a ``d×d``
    matrix whose column ``c`` is the displacement of one index step along tensor axis ``c`` (for an
    axis-aligned grid, ``diag(spacing)``; a sequence is read as that diagonal). ``None`` means the unit-cube
    map convention, ``diag(1 / (N - 1))``. The result is unitless: 1 means volume preserved, ≤ 0 a fold.
    Derivatives are central differences inside and one-sided at the grid's faces.
    """
    dimension = positions.shape[1]
    shape = positions.shape[2:]
    if grid_matrix is None:
        grid_matrix = [1.0 / (n - 1) if n > 1 else 1.0 for n in shape]
    grid_matrix = torch.as_tensor(grid_matrix, dtype=torch.float64)
    if grid_matrix.ndim == 1:
        grid_matrix = torch.diag(grid_matrix)
    scale = float(torch.det(grid_matrix))
    det = _determinant(jacobian_matrix(positions))
    return (det / scale)[:, None] if dimension > 0 else det


def displacement_jacobian_determinant(displacement: torch.Tensor,
                                      grid_matrix: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Jacobian determinant ``[B, 1, *S]`` of ``x ↦ x + u(x)`` from the displacement ``u`` ``[B, 3, *S]``.

    Same meaning as :func:`jacobian_determinant` on ``positions = grid points + u``, computed as
    ``det(I + ∂u/∂index · G⁻¹)`` with ``G = grid_matrix``: differentiating the small displacement instead of
    the absolute positions keeps full accuracy in float32 (positions in mm lose digits to their magnitude).
    3-D only.
    """
    grid_matrix = torch.as_tensor(grid_matrix, dtype=torch.float64)
    if grid_matrix.ndim == 1:
        grid_matrix = torch.diag(grid_matrix)
    inverse_matrix = torch.linalg.inv(grid_matrix)
    if (displacement.dtype == torch.float32 and displacement.dim() == 5 and displacement.shape[1] == 3
            and not (displacement.requires_grad and torch.is_grad_enabled())
            and native_sampler.kernels_eligible(displacement)):
        return native_sampler.displacement_jacobian(displacement, inverse_matrix)  # one pass: 81 → 28 ms at 175³
    inverse = inverse_matrix.tolist()
    derivatives = [_finite_difference(displacement, 2 + axis) for axis in range(3)]  # ∂u/∂index_k
    columns = []
    for s in range(3):  # column s of I + (∂u/∂index) G⁻¹, built in place to limit full-size temporaries
        column = derivatives[0] * inverse[0][s]
        column.add_(derivatives[1], alpha=inverse[1][s]).add_(derivatives[2], alpha=inverse[2][s])
        column[:, s] += 1
        columns.append(column)
    del derivatives
    return _determinant_of_columns(*columns)[:, None]


def fold_count(jacobian_det: torch.Tensor) -> int:
    """Number of grid points whose Jacobian determinant is ≤ 0 (the transform folds there)."""
    return int((jacobian_det <= 0).sum().item())
