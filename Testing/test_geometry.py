"""Physical-space correctness: network grid placement, exported fields in mm, QA maps, warped image.

An analytic "network" returns a known physical transform T (fixed mm → moving mm) in the network's unit-cube
convention; the exported transform is then checked with SimpleITK's own geometry (TransformPoint, Resample).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from analytic import analytic_model, oblique_pair
from conftest import blob_volume, make_image, rotation, tiny_spec
from ICONRegistrationLib import register
from ICONRegistrationLib.core import identity_map
from ICONRegistrationLib.pipeline import Grid


def _interior_points(image: sitk.Image, count: int, margin: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = np.array(image.GetSize())
    indices = rng.uniform(margin, 1 - margin, (count, 3)) * (size - 1)
    return np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in indices])


AFFINE = (np.eye(3) + np.array([[0.04, -0.03, 0.02], [0.05, -0.02, 0.01], [-0.02, 0.03, 0.06]]),
          np.array([3.0, -2.5, 4.0]))


@pytest.mark.parametrize("field_grid", ["network", "fixed"])
def test_exported_field_equals_analytic_map_in_mm(field_grid):
    fixed, moving = oblique_pair()
    matrix, offset = AFFINE
    result = register(fixed, moving, analytic_model(fixed, moving, matrix, offset), fixed_modality="mri",
                      moving_modality="mri", field_grid=field_grid, inverse_qa=True)
    inverse_jacobian = 1 / np.linalg.det(matrix)
    assert result.metrics.inverse.folds == 0
    assert abs(result.metrics.inverse.jacobian_min - inverse_jacobian) < 1e-4
    transform = result.forward_transform()
    inverse = result.inverse_transform()
    points = _interior_points(fixed, 200, margin=0.1)
    expected = points @ matrix.T + offset
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in points])
    assert np.abs(mapped - expected).max() < 1e-3  # mm
    # The inverse field maps moving points back (T⁻¹), checked at images of fixed points inside the moving box
    # (outside its field ITK applies no displacement).
    size = np.array(moving.GetSize())
    inside = [i for i, q in enumerate(expected)
              if np.all((np.array(moving.TransformPhysicalPointToContinuousIndex(q.tolist())) > 0.1 * size)
                        & (np.array(moving.TransformPhysicalPointToContinuousIndex(q.tolist())) < 0.9 * size))]
    assert len(inside) > 20
    returned = np.array([inverse.TransformPoint(expected[i].tolist()) for i in inside])
    assert np.abs(returned - points[inside]).max() < 1e-3
    # QA maps: an affine map has Jacobian det(M) everywhere and no inverse-consistency error.
    jacobian = sitk.GetArrayFromImage(result.jacobian)
    assert np.abs(jacobian - np.linalg.det(matrix)).max() < 1e-4
    assert result.metrics.folds == 0
    # Φ_BA∘Φ_AB is the identity wherever Φ_AB lands inside the moving image (outside it, fields are clamped).
    ic_error = result.ic_error
    ic_values = [ic_error.GetPixel(ic_error.TransformPhysicalPointToIndex(points[i].tolist())) for i in inside]
    assert max(ic_values) < 1e-3
    if field_grid == "fixed":
        assert result.forward_field.GetSize() == fixed.GetSize()
        assert np.allclose(result.forward_field.GetDirection(), fixed.GetDirection())
    else:
        assert result.forward_field.GetSize() == tuple(tiny_spec().input_shape[::-1])


def test_sinusoidal_field_and_jacobian_in_mm():
    fixed, moving = oblique_pair()
    bulge = 2.0
    result = register(fixed, moving, analytic_model(fixed, moving, np.eye(3), np.zeros(3), bulge=bulge),
                      fixed_modality="mri", moving_modality="mri")
    points = _interior_points(fixed, 200, margin=0.1, seed=3)
    centre = Grid.over_image(fixed, tiny_spec().input_shape).unit_to_physical(
        torch.full((1, 3, 1, 1, 1), 0.5, dtype=torch.float64)).flatten().numpy()
    expected = points.copy()
    expected[:, 0] += bulge * np.sin((points[:, 0] - centre[0]) / 9.0)
    transform = result.forward_transform()
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in points])
    # trilinear interpolation of a sinusoid of wavelength 56 mm sampled every ≤ 1.1 mm: error ≪ 0.01 mm
    assert np.abs(mapped - expected).max() < 0.01
    # det(∂T/∂x) = ∂T_0/∂x_0 = 1 + (bulge / 9) cos(...) — compare at the field's grid points, interior.
    field_grid = Grid.of_image(result.jacobian)
    positions = field_grid.unit_to_physical(identity_map(field_grid.shape, dtype=torch.float64))[0].numpy()
    analytic = 1 + (bulge / 9.0) * np.cos((positions[0] - centre[0]) / 9.0)
    jacobian = sitk.GetArrayFromImage(result.jacobian)
    inner = (slice(2, -2),) * 3
    assert np.abs(jacobian[inner] - analytic[inner]).max() < 2e-3


def test_warped_image_matches_simpleitk_resampling_with_the_analytic_transform():
    fixed, moving = oblique_pair()
    matrix, offset = AFFINE
    result = register(fixed, moving, analytic_model(fixed, moving, matrix, offset), fixed_modality="mri",
                      moving_modality="mri")
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(matrix.flatten().tolist())
    affine.SetTranslation(offset.tolist())
    reference = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    through_file = sitk.Resample(moving, fixed, result.forward_transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped = sitk.GetArrayFromImage(result.warped)
    intensity_range = float(np.ptp(sitk.GetArrayFromImage(moving)))
    inner = (slice(3, -3),) * 3
    assert np.abs(warped - sitk.GetArrayFromImage(reference))[inner].max() < 1e-3 * intensity_range
    assert np.abs(warped - sitk.GetArrayFromImage(through_file))[inner].max() < 1e-3 * intensity_range


@pytest.mark.parametrize("case", ["oblique", "flipped", "transposed"])
def test_network_grid_resampling_agrees_with_simpleitk(case):
    """Grid.to_network must equal SimpleITK's linear resampling onto the grid it describes."""
    direction = {"oblique": rotation(1, 25) @ rotation(2, -15),
                 "flipped": np.diag([-1.0, 1.0, -1.0]),
                 "transposed": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float)}[case]
    image = make_image(blob_volume((30, 34, 38), seed=4), spacing=(0.8, 1.5, 1.1), origin=(4.0, -6.0, 9.0),
                       direction=direction)
    reference = Grid.of_image(make_image(np.zeros((5, 5, 5), np.float32)))  # axis-aligned LPS reference
    grid = Grid.over_image(image, (20, 24, 22), align_to=reference)
    # aligned to LPS: every grid axis points along +x, +y, +z
    assert np.allclose(np.abs(np.diag(grid.matrix_direction)), np.abs(np.diag(grid.matrix_direction)) * 0 + 1,
                       atol=0.5)
    assert (np.diag(grid.matrix_direction) > 0).all()
    ours = grid.to_network(sitk.GetArrayFromImage(image))[0, 0].numpy()
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, grid.reference_image(), sitk.Transform(), sitk.sitkLinear,
                                                  0.0, sitk.sitkFloat32))
    inner = (slice(1, -1),) * 3
    assert np.abs(ours - theirs)[inner].max() < 1e-3 * float(np.ptp(theirs))
    # The grid covers the image's physical box exactly: same centre, same extent.
    def centre(g: Grid) -> np.ndarray:
        return np.array(g.origin) + g.index_matrix @ (np.array(g.shape) - 1) / 2
    assert np.allclose(centre(grid), centre(Grid.of_image(image)), atol=1e-9)
    assert np.isclose(np.prod(grid.spacing) * np.prod(grid.size), np.prod(image.GetSpacing()) * np.prod(image.GetSize()))


