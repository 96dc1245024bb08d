"""Coordinate maps on the network grid: identity, sample_at, compose, evaluate_map, Jacobian, fold count.

Convention under test (DESIGN.md): maps are [B, 3, D, H, W] in the unit cube, channel c = coordinate along
tensor axis 2 + c (z, y, x), voxel i of an N-voxel axis at i / (N - 1), trilinear sampling with
grid_sample(align_corners=True) semantics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ICONRegistrationLib.core.coordinates import (compose, evaluate_map, fold_count, identity_map, is_identity,
                                                   jacobian_determinant, sample_at)

SHAPE = (7, 9, 11)  # anisotropic so that any axis / channel mix-up shows


def _index_grid(shape, dtype=torch.float64):
    """Integer voxel indices [3, *shape] (channel c = index along axis c)."""
    axes = [torch.arange(n, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _affine_map(matrix, offset, shape, dtype=torch.float64):
    """Samples of A(x) = M x + b on the identity grid of ``shape`` (unit cube), [1, 3, *shape]."""
    x = identity_map(shape, dtype=dtype)[0].reshape(3, -1)
    m = torch.as_tensor(matrix, dtype=dtype)
    b = torch.as_tensor(offset, dtype=dtype)[:, None]
    return (m @ x + b).reshape(1, 3, *shape)


# --------------------------------------------------------------------------------------------- identity


def test_identity_map_values_shape_and_channel_order():
    grid = identity_map(SHAPE)
    assert grid.shape == (1, 3, *SHAPE)
    assert grid.dtype == torch.float32
    assert is_identity(grid)
    for c, n in enumerate(SHAPE):
        expected = torch.arange(n, dtype=torch.float64) / (n - 1)
        view = [1, 1, 1]
        view[c] = n
        expected = expected.reshape(view).expand(SHAPE)
        # channel c varies along tensor axis c only and equals i / (N_c - 1)
        assert torch.allclose(grid[0, c].double(), expected, atol=1e-7, rtol=0)
    # corners: (0,0,0) and (1,1,1)
    assert grid[0, :, 0, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(grid[0, :, -1, -1, -1], torch.ones(3), atol=1e-7)
    # the tag is an attribute of that tensor only: a copy is not an identity grid
    assert not is_identity(grid.clone())


def test_identity_map_float64():
    grid = identity_map((5, 3, 2), dtype=torch.float64)
    assert grid.dtype == torch.float64
    assert grid[0, 0, :, 0, 0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid[0, 1, 0, :, 0].tolist() == [0.0, 0.5, 1.0]
    assert grid[0, 2, 0, 0, :].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------- sample_at


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_at_identity_returns_the_image(padding):
    torch.manual_seed(0)
    image = torch.randn(2, 3, *SHAPE)
    warped = sample_at(image, identity_map(SHAPE), padding=padding)
    assert warped.shape == image.shape
    assert torch.allclose(warped, image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_warp_translation_matches_hand_computed_linear_interpolation(axis):
    """Φ(x) = x + 0.3 voxel along axis ``axis`` samples 0.7·I[i] + 0.3·I[i+1] (random, non-linear image)."""
    torch.manual_seed(1)
    image = torch.randn(1, 1, *SHAPE, dtype=torch.float64)
    n = SHAPE[axis]
    grid = identity_map(SHAPE, dtype=torch.float64).clone()
    grid[:, axis] += 0.3 / (n - 1)
    warped = sample_at(image, grid, padding="border")
    lower = image.narrow(2 + axis, 0, n - 1)
    upper = image.narrow(2 + axis, 1, n - 1)
    expected = 0.7 * lower + 0.3 * upper
    assert torch.allclose(warped.narrow(2 + axis, 0, n - 1), expected, atol=1e-10, rtol=0)
    # the last slice samples beyond the grid: border padding repeats the edge value
    assert torch.allclose(warped.narrow(2 + axis, n - 1, 1), image.narrow(2 + axis, n - 1, 1), atol=1e-10)


def test_warp_translation_of_linear_image_is_exact():
    """Trilinear interpolation reproduces a linear image I(p) = c + g·p exactly at any point inside the cube."""
    gradient = torch.tensor([2.0, -3.0, 5.0], dtype=torch.float64)
    image = (1.5 + torch.einsum("c,bc...->b...", gradient, identity_map(SHAPE, dtype=torch.float64)))[:, None]
    shift = torch.tensor([0.11, -0.07, 0.23], dtype=torch.float64)
    coordinates = identity_map(SHAPE, dtype=torch.float64) + shift.reshape(1, 3, 1, 1, 1)
    warped = sample_at(image, coordinates, padding="zeros")
    expected = 1.5 + torch.einsum("c,bc...->b...", gradient, coordinates)[:, None]
    inside = ((coordinates >= 0) & (coordinates <= 1)).all(dim=1, keepdim=True)
    assert int(inside.sum()) > 100
    assert torch.allclose(warped[inside], expected[inside], atol=1e-10, rtol=0)


def test_warp_padding_modes_outside_the_cube():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4) + 1
    outside = torch.full((1, 3, 1, 1, 1), -1.0)  # far below the cube along every axis
    assert sample_at(image, outside, padding="zeros").item() == 0.0
    assert sample_at(image, outside, padding="border").item() == image[0, 0, 0, 0, 0].item() == 1.0
    beyond = torch.full((1, 3, 1, 1, 1), 3.0)
    assert sample_at(image, beyond, padding="border").item() == image[0, 0, -1, -1, -1].item() == 24.0
    assert sample_at(image, beyond, padding="zeros").item() == 0.0


def test_warp_broadcasts_batch_of_one():
    torch.manual_seed(2)
    image = torch.randn(3, 1, *SHAPE)
    grid = identity_map(SHAPE)
    assert sample_at(image, grid).shape == (3, 1, *SHAPE)
    maps = torch.cat([grid, grid, grid])
    assert sample_at(image[:1], maps).shape == (3, 1, *SHAPE)


# ---------------------------------------------------------------------------------------------- compose

M_OUTER = [[0.9, 0.05, -0.03], [0.02, 1.1, 0.04], [-0.05, 0.03, 0.95]]
B_OUTER = [0.04, -0.05, 0.03]
M_INNER = [[1.05, -0.04, 0.02], [0.03, 0.92, -0.02], [0.01, 0.05, 1.02]]
B_INNER = [-0.03, 0.04, -0.02]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_compose_affine_maps_matches_analytic_composition(dtype, tolerance):
    shape = (13, 15, 17)
    outer = _affine_map(M_OUTER, B_OUTER, shape, dtype)
    inner = _affine_map(M_INNER, B_INNER, shape, dtype)
    composed = compose(outer, inner)
    m = torch.tensor(M_OUTER, dtype=torch.float64) @ torch.tensor(M_INNER, dtype=torch.float64)
    b = torch.tensor(M_OUTER, dtype=torch.float64) @ torch.tensor(B_INNER, dtype=torch.float64) + torch.tensor(
        B_OUTER, dtype=torch.float64)
    expected = _affine_map(m, b, shape, torch.float64)
    # where inner(x) stays inside the cube no border clamping happens and interpolation of the
    # (affine) displacement is exact
    inside = ((inner >= 0) & (inner <= 1)).all(dim=1)
    count = int(inside.sum())
    assert count > 0.7 * math.prod(shape)
    error = (composed.double() - expected).abs().amax(dim=1)
    assert float(error[inside].max()) < tolerance
    # outside the cube the displacement is continued from the border: no longer the affine composition
    assert float(error[~inside].max()) > 1e-3


def test_compose_with_identity_is_neutral():
    torch.manual_seed(3)
    shape = (6, 7, 8)
    grid = identity_map(shape)
    phi = grid + 0.02 * torch.randn(1, 3, *shape)
    # phi ∘ Id = phi (identity grid: shortcut) and Id ∘ phi = phi (interpolating the zero displacement)
    assert torch.equal(compose(phi, grid), phi)
    assert torch.allclose(compose(identity_map(shape), phi), phi, atol=1e-7)


def test_evaluate_map_identity_shortcut_equals_interpolation():
    torch.manual_seed(4)
    shape = (6, 7, 8)
    phi = identity_map(shape) + 0.05 * torch.randn(2, 3, *shape)
    tagged = identity_map(shape)
    untagged = identity_map(shape).clone()
    assert is_identity(tagged) and not is_identity(untagged)
    shortcut = evaluate_map(phi, tagged)
    interpolated = evaluate_map(phi, untagged)
    assert shortcut.shape == interpolated.shape == (2, 3, *shape)
    assert torch.allclose(shortcut, phi, atol=0, rtol=0)
    assert float((shortcut - interpolated).abs().max()) < 1e-6


def test_evaluate_map_between_grid_points_interpolates_displacement():
    """Displacement u(z) = z² along channel 0 on a 5-voxel axis: halfway between 0.25 and 0.5 u = (1/16 + 1/4) / 2."""
    shape = (5, 2, 2)
    grid = identity_map(shape, dtype=torch.float64)
    phi = grid.clone()
    phi[:, 0] += grid[:, 0] ** 2
    point = torch.tensor([0.375, 0.5, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    value = evaluate_map(phi, point).flatten()
    assert value.tolist() == pytest.approx([0.375 + (0.0625 + 0.25) / 2, 0.5, 0.5], abs=1e-12)


# ------------------------------------------------------------------------------------------- Jacobians

M_JAC = [[1.2, 0.3, -0.1], [0.05, 0.8, 0.2], [-0.15, 0.1, 1.1]]


def test_jacobian_determinant_affine_unit_cube():
    shape = (9, 10, 11)
    det_m = float(np.linalg.det(np.array(M_JAC)))  # 0.994
    assert det_m == pytest.approx(0.994, abs=1e-12)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        positions = _affine_map(M_JAC, [0.1, -0.2, 0.05], shape, dtype)
        det = jacobian_determinant(positions)
        assert det.shape == (1, 1, *shape)
        # central differences inside and one-sided differences at the faces are exact for affine maps
        assert float((det - det_m).abs().max()) < tolerance


def test_jacobian_determinant_identity_is_one():
    det = jacobian_determinant(identity_map((4, 5, 6)))
    assert float((det - 1).abs().max()) < 1e-5
    assert fold_count(det) == 0


def test_jacobian_determinant_affine_physical_oblique_grid():
    """Positions in mm on a grid whose index steps are columns of R·diag(spacing) (oblique, anisotropic)."""
    shape = (8, 9, 10)
    spacing = torch.tensor([2.5, 0.7, 1.3], dtype=torch.float64)
    a, b = 0.4, -0.7  # a rotation about two axes
    rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]], dtype=torch.float64)
    grid_matrix = rz @ rx @ torch.diag(spacing)
    assert float(torch.det(grid_matrix)) == pytest.approx(2.5 * 0.7 * 1.3, rel=1e-12)
    origin = torch.tensor([-40.0, 12.0, 7.5], dtype=torch.float64)
    physical = (grid_matrix @ _index_grid(shape).reshape(3, -1)) + origin[:, None]
    m = torch.tensor(M_JAC, dtype=torch.float64)
    positions = (m @ physical + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)[:, None]).reshape(1, 3, *shape)
    det = jacobian_determinant(positions, grid_matrix)
    assert float((det - 0.994).abs().max()) < 1e-5
    # the identity in physical space has determinant 1 with that grid matrix...
    identity_det = jacobian_determinant(physical.reshape(1, 3, *shape), grid_matrix)
    assert float((identity_det - 1).abs().max()) < 1e-10
    # ...and a diagonal grid matrix may be given as a spacing sequence
    axis_aligned = (torch.diag(spacing) @ _index_grid(shape).reshape(3, -1)).reshape(1, 3, *shape)
    assert float((jacobian_determinant(axis_aligned, spacing.tolist()) - 1).abs().max()) < 1e-10
    # forgetting the grid matrix gives a wrong (unit-cube) answer: the matrix matters
    assert float((jacobian_determinant(positions) - 0.994).abs().max()) > 1.0


def test_jacobian_determinant_sinusoidal_map():
    """Sinusoidal maps against their analytic Jacobian determinants (interior voxels).

    Φ_z = z + a sin(2πy), Φ_y = y + a sin(2πx), Φ_x = x + a sin(2πz): the Jacobian is
    [[1, k cos 2πy, 0], [0, 1, k cos 2πx], [k cos 2πz, 0, 1]] with k = 2πa, det = 1 + k³ cos2πz cos2πy cos2πx.
    A second map Φ_c = x_c + a sin(2πx_c) has det = Π(1 + k cos 2πx_c).
    Central differences with step h = 1/(N-1) see k·cos·sin(2πh)/(2πh): the relative error of each derivative
    is (2πh)²/6 ≈ 0.41 % at N = 41, so with k = 2π·0.05 ≈ 0.31 the determinant (≤ (1+k)³ ≈ 2.25) is off by
    ≈ 3·0.0041·k·(1+k)² ≈ 0.0066 < 1e-2 in the interior;
    with the discrete factor sin(2πh)/(2πh) included the agreement is at rounding level.
    """
    n = 41
    shape = (n, n, n)
    a = 0.05
    k = 2 * math.pi * a
    x = identity_map(shape, dtype=torch.float64)
    z_, y_, x_ = x[0, 0], x[0, 1], x[0, 2]
    h = 1.0 / (n - 1)
    discrete = math.sin(2 * math.pi * h) / (2 * math.pi * h)
    interior = (slice(1, -1),) * 3

    coupled = torch.stack([z_ + a * torch.sin(2 * math.pi * y_), y_ + a * torch.sin(2 * math.pi * x_),
                           x_ + a * torch.sin(2 * math.pi * z_)])[None]
    cosines = torch.cos(2 * math.pi * z_) * torch.cos(2 * math.pi * y_) * torch.cos(2 * math.pi * x_)
    det = jacobian_determinant(coupled)[0, 0]
    analytic = 1 + k ** 3 * cosines
    assert float((det - analytic)[interior].abs().max()) < 1e-2
    assert float((det - (1 + (k * discrete) ** 3 * cosines))[interior].abs().max()) < 1e-10

    separable = x + a * torch.sin(2 * math.pi * x)
    det = jacobian_determinant(separable)[0, 0]
    analytic = ((1 + k * torch.cos(2 * math.pi * z_)) * (1 + k * torch.cos(2 * math.pi * y_))
                * (1 + k * torch.cos(2 * math.pi * x_)))
    error = float((det - analytic)[interior].abs().max())
    assert error < 1e-2
    assert error > 1e-4  # the finite-difference error is real, not a coincidence of the test
    exact_discrete = ((1 + k * discrete * torch.cos(2 * math.pi * z_)) * (1 + k * discrete * torch.cos(2 * math.pi * y_))
                      * (1 + k * discrete * torch.cos(2 * math.pi * x_)))
    assert float((det - exact_discrete)[interior].abs().max()) < 1e-10


def _slab_reflection(shape, first, last):
    """Map reflected along z in the slab s0 < z < s1 with s0, s1 half-way between grid points.

    s0 = (first - ½)h and s1 = (last + ½)h: f(z) = z below s0, 2·s0 − z inside, z − 2(s1 − s0) above.
    The analytic dΦ_z/dz is −1 exactly at grid points first … last and +1 elsewhere; no grid point sits on a kink.
    """
    n = shape[0]
    h = 1.0 / (n - 1)
    s0, s1 = (first - 0.5) * h, (last + 0.5) * h
    positions = identity_map(shape, dtype=torch.float64).clone()
    z = positions[:, 0]
    folded = torch.where(z < s0, z, torch.where(z < s1, 2 * s0 - z, z - 2 * (s1 - s0)))
    positions[:, 0] = folded
    return positions


def test_fold_count_slab_reflection():
    shape = (20, 12, 10)
    first, last = 8, 11  # 4 slices inside the slab
    positions = _slab_reflection(shape, first, last)
    det = jacobian_determinant(positions)[0, 0]
    # 4 slices × 12 × 10 = 480 voxels where the analytic determinant is negative
    assert fold_count(det) == 480
    assert fold_count(det[None, None].float()) == 480
    # values: −1 strictly inside (slices 9, 10), −½ on the slab's first/last slice (one-sided mix of ±1),
    # +½ on the slices just outside, +1 elsewhere
    per_slice = det.mean(dim=(1, 2))
    assert torch.allclose(det, per_slice[:, None, None].expand_as(det))
    expected = [1.0] * 7 + [0.5, -0.5, -1.0, -1.0, -0.5, 0.5] + [1.0] * 7
    assert per_slice.tolist() == pytest.approx(expected, abs=1e-9)
    negative = (det < 0).nonzero()[:, 0].unique().tolist()
    assert negative == [8, 9, 10, 11]


def test_fold_count_counts_zero_as_fold():
    # a map collapsing one axis has determinant 0 everywhere: every voxel counts (≤ 0)
    positions = identity_map((4, 5, 6)).clone()
    positions[:, 1] = 0.5
    det = jacobian_determinant(positions)
    assert float(det.abs().max()) == 0.0
    assert fold_count(det) == 4 * 5 * 6


def test_identity_tag_is_cleared_by_in_place_changes():
    """Regression: an identity grid modified in place must not take the no-interpolation shortcut."""
    from ICONRegistrationLib.core.coordinates import evaluate_map, identity_map, is_identity
    grid = identity_map((5, 6, 7))
    phi = identity_map((5, 6, 7)) * 0.5 + 0.25
    assert is_identity(grid)
    grid += 0.1
    assert not is_identity(grid)
    assert torch.allclose(evaluate_map(phi, grid), evaluate_map(phi, grid.clone()), atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 2, 9, 8)])
def test_vector_length_is_the_channel_norm(shape):
    from ICONRegistrationLib.core.coordinates import vector_length

    field = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(vector_length(field), field.norm(dim=1))
    assert vector_length(field[:, :1]).equal(field[:, 0].abs())
