"""A SITReg-style symmetric multi-resolution network (Honkamaa & Marttinen, "SITReg: multi-resolution architecture
for symmetric, inverse consistent, and topology preserving image registration").

Both images are deformed towards a middle space by half-deformations ``h_A`` (middle → A) and ``h_B``
(middle → B), refined coarse to fine. At each level a UNet sees the half-way images in both orderings and
predicts two small deformations ``g_AB = Id + f(Â, B̂)`` and ``g_BA = Id + f(B̂, Â)``; the level's update is

    U = g_AB ∘ g_BA⁻¹,   U⁻¹ = g_BA ∘ g_AB⁻¹      (inverses from the fixed-point inversion layer)

and ``h_A ← h_A ∘ U``, ``h_B ← h_B ∘ U⁻¹`` (their inverses are tracked by composing the inverse updates).
Swapping A and B swaps ``g_AB`` and ``g_BA``, hence ``U`` and ``U⁻¹``, hence ``h_A`` and ``h_B``: the result
``Φ_AB = h_A ∘ h_B⁻¹`` satisfies Φ_BA = Φ_AB⁻¹ by construction, up to interpolation and the inversion tolerance.

Topology preservation: each ``f`` is predicted on a control grid with at least 2 voxels' spacing and bounded
per component by ``tanh`` so that its Jacobian's Frobenius norm stays below ``max_gradient`` (< 1). Then every
``g`` is a diffeomorphism and the fixed-point inversion is a contraction, so all updates are invertible.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .constricon import InverseConsistentModule
from .coordinates import identity_map, resample_displacement, voxel_scale, sample_at
from .inversion import invert_displacement
from .networks import UNet2
from .registration_modules import Transform, displacement_transform


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``(Id + outer) ∘ (Id + inner)`` on the (shared) grid: ``inner + outer(x + inner)``."""
    grid = identity_map(inner.shape[2:], dtype=inner.dtype, device=inner.device)
    return inner + sample_at(outer, grid + inner, padding="border")


class SITRegNetwork(InverseConsistentModule):
    """Symmetric multi-resolution registration with a deformation-inversion layer (see module docstring).

    ``levels`` resolution levels (the coarsest at 1/2^(levels−1)), one UNet2 per level; ``max_gradient`` bounds
    ‖∇f‖_F of every predicted update; ``inversion_tolerance`` is the inversion layer's stopping error (voxels).
    """

    def __init__(self, levels: int, num_layers: int, channels: Sequence[Sequence[int]], max_gradient: float = 0.9,
                 inversion_tolerance: float = 1e-3, inversion_iterations: int = 50):
        super().__init__()
        if not 0 < max_gradient < 1:
            raise ValueError("max_gradient must be in (0, 1) for the updates to be invertible")
        self.levels = int(levels)
        self.updates = nn.ModuleList(UNet2(num_layers, channels, dimension=3) for _ in range(self.levels))
        self.max_gradient = float(max_gradient)
        self.inversion_tolerance = float(inversion_tolerance)
        self.inversion_iterations = int(inversion_iterations)
        self.last_inversion_iterations: list[int] = []

    def _bounded_update(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` (unit cube) → control grid (pooled by 2) bounded by tanh, upsampled back (unit cube)."""
        shape = raw.shape[2:]
        control = F.avg_pool3d(raw, 2, ceil_mode=True)
        spacing = min((n - 1) / max(m - 1, 1) for n, m in zip(shape, control.shape[2:]))  # ≥ 2 voxels
        # Each partial derivative of the trilinear interpolant is ≤ 2·bound / spacing; nine of them give ‖∇f‖_F.
        bound = self.max_gradient / 3 * spacing / 2  # voxels of this level
        scale = voxel_scale(shape, dtype=raw.dtype, device=raw.device)
        control_voxels = bound * torch.tanh(control * scale / bound)
        return resample_displacement(control_voxels / scale, shape)

    def forward_and_inverse(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Transform, Transform]:
        pyramid = [(image_A, image_B)]
        for _ in range(self.levels - 1):
            a, b = pyramid[-1]
            pyramid.append((F.avg_pool3d(a, 2, ceil_mode=True), F.avg_pool3d(b, 2, ceil_mode=True)))
        batch = image_A.shape[0]
        half_A = half_A_inverse = half_B = half_B_inverse = None
        self.last_inversion_iterations = []
        for level in reversed(range(self.levels)):
            level_A, level_B = pyramid[level]
            shape = level_A.shape[2:]
            if half_A is None:
                zero = level_A.new_zeros(batch, 3, *shape)
                half_A = half_A_inverse = half_B = half_B_inverse = zero
            else:
                half_A, half_A_inverse, half_B, half_B_inverse = (
                    resample_displacement(d, shape) for d in (half_A, half_A_inverse, half_B, half_B_inverse))
            grid = identity_map(shape, dtype=level_A.dtype, device=level_A.device)
            halfway_A = sample_at(level_A, grid + half_A, padding="border")
            halfway_B = sample_at(level_B, grid + half_B, padding="border")
            raw = self.updates[level](torch.cat([halfway_A, halfway_B]), torch.cat([halfway_B, halfway_A]))
            updates = self._bounded_update(raw)  # [f_AB; f_BA]
            inverses, report = invert_displacement(updates, tolerance=self.inversion_tolerance,
                                                   max_iterations=self.inversion_iterations, check_folds=False,
                                                   warn=False)
            self.last_inversion_iterations.append(report.iterations)
            f_AB, f_BA = updates.split(batch)
            f_AB_inverse, f_BA_inverse = inverses.split(batch)
            update = compose_displacements(f_AB, f_BA_inverse)  # U = g_AB ∘ g_BA⁻¹
            update_inverse = compose_displacements(f_BA, f_AB_inverse)  # U⁻¹ = g_BA ∘ g_AB⁻¹
            half_A, half_A_inverse = compose_displacements(half_A, update), compose_displacements(update_inverse,
                                                                                                  half_A_inverse)
            half_B, half_B_inverse = compose_displacements(half_B, update_inverse), compose_displacements(
                update, half_B_inverse)
        forward = compose_displacements(half_A, half_B_inverse)  # Φ_AB = h_A ∘ h_B⁻¹
        backward = compose_displacements(half_B, half_A_inverse)  # Φ_BA = h_B ∘ h_A⁻¹
        return displacement_transform(forward), displacement_transform(backward)
