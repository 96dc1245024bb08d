"""Inverse consistency by construction (ConstrICON, SITReg-style) and the deformation-inversion layer.

Bounds are in voxels of the network grid unless stated. "Interpolation level": the composition Φ_AB∘Φ_BA of
two transforms that are exact inverses in the continuum, each sampled on a grid and interpolated trilinearly.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image, rotation
from ICONRegistrationLib.core.constricon import AffineStep, integrate_velocity
from ICONRegistrationLib.core.coordinates import identity_map, sample_at
from ICONRegistrationLib.core.inversion import InversionWarning, invert_displacement
from ICONRegistrationLib.core.objective import symmetric_objective
from ICONRegistrationLib.core.losses import LNCC
from ICONRegistrationLib.errors import UserError
from ICONRegistrationLib.models import ModelSpec, build_network

SHAPE = (32, 40, 36)
SMALL_UNET = {"num_layers": 3, "channels": [[2, 8, 16, 16], [8, 16, 16]]}


def _pair(shape=SHAPE):
    A = torch.as_tensor(blob_volume(shape, seed=1))[None, None] / 1000
    B = torch.as_tensor(blob_volume(shape, seed=2))[None, None] / 1000
    return A, B


def _voxels(shape):
    return torch.tensor([n - 1 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)


def _random_network(architecture: str, options: dict, output_scale: float, seed: int = 0, shape=SHAPE,
                    spec: ModelSpec | None = None):
    """A network (of ``spec``, or a small one) whose zero-initialised output layers are randomised."""
    torch.manual_seed(seed)
    spec = spec or ModelSpec(name="random", architecture=architecture, unet=SMALL_UNET, levels=2,
                             input_shape=list(shape), options=options)
    net = build_network(spec)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if "lastConv" in name:
                parameter.normal_(0.0, output_scale)
            if name.endswith("linear.weight"):  # the bias cancels in N(A,B) − N(B,A)
                parameter.normal_(0.0, 4.0)
    return net


def _round_trip_voxels(net, A, B):
    """‖Φ_AB(Φ_BA(x)) − x‖ (voxels) on the grid, with Φ_BA from a separate call on the swapped inputs."""
    grid = identity_map(A.shape[2:])
    with torch.no_grad():
        forward, backward = net(A, B), net(B, A)
        displacement = ((forward(grid) - grid).double() * _voxels(A.shape[2:])).norm(dim=1)
        error = ((forward(backward(grid)) - grid).double() * _voxels(A.shape[2:])).norm(dim=1)
    return displacement, error


# ----- ConstrICON ---------------------------------------------------------------------------------------------

def test_affine_step_returns_exact_inverse_matrices():
    torch.manual_seed(3)
    step = AffineStep((2, 8, 16)).double()
    with torch.no_grad():
        step.net.linear.weight.normal_(0.0, 0.5)
        step.net.linear.bias.normal_(0.0, 0.2)
    A, B = (t.double() for t in _pair((20, 24, 22)))
    forward, backward = step.matrices(A, B)
    assert not torch.allclose(forward, torch.eye(4, dtype=torch.float64))  # a real transform, not the identity
    assert torch.allclose(forward @ backward, torch.eye(4, dtype=torch.float64).expand(1, 4, 4), atol=1e-12)
    assert torch.allclose(forward, torch.linalg.inv(backward), atol=1e-12)
    # Swapping the inputs gives the inverse matrix (N(A,B) − N(B,A) is negated).
    swapped, _ = step.matrices(B, A)
    assert torch.allclose(swapped, backward, atol=1e-14)


@pytest.mark.parametrize("options, mean_bound, p99_bound", [
    ({"affine_steps": 1, "svf_steps": 0}, 1e-5, 1e-5),  # affine maps compose analytically: float rounding only
    ({"affine_steps": 0, "svf_steps": 1}, 0.03, 0.25),
    ({"affine_steps": 2, "svf_steps": 2}, 0.03, 0.25),  # the paper's TSC{Ψ1, TSC{Ψ2, TSC{Ξ1, Ξ2}}}
], ids=["affine", "svf", "four-step"])
def test_constricon_random_weights_inverse_consistent(options, mean_bound, p99_bound):
    A, B = _pair()
    net = _random_network("constricon", options, output_scale=0.1)
    displacement, error = _round_trip_voxels(net, A, B)
    assert float(displacement.max()) > 0.4  # the transform moves voxels (up to ~3 voxels for the SVF nets)
    assert float(error.mean()) <= mean_bound
    assert float(error.flatten().quantile(0.99)) <= p99_bound
    # The same random scale in a GradICON network is not inverse consistent at all: ≥ 50× worse on average.
    gradicon = _random_network("gradicon", {}, output_scale=0.1)
    _, gradicon_error = _round_trip_voxels(gradicon, A, B)
    assert float(gradicon_error.mean()) >= 50 * max(float(error.mean()), 1e-3)


def test_constricon_forward_and_inverse_match_swapped_call():
    A, B = _pair()
    net = _random_network("constricon", {}, output_scale=0.05)
    grid = identity_map(SHAPE)
    with torch.no_grad():
        forward, backward = net.forward_and_inverse(A, B)
        assert torch.allclose(backward(grid), net(B, A)(grid), atol=1e-6)
        assert torch.allclose(forward(grid), net(A, B)(grid), atol=1e-6)


def test_scaling_and_squaring_matches_the_flow_of_a_constant_velocity():
    # A constant velocity integrates to the same translation exactly (no interpolation error for constants).
    velocity = torch.zeros(1, 3, 12, 14, 10, dtype=torch.float64)
    velocity[:, 0] = 0.05
    velocity[:, 2] = -0.02
    assert torch.allclose(integrate_velocity(velocity, 7), velocity, atol=1e-12)


def test_constricon_and_sitreg_train_on_synthetic_pairs():
    """The loss falls over a few Adam steps; ConstrICON's penalty is the bending energy of its velocity fields."""
    shape = (20, 20, 20)
    A, _ = _pair(shape)
    B = torch.roll(A, shifts=(2, -1, 1), dims=(2, 3, 4))
    for architecture, penalty in (("constricon", "bending"), ("sitreg", "diffusion")):
        torch.manual_seed(0)
        spec = ModelSpec(name="t", architecture=architecture, unet=SMALL_UNET, levels=2, input_shape=list(shape),
                         options={"affine_steps": 1, "svf_steps": 2} if architecture == "constricon" else {})
        assert spec.penalty == penalty
        net = build_network(spec).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        losses = []
        for _ in range(12):
            optimizer.zero_grad()
            terms = symmetric_objective(net, A, B, similarity=LNCC(2), lmbda=1.0, penalty=spec.penalty)
            terms.loss.backward()
            optimizer.step()
            losses.append(float(terms.similarity.detach()))
        assert losses[-1] < losses[0] - 0.02, (architecture, losses)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


