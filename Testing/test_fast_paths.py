"""The CPU fast paths give the numbers of the plain paths they replace.

* sampling a batch-1 volume in chunks (one per thread) = one ``grid_sample`` call, values and gradients;
* Gaussian blur as banded-matrix products = depthwise 1-D convolutions (odd and even kernels);
* the GradICON penalty with the shifted points fused into one evaluation = four separate evaluations;
* the penalty on a random subset of points has the full penalty's expectation;
* the UNet's channels-last convolutions = the default memory order;
* the objective equals icon_registration's GradICON formula (one-sided penalty) written out here;
* the label loss without one-hot maps = the soft Dice of the sampled one-hot maps, values and gradients.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ICONRegistrationLib.core import coordinates, networks
from ICONRegistrationLib.core.coordinates import identity_map, sample_at
from ICONRegistrationLib.core.losses import (LNCC, gaussian_blur, gaussian_kernel1d, gradicon_penalty,
                                             jittered_identity, label_fractions, label_indices, soft_dice_loss,
                                             soft_dice_loss_of_warped_labels)
from ICONRegistrationLib.core.networks import UNet2
from ICONRegistrationLib.core.registration_modules import displacement_transform


def _plain_grid_sample(image, coordinates_, padding="border", mode="bilinear"):
    grid = torch.stack([coordinates_[:, 2], coordinates_[:, 1], coordinates_[:, 0]], dim=-1) * 2 - 1
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_chunked_sampling_equals_one_grid_sample_call(monkeypatch, padding, mode):
    # grid_sample on both sides, bit for bit (the compiled sampler's equivalence: test_native_sampler.py)
    monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", "0")
    monkeypatch.setattr(coordinates, "_MIN_POINTS_PER_CHUNK", 64)  # force several chunks on a small grid
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # a point count not divisible by the chunks
    generator = torch.Generator().manual_seed(0)
    field = torch.randn(1, 3, 9, 10, 11, generator=generator, dtype=torch.float64).requires_grad_(True)
    points = (torch.rand(1, 3, 7, 8, 5, generator=generator, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(True)
    assert coordinates._sampling_chunks(field, points.movedim(1, -1)) == 3
    chunked = sample_at(field, points, padding=padding, mode=mode)
    plain = _plain_grid_sample(field, points, padding, mode)
    assert chunked.shape == plain.shape == (1, 3, 7, 8, 5)
    assert torch.equal(chunked, plain)
    if mode == "bilinear":
        weights = torch.randn_like(plain)
        grads_chunked = torch.autograd.grad((chunked * weights).sum(), [field, points])
        grads_plain = torch.autograd.grad((plain * weights).sum(), [field, points])
        for a, b in zip(grads_chunked, grads_plain):
            assert torch.allclose(a, b, atol=1e-12)


def _conv_blur(tensor, sigma, kernel_size=None):
    kernel = gaussian_kernel1d(sigma, kernel_size, dtype=tensor.dtype)
    out, groups = tensor, tensor.shape[1]
    for axis in range(3):
        shape = [groups, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        out = F.conv3d(out, kernel.reshape([1, 1] + shape[2:]).expand(shape), padding="same", groups=groups)
    return out


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("sigma,kernel_size", [(2, None), (5, None), (1.25, None), (1.5, 6)])
@pytest.mark.parametrize("block", [16, 1])  # 1: banded products on each axis the band fits (the last one always)
def test_matrix_blur_equals_depthwise_convolution(monkeypatch, sigma, kernel_size, block):
    from ICONRegistrationLib.core import losses
    monkeypatch.setattr(losses, "BLUR_BLOCK", block)
    monkeypatch.setattr(losses, "NATIVE_BLUR", False)  # the matrix products (the compiled blur: the test below)
    image = torch.rand(2, 3, 19, 20, 44, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    length = gaussian_kernel1d(sigma, kernel_size).numel()
    assert block > 1 or losses._banded(image.shape[-1], length // 2, length // 2)
    assert torch.allclose(gaussian_blur(image, sigma, kernel_size), _conv_blur(image, sigma, kernel_size),
                          atol=1e-14)


@pytest.mark.parametrize("sigma,kernel_size", [(1, None), (1.5, 6)])  # bands of 2 + 4 and 2 + 5 voxels
def test_banded_blur_gradients_are_the_transposed_blur(monkeypatch, sigma, kernel_size):
    """The blur's own backward (the transposed banded blur, also for an even kernel's lopsided band) against
    finite differences, first and second order, and against the whole-matrix blur's autograd."""
    from ICONRegistrationLib.core import losses
    monkeypatch.setattr(losses, "BLUR_BLOCK", 1)  # one row + the band ≤ half of every axis: banded everywhere
    monkeypatch.setattr(losses, "NATIVE_BLUR", False)
    image = torch.rand(1, 1, 12, 13, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                       requires_grad=True)
    length = gaussian_kernel1d(sigma, kernel_size).numel()
    assert all(losses._banded(n, (length - 1) // 2, length - 1 - (length - 1) // 2) for n in image.shape[2:])
    blur = lambda x: gaussian_blur(x, sigma, kernel_size)  # noqa: E731
    assert torch.autograd.gradcheck(blur, (image,), fast_mode=True)
    assert torch.autograd.gradgradcheck(blur, (image,), fast_mode=True)
    weights = torch.rand(1, 1, 12, 13, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    banded = torch.autograd.grad((blur(image) * weights).sum(), image)[0]
    monkeypatch.setattr(losses, "BLUR_BLOCK", 10**6)  # one product with the whole matrix per axis
    whole = torch.autograd.grad((blur(image) * weights).sum(), image)[0]
    assert torch.allclose(banded, whole, atol=1e-14)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,sigma,kernel_size", [((2, 3, 19, 20, 44), 2, None), ((1, 2, 5, 4, 3), 2, None),
                                                     ((2, 1, 12, 13, 14), 1.5, 6), ((1, 3, 9, 7, 16), 5, None)])
def test_compiled_blur_equals_the_convolution_and_its_gradient_the_transposed_blur(monkeypatch, dtype, shape, sigma,
                                                                                    kernel_size):
    """The compiled per-axis blur (``native_sampler.blur_axis``): the depthwise convolution's numbers, axes shorter
    than the kernel and an even kernel's lopsided band included, and as gradient the transposed blur — the same as
    the matrix products' (float64 to rounding, float32 to its precision)."""
    from ICONRegistrationLib.core import losses, native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    image = torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(4), requires_grad=True)
    weights = torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    tolerance = 1e-13 if dtype == torch.float64 else 2e-6
    called = []
    blur_axis = native_sampler.blur_axis
    monkeypatch.setattr(native_sampler, "blur_axis", lambda *args: called.append(1) or blur_axis(*args))
    out = gaussian_blur(image, sigma, kernel_size)
    grad, = torch.autograd.grad((out * weights).sum(), image)
    assert len(called) == 6  # three axes forward, three backward
    expected = _conv_blur(image.detach().double(), sigma, kernel_size)
    assert float((out.double() - expected).abs().max()) < tolerance
    monkeypatch.setattr(losses, "NATIVE_BLUR", False)
    matrix_out = gaussian_blur(image, sigma, kernel_size)
    matrix_grad, = torch.autograd.grad((matrix_out * weights).sum(), image)
    assert float((grad - matrix_grad).abs().max() / matrix_grad.abs().max()) < tolerance


def _unfused_gradicon(phi_AB, phi_BA, samples, delta=1e-3):
    error = samples - phi_AB(phi_BA(samples))
    total = 0
    for axis in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, dtype=samples.dtype)
        step[0, axis] = delta
        shifted = samples + step
        total = total + torch.mean(((error - (shifted - phi_AB(phi_BA(shifted)))) / delta) ** 2)
    return total


def _smooth_field(shape, amplitude, seed):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator, dtype=torch.float64) * amplitude
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_fused_gradicon_penalty_equals_separate_evaluations():
    shape = (12, 14, 10)
    phi_AB = displacement_transform(_smooth_field(shape, 0.03, 0))
    phi_BA = displacement_transform(_smooth_field(shape, 0.03, 1))
    samples = jittered_identity(shape, batch=2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fused = gradicon_penalty(phi_AB, phi_BA, samples)
    assert float(fused) > 1e-3
    assert float(fused) == pytest.approx(float(_unfused_gradicon(phi_AB, phi_BA, samples)), rel=1e-12)


def test_subset_penalty_has_the_full_penalty_expectation():
    shape = (10, 12, 9)
    phi_AB = displacement_transform(_smooth_field(shape, 0.04, 3))
    phi_BA = displacement_transform(_smooth_field(shape, 0.04, 4))
    generator = torch.Generator().manual_seed(5)
    full = [float(gradicon_penalty(phi_AB, phi_BA, jittered_identity(shape, 1, dtype=torch.float64,
                                                                      generator=generator))) for _ in range(40)]
    subset = [float(gradicon_penalty(phi_AB, phi_BA, jittered_identity(shape, 1, dtype=torch.float64,
                                                                        generator=generator, fraction=0.125)))
              for _ in range(400)]
    samples = jittered_identity(shape, 2, generator=generator, fraction=0.125)
    count = round(0.125 * 10 * 12 * 9)
    assert samples.shape == (2, 3, count, 1, 1)
    mean_full = sum(full) / len(full)
    mean_subset = sum(subset) / len(subset)
    spread = (sum((v - mean_subset) ** 2 for v in subset) / (len(subset) - 1)) ** 0.5
    # unbiased: the means agree within four standard errors of the subset mean
    assert abs(mean_subset - mean_full) < 4 * spread / math.sqrt(len(subset)) + 1e-3 * mean_full
    # the subset estimate is noisier than the full one, as stated
    spread_full = (sum((v - mean_full) ** 2 for v in full) / (len(full) - 1)) ** 0.5
    assert spread > spread_full
    with pytest.raises(ValueError):
        jittered_identity(shape, 1, fraction=0)


def test_one_direction_penalty_has_the_symmetric_penalty_expectation():
    """The field mode's coin: the mean of the two one-direction objectives is the symmetric objective exactly."""
    from ICONRegistrationLib.core.losses import make_similarity
    from ICONRegistrationLib.pipeline.instance_optimization import field_objective

    shape = (10, 12, 9)
    displacements = torch.cat([_smooth_field(shape, 0.04, 3), _smooth_field(shape, 0.04, 4)])
    generator = torch.Generator().manual_seed(1)
    image_A, image_B = torch.rand((1, 1) + shape, generator=generator), torch.rand((1, 1) + shape, generator=generator)
    samples = jittered_identity(shape, 1, generator=generator)
    options = dict(similarity=make_similarity("lncc", sigma=2), lmbda=1.5, samples=samples)
    both = field_objective(displacements, image_A, image_B, **options)
    one, other = (field_objective(displacements, image_A, image_B, penalty_direction=d, **options) for d in (0, 1))
    assert torch.allclose(0.5 * (one[0] + other[0]), both[0], rtol=1e-6)
    assert torch.allclose(0.5 * (one[2] + other[2]), both[2], rtol=1e-6)
    assert not torch.allclose(one[2], other[2])  # the two compositions differ for unrelated fields
    with pytest.raises(ValueError):
        field_objective(displacements, image_A, image_B, penalty_direction=2, **options)


def test_smoothed_field_steps_recover_a_known_shift_better_with_a_falling_objective():
    """Field-mode instance optimisation smooths each step's gradient and each Adam step (``gradient_sigma``). On a
    pair with a known shift it gets much closer to the shift than unsmoothed steps in the same number of steps, and
    its objective falls from first to last step (unsmoothed Adam first raised it)."""
    from conftest import blob_volume
    from ICONRegistrationLib.core.coordinates import voxel_scale
    from ICONRegistrationLib.pipeline.instance_optimization import optimize_fields

    shape = (32, 36, 30)
    shift = torch.tensor([1.5, -1.0, 1.0])  # voxels: A(x + shift) = B(x), so Φ_AB(x) = x + shift
    image_B = torch.as_tensor(blob_volume(shape, seed=3) / 1000)[None, None].float()
    image_A = torch.as_tensor(blob_volume(shape, centre=[n / 2 + d for n, d in zip(shape, shift.tolist())],
                                          seed=3) / 1000)[None, None].float()
    inside = image_B[0, 0] > 0.1
    start = identity_map(shape).repeat(2, 1, 1, 1, 1)
    errors, histories = {}, {}
    for sigma in (0.0, 2.0):
        maps, histories[sigma] = optimize_fields(start, image_A, image_B, iterations=30,
                                                 similarity=LNCC(sigma=3), lmbda=1.5, gradient_sigma=sigma)
        found = (maps - identity_map(shape)) * voxel_scale(shape)  # voxels
        errors[sigma] = float((found[0] - shift.view(3, 1, 1, 1)).norm(dim=0)[inside].mean())
    assert errors[2.0] < 0.6 * errors[0.0]
    assert errors[2.0] < 0.6 * float(shift.norm())
    smoothed = histories[2.0]
    assert smoothed[-1] < smoothed[0] and max(smoothed[1:]) < smoothed[0]


def _plain_crop_and_concatenate(x, skip, channels_last):
    """PyTorch's own crop and concatenation (default memory order)."""
    return torch.cat([x[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])], skip], dim=1)


