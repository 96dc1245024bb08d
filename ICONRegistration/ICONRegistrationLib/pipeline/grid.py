"""Oriented grids in physical (LPS, mm) space and the network grid placed over an image.

Placement of the network grid (the uniGradICON placement, generalised to any direction matrix):
the network grid covers exactly the image's physical box — from the outer face of its first voxel to
the outer face of its last voxel along each axis — with ``N`` voxels per axis, so its spacing is
``n·s / N`` (``n`` voxels of size ``s`` in the image). Its axes are the image's own axes; for the moving
image they are permuted and flipped to the image axes that best match the fixed image's axes, so that
both images reach the network in the same anatomical orientation even when one is stored flipped or
transposed. Resampling onto it is trilinear with ``align_corners=False`` (``F.interpolate``), exactly what
uniGradICON does when the orientations already agree.

Index and coordinate conventions:

* sitk axes ``(x, y, z)`` ↔ tensor axes ``(W, H, D)``; tensor / map channel ``c`` ↔ sitk axis ``2 − c``.
* ``unit_matrix @ u + origin`` is the physical point of unit-cube coordinates ``u`` (channels in tensor
  order, ``u = index / (N − 1)``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


def apply_affine(matrix: np.ndarray, offset: np.ndarray, coordinates: torch.Tensor) -> torch.Tensor:
    """``matrix @ c + offset`` for every vector ``c`` along axis 1 of ``coordinates`` ``[B, 3, *S]``."""
    m = torch.as_tensor(matrix, dtype=coordinates.dtype, device=coordinates.device)
    t = torch.as_tensor(offset, dtype=coordinates.dtype, device=coordinates.device)
    flat = coordinates.reshape(coordinates.shape[0], 3, -1)
    moved = torch.baddbmm(t.view(1, 3, 1).expand(flat.shape[0], 3, flat.shape[2]),
                          m.expand(flat.shape[0], 3, 3), flat)  # one BLAS pass: 1.6× faster than einsum + add
    return moved.view(coordinates.shape)


def add_linear_(target: torch.Tensor, matrix: np.ndarray, coordinates: torch.Tensor) -> torch.Tensor:
    """``target += matrix @ c`` in place for every vector ``c`` along axis 1 of ``coordinates`` ``[B, 3, *S]``
    (``target`` contiguous, same shape): one BLAS pass instead of :func:`apply_affine` and a subtraction."""
    m = torch.as_tensor(matrix, dtype=coordinates.dtype, device=coordinates.device)
    flat = target.view(target.shape[0], 3, -1)
    flat.baddbmm_(m.expand(flat.shape[0], 3, 3), coordinates.reshape(coordinates.shape[0], 3, -1))
    return target


@dataclasses.dataclass(frozen=True)
class Grid:
    """An oriented voxel grid: ``size``/``spacing`` in sitk axis order, ``direction`` columns = axes, LPS mm.

    ``source_axes`` and ``flipped`` (tensor order) say how the grid's axes derive from the image it was
    placed over: grid tensor axis ``t`` runs along image tensor axis ``source_axes[t]``, reversed if ``flipped[t]``.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...]
    origin: tuple[float, float, float]
    source_axes: tuple[int, int, int] = (0, 1, 2)
    flipped: tuple[bool, bool, bool] = (False, False, False)

    # ----- construction ---------------------------------------------------------------------------
    @classmethod
    def of_image(cls, image: sitk.Image) -> "Grid":
        """The image's own voxel grid."""
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        return cls(tuple(int(n) for n in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(map(tuple, direction)), tuple(float(o) for o in image.GetOrigin()))

    @classmethod
    def over_image(cls, image: sitk.Image, shape: Sequence[int], align_to: Optional["Grid"] = None) -> "Grid":
        """A grid of tensor shape ``shape`` ``(D, H, W)`` covering the image's physical box (see module doc).

        With ``align_to``, the grid's axes are the image axes (permuted, flipped) closest to ``align_to``'s.
        """
        own = cls.of_image(image)
        image_dir = own.matrix_direction
        size = np.array(own.size, dtype=float)
        spacing = np.array(own.spacing, dtype=float)
        # sitk-order permutation: grid axis j runs along image axis perm[j] with sign signs[j].
        perm, signs = (0, 1, 2), (1.0, 1.0, 1.0)
        if align_to is not None:
            target = align_to.matrix_direction
            best = -1.0
            for candidate in itertools.permutations(range(3)):
                score = sum(abs(float(target[:, j] @ image_dir[:, candidate[j]])) for j in range(3))
                if score > best + 1e-9:
                    best, perm = score, candidate
            signs = tuple(1.0 if float(target[:, j] @ image_dir[:, perm[j]]) >= 0 else -1.0 for j in range(3))
        network_size = np.array(list(shape)[::-1], dtype=float)  # sitk order
        extent = size[list(perm)] * spacing[list(perm)]
        grid_spacing = extent / network_size
        grid_dir = np.stack([signs[j] * image_dir[:, perm[j]] for j in range(3)], axis=1)
        corner = np.array(own.origin) - 0.5 * image_dir @ spacing  # outer corner at index −0.5
        for j in range(3):
            if signs[j] < 0:  # a reversed axis starts at the far face of the box
                corner = corner + image_dir[:, perm[j]] * size[perm[j]] * spacing[perm[j]]
        origin = corner + 0.5 * grid_dir @ grid_spacing
        # tensor-order bookkeeping for resampling arrays: tensor axis t = sitk axis 2 − t
        source_axes = tuple(2 - perm[2 - t] for t in range(3))
        flipped = tuple(signs[2 - t] < 0 for t in range(3))
        return cls(tuple(int(n) for n in network_size), tuple(float(s) for s in grid_spacing),
                   tuple(map(tuple, grid_dir)), tuple(float(o) for o in origin), source_axes, flipped)

    # ----- geometry ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Tensor shape ``(D, H, W)``."""
        return tuple(self.size[::-1])

    @property
    def matrix_direction(self) -> np.ndarray:
        return np.array(self.direction, dtype=float)

    @property
    def index_matrix(self) -> np.ndarray:
        """3×3: column ``c`` is the physical step (mm, LPS) of one voxel along tensor axis ``c``."""
        steps = self.matrix_direction * np.array(self.spacing)  # columns in sitk order
        return steps[:, ::-1].copy()

    @property
    def unit_matrix(self) -> np.ndarray:
        """3×3 mapping unit-cube coordinates (tensor order) to physical offsets from ``origin``."""
        return self.index_matrix * (np.array(self.shape, dtype=float) - 1)

    def unit_to_physical(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Physical points ``[B, 3 (x, y, z LPS), *S]`` of unit-cube coordinates ``[B, 3, *S]``."""
        return apply_affine(self.unit_matrix, np.array(self.origin), coordinates)

    def physical_to_unit(self, points: torch.Tensor) -> torch.Tensor:
        """Unit-cube coordinates (tensor order) of physical points ``[B, 3 (x, y, z LPS), *S]``."""
        inverse = np.linalg.inv(self.unit_matrix)
        return apply_affine(inverse, -inverse @ np.array(self.origin), points)

    def unit_affine_to(self, other: "Grid") -> tuple[np.ndarray, np.ndarray]:
        """``(M, t)`` with ``M @ u + t`` = ``other``'s unit-cube coordinates of this grid's unit coordinates ``u``."""
        to_other = np.linalg.inv(other.unit_matrix)
        return to_other @ self.unit_matrix, to_other @ (np.array(self.origin) - np.array(other.origin))

    def index_affine_of(self, other: "Grid") -> tuple[np.ndarray, np.ndarray]:
        """``(A, a)`` with ``A @ i + a`` = the unit-cube coordinates in *this* grid of ``other``'s voxel index ``i``
        (tensor order)."""
        to_self = np.linalg.inv(self.unit_matrix)
        return to_self @ other.index_matrix, to_self @ (np.array(other.origin) - np.array(self.origin))

    def unit_coordinates_of(self, other: "Grid", *, dtype=torch.float32, device=None,
                            slab: Optional[slice] = None) -> torch.Tensor:
        """Unit-cube coordinates in *this* grid of the voxel centres of ``other`` (``[1, 3, *other.shape]``).

        ``slab`` restricts to a range of ``other``'s first tensor axis (to bound memory on large grids).
        """
        affine, offset = (torch.as_tensor(a, dtype=dtype, device=device) for a in self.index_affine_of(other))
        shape = list(other.shape)
        first = range(shape[0])[slab] if slab is not None else range(shape[0])
        axes = [torch.arange(first.start, first.stop, first.step, dtype=dtype, device=device)]
        axes += [torch.arange(n, dtype=dtype, device=device) for n in shape[1:]]
        # Separable: coordinate_r = Σ_c affine[r, c] · index_c + offset_r, built by broadcasting.
        result = offset.view(1, 3, 1, 1, 1) + affine[:, 0].view(1, 3, 1, 1, 1) * axes[0].view(1, 1, -1, 1, 1)
        result = result + affine[:, 1].view(1, 3, 1, 1, 1) * axes[1].view(1, 1, 1, -1, 1)
        return result + affine[:, 2].view(1, 3, 1, 1, 1) * axes[2].view(1, 1, 1, 1, -1)

    def reference_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image with this grid's geometry (for ``sitk.Resample``)."""
        image = sitk.Image([int(n) for n in self.size], pixel_id)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set origin, spacing and direction of ``image`` (whose size must match) to this grid's."""
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(tuple(self.matrix_direction.flatten()))
        return image

    def to_network(self, array: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
        """Resample an array of the image this grid was placed over (tensor order) onto the grid.

        Returns ``[1, 1, D, H, W]`` float32, trilinear with ``align_corners=False`` (box-aligned resize).
        """
        tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)
        tensor = tensor.permute(*self.source_axes)
        flips = [t for t in range(3) if self.flipped[t]]
        if flips:
            tensor = tensor.flip(flips)
        tensor = tensor[None, None]
        if tuple(tensor.shape[2:]) == self.shape:
            return tensor.contiguous()
        return F.interpolate(tensor, size=self.shape, mode="trilinear", align_corners=False)