# ----- SITReg-style network ---------------------------------------------------------------------------------------

def test_sitreg_random_weights_inverse_consistent_and_invertible_updates():
    A, B = _pair()
    net = _random_network("sitreg", {}, output_scale=0.1)
    displacement, error = _round_trip_voxels(net, A, B)
    assert float(displacement.max()) > 1.0
    assert float(error.mean()) <= 0.01 and float(error.flatten().quantile(0.99)) <= 0.1
    grid = identity_map(SHAPE)
    with torch.no_grad():
        forward, _ = net.forward_and_inverse(A, B)
        from ICONRegistrationLib.core.coordinates import jacobian_determinant
        assert int((jacobian_determinant(forward(grid)) <= 0).sum()) == 0  # bounded updates: no folds
    assert len(net.last_inversion_iterations) == 2 and max(net.last_inversion_iterations) < 50


# ----- the deformation-inversion layer ----------------------------------------------------------------------------

def _sinusoidal(shape, amplitude_voxels: float) -> torch.Tensor:
    """A smooth displacement vanishing on the grid's faces (unit-cube units)."""
    grid = identity_map(shape, dtype=torch.float64)
    z, y, x = grid[:, 0], grid[:, 1], grid[:, 2]
    bump = torch.sin(math.pi * z) * torch.sin(math.pi * y) * torch.sin(math.pi * x)
    u = torch.stack([bump * torch.cos(2 * math.pi * y), bump * torch.sin(2 * math.pi * x),
                     bump * torch.cos(math.pi * z)], dim=1)
    return u * amplitude_voxels / _voxels(shape)


def _rotation_plus_bulge(shape, degrees: float, bulge_voxels: float):
    """Analytic Φ(x) = R(x − c) + c + bulge (Gaussian, σ = 8 voxels) in voxel coordinates; returns (u, Φ)."""
    scale = _voxels(shape)
    centre = (scale / 2)
    R = torch.as_tensor(rotation(0, degrees), dtype=torch.float64)

    def phi(voxels: torch.Tensor) -> torch.Tensor:
        offset = voxels - centre
        moved = torch.einsum("rc,bc...->br...", R, offset) + centre
        weight = torch.exp(-(offset ** 2).sum(dim=1, keepdim=True) / (2 * 8.0 ** 2))
        return moved + bulge_voxels * weight * torch.tensor([1.0, 0.5, -0.5], dtype=torch.float64).view(1, 3, 1, 1, 1)

    grid = identity_map(shape, dtype=torch.float64) * scale
    return (phi(grid) - grid) / scale, phi


