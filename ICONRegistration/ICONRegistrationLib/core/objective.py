"""The GradICON / ICON training objective, shared by training and instance optimisation.

Both directions are evaluated as one stacked transform ``[Φ_AB; Φ_BA]`` of the batch ``[A; B]`` against
``[B; A]``; the inverse-consistency penalty acts on Φ_AB∘Φ_BA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch

from .constricon import velocity_bending_energy
from .coordinates import identity_map, voxel_scale, sample_at
from .losses import gradicon_and_round_trip, icon_penalty, jittered_identity
from .networks import UNet2, grouped_batch_norm
from .registration_modules import (DownsampleRegistration, FunctionFromVectorField, RegistrationModule, Transform,
                                   TwoStepRegistration)


@dataclasses.dataclass
class ObjectiveTerms:
    """The objective's value and its parts; ``maps`` is ``[Φ_AB; Φ_BA]`` on the identity grid."""

    loss: torch.Tensor
    similarity: torch.Tensor
    penalty: torch.Tensor
    maps: torch.Tensor
    transform: Transform
    #: mean squared error of the round trip Φ_AB∘Φ_BA − Id at the penalty's sample points, in voxels² of the grid
    #: (GradICON penalty only; ``None`` otherwise)
    round_trip: Optional[torch.Tensor] = None


PENALTIES = ("gradicon", "icon", "bending", "diffusion")


def directions(net: Callable, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Transform, Transform]:
    """``(Φ_AB, Φ_BA)`` for batches ``image_A``, ``image_B`` ``[b, 1, *S]``.

    Networks that are inverse consistent by construction (``forward_and_inverse``) compute both from one pass on
    ``A, B``; others run twice, on ``(A, B)`` and on ``(B, A)``, as icon_registration's GradICON does (in training
    mode each direction's batch norm sees its own batch). The training objective runs those two calls as one batch
    where it can (:func:`runs_as_one_batch`).
    """
    if hasattr(net, "forward_and_inverse"):
        return net.forward_and_inverse(image_A, image_B)
    return net(image_A, image_B), net(image_B, image_A)


def runs_as_one_batch(net: Callable) -> bool:
    """Whether ``net``'s two directions can run as one batch ``[A; B]`` against ``[B; A]`` with the objective of two
    calls: a registration module tree of :class:`TwoStepRegistration`, :class:`DownsampleRegistration` and
    :class:`FunctionFromVectorField` steps around :class:`UNet2` networks (each sample's output depends on that
    sample alone, except through the batch norms, which :func:`grouped_batch_norm` keeps apart, and their transforms
    evaluate batch rows)."""
    if not isinstance(net, RegistrationModule) or hasattr(net, "forward_and_inverse"):
        return False
    steps = (TwoStepRegistration, DownsampleRegistration, FunctionFromVectorField)
    return all(type(module) in steps and (type(module) is not FunctionFromVectorField or type(module.net) is UNet2)
               for module in net.modules() if isinstance(module, RegistrationModule))


def _in_one_batch(net: Callable, pair: torch.Tensor, batch: int) -> tuple[Transform, Transform, Transform]:
    """``(Φ_AB, Φ_BA, [Φ_AB; Φ_BA])`` from one call of ``net`` (:func:`runs_as_one_batch`) on ``pair`` = ``[A; B]``
    (``batch`` samples each) against ``[B; A]``, each direction's batch norms with their own statistics."""
    with grouped_batch_norm(net, 2):
        stacked = net(pair, torch.cat([pair[batch:], pair[:batch]]))
    return (functools.partial(stacked, rows=slice(0, batch)), functools.partial(stacked, rows=slice(batch, 2 * batch)),
            stacked)


def stack_directions(forward: Transform, backward: Transform, batch: int) -> Transform:
    """The transform ``[Φ_AB; Φ_BA]`` of the batch ``[A; B]`` against ``[B; A]``: on coordinates ``[2b, 3, …]`` it
    maps the first half by Φ_AB and the second by Φ_BA; on a single grid ``[1, 3, …]`` it returns both stacked."""
    def stacked(coordinates: torch.Tensor) -> torch.Tensor:
        if coordinates.shape[0] == 2 * batch:
            return torch.cat([forward(coordinates[:batch]), backward(coordinates[batch:])])
        return torch.cat([forward(coordinates), backward(coordinates)])
    return stacked