def test_unet_channels_last_convolutions_give_the_same_output(monkeypatch):
    torch.manual_seed(0)
    net = UNet2(5, [[2, 8, 16, 16, 16, 16], [8, 16, 16, 16, 16]]).train()
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    a, b = torch.rand(2, 1, 34, 33, 36), torch.rand(2, 1, 34, 33, 36)
    fast = net(a, b)
    monkeypatch.setattr(networks, "_channels_last", lambda x: x)
    monkeypatch.setattr(networks, "_crop_and_concatenate", _plain_crop_and_concatenate)
    plain = net(a, b)
    assert fast.is_contiguous()
    assert torch.allclose(fast, plain, atol=1e-6)


def test_deep_transposed_convolutions_keep_the_default_order(monkeypatch):
    """Below the channels-last levels, a transposed convolution's input goes channels-last only with at least
    ``_CHANNELS_LAST_MIN_VOXELS`` voxels per channel (for fewer, converting the large weight costs more than the layout
    saves); the last levels always do. Output and gradients equal those with every input channels-last."""
    torch.manual_seed(0)
    net = UNet2(5, [[2, 4, 4, 8, 8, 8], [4, 4, 8, 8, 8]]).train()
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    a, b = torch.rand(1, 1, 80, 96, 96, requires_grad=True), torch.rand(1, 1, 80, 96, 96, requires_grad=True)
    seen = []
    transposed = networks._transposed_convolution_without_bias

    def watched(conv, x):  # (voxels per channel, channels-last) of each transposed convolution's input, deepest first
        seen.append((x[0, 0].numel(), x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()))
        return transposed(conv, x)

    def output_and_gradients():
        net.zero_grad(set_to_none=True)
        a.grad = b.grad = None
        seen.clear()
        out = net(a, b)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in (*net.parameters(), a, b)]), list(seen)

    monkeypatch.setattr(networks, "_transposed_convolution_without_bias", watched)
    fast, fast_grad, layouts = output_and_gradients()
    # levels 40×48×48, 20×24×24, 10×12×12 (1440 voxels), 5×6×6 (180), 3×3×3: the two deepest stay in the default order
    assert layouts == [(27, False), (180, False), (1440, True), (11520, True), (92160, True)]
    monkeypatch.setattr(networks, "_CHANNELS_LAST_MIN_VOXELS", 0)
    plain, plain_grad, layouts = output_and_gradients()
    assert all(channels_last for _, channels_last in layouts)
    assert torch.allclose(fast, plain, atol=1e-6)
    assert float((fast_grad - plain_grad).norm() / plain_grad.norm()) < 1e-5


@pytest.mark.parametrize("size, kernel, stride, padding", [((1, 1, 1), 4, 2, 1), ((2, 3, 1), 4, 2, 1),
                                                           ((3, 3, 3), 3, 2, 1), ((2, 2, 2), 2, 2, 0)])