@pytest.mark.parametrize("kind", ["sinusoidal", "rotation-plus-bulge"])
def test_inversion_of_analytic_diffeomorphisms_reaches_a_hundredth_of_a_voxel(kind):
    shape = (40, 44, 36)
    scale = _voxels(shape)
    if kind == "sinusoidal":
        u = _sinusoidal(shape, 3.0)

        def phi(voxels):
            return voxels + sample_at(u, voxels / scale) * scale  # trilinear on the grid: this field's exact map
    else:
        u, phi = _rotation_plus_bulge(shape, 8.0, 2.0)
    z, report = invert_displacement(u, tolerance=0.01)
    assert report.converged and report.invertible and report.folds == 0
    assert report.max_error_voxels <= 0.01 and 2 <= report.iterations < 60
    grid = identity_map(shape, dtype=torch.float64) * scale
    residual = (phi(grid + z * scale) - grid).norm(dim=1)  # Φ(Φ⁻¹(y)) − y with the analytic Φ
    inside = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # preimages inside the grid
    bound = 0.01 if kind == "sinusoidal" else 0.02  # + trilinear interpolation of a bulge of σ = 8 voxels
    assert float(residual[inside].max()) <= bound
    assert float(z.abs().max() * scale.max()) > 1.0  # a real deformation


def test_inverse_of_the_inverse_returns_the_original():
    shape = (40, 44, 36)
    u = _sinusoidal(shape, 2.0)
    z, _ = invert_displacement(u, tolerance=1e-3)
    back, report = invert_displacement(z, tolerance=1e-3)
    difference = ((back - u) * _voxels(shape)).norm(dim=1)[0]
    assert report.converged
    assert float(difference[3:-3, 3:-3, 3:-3].max()) <= 0.03  # trilinear resampling twice, 2-voxel sinusoid
    assert float(difference.mean()) <= 0.005


def test_folding_field_is_reported_not_silently_inverted():
    shape = (24, 24, 24)
    u = _sinusoidal(shape, 9.0)  # a 9-voxel sinusoid folds (|∇u| > 1)
    with pytest.warns(InversionWarning, match="folds"):
        _, report = invert_displacement(u, max_iterations=30)
    assert report.folds > 0 and not report.invertible


def test_iteration_cap_warns():
    u = _sinusoidal((24, 24, 24), 2.0)
    with pytest.warns(InversionWarning, match="stopped after 2 steps"):
        _, report = invert_displacement(u, max_iterations=2)
    assert not report.converged and report.iterations == 2


def test_inversion_gradients_by_implicit_differentiation():
    torch.manual_seed(0)
    shape = (3, 4, 3)
    u = ((torch.rand(1, 3, *shape, dtype=torch.float64) - 0.5) * 0.05).requires_grad_(True)
    points = (identity_map(shape, dtype=torch.float64) + 0.01 * torch.randn(1, 3, *shape, dtype=torch.float64))
    points.requires_grad_(True)

    def solve(field, where):
        return invert_displacement(field, where, tolerance=1e-12, max_iterations=500, warn=False)[0]

    assert torch.autograd.gradcheck(solve, (u, points), eps=1e-7, atol=1e-6)


def test_inversion_backward_stores_no_iterations():
    """Memory does not grow with iterations: the graph holds the inputs and the solution only."""
    u = _sinusoidal((16, 16, 16), 2.0).float().requires_grad_(True)
    z, report = invert_displacement(u, tolerance=1e-4)
    assert z.grad_fn is not None and report.iterations > 3
    assert len(z.grad_fn.saved_tensors) == 3  # displacement, points, solution
    z.sum().backward()
    assert torch.isfinite(u.grad).all() and float(u.grad.abs().max()) > 0