def both_directions(net: Callable, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:
    """The stacked transform ``[Φ_AB; Φ_BA]`` (:func:`stack_directions` of :func:`directions`)."""
    return stack_directions(*directions(net, image_A, image_B), image_A.shape[0])


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
                        generator: Optional[torch.Generator] = None, penalty_fraction: float = 1.0,
                        penalty_samples: Optional[torch.Tensor] = None, icon_weight: float = 0.0,
                        icon_point_weights: Optional[torch.Tensor] = None, one_batch: bool = True
                        ) -> ObjectiveTerms:
    """``sim(A∘Φ_AB, B) + sim(B∘Φ_BA, A) + λ · penalty`` for batches ``image_A``, ``image_B`` ``[b, 1, *S]``.

    ``penalty``: ``"gradicon"`` (‖∇(Φ_AB∘Φ_BA) − I‖²_F), ``"icon"`` (‖Φ_AB∘Φ_BA − Id‖²) — on Φ_AB∘Φ_BA only,
    as in the GradICON paper and icon_registration (pairs come in both orders, so it is symmetric in
    expectation, at half the cost of penalising Φ_BA∘Φ_AB as well) — ``"bending"`` (bending
    energy of the velocity fields of a ConstrICON network's SVF steps, voxels) or ``"diffusion"`` (squared
    gradient of both displacements, voxels). Masks restrict the similarity to the reference image's mask (loss
    masking). Images are warped with ``padding``.

    The GradICON / ICON penalties are evaluated at jittered grid points (:func:`jittered_identity`):
    every grid point (``penalty_fraction = 1``, Tian et al.) or a uniformly random subset of that fraction of
    them (same expectation, the cost of the penalty's map evaluations falls in proportion).
    ``penalty_samples`` ``[b, d, …]`` (or ``[1, d, …]`` for all) replaces the random points.

    ``icon_weight`` μ > 0 (GradICON only) adds μ · the mean squared round-trip error ‖Φ_AB(Φ_BA(x)) − x‖² in
    voxels² at the same points (``round_trip``, computed from the penalty's own map evaluations at no extra
    cost): the gradient penalty does not see a constant offset of the round trip, this term does.
    ``icon_point_weights`` ``[b, 1, *S]`` (≥ 0, on ``image_A``'s grid, where the round trip Φ_AB(Φ_BA(x)) starts)
    makes that term a weighted mean, weights sampled linearly at the penalty's points (the batch's weighted mean, so
    they move the term's weight between points and μ alone sets its strength): for example 1 + κ inside ``A``'s
    labels, to ask for inverse consistency most where a user looks. ``round_trip`` stays the unweighted mean.

    With ``one_batch`` (the default) a network that :func:`runs_as_one_batch` computes both directions in one call
    on ``[A; B]`` against ``[B; A]``, its batch norms keeping each direction's statistics apart: the same objective
    and gradients as two calls (up to the order of floating-point sums), in less time on a CPU where the batch is
    small (larger convolutions, the weights read once). Objective and backward on 2 cores, medians of four: the
    hippocampus model's architecture at 65³, batch 1, 0.80 instead of 0.92 s, at 80×96×80 1.42 instead of 1.60 s;
    the uniGradICON width at 80×96×80, batch 2, 3.77 instead of 3.91 s; at the hippocampus model's own 36×48×36,
    batch 4, the same time. ``one_batch=False`` runs the two calls.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty '{penalty}': use one of {', '.join(PENALTIES)}")
    if icon_weight and penalty != "gradicon":
        raise ValueError(f"icon_weight adds to the GradICON penalty, not to '{penalty}'")
    if icon_point_weights is not None and not icon_weight:
        raise ValueError("icon_point_weights weight the ICON term: give icon_weight > 0 as well")
    batch = image_A.shape[0]
    shape = image_A.shape[2:]
    pair_moving = torch.cat([image_A, image_B], dim=0)
    if one_batch and runs_as_one_batch(net):
        phi_AB, phi_BA, phi = _in_one_batch(net, pair_moving, batch)
    else:
        phi_AB, phi_BA = directions(net, image_A, image_B)
        phi = stack_directions(phi_AB, phi_BA, batch)
    grid = identity_map(shape, dtype=image_A.dtype, device=image_A.device)
    maps = phi(grid)
    warped = sample_at(pair_moving, maps, padding=padding)
    similarity_value = (similarity(warped[:batch], image_B, mask_B) + similarity(warped[batch:], image_A, mask_A))
    if penalty in ("gradicon", "icon"):
        if penalty_samples is None:
            samples = jittered_identity(shape, batch=batch, dtype=image_A.dtype, device=image_A.device,
                                        generator=generator, fraction=penalty_fraction)
        else:
            samples = penalty_samples.to(image_A.dtype).expand(batch, *penalty_samples.shape[1:])
        if penalty == "gradicon":
            penalty_value, error = gradicon_and_round_trip(phi_AB, phi_BA, samples)
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(icon_weight)):
                scale = voxel_scale(shape, dtype=error.dtype, device=error.device)
                squared = ((error * scale) ** 2).sum(dim=1, keepdim=True)
                round_trip = squared.mean()
                if icon_point_weights is None:
                    weighted = round_trip
                else:  # a weighted mean: the weights say where, μ alone says how strong
                    at_samples = sample_at(icon_point_weights.to(squared.dtype), samples)
                    weighted = (at_samples * squared).mean() / at_samples.mean()
        else:
            penalty_value, round_trip, weighted = icon_penalty(phi_AB, phi_BA, samples), None, None
    elif penalty == "bending":
        penalty_value, round_trip = velocity_bending_energy(net), None
    else:
        penalty_value, round_trip = diffusion_penalty(maps), None
    loss = similarity_value + lmbda * penalty_value
    if icon_weight:
        loss = loss + icon_weight * weighted
    return ObjectiveTerms(loss, similarity_value, penalty_value, maps, phi,
                          None if round_trip is None else round_trip.detach())