def test_transposed_convolution_by_matrix_product_is_pytorchs(size, kernel, stride, padding):
    """The deepest levels' transposed convolutions (a few voxels per channel) as one matrix product and a scatter-add:
    PyTorch's values and gradients in float64, and the UNet takes this path exactly where the input is that small."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 5, kernel, kernel, kernel, dtype=torch.float64, requires_grad=True)
    ours = networks._transposed_convolution_by_matrix_product(x, weight, stride, padding)
    theirs = F.conv_transpose3d(x, weight, None, stride, padding)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    grad = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(theirs, (x, weight), grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    conv = torch.nn.ConvTranspose3d(8, 5, kernel, stride, padding)
    small, large = torch.randn(1, 8, *size), torch.randn(1, 8, 4, 4, 2)  # at most 27 voxels per channel, and 32
    assert networks._by_matrix_product(conv, small) and not networks._by_matrix_product(conv, large)


@pytest.mark.parametrize("batch, shape", [(1, (33, 35, 33)), (2, (18, 20, 22))])
def test_last_level_in_channels_last_order_gives_the_default_orders_gradients(monkeypatch, batch, shape):
    """The last two levels (upsampling addition, batch norm, crop, concatenation) run channels-last in training: each
    of their batch norms must get its gradient in channels-last order (with a default-order gradient PyTorch's CPU
    batch-norm backward ran 8× slower, and a copy into channels-last order cost as much again), and the output and every gradient must equal PyTorch's own modules in the default memory
    order."""
    torch.manual_seed(0)
    net = UNet2(5, [[2, 8, 16, 16, 16, 16], [8, 16, 16, 16, 16]]).train()
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    a, b = torch.rand(batch, 1, *shape, requires_grad=True), torch.rand(batch, 1, *shape, requires_grad=True)
    seen = []
    replacement = networks._batch_norm

    def channels_last_ordered(grad):  # channels fastest, then W, H, D (a channel slice of a channels-last tensor too)
        strides = grad.permute(0, 2, 3, 4, 1).stride()
        return strides[-1] == 1 and all(strides[i] >= strides[i + 1] for i in range(1, 4))

    def watched_batch_norm(norm, x, groups=1):  # records the memory order of the gradient of each channels-last output
        out = replacement(norm, x, groups)
        if out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous():
            out.register_hook(lambda grad: seen.append(channels_last_ordered(grad)))
        return out

    def output_and_gradients():
        net.zero_grad(set_to_none=True)
        a.grad = b.grad = None
        out = net(a, b)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in (*net.parameters(), a, b)])

    monkeypatch.setattr(networks, "_batch_norm", watched_batch_norm)
    fast, fast_grad = output_and_gradients()
    assert seen == [True] * networks._CHANNELS_LAST_LEVELS
    monkeypatch.setattr(networks, "_channels_last", lambda x: x)
    monkeypatch.setattr(networks, "_crop_and_concatenate", _plain_crop_and_concatenate)
    plain, plain_grad = output_and_gradients()
    assert seen == [True] * networks._CHANNELS_LAST_LEVELS, "the default-order path has no channels-last batch norm"
    assert torch.allclose(fast, plain, atol=1e-6)
    assert float((fast_grad - plain_grad).norm() / plain_grad.norm()) < 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 4), (1, 2, 1, 3, 2), (2, 3, 7, 5), (1, 1, 2, 1)])
def test_linear_upsampling_by_two_is_pytorchs_interpolation(shape):
    """The UNet's separable upsampling of contiguous inputs = ``F.interpolate(scale_factor=2, align_corners=False)``
    (trilinear or bilinear, axes of length 1 and 2 included), values and gradients, in float64."""
    mode = "trilinear" if len(shape) == 5 else "bilinear"
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ours = networks._upsample_twice(x, mode)
    theirs = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
    assert ours.shape == theirs.shape and ours.is_contiguous()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    weights = torch.randn(theirs.shape, dtype=torch.float64)
    grad_ours, = torch.autograd.grad(ours, x, weights)
    grad_theirs, = torch.autograd.grad(theirs, x, weights)
    assert torch.allclose(grad_ours, grad_theirs, rtol=0, atol=1e-12)
    cl = x.detach().contiguous(memory_format=torch.channels_last_3d) if len(shape) == 5 else None
    if cl is not None and not cl.is_contiguous():  # channels-last input: PyTorch's own kernel, layout kept
        out = networks._upsample_twice(cl, mode)
        assert torch.allclose(out, theirs.detach(), rtol=0, atol=1e-12)
        assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 5, 6, 4), (1, 3, 1, 3, 2), (1, 5, 2, 1, 7)])
def test_compiled_upsample_and_add_is_pytorchs_interpolation_and_addition(monkeypatch, shape, y_dtype):
    """The last level's ``y + upsample(coarse)`` through the compiled kernels: PyTorch's trilinear interpolation and
    addition to float32 rounding (axes of length 1 and 2 included), the gradients those of PyTorch's (``y``'s
    rounded to its own dtype), output and gradients channels-last."""
    from ICONRegistrationLib.core import native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    calls = []
    for name in ("upsample_add", "upsample_adjoint"):
        kernel = getattr(native_sampler, name)

        def watched(*args, kernel=kernel, name=name):
            calls.append(name)
            return kernel(*args)
        monkeypatch.setattr(native_sampler, name, watched)
    generator = torch.Generator().manual_seed(7)
    coarse = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last_3d)
    y = torch.randn(*shape[:2], *(2 * n for n in shape[2:]), generator=generator).to(y_dtype)
    y = y.contiguous(memory_format=torch.channels_last_3d)
    weights = torch.randn(y.shape, generator=generator, dtype=torch.float64)

    def run(fast):
        c, v = coarse.clone().requires_grad_(), y.clone().requires_grad_()
        out = networks._add_upsampled_twice(v, c, "trilinear") if fast else \
            v + F.interpolate(c, scale_factor=2, mode="trilinear", align_corners=False)
        (out.double() * weights).sum().backward()
        return out, c.grad, v.grad

    out, grad_coarse, grad_y = run(True)
    assert calls == ["upsample_add", "upsample_adjoint"]
    ref, ref_coarse, ref_y = run(False)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert grad_coarse.is_contiguous(memory_format=torch.channels_last_3d)
    assert float((out - ref).detach().abs().max()) < 2e-6
    assert float((grad_coarse - ref_coarse).abs().max() / ref_coarse.abs().max()) < 2e-6
    assert grad_y.dtype == y_dtype and torch.equal(grad_y, ref_y)
    exact = y.double() + F.interpolate(coarse.double(), scale_factor=2, mode="trilinear", align_corners=False)
    error, reference_error = (float((t.detach().double() - exact).abs().max()) for t in (out, ref))
    assert error <= 2 * reference_error + 1e-7


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dimension, shape, precision", [(3, (17, 20, 18), None), (2, (21, 26), None),
                                                       (3, (17, 20, 18), torch.bfloat16)])
def test_transposed_convolution_bias_added_before_upsampling_is_the_modules_own_bias(monkeypatch, dimension, shape,
                                                                                     precision, training):
    """The UNet adds each transposed convolution's bias to the coarse path before the trilinear upsampling (oneDNN's
    bfloat16 bias gradient is a slow reference kernel): output and every gradient equal the modules' own bias,
    float64 to rounding, and under bfloat16 autocast to bfloat16's precision. In training mode the batch norm after
    each transposed convolution removes the bias (its gradient is zero); with running statistics it matters."""
    torch.manual_seed(0)
    net = UNet2(5, [[2, 8, 16, 16, 16, 16], [8, 16, 16, 16, 16]], dimension=dimension).train(training)
    for conv in net.upConvs:
        torch.nn.init.normal_(conv.bias, std=0.3)  # a fresh bias is small: make it matter
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    if precision is None:
        net = net.double()
    dtype = torch.float32 if precision else torch.float64
    a, b = (torch.rand(2, 1, *shape, dtype=dtype, requires_grad=True) for _ in range(2))
    weights = torch.linspace(-1, 1, 2 * dimension * math.prod(shape), dtype=dtype).view(2, dimension, *shape)
    state = copy.deepcopy(net.state_dict())

    def output_and_gradients(dtype=precision):
        net.load_state_dict(state)  # the same running statistics for both
        net.zero_grad(set_to_none=True)
        a.grad = b.grad = None
        with networks.low_precision(net, dtype):
            out = net(a, b)
        (out * weights).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in (*net.parameters(), a, b)]), net.upConvs[0].bias.grad

    def relative(x, y):
        return float((x - y).norm() / y.norm())

    fast, fast_grad, fast_bias_grad = output_and_gradients()
    monkeypatch.setattr(networks, "_transposed_convolution_without_bias", lambda conv, x: conv(x))
    monkeypatch.setattr(networks, "_per_channel", lambda values, dim: torch.zeros((), dtype=values.dtype))
    plain, plain_grad, plain_bias_grad = output_and_gradients()
    if training and precision is None:
        assert float(plain_bias_grad.abs().max()) < 1e-9 and float(fast_bias_grad.abs().max()) < 1e-9
    elif not training:
        assert float(plain_bias_grad.abs().max()) > 1e-3  # the bias matters
    if precision is None:
        assert relative(fast, plain) < 1e-10 and relative(fast_grad, plain_grad) < 1e-10
        if not training:
            assert relative(fast_bias_grad, plain_bias_grad) < 1e-10
        return
    # bfloat16: no further from the float32 network than the modules' own bias (which rounds the bias in bfloat16)
    exact, exact_grad, exact_bias_grad = output_and_gradients(None)
    assert relative(fast, exact) < 1.25 * relative(plain, exact) + 1e-3
    assert relative(fast_grad, exact_grad) < 1.25 * relative(plain_grad, exact_grad) + 1e-3
    if not training:
        assert relative(fast_bias_grad, exact_bias_grad) < 1.25 * relative(plain_bias_grad, exact_bias_grad) + 1e-3


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_channels_last_training_batch_norm_is_accurate_and_updates_running_statistics(monkeypatch, momentum,
                                                                                      compiled):
    """Against float64: PyTorch's own channels-last CPU batch norm is off by 2.5e-4 (output) and 8e-4 (input
    gradient) on this input; the last level's replacement must be as accurate as the default memory order, with the
    compiled library's per-channel kernels and with tensor operations."""
    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.core.networks import _batch_norm
    calls = []
    if compiled:
        if not native_sampler.enable().available:
            pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
        for name in ("channel_sums", "channel_affine"):
            kernel = getattr(native_sampler, name)
            def watched(*args, kernel=kernel, name=name, **kwargs):
                calls.append(name)
                return kernel(*args, **kwargs)
            monkeypatch.setattr(native_sampler, name, watched)
    else:
        monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    torch.manual_seed(0)
    x = (torch.randn(1, 4, 64, 64, 64) * 0.3 + 1.7).contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn(1, 4, 64, 64, 64).contiguous(memory_format=torch.channels_last_3d)
    template = torch.nn.BatchNorm3d(4, momentum=momentum).train()
    torch.nn.init.normal_(template.weight)
    torch.nn.init.normal_(template.bias)

    def run(dtype, replacement):
        norm = copy.deepcopy(template).to(dtype)
        inputs = x.detach().to(dtype).clone(memory_format=torch.channels_last_3d).requires_grad_()
        for _ in range(2):  # two steps: the running statistics' update rule, momentum None included
            inputs.grad = None
            norm.zero_grad()
            out = _batch_norm(norm, inputs) if replacement else norm(inputs)
            out.backward(grad.to(dtype))
        return out, inputs.grad, norm

    out, grad_x, norm = run(torch.float32, True)
    assert calls == ["channel_sums", "channel_affine"] * 4 if compiled else not calls  # two steps, each both ways
    out_ref, grad_x_ref, norm_ref = run(torch.float64, False)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert float((out.double() - out_ref).abs().max()) < 1e-5
    assert float((grad_x.double() - grad_x_ref).abs().max()) < 1e-5
    for name in ("weight", "bias"):
        found, expected = getattr(norm, name).grad.double(), getattr(norm_ref, name).grad
        assert float((found - expected).norm() / expected.norm()) < 1e-6
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(norm, name).double(), getattr(norm_ref, name), rtol=1e-6, atol=1e-7)
    assert int(norm.num_batches_tracked) == int(norm_ref.num_batches_tracked) == 2


@pytest.mark.parametrize("shape", [(33, 33, 33), (18, 24, 18), (17, 20, 23)])
def test_small_convolutions_in_two_slabs_give_the_same_output_and_gradients(monkeypatch, shape):
    """Batch-1 inputs below PyTorch's oneDNN size test are convolved as a batch of two slabs of planes (odd depths,
    strided convolutions and the last convolution's 'same' padding included): the output and every gradient as
    PyTorch's own path."""
    from ICONRegistrationLib.core.networks import _convolve
    torch.manual_seed(0)
    net = UNet2(5, [[2, 16, 32, 32, 64, 64], [16, 32, 32, 32, 64]]).train()
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    a, b = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)

    def output_and_gradient():
        net.zero_grad(set_to_none=True)
        out = net(a, b)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    batches = []  # the batch size of every input the last convolution sees
    few_channel_conv = networks._few_channel_conv

    def watched(conv, x):
        if conv is net.lastConv:
            batches.append(x.shape[0])
        return few_channel_conv(conv, x)

    monkeypatch.setattr(networks, "_few_channel_conv", watched)
    fast, fast_grad = output_and_gradient()
    assert batches == [2], "the last convolution did not take the two slabs"
    monkeypatch.setattr(networks, "_NATIVE_CONV_MAX_SIZE", 0)  # every convolution as PyTorch chooses
    plain, plain_grad = output_and_gradient()
    assert fast.shape == plain.shape == (1, 3, *shape) and fast.is_contiguous()
    assert torch.allclose(fast, plain, atol=1e-6, rtol=1e-5)
    assert float((fast_grad - plain_grad).norm() / plain_grad.norm()) < 1e-5
    # strided convolutions of odd and even depths, and kernels larger than the stride, keep exactly the output planes
    monkeypatch.undo()
    for kernel, stride, padding, depth in [(3, 2, 1, 33), (3, 2, 1, 32), (4, 2, 1, 9), (5, 1, 2, 7), (3, 2, 1, 2)]:
        conv = torch.nn.Conv3d(2, 16, kernel, padding=padding, stride=stride)
        x = torch.rand(1, 2, depth, 33, 31)
        assert networks._slow_path(x)
        assert torch.allclose(_convolve(conv, x), conv(x), atol=1e-5), (kernel, stride, padding, depth)


@pytest.mark.parametrize("batch, shape, kernel, channels_last", [(2, (7, 9, 6), 3, False), (1, (7, 9, 6), 3, True),
                                                                 (1, (6, 5, 8), 5, False), (2, (6, 5, 8), 1, True),
                                                                 (2, (6, 5, 8), 5, True), (1, (2, 5, 4), 5, True),
                                                                 (1, (1, 4, 3), 3, True)])
