"""Similarity measures (LNCC, squared LNCC, SSD, MIND-SSC), Gaussian blur, masked mean, ICON / GradICON penalties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ICONRegistrationLib.core.coordinates import identity_map, sample_at
from ICONRegistrationLib.core.losses import (LNCC, MINDSSC, SSD, SquaredLNCC, gaussian_blur, gaussian_kernel1d,
                                             gradicon_penalty, icon_penalty, jittered_identity, make_similarity,
                                             masked_mean)

SHAPE = (20, 22, 24)


def _smooth_image(seed=0, shape=SHAPE, sigma=1.0):
    """A random image with some spatial structure (white noise blurred), float32 [1, 1, *shape]."""
    generator = np.random.default_rng(seed)
    noise = generator.standard_normal(shape)
    return torch.from_numpy(ndimage.gaussian_filter(noise, sigma) * 3.0 + 0.5).float()[None, None]


# ------------------------------------------------------------------------------------------------- LNCC


def test_lncc_of_image_with_itself_and_its_negative():
    image = _smooth_image(0)
    # identical images: lncc = var / (var + 1e-5) ≈ 1 everywhere, so the loss 1 − mean(lncc) ≈ 0
    assert float(LNCC(sigma=2)(image, image)) == pytest.approx(0.0, abs=1e-3)
    # negated image: lncc ≈ −1, loss ≈ 2; the squared variant does not care about the sign: ≈ 0
    assert float(LNCC(sigma=2)(image, -image)) == pytest.approx(2.0, abs=1e-3)
    assert float(SquaredLNCC(sigma=2)(image, -image)) == pytest.approx(0.0, abs=1e-3)
    assert float(SquaredLNCC(sigma=2)(image, image)) == pytest.approx(0.0, abs=1e-3)
    # unrelated images: far from both extremes
    other = _smooth_image(1)
    assert 0.5 < float(LNCC(sigma=2)(image, other)) < 1.5
    assert float(SquaredLNCC(sigma=2)(image, other)) > 0.5


def test_lncc_exact_value_for_identical_images_includes_epsilon():
    """1 − mean(v / (v + 1e-5)) with v the blurred local variance: the 1e-5 of icon_registration is honoured."""
    image = _smooth_image(2).double()
    lncc = LNCC(sigma=2)
    blur = lncc.blur
    variance = torch.relu(blur(image * image) - blur(image) ** 2)
    expected = 1 - torch.mean(variance / (variance + 1e-5))
    assert float(lncc(image, image)) == pytest.approx(float(expected), abs=1e-12)
    assert float(expected) > 1e-7  # the epsilon is visible at double precision


def test_lncc_invariant_to_affine_intensity_change():
    image = _smooth_image(3)
    other = _smooth_image(4)
    lncc = LNCC(sigma=2)
    base = lncc.local_correlation(image, other)
    changed = lncc.local_correlation(3.0 * image + 7.0, other)
    # Away from the border (2σ = 4 voxels, where the zero-padded blur of a constant is exactly that constant)
    # the local correlation is unchanged by a·I + b, a > 0.
    interior = (slice(None), slice(None)) + (slice(4, -4),) * 3
    assert float((base - changed)[interior].abs().max()) < 1e-3
    mask = torch.zeros(1, 1, *SHAPE)
    mask[interior] = 1
    assert float(lncc(3.0 * image + 7.0, other, mask)) == pytest.approx(float(lncc(image, other, mask)), abs=1e-4)
    # A pure scaling is invariant everywhere (the zero padding only breaks the offset b).
    assert float(lncc(3.0 * image, other)) == pytest.approx(float(lncc(image, other)), abs=1e-4)
    # A negative factor flips the sign of the correlation: loss → 2 − loss.
    assert float(lncc(-3.0 * image + 7.0, other, mask)) == pytest.approx(2 - float(lncc(image, other, mask)), abs=1e-3)


def test_gaussian_blur_constant_kernel_and_scipy():
    for sigma in (1, 2, 1.5):
        kernel = gaussian_kernel1d(sigma)
        assert kernel.numel() == int(4 * sigma + 1)
        assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(kernel, kernel.flip(0))

    constant = torch.full((1, 1, 16, 17, 18), 2.5)
    blurred = gaussian_blur(constant, 2)
    radius = 4  # kernel size 4σ + 1 = 9
    interior = (slice(None), slice(None)) + (slice(radius, -radius),) * 3
    assert float((blurred[interior] - 2.5).abs().max()) < 1e-5
    # zero ("same") padding: the corner sees only the positive octant of the kernel, roughly 1/8 of it
    assert 0.2 < float(blurred[0, 0, 0, 0, 0]) / 2.5 < 0.25

    image = _smooth_image(5, shape=(16, 17, 18), sigma=0.5)
    array = image[0, 0].double().numpy()
    for sigma in (2, 1.5):
        expected = array
        for axis in range(3):
            expected = ndimage.gaussian_filter1d(expected, sigma, axis=axis, truncate=2.0, mode="constant", cval=0.0)
        result = gaussian_blur(image.double(), sigma)[0, 0].numpy()
        r = int(2 * sigma + 0.5)
        inner = (slice(r, -r),) * 3
        assert np.abs(result[inner] - expected[inner]).max() < 1e-6
        # with scipy's zero padding the whole volume agrees, borders included
        assert np.abs(result - expected).max() < 1e-6


def test_gaussian_blur_is_per_channel():
    image = torch.zeros(1, 2, 9, 9, 9)
    image[0, 0, 4, 4, 4] = 1.0
    blurred = gaussian_blur(image, 1)
    assert float(blurred[0, 1].abs().max()) == 0.0
    assert float(blurred[0, 0].sum()) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ SSD, masks


def test_ssd_known_values():
    torch.manual_seed(0)
    image = torch.randn(2, 1, 5, 6, 7)
    assert float(SSD()(image, image + 0.5)) == pytest.approx(0.25, abs=1e-6)
    assert float(SSD()(torch.zeros(1, 1, 3, 3, 3), torch.full((1, 1, 3, 3, 3), 2.0))) == 4.0
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 2, 2)
    b = torch.tensor([1.0, 0.0, 3.0, 7.0]).reshape(1, 1, 1, 2, 2)
    assert float(SSD()(a, b)) == pytest.approx((0 + 4 + 0 + 9) / 4)
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0]).reshape(1, 1, 1, 2, 2)
    assert float(SSD()(a, b, mask)) == pytest.approx((4 + 9) / 2)


def test_masked_mean_equals_mean_over_mask_per_sample():
    torch.manual_seed(1)
    values = torch.randn(2, 1, 6, 7, 8)
    mask = torch.rand(2, 1, 6, 7, 8) > 0.5
    mask[1, :, :3] = False  # different counts per sample
    result = float(masked_mean(values, mask.float() * 3.0))  # any non-zero value counts
    per_sample = [float(values[i][mask[i]].mean()) for i in range(2)]
    assert result == pytest.approx(sum(per_sample) / 2, abs=1e-6)
    pooled = float(values[mask].mean())
    assert abs(result - pooled) > 1e-4  # samples are weighted equally, not voxels
    assert float(masked_mean(values, None)) == pytest.approx(float(values.mean()), abs=1e-7)
    # a 1-channel mask broadcasts over channels
    two_channels = torch.randn(1, 2, 4, 4, 4)
    single = torch.zeros(1, 1, 4, 4, 4)
    single[..., :2] = 1
    assert float(masked_mean(two_channels, single)) == pytest.approx(float(two_channels[..., :2].mean()), abs=1e-6)


# -------------------------------------------------------------------------------------------- MIND-SSC


def test_mind_ssc():
    image = _smooth_image(6, shape=(16, 18, 20))
    mind = MINDSSC()
    descriptor = mind.descriptor(image)
    assert descriptor.shape == (1, 12, 16, 18, 20)
    assert float(descriptor.min()) >= 0 and float(descriptor.max()) <= 1.0 + 1e-6

    assert float(mind(image, image)) == 0.0
    # Inversion (and any a·I + b): self-similarity distances are squared differences, so the descriptor is
    # unchanged and the loss stays ≈ 0, whereas SSD is 4·mean(I²) for I against −I.
    inverted = -image
    assert float(mind(image, inverted)) < 1e-8
    assert float(mind(image, 5.0 - 2.0 * image)) < 1e-8
    ssd_inverted = float(SSD()(image, inverted))
    assert ssd_inverted == pytest.approx(4 * float((image ** 2).mean()), rel=1e-5)
    assert ssd_inverted > 1.0

    shifted = torch.roll(image, shifts=3, dims=4)
    mind_shifted = float(mind(image, shifted))
    assert mind_shifted > 1e-2
    assert mind_shifted > 1e4 * float(mind(image, inverted))

    with pytest.raises(ValueError):
        mind.descriptor(image[:, :, 0])


def test_make_similarity_names():
    assert isinstance(make_similarity("lncc", sigma=3), LNCC) and make_similarity("lncc", sigma=3).sigma == 3
    assert isinstance(make_similarity("squared-lncc"), SquaredLNCC)
    assert isinstance(make_similarity("SSD"), SSD)
    assert isinstance(make_similarity("mind_ssc"), MINDSSC)
    with pytest.raises(ValueError):
        make_similarity("mutual_information")


# --------------------------------------------------------------------------------- ICON / GradICON


def _translation(t):
    shift = torch.as_tensor(t, dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    return lambda x: x + shift


def _affine(matrix, offset):
    m = torch.as_tensor(matrix, dtype=torch.float64)
    b = torch.as_tensor(offset, dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    return lambda x: torch.einsum("rc,bc...->br...", m, x) + b


@pytest.fixture
def samples():
    return jittered_identity((8, 9, 10), batch=2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_penalties_vanish_for_inverse_translations(samples):
    t = [0.05, -0.03, 0.02]
    forward, backward = _translation(t), _translation([-v for v in t])
    assert float(icon_penalty(forward, backward, samples)) < 1e-8
    assert float(gradicon_penalty(forward, backward, samples)) < 1e-8


def test_penalties_vanish_for_inverse_affine_maps(samples):
    matrix = np.array([[1.1, 0.2, -0.05], [0.0, 0.9, 0.1], [0.05, -0.1, 1.2]])
    offset = np.array([0.02, -0.04, 0.03])
    inverse = np.linalg.inv(matrix)
    forward = _affine(matrix, offset)
    backward = _affine(inverse, -inverse @ offset)
    assert float(icon_penalty(forward, backward, samples)) < 1e-8
    assert float(gradicon_penalty(forward, backward, samples)) < 1e-8
    # swapping the roles works too: Φ_BA ∘ Φ_AB = Id
    assert float(icon_penalty(backward, forward, samples)) < 1e-8


def test_icon_penalty_of_non_inverse_translations_is_mean_squared_residual(samples):
    """Φ_AB(Φ_BA(x)) = x + t1 + t2: the ICON penalty is mean over the 3 channels of r² = |t1 + t2|² / 3."""
    t1, t2 = [0.05, -0.03, 0.02], [0.01, 0.04, -0.02]
    residual = np.add(t1, t2)  # (0.06, 0.01, 0.0)
    expected = float((residual ** 2).sum() / 3)  # 0.0037 / 3 ≈ 1.2333e-3
    assert expected == pytest.approx(0.0037 / 3)
    assert float(icon_penalty(_translation(t1), _translation(t2), samples)) == pytest.approx(expected, rel=1e-9)
    # GradICON only sees the gradient of the residual: any pair of translations has zero penalty
    assert float(gradicon_penalty(_translation(t1), _translation(t2), samples)) < 1e-8


def test_gradicon_penalty_of_scaling_pair(samples):
    """Φ_AB = S1 x, Φ_BA = S2 x (diagonal): the residual's derivative along axis k is (1 − s1k s2k) e_k, so
    penalty = Σ_k mean over channels of its square = Σ_k (1 − s1k s2k)² / 3 (icon_registration's normalisation).
    """
    s1, s2 = np.array([1.1, 0.9, 1.0]), np.array([0.8, 1.2, 1.0])
    products = s1 * s2  # 0.88, 1.08, 1.0
    expected = float(((1 - products) ** 2).sum() / 3)  # (0.0144 + 0.0064) / 3 ≈ 6.9333e-3
    assert expected == pytest.approx(0.0208 / 3)
    phi_ab, phi_ba = _affine(np.diag(s1), [0, 0, 0]), _affine(np.diag(s2), [0, 0, 0])
    assert float(gradicon_penalty(phi_ab, phi_ba, samples)) == pytest.approx(expected, rel=1e-6)
    # ICON penalty of the same pair: mean of ((1 − s1k s2k) x_k)² over samples and channels
    factors = torch.tensor(1 - products, dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    expected_icon = float(torch.mean((factors * samples) ** 2))
    assert float(icon_penalty(phi_ab, phi_ba, samples)) == pytest.approx(expected_icon, rel=1e-9)
    assert expected_icon > 1e-3


def test_penalties_on_sampled_maps():
    """The penalties also work with sampled (interpolated) transforms: an exactly inverse translation pair of
    maps gives ≈ 0 ICON away from the border, while a pair that is not inverse gives the residual shift."""
    from ICONRegistrationLib.core.coordinates import evaluate_map

    shape = (12, 12, 12)
    grid = identity_map(shape, dtype=torch.float64)
    t = torch.tensor([0.02, 0.0, -0.01], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    forward_map, backward_map = grid + t, grid - t
    forward = lambda x: evaluate_map(forward_map, x)  # noqa: E731
    backward = lambda x: evaluate_map(backward_map, x)  # noqa: E731
    interior = identity_map((6, 6, 6), dtype=torch.float64) * 0.6 + 0.2
    assert float(icon_penalty(forward, backward, interior)) < 1e-20
    assert float(gradicon_penalty(forward, backward, interior)) < 1e-8
    assert float(icon_penalty(forward, forward, interior)) == pytest.approx((0.04 ** 2 + 0.02 ** 2) / 3, rel=1e-9)


def test_jittered_identity_statistics():
    shape = (10, 12, 14)
    samples = jittered_identity(shape, batch=3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, *shape)
    noise = samples - identity_map(shape)
    # Gaussian noise of one voxel of the last axis: standard deviation 1 / shape[-1]
    assert float(noise.std()) == pytest.approx(1 / 14, rel=0.05)
    assert math.isclose(float(noise.mean()), 0.0, abs_tol=3e-3)


def test_icon_weight_sees_the_constant_round_trip_offset_that_gradicon_cannot():
    """Φ_AB a translation by t, Φ_BA the identity: the round trip is off by t everywhere, its gradient is exact.
    GradICON's penalty is 0; the ICON term (μ × mean squared round-trip error in voxels²) is μ‖t‖²_voxels, and it
    is the only difference the weight makes to the objective."""
    from ICONRegistrationLib.core.losses import gradicon_and_round_trip
    from ICONRegistrationLib.core.objective import symmetric_objective

    shape = (8, 9, 10)
    t = torch.tensor([0.05, -0.03, 0.02], dtype=torch.float64)
    voxels = t * torch.tensor([n - 1 for n in shape], dtype=torch.float64)

    class Net(torch.nn.Module):  # transforms of a batch of 2 (a single grid is broadcast, as the networks do)
        def forward(self, image_A, image_B):
            move = _translation(t.tolist()) if image_A is images[0] else (lambda x: x)
            return lambda x: move(x.expand(2, *x.shape[1:]))

    generator = torch.Generator().manual_seed(3)
    images = (torch.rand(2, 1, *shape, generator=generator, dtype=torch.float64),
              torch.rand(2, 1, *shape, generator=generator, dtype=torch.float64))
    plain = symmetric_objective(Net(), *images, similarity=SSD(), generator=torch.Generator().manual_seed(1))
    weighted = symmetric_objective(Net(), *images, similarity=SSD(), generator=torch.Generator().manual_seed(1),
                                   icon_weight=0.25)
    assert float(plain.penalty) < 1e-12 and float(weighted.penalty) < 1e-12
    expected = float((voxels ** 2).sum())
    assert float(plain.round_trip) == pytest.approx(expected) and float(weighted.round_trip) == pytest.approx(expected)
    assert float(weighted.loss - plain.loss) == pytest.approx(0.25 * expected)
    # and its gradient reaches the transform: d/dt of μ‖t ⊙ (N − 1)‖² is 2μ t (N − 1)²
    shift = t.clone().requires_grad_(True)

    class Moving(torch.nn.Module):
        def forward(self, image_A, image_B):
            move = (lambda x: x + shift.view(1, 3, 1, 1, 1)) if image_A is images[0] else (lambda x: x)
            return lambda x: move(x.expand(2, *x.shape[1:]))

    gradients = []
    for weight in (0.0, 0.25):
        terms = symmetric_objective(Moving(), *images, similarity=SSD(), icon_weight=weight,
                                    generator=torch.Generator().manual_seed(1))
        gradients.append(torch.autograd.grad(terms.loss, shift)[0])
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float64)
    assert torch.allclose(gradients[1] - gradients[0], 2 * 0.25 * t * scale ** 2, rtol=1e-6)
    # the round trip's error comes from the penalty's own evaluations: equal to Φ_AB(Φ_BA(x)) − x
    samples = jittered_identity(shape, batch=2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    forward, backward = _affine(np.diag([1.1, 0.9, 1.0]), [0.02, 0.0, -0.01]), _translation([0.01, 0.02, 0.0])
    penalty, error = gradicon_and_round_trip(forward, backward, samples)
    assert float(penalty) == pytest.approx(float(gradicon_penalty(forward, backward, samples)))
    assert torch.allclose(error, forward(backward(samples)) - samples)
    with pytest.raises(ValueError, match="icon_weight"):
        symmetric_objective(Net(), *images, similarity=SSD(), penalty="diffusion", icon_weight=0.1)


def test_icon_point_weights_weigh_the_round_trip_error_where_it_starts():
    """Φ_BA a translation, Φ_AB a scaling: the round trip Φ_AB(Φ_BA(x)) starts at x on A's grid and its error
    varies with x. With weights 1 + κ on one half of A's grid the ICON term is μ × the weighted mean of the squared
    error (voxels²) at the penalty's points, computed here directly at x (weights read at Φ_BA(x) differ);
    ``round_trip`` stays the unweighted mean."""
    from ICONRegistrationLib.core.objective import symmetric_objective

    shape = (8, 9, 10)
    scaling = _affine(np.diag([1.4, 0.95, 1.0]), [-0.2, 0.02, 0.0])
    shift = _translation([0.3, 0.0, 0.0])

    class Net(torch.nn.Module):
        def forward(self, image_A, image_B):
            move = scaling if image_A is images[0] else shift
            return lambda x: move(x.expand(2, *x.shape[1:]))

    generator = torch.Generator().manual_seed(4)
    images = (torch.rand(2, 1, *shape, generator=generator, dtype=torch.float64),
              torch.rand(2, 1, *shape, generator=generator, dtype=torch.float64))
    grid = identity_map(shape, dtype=torch.float64)
    inside = torch.zeros(2, 1, *shape, dtype=torch.float64)
    inside[:, :, :3] = 1.0
    kappa, mu = 3.0, 0.5
    weights = 1.0 + kappa * inside
    plain = symmetric_objective(Net(), *images, similarity=SSD(), penalty_samples=grid, icon_weight=mu)
    weighted = symmetric_objective(Net(), *images, similarity=SSD(), penalty_samples=grid, icon_weight=mu,
                                   icon_point_weights=weights)
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    squared = (((scaling(shift(grid)) - grid) * scale) ** 2).sum(dim=1, keepdim=True)
    expected = float((weights * squared).mean() / weights.mean())
    assert float(plain.round_trip) == pytest.approx(float(squared.mean()))
    assert float(weighted.round_trip) == pytest.approx(float(squared.mean()))
    assert float(weighted.loss - plain.loss) == pytest.approx(mu * (expected - float(squared.mean())), rel=1e-9)
    moved = sample_at(weights, shift(grid))
    at_the_image = float((moved * squared).mean() / moved.mean())
    assert abs(at_the_image - expected) > 0.05 * expected  # where the weights are read matters
    assert abs(expected - float(squared.mean())) > 0.05 * expected  # and the weights change the term
    # constant weights change nothing: μ alone sets the term's strength
    constant = symmetric_objective(Net(), *images, similarity=SSD(), penalty_samples=grid, icon_weight=mu,
                                   icon_point_weights=torch.full_like(weights, 7.0))
    assert float(constant.loss) == pytest.approx(float(plain.loss), rel=1e-12)
    with pytest.raises(ValueError, match="icon_weight"):
        symmetric_objective(Net(), *images, similarity=SSD(), icon_point_weights=weights)


@pytest.mark.parametrize("varying", ["I", "J"])
@pytest.mark.parametrize("loss", [LNCC, SquaredLNCC])
def test_lncc_with_a_constant_image_equals_the_five_moment_blur(varying, loss):
    """With one image constant (the fixed image) its two moments are blurred apart (and reused): the same value
    and gradient as blurring all five moment images together."""
    generator = torch.Generator().manual_seed(11)
    moving = torch.rand(1, 1, 12, 13, 14, generator=generator, dtype=torch.float64)
    fixed = torch.rand(1, 1, 12, 13, 14, generator=generator, dtype=torch.float64)
    similarity = loss(2)
    split_input = moving.clone().requires_grad_(True)
    pair = (split_input, fixed) if varying == "I" else (fixed, split_input)
    value = similarity(*pair)
    (gradient,) = torch.autograd.grad(value, split_input)
    joint_input, joint_fixed = moving.clone().requires_grad_(True), fixed.clone().requires_grad_(True)
    reference = loss(2)(*((joint_input, joint_fixed) if varying == "I" else (joint_fixed, joint_input)))
    (reference_gradient,) = torch.autograd.grad(reference, joint_input)
    assert abs(float(value) - float(reference)) < 1e-12
    assert torch.allclose(gradient, reference_gradient, rtol=1e-10, atol=1e-14)


def test_lncc_reuses_a_constant_images_moments_only_while_it_is_unchanged(monkeypatch):
    """Instance optimisation compares with the same fixed image at every step: its moments are blurred once. An
    in-place change, or another tensor with the same values at a reused address, is blurred afresh."""
    from ICONRegistrationLib.core import losses
    calls = []
    blur = losses.gaussian_blur
    monkeypatch.setattr(losses, "gaussian_blur", lambda t, s, k=None: calls.append(t.shape[1]) or blur(t, s, k))
    generator = torch.Generator().manual_seed(12)
    fixed = torch.rand(1, 1, 10, 11, 12, generator=generator)
    moving = torch.rand(1, 1, 10, 11, 12, generator=generator).requires_grad_(True)
    similarity = LNCC(2)
    first = similarity(moving, fixed)
    second = similarity(moving, fixed)
    assert calls == [3, 2, 3] and float(first) == float(second)  # the fixed image's 2 moments once
    fixed.mul_(0.5).add_(0.25)  # in place: the version counter changes
    third = similarity(moving, fixed)
    assert calls[-2:] == [3, 2]
    assert abs(float(third) - float(LNCC(2)(moving.detach(), fixed))) < 1e-6
    other = fixed.clone()  # another tensor: never another tensor's moments
    similarity(moving, other)
    assert calls[-2:] == [3, 2]