def test_identity_network_registers_the_same_anatomy_stored_flipped_and_transposed():
    """A moving image that is the fixed one stored with permuted, flipped axes needs no deformation."""
    fixed = make_image(blob_volume((40, 44, 36), seed=5), spacing=(1.0, 1.2, 0.9), origin=(10.0, -4.0, 2.0))
    moving = sitk.Flip(sitk.PermuteAxes(fixed, [2, 0, 1]), [True, False, True])
    assert not np.allclose(moving.GetDirection(), fixed.GetDirection())
    spec = tiny_spec()
    result = register(fixed, moving, spec, fixed_modality="mri", moving_modality="mri", random_weights=True)
    warped = sitk.GetArrayFromImage(result.warped)
    original = sitk.GetArrayFromImage(fixed)
    inner = (slice(2, -2),) * 3
    correlation = np.corrcoef(warped[inner].ravel(), original[inner].ravel())[0, 1]
    assert correlation > 0.999
    assert abs(result.metrics.jacobian_median - 1.0) < 1e-4
    assert result.metrics.ic_error_max_mm < 1e-3


def test_both_directions_in_one_batch_match_separate_passes():
    spec = tiny_spec()
    from conftest import random_state
    from ICONRegistrationLib.models import build_network
    net = build_network(spec)
    net.load_state_dict(random_state(spec, output_scale=1e-2))
    a = torch.rand(1, 1, *spec.input_shape)
    b = torch.rand(1, 1, *spec.input_shape)
    grid = identity_map(spec.input_shape)
    with torch.no_grad():
        batched = net(torch.cat([a, b]), torch.cat([b, a]))(grid)
        separate = torch.cat([net(a, b)(grid), net(b, a)(grid)])
        composed = net(torch.cat([a, b]), torch.cat([b, a]))(torch.cat([batched[1:], batched[:1]]))
        reference = net(a, b)(net(b, a)(grid))
    assert (batched - separate).abs().max() < 1e-5
    assert (composed[:1] - reference).abs().max() < 1e-5