@pytest.mark.parametrize("slab_bytes", [1, 2**24])  # one plane per slab; all planes in one
def test_few_channel_convolution_gives_pytorchs_output_and_gradients(monkeypatch, batch, shape, kernel,
                                                                     channels_last, slab_bytes):
    """The last convolution's own forward (plane by plane for a channels-last input, fewer planes than the kernel
    included) and backward (weight gradient as one matrix product per slab of planes, input gradient as a forward
    convolution): PyTorch's numbers in float64, the input gradient in the input's order; without a gradient the
    same forward."""
    monkeypatch.setattr(networks, "_SLAB_BYTES", slab_bytes)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(5, 3, kernel, padding=kernel // 2).double()
    x = torch.randn(batch, 5, *shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    expected = conv(x)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
    out = networks._few_channel_conv(conv, x)
    assert _graph_has(out, "_ConvToFewChannelsBackward")
    grads = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    assert float((out - expected).detach().abs().max()) < 1e-12
    for found, reference in zip(grads, expected_grads):
        assert found.shape == reference.shape
        assert float((found - reference).abs().max() / reference.abs().max()) < 1e-12
    assert networks._memory_format(grads[0]) == networks._memory_format(x)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):  # no second derivative
        first = torch.autograd.grad(networks._few_channel_conv(conv, x), x, grad, create_graph=True)[0]
        torch.autograd.grad(first.sum(), conv.weight)
    with torch.no_grad():
        assert float((networks._few_channel_conv(conv, x) - expected).abs().max()) < 1e-12


@pytest.mark.parametrize("kernel, batch, shape", [(3, 2, (9, 12, 10)), (5, 2, (9, 12, 10)), (3, 1, (40, 64, 6))])
def test_few_channel_convolution_of_a_channels_last_float32_input_matches_float64(monkeypatch, kernel, batch, shape):
    """A channels-last float32 input takes the plane-by-plane forward and oneDNN's weight gradient with the channel
    roles swapped — for a batch-1 gradient that PyTorch would convolve on its slow native path, both that and the
    input gradient as a batch of two slabs of planes: output and all gradients within float32 rounding of the
    float64 convolution."""
    torch.manual_seed(0)
    slabs = []
    depth_slabs = networks._depth_slabs
    monkeypatch.setattr(networks, "_depth_slabs", lambda x, starts, length: slabs.append(length) or depth_slabs(
        x, starts, length))
    conv = torch.nn.Conv3d(18, 3, kernel, padding=kernel // 2)
    x = torch.randn(batch, 18, *shape).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    grad = torch.randn(batch, 3, *shape)
    out = networks._few_channel_conv(conv, x)
    assert _graph_has(out, "_ConvToFewChannelsBackward")
    found = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    exact = copy.deepcopy(conv).double()
    x64 = x.detach().double().requires_grad_(True)
    exact_out = exact(x64)
    expected = torch.autograd.grad(exact_out, (x64, exact.weight, exact.bias), grad.double())
    assert float((out.double() - exact_out).norm() / exact_out.norm()) < 1e-6
    for ours, reference in zip(found, expected):
        assert ours.shape == reference.shape
        assert float((ours.double() - reference).norm() / reference.norm()) < 1e-5
    assert networks._memory_format(found[0]) == torch.channels_last_3d
    half, padding = (shape[0] + 1) // 2, kernel // 2  # the input gradient's slabs, then the weight gradient's
    assert slabs == ([] if batch > 1 else [half + 2 * padding, half, half + 2 * padding])


def test_few_channel_convolution_in_bfloat16_is_as_accurate_as_pytorchs(monkeypatch):
    """Under autocast (training with bfloat16 UNets) the weight gradient (oneDNN's, channel roles swapped, for this
    channels-last input) and the forward's kernel planes are summed in float32: their errors against float64 must stay at PyTorch's own bfloat16 level (the forward returns
    the float32 sum, without rounding it to bfloat16 again), with and without gradients. Wider or strided
    convolutions keep PyTorch's path."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(18, 3, 3, padding=1)
    x = torch.randn(2, 18, 20, 24, 20).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    grad = torch.randn(2, 3, 20, 24, 20)
    exact = copy.deepcopy(conv).double()
    exact_out = exact(x.detach().double())
    truth = torch.autograd.grad(exact_out, exact.weight, grad.double())[0]

    def output_and_weight_gradient(function, few_channel_path):
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = function(x)
        assert out.dtype == (torch.float32 if few_channel_path else torch.bfloat16)
        assert _graph_has(out, "_ConvToFewChannelsBackward") == few_channel_path
        out.float().backward(grad)
        return out.detach().double(), conv.weight.grad.double()

    their_out, theirs = output_and_weight_gradient(conv, False)
    monkeypatch.setattr(networks, "_SLAB_BYTES", 1)  # one plane per slab: the most roundings of partial sums
    our_out, ours = output_and_weight_gradient(lambda t: networks._few_channel_conv(conv, t), True)
    error = lambda g, reference=truth: float((g - reference).norm() / reference.norm())  # noqa: E731
    assert error(ours) < max(3 * error(theirs), 5e-3), (error(ours), error(theirs))
    assert error(our_out, exact_out) <= error(their_out, exact_out), (error(our_out, exact_out),
                                                                      error(their_out, exact_out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(networks._few_channel_conv(conv, x), our_out.float())
    for other in (torch.nn.Conv3d(18, 16, 3, padding=1), torch.nn.Conv3d(18, 3, 3, padding=1, stride=2)):
        assert not _graph_has(networks._few_channel_conv(other, x), "_ConvToFewChannelsBackward")
    with torch.no_grad():
        assert torch.allclose(networks._few_channel_conv(conv, x), conv(x), rtol=0, atol=1e-5)
    # autocast leaves float64 alone, and without autocast mixed dtypes raise, as PyTorch's own convolution does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert networks._few_channel_conv(conv.double(), x.double()).dtype == torch.float64
    with pytest.raises(RuntimeError):
        networks._few_channel_conv(conv.float(), x.double())


def test_few_channel_convolution_in_bfloat16_keeps_the_bits_its_weight_loses():
    """Under autocast the last convolution also convolves with what its weight lost in the rounding to bfloat16: the
    rounded weight shifts every output alike (the displacement's systematic error, most of a bfloat16 training step's
    objective difference), so the mean output error must be a small part of that of the exact convolution with the
    rounded weight; the values' rounding errors stay (unbiased). Gradients are those of the rounded weight."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(18, 3, 3, padding=1)
    x = torch.rand(2, 18, 20, 24, 20).bfloat16().float().contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        exact = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        rounded = F.conv3d(x.double(), conv.weight.bfloat16().double(), conv.bias.bfloat16().double(), padding=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = networks._few_channel_conv(conv, x).double()
    mean_error = lambda out: float((out - exact).mean(dim=(0, 2, 3, 4)).abs().max())  # noqa: E731
    assert mean_error(ours) < 0.2 * mean_error(rounded), (mean_error(ours), mean_error(rounded))  # 0.08 here
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = networks._few_channel_conv(conv, x)
    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, (x, conv.weight), grad)
    weight = conv.weight.detach().bfloat16().float().requires_grad_(True)
    plain = networks._ConvToFewChannels.apply(x.bfloat16(), weight.bfloat16(), conv.bias.bfloat16())
    plain_grads = torch.autograd.grad(plain, (x, weight), grad)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, plain_grads))


@pytest.mark.parametrize("dtype, low, bias", [(torch.float32, False, True), (torch.bfloat16, True, True),
                                             (torch.bfloat16, False, False), (torch.float32, False, False)])
@pytest.mark.parametrize("shape, kernel", [((2, 18, 9, 7, 5), 3), ((2, 18, 1, 4, 3), 3), ((2, 5, 2, 3, 4), 3),
                                           ((2, 4, 6, 5, 7), 5), ((1, 18, 5, 4, 3), 3)])
def test_compiled_plane_sum_gives_the_tensor_paths_bits(monkeypatch, dtype, low, bias, shape, kernel):
    """The few-channel convolution's plane sum in one compiled pass (``native_sampler.plane_sum``) over the
    channels-last planes, without copying them to the default order: the same float32 values bit for bit as the
    tensor path (centre plane, the others in order, then the bias), depths shorter than the kernel included. (A small
    batch-1 input's planes come from PyTorch's native convolution in the default order: the tensor path.)"""
    from ICONRegistrationLib.core import native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    torch.manual_seed(0)
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, shape[1], kernel, kernel, kernel).to(dtype)
    weight_low = (torch.randn_like(weight.float()) * 1e-3).to(dtype) if low else None
    bias_ = torch.randn(3).to(dtype) if bias else None
    calls = []
    plane_sum = native_sampler.plane_sum
    monkeypatch.setattr(native_sampler, "plane_sum", lambda *args: calls.append(1) or plane_sum(*args))
    fast = networks._few_channel_forward(x, weight, bias_, weight_low)
    assert bool(calls) == (not networks._slow_path(x)) and fast.dtype == torch.float32 and fast.is_contiguous()
    monkeypatch.setattr(native_sampler, "plane_sum_eligible", lambda partial: False)
    plain = networks._few_channel_forward(x, weight, bias_, weight_low)
    assert torch.equal(fast, plain)
    exact = F.conv3d(x.double(), (weight.double() + (weight_low.double() if low else 0)),
                     None if bias_ is None else bias_.double(), padding=kernel // 2)
    assert float((fast.double() - exact).abs().max() / exact.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("second", [False, True])
def test_compiled_channel_sums_and_affine_read_a_channel_slice_in_place(second):
    """The batch norm's kernels take the rows of a channel slice of a channels-last tensor (rows further apart than
    their channels: the last level's gradient, handed back by the concatenation without a copy) and give the numbers
    of the same rows copied, bit for bit."""
    from ICONRegistrationLib.core import native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    torch.manual_seed(0)
    whole = torch.randn(2, 18, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    rows = whole[:, :16].movedim(1, -1).reshape(-1, 16)
    assert rows.stride() == (18, 1)  # a view, not a copy
    other = torch.randn(2, 16, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d).movedim(1, -1).reshape(-1, 16)
    first, then = (other, rows) if second else (rows, other)
    copied = [t.contiguous() for t in (first, then)]
    assert torch.equal(native_sampler.channel_sums(first, then), native_sampler.channel_sums(*copied))
    shift, scale, other_scale, offset = (torch.randn(16) for _ in range(4))
    assert torch.equal(native_sampler.channel_affine(first, shift, scale, offset, then, other_scale),
                       native_sampler.channel_affine(*copied[:1], shift, scale, offset, copied[1], other_scale))
    assert torch.equal(native_sampler.channel_affine(first, shift, scale, offset),
                       native_sampler.channel_affine(copied[0], shift, scale, offset))


def test_compiled_channel_affine_of_groups_of_rows_is_each_groups_own():
    """Per-group vectors ``[G, C]``: each run of ``R / G`` rows gets its own, bit for bit the kernel on that run
    alone; vectors of another shape are refused."""
    from ICONRegistrationLib.core import native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    torch.manual_seed(0)
    rows, other = torch.randn(3 * 5000, 7), torch.randn(3 * 5000, 7)  # groups longer than a block of rows
    shift, scale, offset, other_scale = (torch.randn(3, 7) for _ in range(4))
    grouped = native_sampler.channel_affine(rows, shift, scale, offset, other, other_scale)
    alone = native_sampler.channel_affine(rows, shift, scale, offset)
    for g, part in enumerate(rows.chunk(3)):
        assert torch.equal(grouped.chunk(3)[g], native_sampler.channel_affine(
            part, shift[g], scale[g], offset[g], other.chunk(3)[g], other_scale[g]))
        assert torch.equal(alone.chunk(3)[g], native_sampler.channel_affine(part, shift[g], scale[g], offset[g]))
    for bad in (torch.randn(7, 7), torch.randn(3, 6), torch.randn(3, 7, 1)):  # 7 does not divide 15000 rows
        with pytest.raises(ValueError):
            native_sampler.channel_affine(rows, bad, bad, bad)
    with pytest.raises(ValueError):
        native_sampler.channel_affine(rows, shift, scale[0], offset)


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, True), (torch.float64, True),
                                                  (torch.float32, False)])