def test_unrolled_inverse_approaches_the_accurate_one_and_its_gradient_with_the_steps():
    """The cheap training-loss inverse: its error against the accurate inverse falls with each plain step (a
    2-voxel sinusoid contracts by |∇u| per step), and its gradient, taken through the steps, approaches the
    implicit gradient of the accurate one."""
    from ICONRegistrationLib.core.inversion import unrolled_inverse

    shape = (24, 28, 20)
    u = _sinusoidal(shape, 2.0).requires_grad_(True)
    accurate, _ = invert_displacement(u, tolerance=1e-6, max_iterations=300)
    weights = torch.randn_like(accurate)
    (accurate_grad,) = torch.autograd.grad((accurate * weights).sum(), u)
    errors, gradient_errors = [], []
    for steps in (1, 3, 8):
        approximate = unrolled_inverse(u, steps)
        errors.append(float(((approximate - accurate).detach() * _voxels(shape)).norm(dim=1).max()))
        (grad,) = torch.autograd.grad((approximate * weights).sum(), u)
        gradient_errors.append(float((grad - accurate_grad).norm() / accurate_grad.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 and errors[1] < 0.1, errors
    assert gradient_errors[0] > gradient_errors[1] > gradient_errors[2] and gradient_errors[2] < 0.01, gradient_errors


def test_symmetrize_maps_is_differentiable_and_the_unrolled_version_is_close_to_the_accurate_one():
    from ICONRegistrationLib.core.coordinates import displacement_to_map
    from ICONRegistrationLib.core.inversion import symmetrize_maps

    shape = (24, 28, 20)
    forward = _sinusoidal(shape, 2.0)
    backward = -0.8 * forward  # not the inverse: the two directions disagree by about 0.4 voxel
    maps = displacement_to_map(torch.cat([forward, backward])).requires_grad_(True)
    accurate, reports = symmetrize_maps(maps, tolerance=1e-4)
    assert all(report.converged for report in reports)
    cheap, cheap_reports = symmetrize_maps(maps, unrolled_steps=4)
    assert [report.iterations for report in cheap_reports] == [4, 4]
    difference = ((cheap - accurate).detach() * _voxels(shape)).norm(dim=1)
    assert float(difference.max()) < 0.05
    assert float(((accurate - maps).detach() * _voxels(shape)).norm(dim=1).max()) > 0.2  # symmetrising did move them
    cheap.sum().backward()
    assert torch.isfinite(maps.grad).all() and float(maps.grad.abs().max()) > 0
    with pytest.raises(ValueError, match="two directions"):
        symmetrize_maps(maps[:1])


# ----- physical fields: invert_field, `iconreg invert`, register(exact_inverse=True) ------------------------------

def _oblique_field():
    """A smooth displacement field (LPS mm) on an oblique anisotropic grid, and its analytic map."""
    direction = rotation(2, 25) @ rotation(1, -10)
    reference = make_image(np.zeros((30, 36, 28), np.float32), spacing=(1.2, 0.8, 1.5), origin=(-10.0, 5.0, 20.0),
                           direction=direction)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reference.GetSize()], indexing="ij"), -1).astype(float)
    points = np.array(reference.GetOrigin()) + index @ (direction * np.array(reference.GetSpacing())).T
    centre = points.mean(axis=(0, 1, 2))

    def displacement(p):
        r2 = ((p - centre) ** 2).sum(-1, keepdims=True)
        return 3.0 * np.exp(-r2 / (2 * 9.0 ** 2)) * np.array([1.0, -0.6, 0.4])

    vectors = displacement(points).transpose(2, 1, 0, 3)  # sitk array order z, y, x
    field = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field, displacement


def test_invert_field_on_another_grid_and_round_trip_in_itk():
    from ICONRegistrationLib.pipeline.inverse import invert_field

    field, displacement = _oblique_field()
    target = make_image(np.zeros((26, 30, 24), np.float32), spacing=(1.0, 1.1, 1.3), origin=(-6.0, 8.0, 22.0),
                        direction=rotation(2, 25) @ rotation(1, -10))
    inverse = invert_field(field, target, dtype=torch.float64)
    assert inverse.report.invertible and inverse.max_error_mm <= 0.01 * 1.5
    forward_transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    inverse_transform = sitk.DisplacementFieldTransform(sitk.Image(inverse.field))
    errors = []
    for index in [(i, j, k) for i in range(4, 22, 5) for j in range(4, 26, 5) for k in range(4, 20, 5)]:
        y = np.array(target.TransformIndexToPhysicalPoint(index))
        x = np.array(inverse_transform.TransformPoint(tuple(y)))
        # ITK's forward transform undoes the inverse everywhere (both read the same trilinear field) ...
        assert np.linalg.norm(np.array(forward_transform.TransformPoint(tuple(x))) - y) <= 0.01 * 1.5
        inside = all(0 <= c <= n - 1 for c, n in zip(field.TransformPhysicalPointToContinuousIndex(tuple(x)),
                                                    field.GetSize()))
        if inside:  # ... and the analytic map where the field samples it (outside it is border-extended)
            errors.append(np.linalg.norm(x + displacement(x) - y))
    assert len(errors) >= 60
    assert max(errors) <= 0.03  # tolerance + trilinear interpolation of a σ = 9 mm bulge, mm


def test_invert_field_reports_the_round_trip_the_other_way_as_itk_reads_it():
    """``forward_first_*``: ‖Φ⁻¹(Φ(x)) − x‖ at the field's voxels whose image lies in the inverse's box, with the
    sampled inverse read trilinearly, exactly as ITK's transforms give it; on a coarse inverse grid it shows the
    interpolation error that the solver's own residual (at the inverse's voxels) cannot see."""
    from ICONRegistrationLib.pipeline.inverse import invert_field

    field, _ = _oblique_field()
    coarse = make_image(np.zeros((9, 10, 8), np.float32), spacing=(3.5, 3.3, 3.9), origin=(-6.0, 8.0, 22.0),
                        direction=rotation(2, 25) @ rotation(1, -10))
    inverse = invert_field(field, coarse, dtype=torch.float64)
    forward_transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    inverse_transform = sitk.DisplacementFieldTransform(sitk.Image(inverse.field))
    errors = []
    for index in np.ndindex(*field.GetSize()):
        x = np.array(field.TransformIndexToPhysicalPoint(tuple(int(i) for i in index)))
        y = forward_transform.TransformPoint(tuple(x))
        position = coarse.TransformPhysicalPointToContinuousIndex(y)
        if all(-1e-6 <= c <= n - 1 + 1e-6 for c, n in zip(position, coarse.GetSize())):
            errors.append(np.linalg.norm(np.array(inverse_transform.TransformPoint(y)) - x))
    assert len(errors) > 1000
    assert inverse.forward_first_max_error_mm == pytest.approx(max(errors), rel=1e-3, abs=1e-5)
    assert inverse.forward_first_mean_error_mm == pytest.approx(float(np.mean(errors)), rel=1e-3, abs=1e-5)
    assert inverse.max_error_mm <= 0.01 * 4  # the solver's residual at the coarse voxels: within tolerance ...
    assert inverse.forward_first_max_error_mm > 5 * inverse.max_error_mm  # ... the other way, interpolation shows
    report = inverse.to_dict()
    assert report["forward_first_max_error_mm"] == inverse.forward_first_max_error_mm
    far = make_image(np.zeros((5, 5, 5), np.float32), origin=(500.0, 500.0, 500.0))  # no Φ(x) in its box
    assert invert_field(field, far).forward_first_max_error_mm is None