def test_box_resampled_displacement_is_the_same_physical_transform_on_a_finer_grid():
    """The similarity grid of instance optimisation (``io_grid="fixed"``) sees the network's transform unchanged:
    a coarse grid's map, resampled onto finer grids over the same oblique / transposed image boxes, takes every
    fine fixed-grid point to the same physical point as the coarse map does."""
    from ICONRegistrationLib.core.coordinates import box_resample_displacement, sample_at

    fixed = make_image(np.zeros((30, 40, 35), np.float32), spacing=(1.2, 0.9, 1.0), origin=(5.0, -3.0, 2.0),
                       direction=rotation(0, 20))
    moving = make_image(np.zeros((36, 30, 40), np.float32), spacing=(1.0, 1.1, 0.8),
                        direction=np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float) @ rotation(2, 10))
    coarse_B = Grid.over_image(fixed, [12, 16, 14])
    coarse_A = Grid.over_image(moving, [12, 16, 14], align_to=coarse_B)
    fine_B = Grid.over_image(fixed, [24, 31, 28])
    fine_A = Grid.over_image(moving, [24, 31, 28], align_to=fine_B)
    assert (fine_A.source_axes, fine_A.flipped) == (coarse_A.source_axes, coarse_A.flipped)
    generator = torch.Generator().manual_seed(0)
    displacement = torch.nn.functional.interpolate(0.05 * torch.randn(1, 3, 4, 5, 4, generator=generator,
                                                                     dtype=torch.float64),
                                                   size=(12, 16, 14), mode="trilinear", align_corners=True)
    fine_identity = identity_map((24, 31, 28), dtype=torch.float64)
    fine_map = fine_identity + box_resample_displacement(displacement, (24, 31, 28))
    # the reference: physically, fine fixed point -> coarse fixed units -> coarse map -> physical -> fine moving units
    coarse_units = coarse_B.physical_to_unit(fine_B.unit_to_physical(fine_identity))
    mapped = coarse_units + sample_at(displacement, coarse_units, padding="border")
    expected = fine_A.physical_to_unit(coarse_A.unit_to_physical(mapped))
    assert torch.allclose(fine_map, expected, atol=1e-9)
    # the network grid's own shape is returned unchanged
    assert box_resample_displacement(displacement, (12, 16, 14)) is displacement