def test_grouped_batch_norm_is_one_call_per_group(monkeypatch, dtype, channels_last):
    """A training-mode batch norm of a batch in two groups (both directions of a training step in one batch) must
    be two calls, one per half: output, input and parameter gradients and running statistics — bit for bit with the
    compiled kernels (float32 channels-last) and in the default memory order, to rounding with tensor operations
    (float64)."""
    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.core.networks import _batch_norm
    if dtype == torch.float32 and channels_last and not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    torch.manual_seed(0)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = (torch.randn(4, 5, 9, 8, 7, dtype=dtype) * 0.3 + 1.7).contiguous(memory_format=layout)
    grad = torch.randn(4, 5, 9, 8, 7, dtype=dtype).contiguous(memory_format=layout)
    template = torch.nn.BatchNorm3d(5).to(dtype).train()
    torch.nn.init.normal_(template.weight)
    torch.nn.init.normal_(template.bias)

    def run(grouped: bool):
        norm = copy.deepcopy(template)
        inputs = x.clone(memory_format=layout).requires_grad_()
        for _ in range(2):  # two steps: the running statistics move part after part
            inputs.grad = None
            norm.zero_grad()
            if grouped:
                out = _batch_norm(norm, inputs, 2)
            else:
                out = torch.cat([_batch_norm(norm, inputs[:2]), _batch_norm(norm, inputs[2:])])
            out.backward(grad)
        return [out, inputs.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var,
                norm.num_batches_tracked]

    grouped, separate = run(True), run(False)
    assert int(grouped[-1]) == 4
    if channels_last:
        assert grouped[0].is_contiguous(memory_format=torch.channels_last_3d)
    for found, expected in zip(grouped, separate):
        if dtype == torch.float32:
            assert torch.equal(found, expected)
        else:
            assert torch.allclose(found, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="equal parts"):
        with networks.grouped_batch_norm(UNet2(2, [[2, 4, 4], [4, 4]]), 2) as odd:
            odd(torch.rand(3, 1, 8, 8, 8), torch.rand(3, 1, 8, 8, 8))


def _two_step_network(dtype: torch.dtype) -> torch.nn.Module:
    """A small TwoStep(Down(Ψ1), Ψ2) of 3-layer UNets in training mode, non-zero last layers."""
    from ICONRegistrationLib.core.registration_modules import (DownsampleRegistration, FunctionFromVectorField,
                                                               TwoStepRegistration)
    torch.manual_seed(0)
    steps = [FunctionFromVectorField(UNet2(3, [[2, 8, 16, 16], [8, 16, 16]])) for _ in range(2)]
    for step in steps:
        torch.nn.init.normal_(step.net.lastConv.weight, std=0.02)
    return TwoStepRegistration(DownsampleRegistration(steps[0]), steps[1]).to(dtype).train()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("penalty_fraction", [1.0, 0.2])
def test_both_directions_in_one_batch_give_the_two_calls_objective(dtype, penalty_fraction):
    """The training objective runs a network's two directions as one batch ``[A; B]`` against ``[B; A]`` (batch
    norms kept apart per direction): objective, every gradient and the running statistics must be those of two
    calls — to rounding in float64, within float32's summation-order noise in float32."""
    from ICONRegistrationLib.core.objective import runs_as_one_batch, symmetric_objective
    net = _two_step_network(dtype)
    assert runs_as_one_batch(net)
    state = copy.deepcopy(net.state_dict())
    generator = torch.Generator().manual_seed(1)
    shape = (18, 20, 22)
    A, B = (F.avg_pool3d(torch.rand(2, 1, *shape, generator=generator), 5, 1, 2).to(dtype) for _ in range(2))

    def run(one_batch: bool):
        net.load_state_dict(state)
        net.zero_grad(set_to_none=True)
        terms = symmetric_objective(net, A, B, similarity=LNCC(2), lmbda=1.5, padding="border",
                                    generator=torch.Generator().manual_seed(5), penalty_fraction=penalty_fraction,
                                    one_batch=one_batch)
        terms.loss.backward()
        # the transposed convolutions' biases come before a batch norm: their gradients are rounding noise
        grads = torch.cat([p.grad.flatten() for name, p in net.named_parameters()
                           if not ("upConvs" in name and name.endswith("bias"))])
        stats = torch.cat([v.flatten().double() for k, v in net.state_dict().items() if "running" in k])
        return terms, grads, stats

    (one, one_grads, one_stats), (two, two_grads, two_stats) = run(True), run(False)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for name in ("loss", "similarity", "penalty", "maps"):
        found, expected = getattr(one, name).detach().double(), getattr(two, name).detach().double()
        assert float((found - expected).abs().max() / expected.abs().max()) < tolerance, name
    assert float((one_grads - two_grads).norm() / two_grads.norm()) < tolerance
    assert float((one_stats - two_stats).abs().max()) < tolerance
    net.load_state_dict(state)
    assert all(unet.batch_groups == 1 for unet in net.modules() if isinstance(unet, UNet2))
    points = identity_map(shape, dtype=dtype).expand(2, -1, -1, -1, -1) + 0.01
    with torch.no_grad():  # the stacked transform's rows are each direction's own transform (eval mode: no groups)
        net.eval()
        stacked = net(torch.cat([A, B]), torch.cat([B, A]))
        assert torch.allclose(stacked(points, rows=slice(2, 4)), net(B, A)(points), atol=1e-12 if dtype ==
                              torch.float64 else 1e-6)


def test_only_networks_of_registration_steps_around_unets_run_as_one_batch():
    """GradICON trees run as one batch; networks inverse consistent by construction (both directions from one pass
    already), other modules and other callables do not."""
    from ICONRegistrationLib.core.objective import runs_as_one_batch
    from ICONRegistrationLib.core.registration_modules import FunctionFromVectorField
    from ICONRegistrationLib.models.build import build_network
    from ICONRegistrationLib.models.spec import ModelSpec
    unet = {"num_layers": 3, "channels": [[2, 8, 16, 16], [8, 16, 16]]}
    assert runs_as_one_batch(_two_step_network(torch.float32))
    for architecture in ("gradicon", "constricon", "sitreg"):
        spec = ModelSpec(name="n", architecture=architecture, unet=unet, input_shape=[32, 40, 36])
        assert runs_as_one_batch(build_network(spec)) == (architecture == "gradicon")
    assert not runs_as_one_batch(FunctionFromVectorField(torch.nn.Conv3d(2, 3, 3, padding=1)))
    assert not runs_as_one_batch(torch.nn.Identity())


