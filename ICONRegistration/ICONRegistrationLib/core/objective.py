"""The GradICON / ICON training objective, shared by training and instance optimisation.

Both directions run as one batch: the network sees ``[A; B]`` against ``[B; A]`` and returns
``[Φ_AB; Φ_BA]``, so inverse consistency is penalised symmetrically (Φ_AB∘Φ_BA and Φ_BA∘Φ_AB).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .coordinates import identity_map, warp
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


def symmetric_objective(net: Callable, image_A: torch.Tensor, image_B: torch.Tensor, *, similarity: Callable,
                        lmbda: float = 1.5, penalty: str = "gradicon", mask_A: Optional[torch.Tensor] = None,
                        mask_B: Optional[torch.Tensor] = None, padding: str = "zeros",
                        generator: Optional[torch.Generator] = None) -> ObjectiveTerms:
    """``sim(A∘Φ_AB, B) + sim(B∘Φ_BA, A) + λ · penalty`` for batches ``image_A``, ``image_B`` ``[b, 1, *S]``.

    ``penalty`` is ``"gradicon"`` (‖∇(Φ_AB∘Φ_BA) − I‖²_F) or ``"icon"`` (‖Φ_AB∘Φ_BA − Id‖²); masks restrict
    the similarity to the reference image's mask (loss masking). Images are warped with ``padding``.
    """
    batch = image_A.shape[0]
    shape = image_A.shape[2:]
    pair_moving = torch.cat([image_A, image_B], dim=0)
    pair_fixed = torch.cat([image_B, image_A], dim=0)
    phi = net(pair_moving, pair_fixed)
    grid = identity_map(shape, dtype=image_A.dtype, device=image_A.device)
    maps = phi(grid)
    warped = warp(pair_moving, maps, padding=padding)
    similarity_value = (similarity(warped[:batch], image_B, mask_B) + similarity(warped[batch:], image_A, mask_A))
    samples = jittered_identity(shape, batch=batch, dtype=image_A.dtype, device=image_A.device, generator=generator)
    samples = torch.cat([samples, samples], dim=0)

    def phi_swapped(coordinates: torch.Tensor) -> torch.Tensor:  # [Φ_BA(x); Φ_AB(y)] for input [x; y]
        return swap_halves(phi(swap_halves(coordinates)))

    if penalty == "gradicon":
        penalty_value = gradicon_penalty(phi, phi_swapped, samples)
    elif penalty == "icon":
        penalty_value = icon_penalty(phi, phi_swapped, samples)
    else:
        raise ValueError(f"unknown penalty '{penalty}': use gradicon or icon")
    return ObjectiveTerms(similarity_value + lmbda * penalty_value, similarity_value, penalty_value, maps, phi)