# ----- test-time flips: the averaged prediction is exactly equivariant to the flips it averages over -------------

def _mirrored_field(field: sitk.Image, axis: int) -> np.ndarray:
    """The displacement field of the mirrored registration: voxels reversed along tensor ``axis`` and the
    displacement component along that axis negated (axis-aligned images, mirrored about their box centre)."""
    values = np.flip(sitk.GetArrayFromImage(field), axis=axis).copy()  # [z, y, x, (x, y, z)]
    values[..., 2 - axis] *= -1
    return values


@pytest.mark.parametrize("axis", [0, 2])
def test_flip_averaged_prediction_is_equivariant_to_the_flip_and_a_single_one_is_not(tmp_path, axis):
    from conftest import random_state

    spec = tiny_spec(shape=(66, 66, 66), test_time_flips=[axis])
    weights = tmp_path / "tiny.pt"
    torch.save(random_state(spec, seed=3, output_scale=0.02), weights)
    fixed_voxels = blob_volume((66, 66, 66))
    moving_voxels = blob_volume((66, 66, 66), centre=(30, 36, 35), seed=1)

    def forward(fixed_array, moving_array, flips):
        return register(make_image(fixed_array), make_image(moving_array), spec, weights=weights,
                        fixed_modality="mri", moving_modality="mri", flips=flips)

    averaged = forward(fixed_voxels, moving_voxels, None)  # None: the model's test_time_flips
    assert averaged.metrics.flips == [axis]
    mirrored = forward(np.flip(fixed_voxels, axis).copy(), np.flip(moving_voxels, axis).copy(), None)
    expected = sitk.GetArrayFromImage(averaged.forward_field)
    assert np.abs(expected).max() > 0.5  # the network moves the image by more than half a millimetre
    assert np.abs(_mirrored_field(mirrored.forward_field, axis) - expected).max() < 1e-3
    inverse = sitk.GetArrayFromImage(averaged.inverse_field)
    assert np.abs(_mirrored_field(mirrored.inverse_field, axis) - inverse).max() < 1e-3

    single = forward(fixed_voxels, moving_voxels, [])
    single_mirrored = forward(np.flip(fixed_voxels, axis).copy(), np.flip(moving_voxels, axis).copy(), [])
    assert single.metrics.flips == []
    single_values = sitk.GetArrayFromImage(single.forward_field)
    assert np.abs(_mirrored_field(single_mirrored.forward_field, axis) - single_values).max() > 0.05
    # the average is the mean of the single prediction and the mirrored one mapped back
    mean = 0.5 * (single_values + _mirrored_field(single_mirrored.forward_field, axis))
    assert np.abs(mean - expected).max() < 1e-3


def test_flips_are_checked():
    from ICONRegistrationLib.errors import UserError

    fixed = make_image(blob_volume((20, 22, 24)))
    for flips in ([3], [1, 1], [True], "2", [2.0]):
        with pytest.raises(UserError, match="flips"):
            register(fixed, fixed, tiny_spec(), fixed_modality="mri", moving_modality="mri", random_weights=True,
                     flips=flips)
    with pytest.raises(UserError, match="weights"):
        register(fixed, fixed, tiny_spec(), fixed_modality="mri", moving_modality="mri", random_weights=True,
                 flips=[2], io_iterations=1, io_mode="weights")
    for value in ([3], [0, 0], "2", [None]):
        with pytest.raises(UserError, match="test_time_flips"):
            tiny_spec(test_time_flips=value)
    assert tiny_spec(test_time_flips=[2, 0]).test_time_flips == [0, 2]
    # the weight mode of instance optimisation replaces the prediction: the model's flips do not apply to it
    result = register(fixed, fixed, tiny_spec(test_time_flips=[2]), fixed_modality="mri", moving_modality="mri",
                      random_weights=True, io_iterations=1, io_mode="weights")
    assert result.metrics.flips == []