def test_leading_channels_of_a_channels_last_input_give_a_channels_last_gradient():
    """``_match_channels`` of a channels-last input that keeps its first channels: PyTorch's slice values, and the
    gradient in channels-last order (PyTorch's slice backward writes it in the default order, which made the sum of
    the input's gradients default-order and its consumers copy it)."""
    torch.manual_seed(0)
    x = torch.randn(2, 48, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    out = networks._match_channels(x, 16)
    assert torch.equal(out, x[:, :16])
    grad = torch.randn_like(out)
    (found,) = torch.autograd.grad(out, x, grad)
    expected = torch.zeros_like(x)
    expected[:, :16] = grad
    assert torch.equal(found, expected) and found.is_contiguous(memory_format=torch.channels_last_3d)
    plain = torch.randn(2, 48, 4, 5, 6, requires_grad=True)  # the default order keeps PyTorch's slice
    assert networks._match_channels(plain, 16).grad_fn.name() == "SliceBackward0"
    assert torch.equal(networks._match_channels(plain, 50)[:, 2:], plain)  # zero-padded at the front


@pytest.mark.parametrize("shape", [(2, 2, 9, 8, 7), (1, 2, 10, 12, 10), (1, 1, 5, 6, 7), (3, 4, 6, 5, 4),
                                   (1, 2, 1, 2, 3)])
def test_polyphase_input_gradient_is_pytorchs(shape):
    """The first convolution's input gradient as one convolution to the eight parities and their interleaving
    (``_PolyphaseInputGradientConv``): PyTorch's output and gradients in float64, odd and even sizes, 1 to 4
    channels, axes of one voxel."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], 16, 3, stride=2, padding=1).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    expected = conv(x)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
    found = networks._PolyphaseInputGradientConv.apply(x, conv.weight, conv.bias)
    found_grads = torch.autograd.grad(found, (x, conv.weight, conv.bias), grad)
    assert torch.equal(found, expected)
    for a, b in zip(found_grads, expected_grads):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-14


def test_polyphase_input_gradient_where_it_pays_and_under_autocast():
    """Taken only for a strided 3×3×3 convolution from a few channels whose input needs a gradient, and whose
    polyphase convolution PyTorch runs on oneDNN; under bfloat16 autocast it computes in bfloat16 as autocast's own
    convolution does, with float32 weight and bias gradients equal to autocast's and an input gradient within
    bfloat16 rounding of it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 16, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 20, 24, 18, requires_grad=True)
    assert networks._polyphase_eligible(conv, x)
    assert not networks._polyphase_eligible(conv, x.detach())  # no input gradient to take
    wide = torch.randn(2, 16, 20, 24, 18, requires_grad=True)
    assert not networks._polyphase_eligible(torch.nn.Conv3d(16, 16, 3, stride=2, padding=1), wide)
    assert not networks._polyphase_eligible(torch.nn.Conv3d(2, 16, 3, padding=1), x)  # stride 1
    assert not networks._polyphase_eligible(conv, x.detach().bfloat16().requires_grad_())  # mixed dtypes: PyTorch's error
    small = torch.randn(1, 2, 33, 33, 33, requires_grad=True)  # its 16×18×18 polyphase input: PyTorch's slow path
    assert not networks._polyphase_eligible(conv, small)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert networks._polyphase_eligible(conv, small)  # bfloat16 convolutions always run on oneDNN
        expected = conv(x)
        found = networks._convolve(conv, x)
    assert found.dtype == expected.dtype == torch.bfloat16 and torch.equal(found, expected)
    grad = torch.randn_like(expected.float())
    expected_grads = torch.autograd.grad(expected.float(), (x, conv.weight, conv.bias), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = networks._convolve(conv, x)
    found_grads = torch.autograd.grad(found.float(), (x, conv.weight, conv.bias), grad)
    assert [g.dtype for g in found_grads] == [torch.float32] * 3
    assert torch.equal(found_grads[1], expected_grads[1]) and torch.equal(found_grads[2], expected_grads[2])
    assert float((found_grads[0] - expected_grads[0]).abs().max() / expected_grads[0].abs().max()) < 1e-2


def test_unet_trains_through_the_few_channel_last_convolution(monkeypatch):
    """The UNet's last convolution takes the few-channel path in training; the network's gradients equal
    PyTorch's own convolution's."""
    torch.manual_seed(0)
    net = UNet2(5, [[2, 8, 16, 16, 16, 16], [8, 16, 16, 16, 16]]).double().train()
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    a, b = torch.rand(2, 1, 18, 20, 22, dtype=torch.float64), torch.rand(2, 1, 18, 20, 22, dtype=torch.float64)
    used = []

    def gradients():
        net.zero_grad(set_to_none=True)
        out = net(a, b)
        used.append(_graph_has(out, "_ConvToFewChannelsBackward"))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    fast = gradients()
    monkeypatch.setattr(networks, "_FEW_CHANNELS", 0)
    plain = gradients()
    assert used == [True, False]
    assert float((fast - plain).norm() / plain.norm()) < 1e-10


def _graph_has(tensor: torch.Tensor, node: str) -> bool:
    """Whether ``tensor``'s autograd graph has a node of type ``node``."""
    pending, seen = [tensor.grad_fn], set()
    while pending:
        function = pending.pop()
        if function is None or function in seen:
            continue
        seen.add(function)
        if type(function).__name__ == node:
            return True
        pending.extend(next_function for next_function, _ in function.next_functions)
    return False


def test_objective_is_icon_registrations_gradicon_loss():
    """icon_registration 1.1.9's GradientICON, transcribed: LNCC both ways (border padding) + λ·penalty of
    Φ_AB∘Φ_BA at identity + N(0, 1/W²) noise (the same noise for every batch element)."""
    from ICONRegistrationLib.core.objective import symmetric_objective

    shape = (12, 14, 10)
    fields = {"AB": _smooth_field(shape, 0.03, 6).float(), "BA": _smooth_field(shape, 0.03, 7).float()}

    class Net(torch.nn.Module):
        def forward(self, image_A, image_B):
            key = "AB" if image_A is images[0] else "BA"
            return displacement_transform(fields[key].expand(image_A.shape[0], -1, -1, -1, -1))

    generator = torch.Generator().manual_seed(8)
    images = (torch.rand(2, 1, *shape, generator=generator), torch.rand(2, 1, *shape, generator=generator))
    identity = identity_map(shape)
    samples = identity + torch.randn(identity.shape, generator=generator) / shape[-1]
    terms = symmetric_objective(Net(), *images, similarity=LNCC(2), lmbda=1.5, padding="border",
                                penalty_samples=samples)
    phi_AB, phi_BA = displacement_transform(fields["AB"]), displacement_transform(fields["BA"])
    maps_AB, maps_BA = ((identity + fields[key]).expand(2, -1, -1, -1, -1) for key in ("AB", "BA"))
    similarity = (LNCC(2)(_plain_grid_sample(images[0], maps_AB), images[1])
                  + LNCC(2)(_plain_grid_sample(images[1], maps_BA), images[0]))
    penalty = _unfused_gradicon(phi_AB, phi_BA, samples)
    assert float(terms.similarity) == pytest.approx(float(similarity), rel=1e-6)
    assert float(terms.penalty) == pytest.approx(float(penalty), rel=1e-5)
    assert float(terms.loss) == pytest.approx(float(similarity + 1.5 * penalty), rel=1e-6)


@pytest.mark.parametrize("shape", [(9, 11, 8), (13, 10)])
def test_label_dice_without_one_hot_maps_equals_the_sampled_one_hot_maps(shape):
    generator = torch.Generator().manual_seed(len(shape))
    values = torch.tensor([3, 8, 21, 40, 41])  # not consecutive; 40 absent from both maps below
    present = values[torch.tensor([0, 1, 2, 4])]

    def labels():
        drawn = present[torch.randint(len(present), (2, 1, *shape), generator=generator)]
        drawn[torch.rand(drawn.shape, generator=generator) < 0.3] = 0
        drawn[torch.rand(drawn.shape, generator=generator) < 0.05] = 99  # not a training label: background
        return drawn

    moving, fixed = labels(), labels()
    # maps that reach outside the grid (zero padding: background) and land on and between voxel centres
    maps = identity_map(shape, dtype=torch.float64).expand(2, *(-1,) * (len(shape) + 1)).clone()
    maps = (maps + 0.15 * torch.randn(maps.shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    reference = soft_dice_loss(sample_at(label_fractions(moving, values, dtype=torch.float64), maps,
                                         padding="zeros"), label_fractions(fixed, values, dtype=torch.float64))
    reference_gradient, = torch.autograd.grad(reference, maps)
    fast = soft_dice_loss_of_warped_labels(label_indices(moving, values), label_indices(fixed, values), maps,
                                           values.numel())
    fast_gradient, = torch.autograd.grad(fast, maps)
    assert 0.3 < float(reference.detach()) < 1
    assert float(fast) == pytest.approx(float(reference), rel=1e-12)
    assert torch.allclose(fast_gradient, reference_gradient, rtol=1e-9, atol=1e-12)
    # a perfect match scores 0 through the fast path too
    assert float(soft_dice_loss_of_warped_labels(label_indices(fixed, values), label_indices(fixed, values),
                                                 identity_map(shape, dtype=torch.float64).expand(2, -1, *shape),
                                                 values.numel())) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_label_dice_equals_the_tensor_operations(monkeypatch, dtype):
    """The compiled overlap and warped-volume sums (3-D, CPU) against the tensor path: the same loss and gradient, for
    points inside, on voxel centres, just outside and far outside the grid (background there)."""
    from ICONRegistrationLib.core import native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    generator = torch.Generator().manual_seed(3)
    shape, channels = (7, 9, 6), 4
    moving = torch.randint(0, channels + 1, (3, *shape), generator=generator)
    fixed = torch.randint(0, channels + 1, (3, 5, 8, 4), generator=generator)  # points on another grid
    maps = identity_map((5, 8, 4), dtype=torch.float64).expand(3, -1, -1, -1, -1).clone()
    maps[0] += 0.2 * torch.randn(maps[0].shape, generator=generator, dtype=torch.float64)
    maps[1, :, :, :2] = torch.round(maps[1, :, :, :2] * 6) / 6  # on voxel centres along every axis of a 7-voxel side
    maps[2] += 0.6 * torch.randn(maps[2].shape, generator=generator, dtype=torch.float64)  # many far outside
    maps = maps.to(dtype).requires_grad_(True)
    compiled = soft_dice_loss_of_warped_labels(moving, fixed, maps, channels)
    compiled_gradient, = torch.autograd.grad(compiled, maps)
    monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    tensors = soft_dice_loss_of_warped_labels(moving, fixed, maps, channels)
    tensors_gradient, = torch.autograd.grad(tensors, maps)
    assert compiled.dtype == dtype and 0.2 < float(tensors) < 1
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    assert float(compiled) == pytest.approx(float(tensors), rel=tolerance)
    assert float((compiled_gradient - tensors_gradient).abs().max()) <= tolerance * float(tensors_gradient.abs().max())
    assert float(tensors_gradient[2].abs().max()) > 0  # the points near the grid still move the loss
    with pytest.raises(ValueError, match="channel numbers"):  # a channel number past the bins: refused, not written
        native_sampler.warped_label_sums(moving, fixed.clamp_max(channels) + 1, maps.detach().flatten(2), shape,
                                         channels + 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 9, 6), (2, 3, 5)])  # axes of 2 and 3 voxels: the faces' one-sided differences
def test_compiled_fold_penalty_equals_the_tensor_operations(monkeypatch, dtype, shape):
    """The compiled fold penalty against the tensor path (central differences inside, one-sided at the faces, det J,
    relu, mean): the same value and gradient on maps that fold in places and are smooth in others."""
    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.core.losses import fold_penalty
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    generator = torch.Generator().manual_seed(4)
    maps = identity_map(shape, dtype=torch.float64).expand(2, -1, -1, -1, -1).clone()
    spacing = 1 / (max(shape) - 1)  # the smallest voxel step of the unit cube
    maps[0] += 0.6 * spacing * torch.randn(maps[0].shape, generator=generator, dtype=torch.float64)  # folds in places
    maps[1] += 0.05 * spacing * torch.randn(maps[1].shape, generator=generator, dtype=torch.float64)
    maps = maps.to(dtype).requires_grad_(True)
    compiled = fold_penalty(maps)
    compiled_gradient, = torch.autograd.grad(3.0 * compiled, maps)
    monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    tensors = fold_penalty(maps)
    tensors_gradient, = torch.autograd.grad(3.0 * tensors, maps)
    assert compiled.dtype == dtype and float(tensors) > 0.01
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(compiled) == pytest.approx(float(tensors), rel=tolerance)
    assert float((compiled_gradient - tensors_gradient).abs().max()) <= tolerance * float(tensors_gradient.abs().max())
    assert float(tensors_gradient[1].abs().max()) == 0  # smooth maps: nothing to push
    monkeypatch.undo()
    broken = maps.detach().clone()
    broken[0, 0, 1, 1, 1] = float("nan")
    assert math.isnan(float(fold_penalty(broken)))  # as the tensor path's relu and mean give


def test_keep_freed_memory_applies_to_its_own_process_only_and_can_be_switched_off():
    import os
    import subprocess
    import sys

    code = "from ICONRegistrationLib.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    applied = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert applied.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    env["ICONREG_SYSTEM_MALLOC"] = "1"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert off.stdout.strip() == "False"


def test_quality_summary_is_numpys_with_any_thread_count_and_normalisation_clips_at_the_percentile():
    import dataclasses

    import numpy as np

    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities
    from ICONRegistrationLib.pipeline.qa import summarize_quality

    native_sampler.enable()  # the percentiles' bands through the compiled kernel where it builds
    rng = np.random.default_rng(3)
    jacobian = rng.normal(1.0, 0.4, size=(70, 64, 60)).astype(np.float32)  # large enough for the banded selection
    ic_error = rng.gamma(2.0, 0.3, size=(70, 64, 60)).astype(np.float32)
    image = rng.gamma(3.0, 50.0, size=(20, 21, 22)).astype(np.float32)
    results = {}
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = dataclasses.asdict(summarize_quality(jacobian, ic_error))
    finally:
        torch.set_num_threads(threads_before)
    assert results[1] == results[2]
    summary = results[2]
    assert summary["folds"] == int((jacobian <= 0).sum()) > 0
    for key, q in (("p1", 1), ("p5", 5), ("median", 50), ("p95", 95), ("p99", 99)):
        assert summary[f"jacobian_{key}"] == float(np.percentile(jacobian, q))
    assert summary["ic_error_p95_mm"] == float(np.percentile(ic_error, 95))
    normalised = normalize_intensities(image, "mri", {"mri_percentile": 99})
    high = np.percentile(image, 99)
    assert normalised.dtype == np.float32 and normalised.min() == 0.0 and normalised.max() == 1.0
    assert float((image >= high).mean()) == pytest.approx(float((normalised == 1.0).mean()), abs=1e-4)


def _percentile_cases():
    import numpy as np

    rng = np.random.default_rng(11)
    n = (1 << 18) + 12345  # above the size where the banded selection is used
    yield "uniform float32", rng.random(n, dtype=np.float32) * 1000
    yield "normal float64", rng.normal(size=n)
    yield "many ties", np.round(rng.exponential(size=n) * 3).astype(np.float32)
    yield "mostly background", np.where(rng.random(n) < 0.7, 0, rng.random(n) * 500).astype(np.float32)
    yield "sorted (the strided sample sees a ramp)", np.sort(rng.random(n).astype(np.float32))
    yield "one value", np.full(n, 7.0, dtype=np.float32)
    yield "3-D volume", rng.gamma(2.0, 100.0, size=(70, 64, 60)).astype(np.float32)
    yield "small", rng.random(1000, dtype=np.float32)
    with_nan = rng.random(n, dtype=np.float32)
    with_nan[123] = np.nan
    yield "a NaN", with_nan
    signed_zeros = rng.normal(size=n).astype(np.float32)
    signed_zeros[rng.random(n) < 0.4] = 0.0
    signed_zeros[rng.random(n) < 0.2] = -0.0
    yield "±0.0 among the values", signed_zeros
    yield "±inf among the values", np.concatenate([rng.random(n, dtype=np.float32), [np.inf, -np.inf]])


@pytest.mark.parametrize("compiled_band", [True, False])
@pytest.mark.parametrize("case", list(range(11)))
def test_banded_percentile_is_numpys_bit_for_bit(monkeypatch, case, compiled_band):
    """The same bits as np.percentile, but for the sign of a zero (partitioning may pick either zero), one quantile
    at a time and several from one sorted sample, with the band gathered by the compiled kernel or by NumPy."""
    import numpy as np

    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.pipeline import percentile as module

    if compiled_band and not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    calls = []
    if compiled_band:
        kernel = native_sampler.band_of
        monkeypatch.setattr(native_sampler, "band_of", lambda *args: calls.append(1) or kernel(*args))
    else:
        monkeypatch.setattr(module, "_compiled_band", lambda *args: None)
    name, values = list(_percentile_cases())[case]
    qs = (0.0, 0.5, 1, 5, 30.5, 37.3, 50, 95, 99, 99.5, 100, np.float64(12.345), np.float32(87.5))
    together = module.percentiles(values, qs)
    if compiled_band and values.size >= module._SMALL and bool(np.isfinite(values).all()):
        assert calls, name  # the compiled kernel gathered the bands
    if not compiled_band or values.size < module._SMALL:
        assert not calls, name
    for q, from_several in zip(qs, together):
        expected = float(np.percentile(values, q))
        for got in (module.percentile(values, q), from_several):
            if expected == 0.0:
                assert got == 0.0, (name, q, got, expected)
            else:
                assert np.float64(got).tobytes() == np.float64(expected).tobytes(), (name, q, got, expected)


def test_banded_percentile_selects_from_the_band_without_numpys_percentile(monkeypatch):
    """On a large array the fast path answers alone (a fallback to np.percentile would raise here)."""
    import numpy as np

    from ICONRegistrationLib.pipeline import percentile as module

    values = np.random.default_rng(5).gamma(2.0, 100.0, size=(64, 64, 80)).astype(np.float32)
    expected = {q: float(np.percentile(values, q)) for q in (1, 50, 99)}

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to np.percentile")

    monkeypatch.setattr(module.np, "percentile", refuse)
    assert {q: module.percentile(values, q) for q in (1, 50, 99)} == expected
    from ICONRegistrationLib.core import native_sampler
    if native_sampler.enable().available:  # and the compiled kernel gathered the bands
        calls = []
        kernel = native_sampler.band_of
        monkeypatch.setattr(native_sampler, "band_of", lambda *args: calls.append(1) or kernel(*args))
        assert dict(zip((1, 50, 99), module.percentiles(values, (1, 50, 99)))) == expected and len(calls) == 3


def test_normalisation_is_the_float64_numpy_formula_bit_for_bit_and_guessing_a_modality_needs_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities

    rng = np.random.default_rng(8)
    for image in (rng.gamma(3.0, 50.0, size=(70, 64, 60)).astype(np.float32),
                  (rng.normal(size=(40, 30, 20)) * 3e37).astype(np.float32)):  # a range beyond float32
        for modality, rules in (("mri", {"mri_percentile": 99}), ("ct", {"ct_window": [-100.0, 300.0]})):
            low, high = ((float(image.min()), float(np.percentile(image, 99))) if modality == "mri"
                         else (-100.0, 300.0))
            expected = ((np.clip(image, low, high).astype(np.float64) - low) / (high - low)).astype(np.float32)
            got = normalize_intensities(image, modality, rules)
            assert got.dtype == np.float32 and np.array_equal(got, expected), modality
    # other voxel types keep NumPy's arithmetic too (integers are clipped against float bounds in float64)
    base = rng.gamma(3.0, 50.0, size=(30, 20, 10))
    for image in (base.astype(np.int16), base.astype(np.uint16), base, base.astype(">f4"), base.astype(np.uint8)):
        low, high = float(image.min()), float(np.percentile(image, 99))
        expected = ((np.clip(image, low, high).astype(np.float64) - low) / (high - low)).astype(np.float32)
        got = normalize_intensities(image, "mri", {"mri_percentile": 99})
        assert got.dtype == np.float32 and np.array_equal(got, expected), image.dtype
    package = Path(__file__).resolve().parents[1] / "ICONRegistration"
    code = (f"import sys; sys.path.insert(0, {str(package)!r})\n"
            "import numpy as np\n"
            "from ICONRegistrationLib.pipeline.preprocessing import guess_modality\n"
            "assert guess_modality(np.full((70, 70, 70), -1000.0, dtype=np.float32)) == 'ct'\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_ct_with_padding_outside_the_field_of_view_is_guessed_as_ct():
    """CT padded with −32768 outside the scanner's field of view was guessed as MRI ('auto', the default), squeezing
    soft tissue into 0.976–0.982 of the network's input range. Padding below −3100 is left out of the guess."""
    import numpy as np

    from ICONRegistrationLib.pipeline.preprocessing import guess_modality
    rng = np.random.default_rng(3)
    body = np.concatenate([np.full(4000, -1000.0), rng.normal(40.0, 30.0, 20000), rng.normal(700.0, 200.0, 3000)])
    mri = rng.gamma(3.0, 50.0, size=27000)
    for padding in (None, -1024.0, -3024.0, -32768.0):
        ct = body if padding is None else np.concatenate([body, np.full(15000, padding)])
        assert guess_modality(ct.astype(np.float32)) == "ct", padding
        assert guess_modality(np.concatenate([mri, np.zeros(15000)]).astype(np.float32)) == "mri"
    assert guess_modality(np.full(100, -32768.0, dtype=np.float32)) == "mri"  # nothing but padding: no evidence


def test_mri_padding_outside_the_field_of_view_normalises_to_background():
    """An int16 MRI padded with −32768 outside its field of view was normalised from that minimum: the tissue went to
    0.976–1.0 of the network's input range, a nearly constant image. Padding (one value ≤ −3100, every other voxel
    above) is now left out of the minimum and the percentile and becomes 0."""
    import numpy as np

    from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities

    rules = {"mri_percentile": 99}
    tissue = np.random.default_rng(0).gamma(3.0, 100.0, size=(30, 20, 20)).astype(np.int16)
    for padding in (-32768, -3200):
        padded = tissue.copy()
        padded[:6] = padding
        got = normalize_intensities(padded.astype(np.float32), "mri", rules)
        np.testing.assert_array_equal(got[6:], normalize_intensities(padded[6:].astype(np.float32), "mri", rules))
        assert np.all(got[:6] == 0.0) and float(np.percentile(got[6:], 1)) < 0.1, padding
    # values that reach below −3100 continuously are image, not padding: the minimum still counts
    spread = np.random.default_rng(1).normal(0.0, 5000.0, size=(30, 20, 20)).astype(np.float32)
    with pytest.warns(UserWarning, match="looks like CT"):  # 1 % of it below −200
        normalised = normalize_intensities(spread, "mri", rules)
    assert float(normalised.reshape(-1)[np.argmin(spread)]) == 0.0 and np.count_nonzero(normalised == 0.0) == 1


def test_a_modality_that_contradicts_the_intensities_warns():
    """An MRI (or a CT stored without its rescale intercept) given as CT went through the [−1000, 1000] HU window
    without a word: soft tissue stored at ~1064 saturated at 1.0, air at 0.51. A CT given as MRI skipped the CT window
    silently. Both warn now; matching modalities do not."""
    import warnings

    import numpy as np

    from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities

    rng = np.random.default_rng(2)
    rules = {"ct_window": [-1000, 1000], "mri_percentile": 99}
    mri = rng.gamma(3.0, 100.0, size=(30, 20, 20)).astype(np.float32)
    raw_ct = (rng.normal(40.0, 20.0, size=(30, 20, 20)) + 1024).astype(np.uint16)
    raw_ct[:5] = 24  # air, stored without the −1024 intercept
    ct = raw_ct.astype(np.float32) - 1024
    for image in (mri, raw_ct):
        with pytest.warns(UserWarning, match="given as CT but has no voxel below 0 HU"):
            normalize_intensities(image, "ct", rules, role="fixed")
    with pytest.warns(UserWarning, match="given as MRI but looks like CT"):
        normalize_intensities(ct, "mri", rules)
    # a large CT whose axes are powers of two, with air inside but none in the plane x = 0: the check looks at a
    # sample of the voxels, which must not be a few planes (a stride of 16 on rows of 64 voxels would be)
    cropped_ct = rng.normal(40.0, 20.0, size=(256, 64, 64)).astype(np.float32)
    cropped_ct[:, 20:40, 1:16] = -900.0  # between the columns 0 and 16 that a stride of 16 would see
    with pytest.warns(UserWarning, match="given as MRI but looks like CT"):
        normalize_intensities(cropped_ct, "mri", rules)
    padded_ct = ct.copy()
    padded_ct[:2] = -3024  # padding is not evidence either way
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for image in (ct, padded_ct):
            normalize_intensities(image, "ct", rules)
        normalize_intensities(mri, "mri", rules)
        normalize_intensities(mri, "ct", {"scale_max_to": 0.9})  # this model ignores the modality


def test_mri_with_a_small_object_in_a_large_background_warns():
    """The 99th percentile over all voxels (uniGradICON's rule, kept) lies inside the anatomy when the background
    fills > 96 % of the image: 2 % of tissue had half its voxels clipped to 1.0 without a word."""
    import warnings

    import numpy as np

    from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities

    rng = np.random.default_rng(4)
    rules = {"mri_percentile": 99}
    small = np.zeros((50, 50, 50), np.float32)
    small[:10, :10, :25] = rng.gamma(3.0, 100.0, size=(10, 10, 25)) + 1  # 2 % of the voxels
    with pytest.warns(UserWarning, match="mostly background"):
        normalize_intensities(small, "mri", rules, role="moving")
    brain_like = np.zeros((50, 50, 50), np.float32)
    brain_like[:15] = rng.gamma(3.0, 100.0, size=(15, 50, 50)) + 1  # 30 % foreground, as skull-stripped brains
    binary = np.zeros((50, 50, 50), np.float32)
    binary[:10, :10, :25] = 1000.0  # nothing above the percentile's value: nothing clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        normalize_intensities(brain_like, "mri", rules)
        normalize_intensities(binary, "mri", rules)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_field_image_from_the_gpu_equals_the_cpu_one():
    import numpy as np
    import SimpleITK as sitk

    from ICONRegistrationLib.pipeline.grid import Grid
    from ICONRegistrationLib.pipeline.registration import _field_image

    grid = Grid.of_image(sitk.Image([12, 10, 8], sitk.sitkFloat32))
    field = torch.randn(1, 3, 8, 10, 12, generator=torch.Generator().manual_seed(0))
    on_cpu = sitk.GetArrayFromImage(_field_image(field, grid))
    on_gpu = sitk.GetArrayFromImage(_field_image(field.cuda(), grid))
    assert on_gpu.dtype == np.float64 and np.array_equal(on_cpu, on_gpu)


def test_low_precision_unets_stay_close_to_float32_and_restore():
    """bfloat16 training (``low_precision``): every convolution computes in bfloat16, the displacement comes back
    as float32 and close to float32's, the gradients too, the state dict is unchanged and the setting is restored on
    leaving the block."""
    torch.manual_seed(0)
    net = UNet2(5, [[2, 8, 16, 16, 16, 16], [8, 16, 16, 16, 16]]).train()
    torch.nn.init.normal_(net.lastConv.weight, std=0.05)
    blur = torch.nn.AvgPool3d(5, stride=1, padding=2)
    a, b = blur(torch.rand(1, 1, 34, 32, 34)), blur(torch.rand(1, 1, 34, 32, 34))
    keys = set(net.state_dict())

    def output_and_gradient():
        net.zero_grad(set_to_none=True)
        out = net(a, b)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    reference, reference_gradient = output_and_gradient()
    seen = set()
    hooks = [conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
             for conv in [*net.downConvs, *net.upConvs, net.lastConv]]
    with networks.low_precision(net, torch.bfloat16):
        assert net.low_precision == torch.bfloat16
        low, low_gradient = output_and_gradient()
    for hook in hooks:
        hook.remove()
    assert net.low_precision is None and set(net.state_dict()) == keys
    assert seen == {torch.bfloat16} and low.dtype == torch.float32
    error = (low - reference).abs().max() / reference.abs().max()
    assert 1e-6 < error < 0.03, error  # rounded (not silently float32), but close
    cosine = F.cosine_similarity(low_gradient, reference_gradient, dim=0)
    assert cosine > 0.99, cosine
    with pytest.raises(ValueError):
        with networks.low_precision(net, torch.float64):
            pass


@pytest.mark.parametrize("shape", [(2, 3, 7, 1, 5), (1, 3, 2, 3, 4), (1, 3, 9, 10, 11)])
def test_compiled_displacement_jacobian_is_the_tensor_formula(monkeypatch, shape):
    """The QA stage's Jacobian determinant through the compiled one-pass kernel: the tensor operations' numbers to
    float32 rounding against float64 (axes of one and two voxels included, an oblique grid matrix), and it is the
    kernel that ran."""
    from ICONRegistrationLib.core import coordinates, native_sampler
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    calls = []
    kernel = native_sampler.displacement_jacobian
    monkeypatch.setattr(native_sampler, "displacement_jacobian", lambda *args: calls.append(1) or kernel(*args))
    grid_matrix = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.1]], dtype=torch.float64)
    displacement = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.3
    fast = coordinates.displacement_jacobian_determinant(displacement, grid_matrix)
    assert calls == [1] and fast.shape == (shape[0], 1, *shape[2:]) and fast.dtype == torch.float32
    exact = coordinates.displacement_jacobian_determinant(displacement.double(), grid_matrix)
    monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    tensor_path = coordinates.displacement_jacobian_determinant(displacement, grid_matrix)
    assert float((fast.double() - exact).abs().max()) < 1e-6
    assert float((fast - tensor_path).abs().max()) < 1e-6


