"""Deformation inversion layer: the inverse of ``x ↦ x + u(x)`` by a fixed-point iteration (SITReg's layer).

The inverse displacement ``z`` at a point ``p`` solves ``p + z + u(p + z) = p``, i.e. the fixed point

    z = G(z) = −u(p + z)                         (Chen et al. 2008)

which converges when ``u`` is a contraction (‖∇u‖ < 1, as SITReg's bounded updates guarantee) and in practice
for any smooth invertible field. Anderson acceleration (Walker & Ni 2011) speeds it up several times.
The residual ``G(z) − z`` is exactly the round-trip error ``−(Φ(Φ⁻¹(p)) − p)`` of the current estimate, so the
stopping rule "maximum error below ``tolerance`` voxels" is checked on the quantity the user cares about.

Backward pass (Honkamaa & Marttinen, SITReg): by the implicit function theorem the vector–Jacobian product of
the solution is ``(∂G/∂u)ᵀ w`` with ``w = g + (∂G/∂z)ᵀ w``, a second fixed point solved the same way, so no
iteration is stored for autograd and memory does not grow with the iteration count.

Units: ``u`` is in the unit-cube map convention of :mod:`.coordinates` on its own grid; errors are reported in
voxels of that grid (channel ``c`` scaled by ``N_c − 1``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch

from .coordinates import (displacement_to_map, identity_map, jacobian_determinant, map_to_displacement, sample_at,
                          vector_length, voxel_scale)


class InversionWarning(UserWarning):
    """The inversion stopped before reaching its tolerance, or the field folds (has no inverse there)."""


@dataclasses.dataclass
class InversionReport:
    """How a fixed-point inversion went.

    * ``iterations``: fixed-point evaluations of the forward solve (the last backward solve's in
      ``backward_iterations``).
    * ``max_error_voxels``: max over points of ‖Φ(Φ⁻¹(p)) − p‖ in voxels of the field's grid.
    * ``converged``: ``max_error_voxels ≤ tolerance_voxels``.
    * ``folds``: grid points of the input field with Jacobian determinant ≤ 0; > 0 means no inverse exists there.
    """

    iterations: int = 0
    max_error_voxels: float = float("inf")
    tolerance_voxels: float = 0.01
    converged: bool = False
    folds: int = 0
    backward_iterations: int = 0

    @property
    def invertible(self) -> bool:
        return self.converged and self.folds == 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "invertible": self.invertible}


def anderson_fixed_point(function: Callable[[torch.Tensor], torch.Tensor], initial: torch.Tensor,
                         error: Callable[[torch.Tensor], torch.Tensor], tolerance: float, max_iterations: int,
                         memory: int = 5) -> tuple[torch.Tensor, int, float]:
    """Solve ``x = function(x)`` for a batch ``[B, …]`` by Anderson acceleration (type II, mixing 1).

    ``error(residual)`` gives one number per batch element for ``residual = function(x) − x``; the solve stops
    when every element's error is ≤ ``tolerance`` or after ``max_iterations`` evaluations of ``function``.
    Returns the best iterate seen (lowest worst-case error), the number of evaluations and that error.
    The history is restarted when an extrapolated step makes the error ten times worse than the best one.
    """
    batch = initial.shape[0]
    x = initial.reshape(batch, -1)
    shape = initial.shape
    best, best_error = x, float("inf")
    previous_x = previous_g = None
    # Ring buffers of the last ``memory`` differences of residuals (ΔF) and of values (ΔG), rows [B, m, n]: each
    # difference is one contiguous row (a column layout [B, n, m] made every write and product strided, 4× slower).
    delta_residuals = x.new_empty(batch, max(memory, 1), x.shape[1])
    delta_values = torch.empty_like(delta_residuals)
    gram_all = x.new_zeros(batch, max(memory, 1), max(memory, 1))  # ΔF ΔFᵀ, one new row per stored difference
    stored = slot = 0
    evaluations = 0
    for evaluations in range(1, max_iterations + 1):
        g = function(x.view(shape)).reshape(batch, -1)
        residual = g - x
        worst = float(error(residual.view(shape)).max())
        if worst < best_error:
            best, best_error = x, worst
        if worst <= tolerance:
            break
        if worst > 10 * best_error:  # a bad extrapolation: forget the history, continue from the best point
            stored = slot = 0
            previous_x = previous_g = None
            x = best
            continue
        if previous_x is not None and memory > 0:
            torch.sub(residual, previous_g - previous_x, out=delta_residuals[:, slot])
            torch.sub(g, previous_g, out=delta_values[:, slot])
            stored = min(stored + 1, memory)
            row = (delta_residuals[:, :stored] @ delta_residuals[:, slot, :, None])[..., 0]  # [B, stored]
            gram_all[:, slot, :stored] = row
            gram_all[:, :stored, slot] = row
            slot = (slot + 1) % memory
        previous_x, previous_g = x, g
        if stored == 0:
            x = g
            continue
        # γ = argmin ‖residual − ΔFᵀ γ‖ (ridge-regularised normal equations), x ← g − ΔGᵀ γ
        dF = delta_residuals[:, :stored]
        gram = gram_all[:, :stored, :stored]
        ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(torch.finfo(gram.dtype).tiny)
        gram = gram + ridge.view(-1, 1, 1) * torch.eye(stored, dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram, dF @ residual[..., None])
        x = g - (gamma.transpose(1, 2) @ delta_values[:, :stored])[:, 0]
    return best.view(shape), evaluations, best_error


def count_folds(displacement: torch.Tensor) -> int:
    """Grid points where ``x + u(x)`` has Jacobian determinant ≤ 0 (``u`` in the unit-cube convention)."""
    with torch.no_grad():
        positions = displacement + identity_map(displacement.shape[2:], dtype=displacement.dtype,
                                                device=displacement.device)
        return int((jacobian_determinant(positions) <= 0).sum())


@dataclasses.dataclass
class _Settings:
    tolerance: float
    max_iterations: int
    memory: int
    report: InversionReport


class _FixedPointInverse(torch.autograd.Function):
    """``z`` with ``z = −u(p + z)``; implicit backward."""

    @staticmethod
    def forward(ctx, displacement: torch.Tensor, points: torch.Tensor, settings: _Settings) -> torch.Tensor:
        scale = voxel_scale(displacement.shape[2:], dtype=displacement.dtype, device=displacement.device)
        batch = max(displacement.shape[0], points.shape[0])

        def step(z: torch.Tensor) -> torch.Tensor:
            return -sample_at(displacement, points + z, padding="border")

        def error(residual: torch.Tensor) -> torch.Tensor:
            return vector_length(residual * scale).flatten(1).amax(dim=1)

        initial = torch.zeros(batch, *points.shape[1:], dtype=displacement.dtype, device=displacement.device)
        with torch.no_grad():
            solution, iterations, worst = anderson_fixed_point(step, initial, error, settings.tolerance,
                                                               settings.max_iterations, settings.memory)
        report = settings.report
        report.iterations, report.max_error_voxels = iterations, worst
        report.tolerance_voxels, report.converged = settings.tolerance, worst <= settings.tolerance
        ctx.settings = settings
        ctx.save_for_backward(displacement, points, solution)
        return solution

    @staticmethod
    def backward(ctx, grad_solution: torch.Tensor):
        displacement, points, solution = ctx.saved_tensors
        settings: _Settings = ctx.settings
        with torch.enable_grad():
            u = displacement.detach().requires_grad_(ctx.needs_input_grad[0])
            p = points.detach().requires_grad_(ctx.needs_input_grad[1])
            z = solution.detach().requires_grad_(True)
            value = -sample_at(u, p + z, padding="border")

            def adjoint_step(w: torch.Tensor) -> torch.Tensor:  # w ↦ g + (∂G/∂z)ᵀ w
                (vjp,) = torch.autograd.grad(value, z, w, retain_graph=True)
                return grad_solution + vjp

            relative = 1e-10 if grad_solution.dtype == torch.float64 else 1e-5
            size = grad_solution.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(grad_solution.dtype).tiny)
            w, iterations, _ = anderson_fixed_point(
                adjoint_step, grad_solution.detach().clone(),
                lambda r: r.flatten(1).abs().amax(dim=1) / size, relative, settings.max_iterations,
                settings.memory)
            settings.report.backward_iterations = iterations
            wanted = [t for t, needed in ((u, ctx.needs_input_grad[0]), (p, ctx.needs_input_grad[1])) if needed]
            grads = iter(torch.autograd.grad(value, wanted, w)) if wanted else iter(())
        grad_u = next(grads) if ctx.needs_input_grad[0] else None
        grad_p = next(grads) if ctx.needs_input_grad[1] else None
        if grad_p is not None and grad_p.shape != points.shape:
            grad_p = grad_p.sum(dim=0, keepdim=True)
        if grad_u is not None and grad_u.shape != displacement.shape:
            grad_u = grad_u.sum(dim=0, keepdim=True)
        return grad_u, grad_p, None


def invert_displacement(displacement: torch.Tensor, points: Optional[torch.Tensor] = None, *,
                        tolerance: float = 0.01, max_iterations: int = 200, memory: int = 5,
                        check_folds: bool = True, warn: bool = True) -> tuple[torch.Tensor, InversionReport]:
    """The inverse of ``Φ(x) = x + u(x)`` as a displacement ``z`` at ``points``: ``Φ(p + z(p)) = p``.

    Args:
        displacement: ``u`` ``[B, 3, *S]`` in the unit-cube map convention of its own grid (border-extended
            outside it, as everywhere in this package).
        points: where to evaluate the inverse, unit-cube coordinates ``[B or 1, 3, *T]``; default: ``u``'s grid.
        tolerance: stop when max ‖Φ(p + z) − p‖ ≤ ``tolerance`` voxels of ``u``'s grid.
        max_iterations: cap on fixed-point evaluations; reaching it warns (:class:`InversionWarning`).
        check_folds: count grid points where ``Φ`` folds (det J ≤ 0); any fold warns, the inverse is not
            defined there (the iteration may still settle on one of several preimages).

    Returns ``(z, report)``. ``z`` is differentiable in ``u`` and ``points`` (implicit backward pass).
    """
    if points is None:
        points = identity_map(displacement.shape[2:], dtype=displacement.dtype, device=displacement.device)
    report = InversionReport(tolerance_voxels=tolerance)
    if check_folds:
        report.folds = count_folds(displacement)
    solution = _FixedPointInverse.apply(displacement, points, _Settings(tolerance, max_iterations, memory, report))
    if warn and not report.invertible:
        reasons = []
        if report.folds:
            reasons.append(f"the field folds at {report.folds} grid points (Jacobian determinant ≤ 0), so it has "
                           "no inverse there")
        if not report.converged:
            reasons.append(f"the iteration stopped after {report.iterations} steps with a maximum error of "
                           f"{report.max_error_voxels:.3g} voxels (tolerance {tolerance:g})")
        warnings.warn("Deformation inversion: " + "; ".join(reasons) + ".", InversionWarning, stacklevel=2)
    return solution, report


def unrolled_inverse(displacement: torch.Tensor, steps: int) -> torch.Tensor:
    """An approximate inverse displacement on ``displacement``'s own grid: ``steps`` plain fixed-point steps
    ``z ← −u(x + z)`` from ``z = −u(x)``, differentiated through the steps by autograd (no convergence check, no
    implicit backward). For losses in training, where a few hundredths of a voxel do not matter and the exact
    inversion's cost does: on the hippocampus model's predictions (36×48×36, batch 4) 4 steps are within 0.02
    voxel of the accurate inverse on average, forward and backward in 0.13 s against 2.6 s for the accurate solve
    (one thread)."""
    grid = identity_map(displacement.shape[2:], dtype=displacement.dtype, device=displacement.device)
    inverse = -displacement
    for _ in range(steps):
        inverse = -sample_at(displacement, grid + inverse, padding="border")
    return inverse


def symmetrize_displacements(displacement_AB: torch.Tensor, displacement_BA: torch.Tensor, *,
                             tolerance: float = 0.01, max_iterations: int = 200, margin: float = 2.0,
                             unrolled_steps: Optional[int] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, list[InversionReport]]:
    """Make two predicted directions consistent: ``u_AB' = u_AB + w (inv(u_BA) − u_AB) / 2`` (the mean of u_AB and
    the inverse of u_BA where ``w = 1``), and ``u_BA'`` likewise.

    ``displacement_AB`` ``[B, 3, *S]`` is Φ_AB − Id (B's grid → A's unit cube) and ``displacement_BA`` Φ_BA − Id,
    both in the unit-cube map convention on grids of the same shape. The inverse of Φ_BA at a point is known only
    where its preimage lies inside A's grid (outside it Φ_BA is only border-extended): ``w`` is 1 there and falls
    linearly to 0 at ``margin`` voxels outside, where Φ_AB is kept as predicted. Swapping the inputs swaps the
    outputs exactly; where ``w = 1`` the two outputs are inverse to each other up to second order in their
    difference, and directions that are already inverse come back unchanged up to the inversion's ``tolerance``
    (voxels) plus the interpolation error of inverting a sampled field (a few hundredths of a voxel at the faces,
    about 0.005 on average for a 2-voxel sinusoid). The reports say how each inversion went (folds are not counted; no warning is raised here:
    callers report). With ``unrolled_steps`` the inverses are :func:`unrolled_inverse` approximations instead (for
    training losses; the reports then hold only that step count).
    """
    if displacement_AB.shape != displacement_BA.shape:
        raise ValueError(f"both directions need the same shape, got {tuple(displacement_AB.shape)} and "
                         f"{tuple(displacement_BA.shape)}")
    grid = identity_map(displacement_AB.shape[2:], dtype=displacement_AB.dtype, device=displacement_AB.device)
    scale = voxel_scale(displacement_AB.shape[2:], dtype=displacement_AB.dtype, device=displacement_AB.device)

    def symmetric(own: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, InversionReport]:
        if unrolled_steps is None:
            inverse, inversion = invert_displacement(other, tolerance=tolerance, max_iterations=max_iterations,
                                                     check_folds=False, warn=False)
        else:
            inverse = unrolled_inverse(other, unrolled_steps)
            inversion = InversionReport(iterations=unrolled_steps, converged=False)
        preimage = grid + inverse  # in the other grid's unit cube
        outside = torch.clamp(torch.maximum(-preimage, preimage - 1) * scale, min=0)  # voxels beyond its faces
        weight = torch.clamp(1 - outside / margin, min=0).prod(dim=1, keepdim=True)
        return own + weight * (inverse - own) / 2, inversion

    forward, report_BA = symmetric(displacement_AB, displacement_BA)
    backward, report_AB = symmetric(displacement_BA, displacement_AB)
    return forward, backward, [report_AB, report_BA]


def symmetrize_maps(maps: torch.Tensor, *, tolerance: float = 0.01, max_iterations: int = 200,
                    unrolled_steps: Optional[int] = None) -> tuple[torch.Tensor, list[InversionReport]]:
    """:func:`symmetrize_displacements` of stacked maps ``[Φ_AB; Φ_BA]`` ``[2b, 3, *S]`` (the first ``b`` one
    direction, the last ``b`` the other, as networks and the training objective stack them): the same stack made
    consistent, and the reports of the two inversions. Differentiable in ``maps`` (implicit backward), so a loss
    can be taken on the consistent maps a user gets with ``register(symmetric=True)`` (``unrolled_steps``: the
    cheap approximation of :func:`symmetrize_displacements`, for training)."""
    if maps.shape[0] % 2:
        raise ValueError(f"maps must stack two directions of the same batch, got a batch of {maps.shape[0]}")
    forward, backward, reports = symmetrize_displacements(*map_to_displacement(maps).chunk(2),
                                                          tolerance=tolerance, max_iterations=max_iterations,
                                                          unrolled_steps=unrolled_steps)
    return displacement_to_map(torch.cat([forward, backward])), reports