def test_invert_field_counts_the_voxels_where_itk_applies_no_displacement():
    """ITK's displacement-field transform applies no displacement more than half a voxel outside its box; the
    inverse border-extends the field there. A reference grid shifted 6 mm past a constant (3, −2, 5) mm field:
    the solver's residual is ~0, but an ITK round trip misses by the full 6.16 mm at the voxels whose preimage is
    outside; the report counts them and gives ITK's error, measured here with SimpleITK itself."""
    from ICONRegistrationLib.pipeline.inverse import invert_field

    vectors = np.broadcast_to(np.array([3.0, -2.0, 5.0]), (20, 20, 20, 3)).copy()
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.SetSpacing((2.0, 2.0, 2.0))
    counts = []
    for origin in ((0.0, 0.0, 0.0), (6.0, 6.0, 6.0)):  # the field's own grid: its edge voxels' preimages leave too
        reference = make_image(np.zeros((20, 20, 20), np.float32), spacing=(2.0, 2.0, 2.0), origin=origin)
        inverse = invert_field(field, reference, dtype=torch.float64)
        forward, backward = (sitk.DisplacementFieldTransform(sitk.Image(f)) for f in (field, inverse.field))
        itk_errors = [np.linalg.norm(np.array(forward.TransformPoint(backward.TransformPoint(y))) - np.array(y))
                      for y in (reference.TransformIndexToPhysicalPoint(index) for index in
                                np.ndindex(*reference.GetSize()))]
        assert inverse.max_error_mm < 1e-4
        assert inverse.itk_max_error_mm == pytest.approx(max(itk_errors), abs=1e-4)
        assert inverse.outside_field_voxels == sum(error > 1e-3 for error in itk_errors)
        counts.append(inverse.outside_field_voxels)
    assert 0 < counts[0] < counts[1] and inverse.itk_max_error_mm == pytest.approx(np.sqrt(38.0), abs=1e-4)


def test_invert_field_refuses_a_folding_field():
    from ICONRegistrationLib.pipeline.inverse import invert_field

    field, _ = _oblique_field()
    array = sitk.GetArrayFromImage(field) * 6.0  # an 18 mm bulge of σ = 9 mm folds
    folding = sitk.GetImageFromArray(array, isVector=True)
    folding.CopyInformation(field)
    with pytest.raises(UserError, match="folds at .* voxels"):
        invert_field(folding, field)
    with pytest.warns(InversionWarning, match="folds"):
        approximate = invert_field(folding, field, allow_folds=True)
    assert not approximate.report.invertible