def _oblique_pair(moving_size=(25, 31, 20), moving_rotation=0.0):
    """A fixed image 30×26×22 rotated by 0.3 rad about z and a moving image of ``moving_size`` (rotated by
    ``moving_rotation`` about x), anisotropic spacings and different origins; and the 9×11×8 network grids over them
    (``grid_B`` over fixed, ``grid_A`` over moving)."""
    import SimpleITK as sitk

    from ICONRegistrationLib.pipeline.grid import Grid

    fixed = sitk.Image(30, 26, 22, sitk.sitkFloat32)
    fixed.SetSpacing((1.2, 0.9, 1.5))
    fixed.SetOrigin((3.0, -4.0, 7.0))
    angle = 0.3
    fixed.SetDirection((math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0))
    moving = sitk.Image(*moving_size, sitk.sitkFloat32)
    moving.SetSpacing((1.0, 1.1, 1.3))
    moving.SetOrigin((-2.0, 1.0, 4.0))
    c, s_ = math.cos(moving_rotation), math.sin(moving_rotation)
    moving.SetDirection((1.0, 0.0, 0.0, 0.0, c, -s_, 0.0, s_, c))
    grid_B = Grid.over_image(fixed, [9, 11, 8])
    grid_A = Grid.over_image(moving, [9, 11, 8], align_to=grid_B)
    return fixed, moving, grid_B, grid_A


