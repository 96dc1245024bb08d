"""The GradICON / ICON training objective, shared by training and instance optimisation.

Both directions run as one batch: the network sees ``[A; B]`` against ``[B; A]`` and returns
``[Φ_AB; Φ_BA]``, so inverse consistency is penalised symmetrically (Φ_AB∘Φ_BA and Φ_BA∘Φ_AB).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .constricon import velocity_bending_energy
from .coordinates import identity_map, voxel_scale, warp
from .losses import gradicon_penalty, icon_penalty, jittered_identity
from .registration_modules import Transform


@dataclasses.dataclass
class ObjectiveTerms:
    """The objective's value and its parts; ``maps`` is ``[Φ_AB; Φ_BA]`` on the identity grid."""

    loss: torch.Tensor
    similarity: torch.Tensor
    penalty: torch.Tensor
    maps: torch.Tensor
    transform: Transform


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """``[X; Y] -> [Y; X]`` along the batch axis."""
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]], dim=0)


PENALTIES = ("gradicon", "icon", "bending", "diffusion")


def both_directions(net: Callable, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:
    """The transform ``[Φ_AB; Φ_BA]`` of the batch ``[A; B]`` against ``[B; A]``.

    Networks that are inverse consistent by construction (``forward_and_inverse``) compute both directions from
    one pass on ``A, B``; others run on the doubled batch. Called on coordinates ``[2b, 3, …]`` the result maps
    the first half by Φ_AB and the second by Φ_BA; on a single grid ``[1, 3, …]`` it returns both stacked.
    """
    if hasattr(net, "forward_and_inverse"):
        forward, backward = net.forward_and_inverse(image_A, image_B)
        batch = image_A.shape[0]

        def stacked(coordinates: torch.Tensor) -> torch.Tensor:
            if coordinates.shape[0] == 2 * batch:
                return torch.cat([forward(coordinates[:batch]), backward(coordinates[batch:])])
            return torch.cat([forward(coordinates), backward(coordinates)])
        return stacked
    return net(torch.cat([image_A, image_B], dim=0), torch.cat([image_B, image_A], dim=0))


def diffusion_penalty(maps: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement ``Φ − Id`` in voxels (per voxel step)."""
    displacement = (maps - identity_map(maps.shape[2:], dtype=maps.dtype, device=maps.device)) \
        * voxel_scale(maps.shape[2:], dtype=maps.dtype, device=maps.device)
    total = maps.new_zeros(())
    for axis in range(2, maps.dim()):
        n = displacement.shape[axis]
        total = total + (displacement.narrow(axis, 1, n - 1) - displacement.narrow(axis, 0, n - 1)).pow(2).mean()
    return total


def symmetric_objective(net: Callable, image_A: torch.Tensor, image_B: torch.Tensor, *, similarity: Callable,
                        lmbda: float = 1.5, penalty: str = "gradicon", mask_A: Optional[torch.Tensor] = None,
                        mask_B: Optional[torch.Tensor] = None, padding: str = "zeros",
                        generator: Optional[torch.Generator] = None) -> ObjectiveTerms:
    """``sim(A∘Φ_AB, B) + sim(B∘Φ_BA, A) + λ · penalty`` for batches ``image_A``, ``image_B`` ``[b, 1, *S]``.

    ``penalty``: ``"gradicon"`` (‖∇(Φ_AB∘Φ_BA) − I‖²_F), ``"icon"`` (‖Φ_AB∘Φ_BA − Id‖²), ``"bending"`` (bending
    energy of the velocity fields of a ConstrICON network's SVF steps, voxels) or ``"diffusion"`` (squared
    gradient of both displacements, voxels). Masks restrict the similarity to the reference image's mask (loss
    masking). Images are warped with ``padding``.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty '{penalty}': use one of {', '.join(PENALTIES)}")
    batch = image_A.shape[0]
    shape = image_A.shape[2:]
    pair_moving = torch.cat([image_A, image_B], dim=0)
    phi = both_directions(net, image_A, image_B)
    grid = identity_map(shape, dtype=image_A.dtype, device=image_A.device)
    maps = phi(grid)
    warped = warp(pair_moving, maps, padding=padding)
    similarity_value = (similarity(warped[:batch], image_B, mask_B) + similarity(warped[batch:], image_A, mask_A))
    if penalty in ("gradicon", "icon"):
        samples = jittered_identity(shape, batch=batch, dtype=image_A.dtype, device=image_A.device,
                                    generator=generator)
        samples = torch.cat([samples, samples], dim=0)

        def phi_swapped(coordinates: torch.Tensor) -> torch.Tensor:  # [Φ_BA(x); Φ_AB(y)] for input [x; y]
            return swap_halves(phi(swap_halves(coordinates)))

        penalty_function = gradicon_penalty if penalty == "gradicon" else icon_penalty
        penalty_value = penalty_function(phi, phi_swapped, samples)
    elif penalty == "bending":
        penalty_value = velocity_bending_energy(net)
    else:
        penalty_value = diffusion_penalty(maps)
    return ObjectiveTerms(similarity_value + lmbda * penalty_value, similarity_value, penalty_value, maps, phi)