def test_symmetric_prediction_makes_the_two_directions_inverse_to_second_order(tmp_path):
    """register(symmetric=True): each direction becomes the mean of itself and the exact inverse of the other, so a
    network whose directions disagree gives a far smaller IC error, and swapping fixed and moving swaps the
    result (the forward field of one run is the inverse field of the swapped run)."""
    import warnings

    from conftest import random_state
    from ICONRegistrationLib.core.inversion import InversionWarning

    spec = tiny_spec(shape=(66, 66, 66))
    weights = tmp_path / "tiny.pt"
    torch.save(random_state(spec, seed=5, output_scale=0.02), weights)
    fixed = make_image(blob_volume((66, 66, 66)))
    moving = make_image(blob_volume((66, 66, 66), centre=(30, 36, 35), seed=1))

    def run(a, b, symmetric):
        with warnings.catch_warnings():
            warnings.simplefilter("error", InversionWarning)
            return register(a, b, spec, weights=weights, fixed_modality="mri", moving_modality="mri", flips=[],
                            symmetric=symmetric)

    plain, symmetric, swapped = run(fixed, moving, False), run(fixed, moving, True), run(moving, fixed, True)
    assert not plain.metrics.symmetric and symmetric.metrics.symmetric
    assert plain.metrics.ic_error_mean_mm > 0.3  # the random network's two directions disagree
    assert symmetric.metrics.ic_error_mean_mm < 0.15 * plain.metrics.ic_error_mean_mm
    assert symmetric.metrics.folds == 0
    forward = sitk.GetArrayFromImage(symmetric.forward_field)
    assert np.abs(forward - sitk.GetArrayFromImage(plain.forward_field)).max() > 0.1
    assert np.abs(forward - sitk.GetArrayFromImage(swapped.inverse_field)).max() < 1e-4
    assert symmetric.metrics.to_dict()["symmetric"] is True


def test_symmetric_prediction_keeps_directions_that_are_already_inverse():
    from ICONRegistrationLib.errors import UserError

    fixed, moving = oblique_pair()
    matrix = rotation(2, 4) * 1.03
    model = analytic_model(fixed, moving, matrix, np.array([2.0, -1.5, 1.0]))
    plain = register(fixed, moving, model, fixed_modality="mri", moving_modality="mri")
    symmetric = register(fixed, moving, model, fixed_modality="mri", moving_modality="mri", symmetric=True)
    difference = sitk.GetArrayFromImage(symmetric.forward_field) - sitk.GetArrayFromImage(plain.forward_field)
    # mm; the network voxel is about 2.5 mm here, the inversion's tolerance 0.01 voxel. Where a map leaves the other
    # image's box, the inverse is only border-extended: kept out, it gave 2.3 mm there (the oblique boxes differ).
    assert np.percentile(np.abs(difference), 99) < 0.03 and np.abs(difference).max() < 0.1
    with pytest.raises(UserError, match="symmetric"):
        register(fixed, moving, model, fixed_modality="mri", moving_modality="mri", symmetric="yes")