@pytest.mark.parametrize("with_ic", [True, False])
def test_compiled_qa_fields_give_the_tensor_paths_displacement_ic_error_and_outside_mask(monkeypatch, with_ic):
    """register()'s QA fields on the network grid through the compiled one-pass kernel: the tensor path's
    displacement in mm, IC error and outside mask (grids of different shapes, oblique directions and origins, a
    map that leaves the other box), a non-finite displacement stays non-finite, and it is the kernel that ran."""
    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.pipeline import registration
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    _, _, grid_B, grid_A = _oblique_pair()
    generator = torch.Generator().manual_seed(5)
    displacement = torch.randn(1, 3, 9, 11, 8, generator=generator) * 0.08
    back = torch.randn(1, 3, 9, 11, 8, generator=generator) * 0.08 if with_ic else None
    calls = []
    kernel = native_sampler.qa_fields
    monkeypatch.setattr(native_sampler, "qa_fields", lambda *args: calls.append(1) or kernel(*args))
    fast = registration._sample_fields(displacement, back, grid_B, grid_A, grid_B)
    assert calls == [1]
    monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    tensor_path = registration._sample_fields(displacement, back, grid_B, grid_A, grid_B)
    assert calls == [1]
    for found, expected in zip(fast, tensor_path):
        if expected is None:
            assert found is None
            continue
        assert found.shape == expected.shape and found.dtype == expected.dtype
        if expected.dtype == torch.bool:
            assert bool(expected.any()) and torch.equal(found, expected)  # some points leave the other box
        else:
            assert float((found - expected).abs().max()) < 1e-4 * max(1.0, float(expected.abs().max()))
    monkeypatch.undo()
    broken = displacement.clone()
    broken[0, 1, 4, 5, 3] = float("nan")
    outputs = registration._sample_fields(broken, back, grid_B, grid_A, grid_B)
    assert not bool(torch.isfinite(outputs[0]).all())
    if with_ic:
        assert not bool(torch.isfinite(outputs[2]).all())


def test_compiled_clamp_and_scale_is_the_float64_formula_bit_for_bit(monkeypatch):
    """The intensity normalisation's clamp and scale through the compiled kernel: the tensor expression's bits
    (bounds that float32 cannot hold, values on and beyond them, a NaN), and it is the kernel that ran."""
    import numpy as np

    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    values = (torch.randn(300_001, generator=torch.Generator().manual_seed(4)) * 100).float()
    values[7] = float("nan")
    values[8], values[9], values[10], values[11] = float("inf"), float("-inf"), -0.0, 0.0
    for low, high in ((0.1, 57.3), (-3.3333333333, 99.123456789), (float(values[:6].min()), float(values[:6].max())),
                      (0.0, 1.0), (-0.0, 2.5), (5.0, -5.0)):  # a zero bound of either sign; bounds the wrong way
        expected = values.clamp(low, high).to(torch.float64).sub_(low).div_(high - low).to(torch.float32)
        found = native_sampler.clamp_scale(values, low, high)
        assert torch.equal(found.view(torch.int32), expected.view(torch.int32))
    calls = []
    kernel = native_sampler.clamp_scale
    monkeypatch.setattr(native_sampler, "clamp_scale", lambda *args: calls.append(1) or kernel(*args))
    image = np.random.default_rng(9).gamma(3.0, 50.0, size=(40, 30, 20)).astype(np.float32)
    fast = normalize_intensities(image, "mri", {"mri_percentile": 99})
    assert calls == [1]
    monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    assert np.array_equal(normalize_intensities(image, "mri", {"mri_percentile": 99}), fast) and calls == [1]


@pytest.mark.parametrize("moving_size", [(25, 31, 20), (2, 17, 9)])
def test_compiled_warp_gives_the_tensor_paths_warped_image(monkeypatch, moving_size):
    """register()'s warped moving image through the compiled kernel: the tensor path's values to float32 rounding
    and its zeros outside the moving image (oblique, anisotropic grids with different origins, a displacement that
    takes points out of the moving image, a moving axis of two voxels), the AVX-512 and scalar paths the same bits,
    and it is the kernel that ran."""
    import numpy as np

    from ICONRegistrationLib.core import native_sampler
    from ICONRegistrationLib.pipeline import registration
    from ICONRegistrationLib.pipeline.grid import Grid
    if not native_sampler.enable().available:
        pytest.skip(f"the compiled library is not available: {native_sampler.status().reason}")
    fixed, moving, grid_B, grid_A = _oblique_pair(moving_size, moving_rotation=-0.3)
    voxels = np.random.default_rng(6).gamma(3.0, 50.0, size=moving_size[::-1]).astype(np.float32)
    displacement = torch.randn(1, 3, 9, 11, 8, generator=torch.Generator().manual_seed(5)) * 0.1
    calls = []
    kernel = native_sampler.warp_image
    monkeypatch.setattr(native_sampler, "warp_image", lambda *args: calls.append(1) or kernel(*args))
    fixed_grid, moving_grid = Grid.of_image(fixed), Grid.of_image(moving)
    fast = registration._warp_moving(voxels, displacement, grid_B, grid_A, fixed_grid, moving_grid)
    vectorized = native_sampler._module.vectorized()  # without AVX-512 both calls take the scalar path
    before = native_sampler._module.set_vectorized(False)
    try:
        scalar = registration._warp_moving(voxels, displacement, grid_B, grid_A, fixed_grid, moving_grid)
    finally:
        native_sampler._module.set_vectorized(before)
    assert calls == [1, 1] and np.array_equal(fast, scalar), f"AVX-512 path: {vectorized}"
    monkeypatch.setattr(native_sampler, "kernels_eligible", lambda tensor: False)
    expected = registration._warp_moving(voxels, displacement, grid_B, grid_A, fixed_grid, moving_grid)
    assert calls == [1, 1] and fast.shape == expected.shape and fast.dtype == expected.dtype
    outside = expected == 0
    assert 0.05 < outside.mean() < 0.95  # some points leave the moving image, most do not
    assert np.count_nonzero((fast == 0) != outside) <= 2  # rounding at the inside test's edge
    both = (fast != 0) & ~outside
    assert np.abs(fast[both] - expected[both]).max() < 1e-4 * np.abs(expected).max()