def test_cli_invert_writes_an_inverse_transform(tmp_path, capsys):
    import json

    from ICONRegistrationLib.cli import main
    from ICONRegistrationLib.io import write_displacement_field

    field, displacement = _oblique_field()
    write_displacement_field(field, tmp_path / "T.h5")
    reference = make_image(np.zeros((20, 22, 18), np.float32), spacing=(1.5, 1.5, 1.5), origin=(-4.0, 6.0, 24.0))
    sitk.WriteImage(reference, str(tmp_path / "R.nii.gz"))
    assert main(["invert", "--transform", str(tmp_path / "T.h5"), "--reference", str(tmp_path / "R.nii.gz"),
                 "--out", str(tmp_path / "T_inv.h5")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["invertible"] and summary["max_error_voxels"] <= 0.01
    inverse = sitk.ReadTransform(str(tmp_path / "T_inv.h5"))
    y = np.array(reference.TransformIndexToPhysicalPoint((10, 11, 9)))
    x = np.array(inverse.TransformPoint(tuple(y)))
    assert np.linalg.norm(x - y) > 0.5 and np.linalg.norm(x + displacement(x) - y) <= 0.03
    # A folding field: exit code 3 with one line on stderr.
    array = sitk.GetArrayFromImage(field) * 6.0
    folding = sitk.GetImageFromArray(array, isVector=True)
    folding.CopyInformation(field)
    write_displacement_field(folding, tmp_path / "fold.h5")
    assert main(["invert", "--transform", str(tmp_path / "fold.h5"), "--reference", str(tmp_path / "R.nii.gz"),
                 "--out", str(tmp_path / "fold_inv.h5")]) == 3
    assert "folds" in capsys.readouterr().err
    assert not (tmp_path / "fold_inv.h5").exists()
    # No iterations (the initial guess was written as the inverse with exit 0) or a meaningless tolerance: refused.
    for option, value in (("--max-iterations", "0"), ("--max-iterations", "-5"), ("--tolerance", "-1"),
                          ("--tolerance", "nan"), ("--tolerance", "inf")):
        assert main(["invert", "--transform", str(tmp_path / "T.h5"), "--reference", str(tmp_path / "R.nii.gz"),
                     "--out", str(tmp_path / "bad_inv.h5"), option, value]) == 3, (option, value)
        assert ("iteration" if "iterations" in option else "tolerance") in capsys.readouterr().err
        assert not (tmp_path / "bad_inv.h5").exists()


def test_register_exact_inverse_on_oblique_grids():
    """An analytic affine-plus-bulge network whose reverse prediction is wrong (identity): the exact inverse
    replaces it, and maps moving points back through the analytic forward map within 0.01 voxel + interpolation."""
    from analytic import analytic_model, oblique_pair
    from ICONRegistrationLib.pipeline import register

    fixed, moving = oblique_pair()
    matrix = rotation(2, 4.0) * 1.02
    offset = np.array([1.5, -2.0, 1.0])
    model = analytic_model(fixed, moving, matrix, offset, bulge=1.5)
    for field_grid in ("network", "fixed"):
        result = register(fixed, moving, model, fixed_modality="mri", moving_modality="mri", exact_inverse=True,
                          field_grid=field_grid)
        inverse = result.metrics.inverse
        assert inverse.method == "exact" and inverse.invertible and inverse.max_error_voxels <= 0.01
        network = model.net
        # Moving-grid points well inside the forward field's domain: Φ(Φ⁻¹(y)) with the analytic Φ.
        grid = sitk.DisplacementFieldTransform(sitk.Image(result.inverse_field))
        size = moving.GetSize()
        errors = []
        for index in [(i, j, k) for i in range(8, size[0] - 8, 5) for j in range(8, size[1] - 8, 7)
                      for k in range(8, size[2] - 8, 6)]:
            y = moving.TransformIndexToPhysicalPoint(index)
            x = grid.TransformPoint(y)
            domain = result.forward_field
            if not all(0.5 <= c <= n - 1.5 for c, n in zip(domain.TransformPhysicalPointToContinuousIndex(x),
                                                           domain.GetSize())):
                continue  # the preimage lies where the forward field is border-extended, not analytic
            mapped = network.physical_map(torch.tensor(x, dtype=torch.float64).view(1, 3))
            errors.append(float((mapped - torch.tensor(y).view(1, 3)).norm()))
        assert len(errors) >= 20
        assert max(errors) <= 0.05, (field_grid, max(errors))
    plain = register(fixed, moving, model, fixed_modality="mri", moving_modality="mri")
    assert plain.metrics.inverse.method == "network"


def test_bending_energy_is_zero_for_affine_velocity_and_positive_otherwise():
    from ICONRegistrationLib.core.constricon import bending_energy

    grid = identity_map((10, 12, 14), dtype=torch.float64)
    affine = 0.1 * grid[:, [1, 2, 0]] + 0.02
    assert float(bending_energy(affine)) < 1e-20
    curved = affine + 0.01 * torch.sin(6 * grid)
    assert float(bending_energy(curved)) > 1e-6


def test_warnings_are_not_raised_for_well_behaved_fields():
    with warnings.catch_warnings():
        warnings.simplefilter("error", InversionWarning)
        invert_displacement(_sinusoidal((20, 20, 20), 1.0))


def test_constricon_hippocampus_recipe_builds_trains_and_registers():
    """The spec of the reported ConstrICON run (Resources/Models) is valid, defaults to the bending penalty, and a
    network built from it registers both directions at interpolation-level inverse consistency."""
    from conftest import REPO

    spec = ModelSpec.from_file(REPO / "Resources" / "Models" / "constricon-hippocampus.json")
    assert spec.architecture == "constricon" and spec.penalty == "bending" and spec.lmbda == 5.0
    net = _random_network("constricon", {}, output_scale=0.05, spec=spec)
    assert {"netPhi.net.linear.weight", "netPsi.netPhi.net.linear.weight"} <= set(net.state_dict())
    A, B = _pair(tuple(spec.input_shape))
    _, error = _round_trip_voxels(net, A, B)
    assert float(error.mean()) <= 0.03


def test_sitreg_hippocampus_recipe_is_valid():
    from conftest import REPO

    spec = ModelSpec.from_file(REPO / "Resources" / "Models" / "sitreg-hippocampus.json")
    assert spec.architecture == "sitreg" and spec.penalty == "diffusion" and spec.levels == 3
    net = build_network(spec)
    A, B = _pair(tuple(spec.input_shape))
    _, error = _round_trip_voxels(net, A, B)  # fresh weights: the identity, exactly inverse
    assert float(error.max()) <= 1e-5


def _gradicon_and_constricon(svf_downsample, affine_steps=1, channels=None):
    gradicon = _random_network("gradicon", {}, output_scale=0.05, seed=3,
                               spec=ModelSpec(name="g", architecture="gradicon", unet=SMALL_UNET, levels=2,
                                              last_step=True, input_shape=list(SHAPE)))
    unet = SMALL_UNET if channels is None else {"num_layers": 3, "channels": channels}
    constricon = _random_network("constricon", {}, output_scale=0.05, seed=4,
                                 spec=ModelSpec(name="c", architecture="constricon", unet=unet,
                                                input_shape=list(SHAPE),
                                                options={"affine_steps": affine_steps, "svf_steps": 3,
                                                         "svf_downsample": svf_downsample}))
    return gradicon, constricon


def test_constricon_from_gradicon_predicts_half_the_antisymmetric_displacement():
    """A warm start copies each GradICON UNet into the SVF step pooled as often (coarse to fine) with its last
    convolution halved, so each velocity is (u[A,B] − u[B,A]) / 2; affine steps start at the identity."""
    from ICONRegistrationLib.core.constricon import SVFStep, _pool
    from ICONRegistrationLib.models.convert import constricon_from_gradicon, gradicon_steps

    gradicon, constricon = _gradicon_and_constricon([1, 0, 0])
    constricon_from_gradicon(gradicon, constricon)
    A, B = _pair()
    sources = list(gradicon_steps(gradicon))
    steps = [m for m in constricon.modules() if isinstance(m, SVFStep)]
    assert [p for p, _ in sources] == [s.downsample for s in steps] == [1, 0, 0]
    with torch.no_grad():
        for (pooled, unet), step in zip(sources, steps):
            u_ab = unet(_pool(A, pooled), _pool(B, pooled))
            u_ba = unet(_pool(B, pooled), _pool(A, pooled))
            assert float(u_ab.abs().max()) > 1e-3  # the randomised steps move voxels
            velocity = step.algebra(A, B)
            expected = (u_ab - u_ba) / 2
            if pooled:
                from ICONRegistrationLib.core.coordinates import resample_displacement
                expected = resample_displacement(expected, A.shape[2:])
            torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)
        affine = next(m for m in constricon.modules() if isinstance(m, AffineStep))
        assert float(affine.net(A, B).abs().max()) == 0.0
    _, error = _round_trip_voxels(constricon, A, B)  # still inverse consistent by construction
    assert float(error.mean()) <= 0.03


@pytest.mark.parametrize("svf_downsample, channels, message", [
    ([2, 1, 0], None, "pooled"),
    ([1, 0, 0], [[2, 8, 16, 32], [8, 16, 16]], "differ"),
])
def test_constricon_from_gradicon_refuses_networks_that_do_not_correspond(svf_downsample, channels, message):
    from ICONRegistrationLib.models.convert import constricon_from_gradicon

    gradicon, constricon = _gradicon_and_constricon(svf_downsample, channels=channels)
    with pytest.raises(UserError, match=message):
        constricon_from_gradicon(gradicon, constricon)


@pytest.mark.parametrize("architecture, options", [
    ("constricon", {"svf_steps": 3, "svf_downsample": [1, 0]}),
    ("constricon", {"svf_steps": 2, "svf_downsample": [1, -1]}),
    ("constricon", {"svf_steps": 2, "svf_downsample": [1, 0.5]}),
    ("gradicon", {"svf_downsample": [0]}),
])
def test_spec_checks_svf_downsample(architecture, options):
    with pytest.raises(UserError, match="svf_downsample"):
        ModelSpec(name="bad", architecture=architecture, unet=SMALL_UNET, input_shape=list(SHAPE), options=options)


def test_spec_minimum_size_follows_svf_downsample():
    spec = ModelSpec(name="c", architecture="constricon", unet=SMALL_UNET, input_shape=list(SHAPE),
                     options={"svf_steps": 3, "svf_downsample": [2, 0, 0]})
    assert spec.coarsest_pooling == 2 and spec.minimum_size == 4 * 4 + 1


def test_cli_convert_weights_writes_weights_the_constricon_spec_loads(tmp_path, capsys):
    import json

    from ICONRegistrationLib.cli import main
    from ICONRegistrationLib.models import load_model, read_state_dict
    from ICONRegistrationLib.models.weights import write_state_dict

    gradicon, _ = _gradicon_and_constricon([1, 0, 0])
    write_state_dict(gradicon.state_dict(), tmp_path / "g.pt", half=False)
    (tmp_path / "g.json").write_text(json.dumps({
        "name": "g", "architecture": "gradicon", "unet": SMALL_UNET, "levels": 2, "last_step": True,
        "input_shape": list(SHAPE), "similarity": {"name": "lncc", "sigma": 2}, "lambda": 1.5,
        "preprocessing": {"mri_percentile": 99}, "weights": {"file": "g.pt", "sha256": None}}))
    target = {"name": "c", "architecture": "constricon", "unet": SMALL_UNET, "input_shape": list(SHAPE),
              "similarity": {"name": "lncc", "sigma": 2}, "lambda": 5.0, "preprocessing": {"mri_percentile": 99},
              "options": {"affine_steps": 0, "svf_steps": 3, "svf_downsample": [1, 0, 0]},
              "weights": {"file": "c.pt", "sha256": None}}
    (tmp_path / "c.json").write_text(json.dumps(target))
    assert main(["convert-weights", "--from", str(tmp_path / "g.json"), "--weights", str(tmp_path / "g.pt"),
                 "--to", str(tmp_path / "c.json"), "--out", str(tmp_path / "c.pt")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["to"] == "c" and len(summary["sha256"]) == 64
    state = read_state_dict(tmp_path / "c.pt")
    torch.testing.assert_close(state["netPsi.netPsi.net.lastConv.weight"],
                               gradicon.state_dict()["netPsi.net.lastConv.weight"] / 2, rtol=1e-3, atol=1e-4)
    loaded = load_model(tmp_path / "c.json", tmp_path / "c.pt", device="cpu")  # strict loading
    assert loaded.spec.architecture == "constricon"
    assert main(["convert-weights", "--from", str(tmp_path / "c.json"), "--weights", str(tmp_path / "c.pt"),
                 "--to", str(tmp_path / "c.json"), "--out", str(tmp_path / "x.pt")]) != 0


def test_anderson_acceleration_solves_a_batch_of_slow_linear_fixed_points_quickly():
    """x = M x + b with M's spectral radius 0.95 (plain iteration: ~270 steps to 1e-6): Anderson (memory 5) gets
    every batch element to the tolerance in about a third of the evaluations, with the least-squares history kept
    incrementally."""
    from ICONRegistrationLib.core.inversion import anderson_fixed_point

    torch.manual_seed(0)
    n = 400
    q, _ = torch.linalg.qr(torch.randn(2, n, n, dtype=torch.float64))
    eigenvalues = torch.linspace(-0.95, 0.95, n, dtype=torch.float64)
    matrices = q @ torch.diag_embed(eigenvalues.expand(2, n)) @ q.transpose(1, 2)
    offsets = torch.randn(2, n, dtype=torch.float64)
    # one solve per matrix: batched LU solves of this size fail in MKL after any torch.set_num_threads call
    exact = torch.stack([torch.linalg.solve(torch.eye(n, dtype=torch.float64) - matrix, offset)
                         for matrix, offset in zip(matrices, offsets)])

    def function(x):
        return (matrices @ x[..., None])[..., 0] + offsets

    def error(residual):
        return residual.abs().amax(dim=1)

    solution, evaluations, worst = anderson_fixed_point(function, torch.zeros(2, n, dtype=torch.float64), error,
                                                        tolerance=1e-6, max_iterations=200, memory=5)
    assert worst <= 1e-6 and evaluations < 120  # 96, as with the history recomputed each step
    assert float((solution - exact).abs().max()) < 1e-4


@pytest.mark.parametrize("architecture", ["constricon", "sitreg"])
def test_refinement_of_an_inverse_consistent_network_is_its_forward_map_of_the_warped_image(architecture):
    """``register(refinements=1)`` for networks that predict both directions in one pass: each refinement is the
    network's forward map from the warped moving image to the fixed image, composed inside the first map."""
    from ICONRegistrationLib.core.coordinates import compose, sample_at
    from ICONRegistrationLib.core.objective import both_directions
    from ICONRegistrationLib.pipeline.registration import _predict_both_directions

    net = _random_network(architecture, {}, output_scale=0.05).eval()
    A, B = _pair()
    grid = identity_map(SHAPE)
    with torch.no_grad():
        first = both_directions(net, A, B)(grid)
        assert (_predict_both_directions(net, A, B, None) - first).abs().max() < 1e-6
        refined = _predict_both_directions(net, A, B, None, (), refinements=1)
        step_AB = both_directions(net, sample_at(A, first[:1]), B)(grid)[:1]
        step_BA = both_directions(net, sample_at(B, first[1:]), A)(grid)[:1]
    expected = torch.cat([compose(first[:1], step_AB), compose(first[1:], step_BA)])
    assert (refined - expected).abs().max() < 1e-5
    assert (refined - first).abs().max() > 1e-3  # the refinement moved the maps