def test_symmetric_prediction_warns_when_an_inversion_stops_short(monkeypatch):
    """The fixed-point inversion of a direction that stops above its tolerance is reported, not passed over."""
    import warnings

    from ICONRegistrationLib.core import inversion
    from ICONRegistrationLib.core.inversion import InversionWarning
    from ICONRegistrationLib.pipeline import registration

    grid = identity_map((16, 16, 16))
    consistent = torch.cat([grid, grid])
    with warnings.catch_warnings():
        warnings.simplefilter("error", InversionWarning)
        torch.testing.assert_close(registration._symmetrize(consistent), consistent)
    monkeypatch.setattr(registration, "symmetrize_maps",
                        lambda *args, **kwargs: inversion.symmetrize_maps(*args, max_iterations=1))
    shifted = consistent.clone()
    shifted[0, 0] += 0.05 * torch.sin(grid[0, 1] * 3.1)
    with pytest.warns(InversionWarning, match="inverted only to .* after 1 steps"):
        registration._symmetrize(shifted)


# ----- test-time refinements: the network refines its own result ------------------------------------------------------

class _HalfCentroidNetwork(torch.nn.Module):
    """A "network" that recovers half of the shift between the intensity centroids of its inputs: Φ_AB(x) = x + (c_A
    − c_B) / 2 in the unit cube. Applied once it registers half a translation; each refinement, which sees the
    moving image warped so far, halves what is left."""

    @staticmethod
    def centroid(images: torch.Tensor) -> torch.Tensor:  # [b, 1, *S] → [b, 3] in the unit cube
        grid = identity_map(images.shape[2:], dtype=torch.float64)
        weights = images.double().clamp(min=0)
        return (weights * grid).sum(dim=(2, 3, 4)) / weights.sum(dim=(2, 3, 4))

    def forward(self, image_A, image_B):
        shift = 0.5 * (self.centroid(image_A) - self.centroid(image_B))
        return lambda coordinates: (coordinates.double() + shift.view(-1, 3, 1, 1, 1)).float()


@pytest.mark.parametrize("refinements", [0, 1, 2])
def test_each_refinement_registers_the_moving_image_warped_so_far_again(refinements):
    from ICONRegistrationLib.models import LoadedModel

    shape = (66, 66, 66)
    fixed = make_image(blob_volume(shape))  # 1 mm voxels: the unit cube's 65 mm are the network grid
    background = blob_volume(shape)
    moving_voxels = np.zeros_like(background)
    moving_voxels[2:, :-3, 1:] = background[:-2, 3:, :-1]  # the anatomy moved by (+2, −3, +1) voxels (z, y, x)
    moving = make_image(moving_voxels)
    model = LoadedModel(tiny_spec(shape=shape), _HalfCentroidNetwork(), torch.device("cpu"), None, None)
    result = register(fixed, moving, model, fixed_modality="mri", moving_modality="mri", refinements=refinements)
    assert result.metrics.refinements == refinements
    # ITK displacement (x, y, z) mm of fixed → moving points: the true one is (+1, −3, +2); each prediction
    # finds half of what is left, so 1 − 2^−(refinements + 1) of it is found
    field = sitk.GetArrayFromImage(result.forward_field)[20:46, 20:46, 20:46].reshape(-1, 3).mean(axis=0)
    expected = np.array([1.0, -3.0, 2.0]) * (1 - 0.5 ** (refinements + 1))
    assert np.abs(field - expected).max() < 0.1, (field, expected)
    inverse = sitk.GetArrayFromImage(result.inverse_field)[20:46, 20:46, 20:46].reshape(-1, 3).mean(axis=0)
    assert np.abs(inverse + expected).max() < 0.1, (inverse, expected)


