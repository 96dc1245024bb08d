"""Instance optimisation: refine one pair's registration after the network's prediction.

Two modes (``IO_MODES``):

* ``"fields"`` (default): optimise the two displacement fields Φ_AB − Id and Φ_BA − Id on the network grid
  directly, starting from the network's prediction, with the model's similarity in both directions and the
  GradICON penalty on both compositions (one per step, by a fair coin, at a random eighth of the grid points).
  Each step's gradient and each Adam step are smoothed with a Gaussian (``FIELD_GRADIENT_SIGMA`` voxels), as
  demons smooths its updates. The images may be compared on a finer grid than the fields (``io_grid="fixed"`` of
  :func:`~ICONRegistrationLib.pipeline.registration.register`). No network runs in the loop, so an iteration
  costs a few samplings of the images and fields: tens of times less than a network step.
* ``"weights"``: fine-tune the network's weights on the pair with the training objective (uniGradICON's
  instance optimisation), then give the cached model its weights back.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.coordinates import box_resample_displacement, identity_map, voxel_scale, sample_at
from ..core.losses import gaussian_blur, gradicon_penalty, jittered_identity
from ..core.objective import symmetric_objective
from ..core.optimizers import adam
from ..core.registration_modules import displacement_transform
from ..progress import ProgressCallback, report

IO_MODES = ("fields", "weights")
WEIGHTS_LEARNING_RATE = 2e-5  # Adam step size of the weight mode (uniGradICON's)
FIELD_LEARNING_RATE = 0.1  # Adam step size of the field mode, in voxels of the network grid
FIELD_PENALTY_FRACTION = 0.125  # the field mode's penalty points: a fresh random eighth of the grid each step
FIELD_GRADIENT_SIGMA = 2.0  # the field mode smooths each step's gradient with a Gaussian of this σ (network voxels)


def optimize_instance(net: torch.nn.Module, image_A: torch.Tensor, image_B: torch.Tensor, *, iterations: int,
                      similarity: Callable, lmbda: float, penalty: str = "gradicon",
                      learning_rate: float = WEIGHTS_LEARNING_RATE,
                      mask_A: Optional[torch.Tensor] = None, mask_B: Optional[torch.Tensor] = None,
                      progress: Optional[ProgressCallback] = None) -> tuple[Callable, list[float]]:
    """Run ``iterations`` Adam steps of the training objective (``penalty``: the model's regulariser, GradICON by
    default) on the pair, return the optimised transform.

    The returned transform is ``[Φ_AB; Φ_BA]`` for the batch ``[A; B]`` vs ``[B; A]`` (see
    :func:`~ICONRegistrationLib.core.objective.symmetric_objective`), evaluated after the last step; it
    captures the predicted fields, not the weights. ``net``'s weights and mode are restored before returning,
    also on error or cancellation. Returns the transform and the objective before each step and after the last
    one (``iterations + 1`` values).
    """
    saved = {key: value.detach().clone() for key, value in net.state_dict().items()}
    was_training = net.training
    history: list[float] = []
    net.eval()  # batch-norm statistics stay those of the trained model, as in uniGradICON
    try:
        optimizer = adam(net.parameters(), lr=learning_rate)
        for step in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            terms = symmetric_objective(net, image_A, image_B, similarity=similarity, lmbda=lmbda,
                                        penalty=penalty, mask_A=mask_A, mask_B=mask_B)
            terms.loss.backward()
            optimizer.step()
            history.append(float(terms.loss.detach()))
            report(progress, "instance optimisation", (step + 1) / iterations)
        with torch.no_grad():
            final = symmetric_objective(net, image_A, image_B, similarity=similarity, lmbda=lmbda,
                                        penalty=penalty, mask_A=mask_A, mask_B=mask_B)
        history.append(float(final.loss))
        return final.transform, history
    finally:
        net.load_state_dict(saved)
        net.train(was_training)
        for parameter in net.parameters():
            parameter.grad = None


def field_objective(displacements: torch.Tensor, image_A: torch.Tensor, image_B: torch.Tensor, *,
                    similarity: Callable, lmbda: float, samples: torch.Tensor, mask_A: Optional[torch.Tensor] = None,
                    mask_B: Optional[torch.Tensor] = None,
                    penalty_direction: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sim(A∘Φ_AB, B) + sim(B∘Φ_BA, A) + λ/2 (GradICON(Φ_AB, Φ_BA) + GradICON(Φ_BA, Φ_AB))``.

    ``displacements`` ``[2, 3, *S]``: Φ_AB − Id and Φ_BA − Id on the network grid ``S`` (unit-cube units);
    ``image_A``, ``image_B`` ``[1, 1, *T]`` (and the masks) on the network grid (``T = S``) or on a finer grid
    ``T`` over the same image boxes (the similarity grid), where the maps are interpolated
    (:func:`~ICONRegistrationLib.core.coordinates.box_resample_displacement`). ``samples``: the penalty's
    points on ``S``, unit-cube coordinates ``[1, 3, …]`` (jittered grid points,
    :func:`~ICONRegistrationLib.core.losses.jittered_identity`).
    ``penalty_direction`` 0 or 1 replaces the mean of the two GradICON terms by the first or the second alone
    (half the cost; a fair coin per step has the mean's expectation). Returns (loss, similarity, penalty).
    """
    shape = image_A.shape[2:]
    grid = identity_map(shape, dtype=displacements.dtype, device=displacements.device)
    maps = grid + box_resample_displacement(displacements, shape)
    warped = sample_at(torch.cat([image_A, image_B]), maps, padding="zeros")
    similarity_value = similarity(warped[:1], image_B, mask_B) + similarity(warped[1:], image_A, mask_A)
    # split, not sliced: the two slices' backward each filled a zero tensor of both fields and copied into it
    phi_AB, phi_BA = (displacement_transform(field) for field in displacements.split(1))
    if penalty_direction is None:
        penalty = 0.5 * (gradicon_penalty(phi_AB, phi_BA, samples) + gradicon_penalty(phi_BA, phi_AB, samples))
    elif penalty_direction in (0, 1):
        penalty = gradicon_penalty(*((phi_AB, phi_BA) if penalty_direction == 0 else (phi_BA, phi_AB)), samples)
    else:
        raise ValueError(f"penalty_direction must be None, 0 or 1, got {penalty_direction!r}")
    return similarity_value + lmbda * penalty, similarity_value, penalty


