"""Registration modules: ``module(image_A, image_B)`` returns a transform ``Φ_AB``.

A transform is a Python callable taking a coordinate tensor ``[B, d, *S]`` (unit-cube map convention of
:mod:`.coordinates`) to transformed coordinates of the same shape, with ``I_A ∘ Φ_AB ≈ I_B``
(A = moving, B = fixed). The transforms of the modules here also take ``rows``, a slice of the batch: evaluated
with it, a transform uses only those samples' fields (``[Φ_AB; Φ_BA]`` computed as one batch gives Φ_BA alone
with ``rows=slice(b, 2b)``); the coordinates then have ``rows``' batch size (or 1). The module tree and attribute
names follow icon_registration so that ``state_dict()`` keys match official checkpoints. Identity maps are derived
from each input's shape, so a module works at any grid size (a downsampled level sees ``ceil(N / 2)`` voxels per axis).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .coordinates import identity_map, is_identity, sample_at

Transform = Callable[[torch.Tensor], torch.Tensor]


class RegistrationModule(nn.Module):
    """Base class: ``forward(image_A, image_B) -> Φ_AB`` (a :data:`Transform`)."""

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:  # pragma: no cover - abstract
        raise NotImplementedError


def displacement_transform(displacement: torch.Tensor) -> Transform:
    """The map ``x ↦ x + u(x)`` of a displacement sampled on its grid (trilinear, border-extended)."""
    def transform(coordinates: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        field = displacement if rows is None else displacement[rows]
        if is_identity(coordinates) and coordinates.shape[2:] == field.shape[2:]:
            return coordinates + field  # exactly on the grid: no interpolation needed
        return coordinates + sample_at(field, coordinates, padding="border")
    return transform


class FunctionFromVectorField(RegistrationModule):
    """Wrap a network that predicts a displacement ``u`` on the input grid: ``Φ(x) = x + u(x)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:
        return displacement_transform(self.net(image_A, image_B))


class DownsampleRegistration(RegistrationModule):
    """Run ``net`` on both images average-pooled by 2 (``ceil_mode``, so odd sizes keep their last voxel)."""

    def __init__(self, net: RegistrationModule, dimension: int = 3):
        super().__init__()
        self.net = net
        self.dimension = dimension

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:
        pool = F.avg_pool3d if self.dimension == 3 else F.avg_pool2d
        return self.net(pool(image_A, 2, ceil_mode=True), pool(image_B, 2, ceil_mode=True))


class TwoStepRegistration(RegistrationModule):
    """``Φ ∘ Ψ[A ∘ Φ, B]``: register with ``netPhi``, warp A, register the rest with ``netPsi``, compose."""

    def __init__(self, netPhi: RegistrationModule, netPsi: RegistrationModule):  # noqa: N803 (checkpoint names)
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:
        phi = self.netPhi(image_A, image_B)
        grid = identity_map(image_A.shape[2:], dtype=image_A.dtype, device=image_A.device)
        psi = self.netPsi(sample_at(image_A, phi(grid), padding="border"), image_B)

        def transform(coordinates: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
            if rows is None:
                return phi(psi(coordinates))
            return phi(psi(coordinates, rows), rows)
        return transform


Down = DownsampleRegistration
TwoStep = TwoStepRegistration