def test_refinements_are_checked_and_default_to_the_model():
    from ICONRegistrationLib.errors import UserError

    fixed = make_image(blob_volume((20, 22, 24)))
    for refinements in (-1, 4, True, "1", 0.5):
        with pytest.raises(UserError, match="refinements"):
            register(fixed, fixed, tiny_spec(), fixed_modality="mri", moving_modality="mri", random_weights=True,
                     refinements=refinements)
    with pytest.raises(UserError, match="weights"):
        register(fixed, fixed, tiny_spec(), fixed_modality="mri", moving_modality="mri", random_weights=True,
                 refinements=1, io_iterations=1, io_mode="weights")
    for value in (-1, 4, 0.5, "1", None):
        with pytest.raises(UserError, match="test_time_refinements"):
            tiny_spec(test_time_refinements=value)
    assert tiny_spec().test_time_refinements == 0
    result = register(fixed, fixed, tiny_spec(test_time_refinements=1), fixed_modality="mri",
                      moving_modality="mri", random_weights=True)
    assert result.metrics.refinements == 1
    # the weight mode of instance optimisation replaces the prediction: the model's refinements do not apply to it
    result = register(fixed, fixed, tiny_spec(test_time_refinements=1), fixed_modality="mri",
                      moving_modality="mri", random_weights=True, io_iterations=1, io_mode="weights")
    assert result.metrics.refinements == 0


def test_points_that_map_outside_the_moving_box_are_counted_and_left_out_of_the_overlap_ic_error():
    """Where Φ_AB(x) leaves the moving image's box the reverse map is only extended from its border, so the IC
    error there measures the fields of view. The share of such points is reported (and warned about above 20 %),
    and the mean IC error over the other points is that of the registration itself (0 for an exact affine map)."""
    fixed, moving = oblique_pair()
    matrix, offset = AFFINE
    with pytest.warns(UserWarning, match="maps outside the moving image's box"):
        result = register(fixed, moving, analytic_model(fixed, moving, matrix, offset), fixed_modality="mri",
                          moving_modality="mri")
    metrics = result.metrics
    # Independently: the fixed network grid's points through T, in the moving network grid's unit coordinates.
    grid_B = Grid.over_image(fixed, tiny_spec().input_shape)
    grid_A = Grid.over_image(moving, tiny_spec().input_shape, align_to=grid_B)
    points = grid_B.unit_to_physical(identity_map(grid_B.shape, dtype=torch.float64))[0].reshape(3, -1).numpy()
    mapped = matrix @ points + offset[:, None]
    unit = grid_A.physical_to_unit(torch.from_numpy(mapped).reshape(1, 3, -1, 1, 1))[0, :, :, 0, 0].numpy()
    outside = ((unit < 0) | (unit > 1)).any(axis=0)
    assert 20 < 100 * outside.mean() < 95
    assert metrics.ic_outside_percent == pytest.approx(100 * outside.mean(), abs=0.2)
    ic_error = sitk.GetArrayFromImage(result.ic_error).ravel()  # same point order as the grid (z, y, x)
    assert metrics.ic_error_overlap_mean_mm < 1e-3
    assert metrics.ic_error_mean_mm > 10 * metrics.ic_error_overlap_mean_mm
    assert metrics.ic_error_overlap_mean_mm == pytest.approx(float(ic_error[~outside].mean()), abs=1e-4)
    assert result.metrics.to_dict()["ic_outside_percent"] == metrics.ic_outside_percent
    from ICONRegistrationLib.cli import _summary
    assert f"{metrics.ic_outside_percent:.1f} % of the field maps outside the moving image; inside:" in _summary(metrics)


def _quality(ic_mean: float, folds_percent: float = 0.0, outside: float = 0.0, overlap_mean=None):
    from ICONRegistrationLib.pipeline.metrics import QualitySummary

    return QualitySummary(folds=int(folds_percent * 1000), folds_percent=folds_percent, jacobian_min=0.5,
                          jacobian_p1=0.6, jacobian_p5=0.7, jacobian_median=1.0, jacobian_p95=1.3, jacobian_p99=1.4,
                          jacobian_max=1.6, ic_error_mean_mm=ic_mean, ic_error_p95_mm=2 * ic_mean,
                          ic_error_max_mm=4 * ic_mean, ic_outside_percent=outside,
                          ic_error_overlap_mean_mm=overlap_mean)