def optimize_fields(maps: torch.Tensor, image_A: torch.Tensor, image_B: torch.Tensor, *, iterations: int,
                    similarity: Callable, lmbda: float, learning_rate: float = FIELD_LEARNING_RATE,
                    gradient_sigma: float = FIELD_GRADIENT_SIGMA,
                    mask_A: Optional[torch.Tensor] = None, mask_B: Optional[torch.Tensor] = None,
                    progress: Optional[ProgressCallback] = None) -> tuple[torch.Tensor, list[float]]:
    """Refine ``maps`` ``[Φ_AB; Φ_BA]`` (``[2, 3, *S]`` on the network grid, e.g. the network's prediction) by
    ``iterations`` Adam steps of :func:`field_objective` on the displacement fields; ``learning_rate`` is in
    voxels of the network grid. The images (and masks) lie on the network grid or on a finer similarity grid over
    the same boxes (see :func:`field_objective`); the fields stay on the network grid either way.

    Each step's gradient and each Adam step are smoothed with a Gaussian of ``gradient_sigma`` voxels (0: off),
    as demons and ANTs smooth their update fields. Adam scales every voxel's step by that voxel's own gradient
    history, so without smoothing a voxel with a tiny, noisy gradient moves as far as one at an edge and the
    fields roughen before they improve; smoothing only the gradient still lets Adam's per-voxel scaling put
    sharp steps where the smoothed gradient changes sign, and the penalty then grows after ~15 steps. With both
    (LPBA40 S36 ↔ S37, 2 mm grid): Dice 0.721 and IC error 0.63 mm after 40 steps, against 0.710 and 1.50 mm
    after 60 unsmoothed steps, and the objective falls at every step. Each step evaluates the penalty at a fresh random eighth of the jittered grid points, in
    one of its two directions drawn by a fair coin (both: the full symmetric penalty's expectation, see
    :func:`~ICONRegistrationLib.core.losses.jittered_identity`); the last objective value uses every jittered grid
    point and both directions. The network is not involved. Returns the refined maps (same
    layout) and the objective before each step and after the last one (``iterations + 1`` values).
    """
    shape = maps.shape[2:]
    grid = identity_map(shape, dtype=maps.dtype, device=maps.device)
    scale = voxel_scale(shape, dtype=maps.dtype, device=maps.device)
    # Optimised in voxels, so that one learning rate means the same step along every axis and grid size.
    voxels = ((maps.detach() - grid) * scale).requires_grad_(True)
    optimizer = adam([voxels], lr=learning_rate)
    history: list[float] = []
    generator = torch.Generator().manual_seed(0)  # the same result for the same inputs
    for step in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        samples = jittered_identity(shape, 1, dtype=maps.dtype, device=maps.device, generator=generator,
                                    fraction=FIELD_PENALTY_FRACTION)
        direction = int(torch.randint(2, (1,), generator=generator))
        loss, _, _ = field_objective(voxels / scale, image_A, image_B, similarity=similarity, lmbda=lmbda,
                                     mask_A=mask_A, mask_B=mask_B, samples=samples, penalty_direction=direction)
        loss.backward()
        if gradient_sigma > 0:
            voxels.grad = gaussian_blur(voxels.grad, gradient_sigma)
            before = voxels.detach().clone()
        optimizer.step()
        if gradient_sigma > 0:
            with torch.no_grad():
                voxels.copy_(before + gaussian_blur(voxels - before, gradient_sigma))
        history.append(float(loss.detach()))
        report(progress, "instance optimisation", (step + 1) / iterations)
    with torch.no_grad():
        displacements = voxels / scale
        every_point = jittered_identity(shape, 1, dtype=maps.dtype, device=maps.device, generator=generator)
        history.append(float(field_objective(displacements, image_A, image_B, similarity=similarity, lmbda=lmbda,
                                             samples=every_point, mask_A=mask_A, mask_B=mask_B)[0]))
        return grid + displacements, history