def test_results_far_from_the_models_validation_numbers_are_warned_about():
    """A network given images unlike its training data still returns a smooth-looking field; its directions then
    disagree (IC error) or it folds far more than on its validation pairs, and the user is told so."""
    from ICONRegistrationLib.pipeline.metrics import out_of_domain_warnings

    validation = {"ic_error_mm": 0.44, "folds_percent": 0.0}
    said = out_of_domain_warnings(_quality(2.47), "hippo", validation, use="hippocampus crops")
    assert len(said) == 1 and "(mean 2.47 mm) is 5.6× what hippo shows on its validation data (0.44 mm)" in said[0]
    assert "it is for: hippocampus crops" in said[0]
    assert out_of_domain_warnings(_quality(1.3), "hippo", validation) == []  # 2.95×: within the margin
    # fields of view that differ have their own warning: the comparison uses the IC error inside the overlap
    assert out_of_domain_warnings(_quality(2.47, outside=40.0, overlap_mean=0.5), "hippo", validation) == []
    assert len(out_of_domain_warnings(_quality(2.47, outside=40.0, overlap_mean=1.5), "hippo", validation)) == 1
    assert len(out_of_domain_warnings(_quality(2.47, outside=10.0, overlap_mean=0.5), "hippo", validation)) == 1
    # folds: above 0.05 % and ten times the validation share
    said = out_of_domain_warnings(_quality(0.4, folds_percent=1.95), "brain", {"folds_percent": 0.0004})
    assert len(said) == 1 and said[0].startswith("1.950 % of the field folds (det J ≤ 0), against 0.0004 %")
    assert out_of_domain_warnings(_quality(0.4, folds_percent=0.04), "brain", {"folds_percent": 0.0}) == []
    assert out_of_domain_warnings(_quality(0.4, folds_percent=0.5), "brain", {"folds_percent": 0.1}) == []
    assert len(out_of_domain_warnings(_quality(2.0, folds_percent=2.0), "m", {"ic_error_mm": 0.5,
                                                                             "folds_percent": 0.1})) == 2
    # nothing to compare with: no warning
    assert out_of_domain_warnings(_quality(50.0, folds_percent=30.0), "unigradicon", None) == []
    assert out_of_domain_warnings(_quality(50.0), "m", {"ic_error_mm": None, "dice": 0.8}) == []


def test_register_warns_when_the_ic_error_is_far_above_the_models_validation():
    """The warning reaches the front ends (collect_user_warnings) from register itself; a model whose validation
    IC error is of the result's order gives none."""
    from ICONRegistrationLib.errors import collect_user_warnings

    fixed, moving = (make_image(blob_volume((30, 34, 32), seed=s), spacing=(1.2, 1.0, 1.1)) for s in (1, 2))
    model = analytic_model(fixed, moving, np.eye(3), np.zeros(3), bulge=2.0)  # Φ_BA = Id: IC error ≈ the bulge
    result, said = collect_user_warnings(lambda: register(fixed, moving, model, fixed_modality="mri",
                                                          moving_modality="mri"))
    ic_error = result.metrics.ic_error_mean_mm
    assert 0.8 < ic_error < 2.0 and said == [] and result.metrics.warnings == []  # no validation record
    model.spec.extra["validation"] = {"ic_error_mm": ic_error / 4, "folds_percent": 0.0}
    result, said = collect_user_warnings(lambda: register(fixed, moving, model, fixed_modality="mri",
                                                          moving_modality="mri"))
    assert len(said) == 1 and f"(mean {ic_error:.3g} mm) is 4.0× what tiny shows" in said[0]
    assert result.metrics.warnings == said and result.metrics.to_dict()["warnings"] == said  # kept with the result
    model.spec.extra["validation"] = {"ic_error_mm": ic_error / 2, "folds_percent": 0.0}
    _, said = collect_user_warnings(lambda: register(fixed, moving, model, fixed_modality="mri",
                                                     moving_modality="mri"))
    assert said == []
