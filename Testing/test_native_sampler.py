"""The compiled CPU sampler computes what ``grid_sample`` computes, and the package falls back where it cannot.

* values, image gradients and point gradients equal ``grid_sample(bilinear, border or zeros, align_corners=True)``
  in float32 and float64, for points inside, outside (clamped), exactly on voxel nodes and cell faces, batches, an image
  broadcast over the batch (stride 0), and non-contiguous grids;
* ``sample_at`` (chunked or not) gives the same values and gradients with and without the kernel;
* calls the kernel does not cover (nearest, float16/bfloat16, a single-voxel axis, no points, the switch set to 0)
  go to ``grid_sample``; without a compiler the status says why and nothing fails.

The kernel builds once per machine (about 30 s) and is cached; tests that need it skip without a C++ compiler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ICONRegistrationLib.core import coordinates, native_sampler
from ICONRegistrationLib.core.coordinates import grid_sample_grid, identity_map, sample_at


@pytest.fixture(scope="module")
def kernel():
    state = native_sampler.enable()
    if not state.available:
        pytest.skip(f"compiled sampler unavailable here: {state.reason}")
    return native_sampler


def _to_coordinates(grid):
    """``[N, *T, 3]`` (x, y, z) in [−1, 1] → ``[N, 3, *T]`` (z, y, x) in the unit cube (the map convention)."""
    return ((grid.flip(-1) + 1) / 2).movedim(-1, 1)


def _reference(image, grid, padding="border"):
    """grid_sample on the grid sample_at builds from the coordinates (so both sides see the same grid values)."""
    return F.grid_sample(image, grid_sample_grid(_to_coordinates(grid)), mode="bilinear", padding_mode=padding,
                         align_corners=True)


def _kernel(image, grid, padding="border"):
    return native_sampler.sample(image, _to_coordinates(grid), padding)


def _both(image, grid, grad_out, sample, image_gradient=True):
    """Values, image gradient (None without ``image_gradient``) and point gradient."""
    img = image.clone().requires_grad_(image_gradient)
    pts = grid.clone().requires_grad_(True)
    out = sample(img, pts)
    grads = torch.autograd.grad(out, (img, pts) if image_gradient else (pts,), grad_out)
    return (out.detach(), grads[0], grads[1]) if image_gradient else (out.detach(), None, grads[0])


class _CountingModule:
    """The built module with a count of its calls of ``name``."""

    def __init__(self, module, name):
        self._module, self._name, self.calls = module, name, 0

    def __getattr__(self, attribute):
        found = getattr(self._module, attribute)
        if attribute != self._name:
            return found

        def counted(*args):
            self.calls += 1
            return found(*args)
        return counted


def _grid_with_special_points(batch, out_shape, image_shape, dtype, generator):
    """Points in [−1.6, 1.6] (some clamped or outside), plus exact voxel nodes, cell faces and the two borders."""
    grid = torch.rand(batch, *out_shape, 3, generator=generator, dtype=dtype) * 3.2 - 1.6
    flat = grid.view(-1, 3)
    sizes = torch.tensor([image_shape[2], image_shape[1], image_shape[0]], dtype=dtype)  # x, y, z
    nodes = torch.randint(0, 100, (flat.shape[0] // 3, 3), generator=generator).to(dtype) % sizes
    flat[: nodes.shape[0]] = nodes / (sizes - 1) * 2 - 1  # exact nodes, incl. 0 and n − 1
    flat[nodes.shape[0]: 2 * nodes.shape[0], 0] = 1.0  # on the last x face
    flat[2 * nodes.shape[0]: 2 * nodes.shape[0] + 5] = -1.0
    start = 2 * nodes.shape[0] + 5  # one voxel outside (x = −1 and x = n: the edge of the zeros padding's reach)
    flat[start: start + 4, 0] = -1 - 2 / (sizes[0] - 1)
    flat[start + 4: start + 8, 1] = 1 + 2 / (sizes[1] - 1)
    return grid


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("batch,channels,image_shape,out_shape", [
    (1, 3, (8, 9, 10), (5, 6, 7)),
    (2, 1, (12, 10, 8), (4, 4, 4)),
    (3, 2, (2, 5, 3), (6, 2, 3)),
])
@pytest.mark.parametrize("image_gradient", [True, False])  # False: the derivatives come from the forward
def test_values_and_gradients_equal_grid_sample(kernel, monkeypatch, padding, dtype, tolerance, batch, channels,
                                                image_shape, out_shape, image_gradient):
    generator = torch.Generator().manual_seed(batch * 10 + channels)
    image = torch.randn(batch, channels, *image_shape, generator=generator, dtype=dtype)
    grid = _grid_with_special_points(batch, out_shape, image_shape, dtype, generator)
    grad_out = torch.randn(batch, channels, *out_shape, generator=generator, dtype=dtype)
    ref = _both(image, grid, grad_out, lambda img, pts: _reference(img, pts, padding), image_gradient)
    counting = _CountingModule(native_sampler._module, "sample_forward_with_derivatives")
    monkeypatch.setattr(native_sampler, "_module", counting)
    ours = _both(image, grid, grad_out, lambda img, pts: _kernel(img, pts, padding), image_gradient)
    assert counting.calls == (0 if image_gradient else 1)
    for name, a, b in zip(("values", "image gradient", "point gradient"), ref, ours):
        if a is None:
            continue
        scale = a.abs().max().clamp_min(1)
        assert float((a - b).abs().max() / scale) < tolerance, name


def test_many_channels_without_an_image_gradient_take_the_backward_pass(kernel, monkeypatch):
    """Above DERIVATIVES_IN_FORWARD_CHANNELS the forward stores no derivatives; the same point gradient."""
    generator = torch.Generator().manual_seed(8)
    channels = native_sampler.DERIVATIVES_IN_FORWARD_CHANNELS + 1
    image = torch.randn(1, channels, 7, 8, 9, generator=generator)
    grid = torch.rand(1, 4, 5, 6, 3, generator=generator) * 2.4 - 1.2
    grad_out = torch.randn(1, channels, 4, 5, 6, generator=generator)
    counting = _CountingModule(native_sampler._module, "sample_forward_with_derivatives")
    monkeypatch.setattr(native_sampler, "_module", counting)
    for padding in ("border", "zeros"):
        ours = _both(image, grid, grad_out, lambda img, pts: _kernel(img, pts, padding), False)
        ref = _both(image, grid, grad_out, lambda img, pts: _reference(img, pts, padding), False)
        assert torch.allclose(ours[2], ref[2], rtol=1e-5, atol=1e-5)
    assert counting.calls == 0


def test_broadcast_image_and_non_contiguous_grid(kernel):
    """An image expanded over the batch (stride 0, as sample_at's chunks are) and a transposed grid."""
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, 2, 6, 7, 8, generator=generator)
    grid = (torch.rand(3, 5, 4, 6, 3, generator=generator) * 2 - 1).transpose(1, 3)
    assert not grid.is_contiguous()
    grad_out = torch.randn(3, 2, 6, 4, 5, generator=generator)

    def expanded(sample):
        def run(img, pts):
            return sample(img.expand(3, *img.shape[1:]), pts)
        return run

    ref = _both(image, grid, grad_out, expanded(_reference))
    ours = _both(image, grid, grad_out, expanded(_kernel))
    for a, b in zip(ref, ours):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_points_only_gradient_and_no_gradient_at_all(kernel):
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 9, 8, 7, generator=generator)
    grid = (torch.rand(2, 4, 5, 6, 3, generator=generator) * 2.2 - 1.1).requires_grad_(True)
    out = _kernel(image, grid)
    (ours,) = torch.autograd.grad(out.square().sum(), grid)
    (ref,) = torch.autograd.grad(_reference(image, grid).square().sum(), grid)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(_kernel(image, grid), _reference(image, grid), atol=1e-6)


def test_non_finite_points_give_finite_values_and_a_nan_point_no_gradient(kernel):
    """A NaN coordinate samples the last voxel (as grid_sample's forward does) and, as grid_sample's backward,
    reaches no voxel: no image gradient, a zero point gradient. ±inf clamp to the border with no point gradient."""
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 1, 2, 3, 4).requires_grad_(True)
    grid = torch.tensor([[float("nan"), 0.2, -0.3], [float("inf"), -float("inf"), 0.5], [0.1, 0.2, 0.3]])
    grid = grid.view(1, 3, 1, 1, 3).requires_grad_(True)
    value = _kernel(image, grid)
    assert torch.isfinite(value).all()
    assert torch.allclose(value, _reference(image, grid))
    grad_image, grad_grid = torch.autograd.grad(value.sum(), (image, grid))
    clean = grid.detach()[:, 1:]  # the same points without the NaN one
    ref_image = torch.autograd.grad(_reference(image, clean).sum(), image)[0]
    assert torch.allclose(grad_image, ref_image)
    assert torch.equal(grad_grid[0, 0, 0, 0], torch.zeros(3))  # the NaN point
    assert grad_grid[0, 1, 0, 0, 0] == 0 and grad_grid[0, 1, 0, 0, 1] == 0  # the clamped ±inf coordinates
    assert grad_grid[0, 2].abs().sum() > 0
    # zeros padding: a NaN or infinite point samples 0 and has no gradient of any kind
    value = _kernel(image, grid, "zeros")
    assert value[0, 0, 0, 0, 0] == 0 and value[0, 0, 1, 0, 0] == 0
    assert torch.allclose(value, _reference(image, grid, "zeros"))
    grad_image, grad_grid = torch.autograd.grad(value.sum(), (image, grid))
    ref_image = torch.autograd.grad(_reference(image, grid.detach()[:, 2:], "zeros").sum(), image)[0]
    assert torch.allclose(grad_image, ref_image)
    assert torch.equal(grad_grid[0, :2], torch.zeros(2, 1, 1, 3))
    # an image without gradient (the derivatives computed in the forward): the same point gradients
    for padding in ("border", "zeros"):
        value = _kernel(image.detach(), grid, padding)
        (forward_derivatives,) = torch.autograd.grad(value.sum(), grid)
        (backward_pass,) = torch.autograd.grad(_kernel(image, grid, padding).sum(), grid)
        assert torch.equal(forward_derivatives, backward_pass)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("image_gradient", [True, False])
@pytest.mark.parametrize("batch", [3, 2, 4])
def test_two_threads_split_the_points_and_batches_as_one_thread_does(kernel, padding, image_gradient, batch):
    """Above the kernel's grain (4096 points) the forward and the backward split the points across threads, chunks
    crossing batch elements; with an image gradient each thread adds to its own copy, summed at the end — unless
    the batch divides evenly over the threads: then each thread takes whole batch elements and the image gradient is
    one thread's to the bit."""
    generator = torch.Generator().manual_seed(6)
    image = torch.randn(batch, 2, 12, 13, 14, generator=generator)
    grid = torch.rand(batch, 17, 18, 19, 3, generator=generator) * 2.2 - 1.1
    grad_out = torch.randn(batch, 2, 17, 18, 19, generator=generator)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            img = image.clone().requires_grad_(image_gradient)
            pts = grid.clone().requires_grad_(True)
            out = _kernel(img, pts, padding)
            grads = torch.autograd.grad(out, (img, pts) if image_gradient else (pts,), grad_out)
            results.append((out.detach(), *grads))
    finally:
        torch.set_num_threads(before)
    one, two = results
    assert torch.equal(one[0], two[0]) and torch.equal(one[-1], two[-1])  # values, point gradients
    if image_gradient and batch % 2 == 0:
        assert torch.equal(one[1], two[1])
    elif image_gradient:  # the threads' copies are summed: the same up to the order of the sum
        assert torch.allclose(one[1], two[1], rtol=1e-6, atol=1e-6)
    ref = _both(image, grid, grad_out, lambda img, pts: _reference(img, pts, padding))
    assert torch.allclose(results[1][0], ref[0], atol=1e-6)
    assert torch.allclose(results[1][-1], ref[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_vector_path_gives_the_scalar_paths_bits(kernel, padding, channels):
    """On a CPU with AVX-512 the float32 kernels take 16 points at a time with the scalar code's arithmetic in every
    lane: values, forward derivatives and both gradients must be the scalar path's bits (the image gradient up
    to the order of the threads' sum), on special points (nodes, faces, borders, one voxel outside, NaN, ±inf)
    and a point count that leaves a partial group of 16."""
    if not native_sampler._module.vectorized():
        pytest.skip("this CPU has no AVX-512: only the scalar path runs")
    generator = torch.Generator().manual_seed(20 + channels)
    image_shape, out_shape = (9, 10, 11), (7, 5, 13)  # 455 points per batch element: 28 groups and 7 points
    image = torch.randn(2, channels, *image_shape, generator=generator)
    grid = _grid_with_special_points(2, out_shape, image_shape, torch.float32, generator)
    nan, inf = float("nan"), float("inf")
    grid.view(-1, 3)[-6:] = torch.tensor([[nan, 0.2, -0.3], [0.1, nan, 0.0], [0.4, 0.5, nan], [inf, 0.0, 0.0],
                                          [0.0, -inf, 0.0], [0.3, 0.0, inf]])
    points = _to_coordinates(grid).reshape(2, 3, -1).contiguous()
    grad_out = torch.randn(2, channels, points.shape[2], generator=generator)
    zeros = padding == "zeros"
    module = native_sampler._module
    results = []
    try:
        for vector in (True, False):
            module.set_vectorized(vector)
            assert module.vectorized() == vector
            results.append((module.sample_forward(image, points, zeros),
                            *module.sample_forward_with_derivatives(image, points, zeros),
                            *module.sample_backward(image, points, grad_out, True, True, zeros),
                            module.sample_backward(image, points, grad_out, False, True, zeros)[1]))
    finally:
        module.set_vectorized(True)
    names = ("values", "values with derivatives", "derivatives", "image gradient", "point gradient",
             "point gradient alone")
    for name, vector, scalar in zip(names, *results):  # (one thread's chunk: the image gradient too, in order)
        assert torch.equal(vector.nan_to_num(7.0), scalar.nan_to_num(7.0)), name


def _finite_difference_quads(batch, out_shape, image_shape, generator, delta=1e-3):
    """GradICON's penalty points: each point followed by its copies shifted by ``delta`` along each axis (quads side by
    side, ``gradicon_and_round_trip``'s layout) as unit-cube coordinates ``[batch, 3, 4·ΠT]``; most quads lie in one
    cell. Some quads are spoiled: one copy moved to another cell, one NaN copy, quads reaching outside the image
    (clamped or beyond the zeros padding), and a point count that leaves a partial quad and a partial group of 16."""
    base = torch.rand(batch, 3, *out_shape, generator=generator) * 1.2 - 0.1  # some cells hang over the borders
    steps = torch.zeros(4, 1, 3, *[1] * len(out_shape))
    for axis in range(3):
        steps[axis + 1, 0, axis] = delta
    points = torch.stack([base + step for step in steps], dim=-1).reshape(batch, 3, -1)[..., :-2].contiguous()
    cell = 1.0 / (image_shape[2] - 1)
    points[0, 2, 4 * 5 + 1] += cell  # a copy in the next cell along x
    points[0, 0, 4 * 9 + 3] = float("nan")
    points[-1, 1, 4 * 11:4 * 12] = 1.0  # a quad on the last face
    return points


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("image_gradient", [True, False])
def test_finite_difference_quads_merge_their_scatter_adds_exactly(kernel, padding, image_gradient):
    """Four points in one cell (an aligned quad: a GradICON point and its shifted copies) add their image-gradient
    products to each corner as one sum. The image gradient, point gradient and values still equal grid_sample's to
    float rounding. The AVX-512 path, which reads a group of four such quads with one two-float
    load per corner pair instead of gathers, gives the scalar path's bits (values, forward derivatives, gradients);
    two threads give one thread's."""
    generator = torch.Generator().manual_seed(41)
    image_shape = (9, 10, 11)
    image = torch.randn(2, 3, *image_shape, generator=generator)
    points = _finite_difference_quads(2, (7, 5, 13), image_shape, generator)
    grad_out = torch.randn(2, 3, points.shape[2], generator=generator)
    zeros = padding == "zeros"
    module = native_sampler._module
    results = {}
    before = torch.get_num_threads()
    try:
        for vector in ((True, False) if module.vectorized() else (False,)):
            module.set_vectorized(vector)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[vector, threads] = (
                    *module.sample_backward(image, points, grad_out, image_gradient, True, zeros),
                    module.sample_forward(image, points, zeros),
                    *module.sample_forward_with_derivatives(image, points, zeros))
    finally:
        module.set_vectorized(True)
        torch.set_num_threads(before)
    first = results[next(iter(results))]
    for key, (grad_image, grad_points, *forward) in results.items():
        assert torch.equal(grad_points.nan_to_num(7.0), first[1].nan_to_num(7.0)), key
        for mine, theirs in zip(forward, first[2:]):  # values (twice) and the forward's point derivatives
            assert torch.equal(mine.nan_to_num(7.0), theirs.nan_to_num(7.0)), key
        if image_gradient and key[1] == 1:  # one thread: the same additions in the same order
            assert torch.equal(grad_image, first[0]), key
        elif image_gradient:  # the threads' copies are summed
            assert torch.allclose(grad_image, first[0], rtol=1e-6, atol=1e-6), key
    # against grid_sample (the points as its grid; a NaN point gets no gradient on either side)
    coords = points.reshape(2, 3, 1, 1, -1)
    img = image.clone().requires_grad_(True)
    pts = coords.clone().requires_grad_(True)
    grid = grid_sample_grid(pts)
    ref = F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=True)
    ref_image, ref_points = torch.autograd.grad(ref, (img, pts), grad_out.reshape(ref.shape))
    if image_gradient:
        assert torch.allclose(first[0], ref_image, rtol=1e-5, atol=1e-5)
    assert torch.allclose(first[2].nan_to_num(7.0), ref.detach().reshape(first[2].shape).nan_to_num(7.0), atol=1e-6)
    finite = ~torch.isnan(points).any(dim=1, keepdim=True).expand_as(points)
    assert torch.allclose(first[1][finite], ref_points.reshape(points.shape)[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_forward_derivatives_give_no_gradient_where_the_kernel_gives_none(kernel, padding):
    """A point outside the zeros padding's reach or with a NaN coordinate gets a zero point gradient even when its
    output gradient is NaN or inf (as grid_sample and the backward kernel give), while a NaN output gradient at a
    point that reaches voxels still propagates. The derivatives are saved tensors, freed after the backward."""
    image = torch.arange(4 * 5 * 6, dtype=torch.float32).view(1, 1, 4, 5, 6)
    coordinates = torch.tensor([[2.0, 0.5, 0.5], [float("nan"), 0.5, 0.5], [0.5, 0.5, 0.5], [0.4, 0.3, 0.2]])
    coordinates = coordinates.t().reshape(1, 3, 4, 1, 1).contiguous().requires_grad_(True)
    grad_out = torch.tensor([float("nan"), float("inf"), float("nan"), 1.0]).view(1, 1, 4, 1, 1)
    out = native_sampler.sample(image, coordinates, padding)
    (ours,) = torch.autograd.grad(out, coordinates, grad_out)
    (kernel_path,) = torch.autograd.grad(native_sampler.sample(image.clone().requires_grad_(True), coordinates,
                                                                padding), coordinates, grad_out)
    reference = torch.autograd.grad(_reference(image, _to_grid(coordinates), padding), coordinates, grad_out)[0]
    for found in (ours, kernel_path):
        assert torch.equal(found[0, :, 1], torch.zeros(3, 1, 1))  # NaN coordinate
        if padding == "zeros":
            assert torch.equal(found[0, :, 0], torch.zeros(3, 1, 1))  # out of reach
        assert torch.isnan(found[0, :, 2]).any()  # reaches voxels: a NaN output gradient propagates
        assert torch.allclose(found[0, :, 3], reference[0, :, 3])
    assert torch.equal(ours.nan_to_num(7.0), kernel_path.nan_to_num(7.0))
    with pytest.raises(RuntimeError, match="freed|backward through the graph a second time"):
        out.grad_fn.saved_tensors  # noqa: B018 (the derivatives are saved tensors: freed after the backward)


def _to_grid(coordinates):
    """The inverse of :func:`_to_coordinates`: ``[N, 3, *T]`` unit cube (z, y, x) → ``[N, *T, 3]`` (x, y, z) in [−1, 1]."""
    return (coordinates * 2 - 1).movedim(1, -1).flip(-1)


def test_inference_mode_and_no_double_backward(kernel):
    image = torch.rand(1, 1, 4, 5, 6)
    grid = torch.rand(1, 3, 3, 3, 3) * 2 - 1
    with torch.inference_mode():
        assert torch.allclose(_kernel(image, grid), _reference(image, grid), atol=1e-6)
    pts = grid.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(_kernel(image, pts).sum(), pts, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), pts)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sample_at_with_the_kernel_equals_sample_at_without_it(kernel, monkeypatch, threads, padding):
    """Through the package's entry point, chunked (two threads) or not, maps and images alike."""
    monkeypatch.setattr(coordinates, "_MIN_POINTS_PER_CHUNK", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(5)
        field = torch.randn(1, 3, 10, 11, 12, generator=generator)
        points = identity_map((10, 11, 12)) + 0.2 * torch.randn(1, 3, 10, 11, 12, generator=generator)
        grad_out = torch.randn(1, 3, 10, 11, 12, generator=generator)
        results, calls = {}, []
        original = native_sampler.sample
        monkeypatch.setattr(native_sampler, "sample", lambda *a: calls.append(1) or original(*a))
        for setting in ("0", "1"):
            monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", setting)
            results[setting] = _both(field, points, grad_out,
                                     lambda img, pts: sample_at(img, pts, padding=padding))
            assert len(calls) == (0 if setting == "0" else 1)  # one call: the kernel splits the points itself
        for a, b in zip(results["0"], results["1"]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("case", ["nearest", "float16", "bfloat16", "single voxel axis", "no points", "switched off"])
def test_calls_the_kernel_does_not_cover_use_grid_sample(kernel, monkeypatch, case):
    calls = []
    monkeypatch.setattr(native_sampler, "sample", lambda *a: calls.append(a))
    shape = (1, 6, 7) if case == "single voxel axis" else (5, 6, 7)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    image = torch.rand(1, 1, *shape).to(dtype)
    points = identity_map((0, 4, 4) if case == "no points" else (4, 4, 4)).to(dtype)
    if case == "switched off":
        monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", "0")
    out = sample_at(image, points, mode="nearest" if case == "nearest" else "bilinear")
    assert calls == [] and out.shape == (1, 1, *points.shape[2:])
    monkeypatch.delenv("ICONREG_NATIVE_SAMPLER", raising=False)
    if case != "switched off":
        return
    sample_at(image, points)
    assert len(calls) == 1  # the same call with the switch back on goes to the kernel


def test_without_a_compiler_the_status_says_why_and_sampling_still_works(monkeypatch):
    from conftest import without_compiler
    without_compiler(monkeypatch)
    state = native_sampler.enable()
    assert not state.available and state.reason == "c++ and ninja not found"
    assert state.to_dict()["reason"] == "c++ and ninja not found"
    image = torch.rand(1, 1, 5, 6, 7)
    points = identity_map((5, 6, 7))
    assert torch.allclose(sample_at(image, points), image, atol=1e-6)


def _fresh_state(monkeypatch):
    for name, value in (("_module", None), ("_failure", None), ("_requested", False), ("_looked_in_cache", False)):
        monkeypatch.setattr(native_sampler, name, value)
    monkeypatch.delenv("ICONREG_NATIVE_SAMPLER", raising=False)


def test_auto_mode_loads_a_cached_build_without_compiling(kernel, monkeypatch):
    """``auto`` (the default) imports the build that setup or training left in the cache, with no compiler run and
    no build lock (a lock left by a killed build must not hang a registration)."""
    _fresh_state(monkeypatch)
    monkeypatch.setattr(native_sampler, "_build", lambda: pytest.fail("compiled although a build is cached"))
    (native_sampler._build_directory() / "lock").touch()
    try:
        image = torch.rand(1, 1, 5, 6, 7)
        assert torch.allclose(sample_at(image, identity_map((5, 6, 7))), image, atol=1e-6)
        assert native_sampler.status().available
    finally:
        (native_sampler._build_directory() / "lock").unlink()


def test_auto_mode_never_compiles_unless_asked(monkeypatch, tmp_path):
    """Without a cached build, ``auto`` samples with grid_sample and never starts a compiler."""
    _fresh_state(monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native_sampler, "_build", lambda: pytest.fail("compiled without being asked"))
    image = torch.rand(1, 1, 5, 6, 7)
    assert torch.allclose(sample_at(image, identity_map((5, 6, 7))), image, atol=1e-6)
    state = native_sampler.status()
    assert not state.available and "not built yet" in state.reason


def test_a_failed_build_is_reported_once_and_training_goes_on(monkeypatch, tmp_path):
    """A build error without a message still gives a reason; later samplings do not retry."""
    from torch.utils import cpp_extension
    _fresh_state(monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    attempts = []

    def failing_build(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError()
    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
    monkeypatch.setattr(native_sampler, "_find_ninja", lambda: True)
    monkeypatch.setattr(native_sampler.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    state = native_sampler.enable()
    assert not state.available and state.reason == "the kernel did not build (RuntimeError)"
    image = torch.rand(1, 1, 5, 6, 7)
    assert torch.allclose(sample_at(image, identity_map((5, 6, 7))), image, atol=1e-6)
    native_sampler.enable()
    assert attempts == [1]


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path):
    """PyTorch waits on its build lock without a time limit: one left by a killed build (older than ten minutes)
    is removed before building; a recent one (a build in progress) is left to PyTorch."""
    import os
    from torch.utils import cpp_extension
    monkeypatch.setattr(native_sampler, "_find_ninja", lambda: True)
    monkeypatch.setattr(native_sampler.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(cpp_extension, "load_inline",
                        lambda name, **kwargs: seen.append(Path(kwargs["build_directory"], "lock").exists()) or object())
    for age, kept in ((3600, False), (5, True)):
        _fresh_state(monkeypatch)
        monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", "1")
        lock = native_sampler._build_directory() / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
        os.utime(lock, (lock.stat().st_atime - age, lock.stat().st_mtime - age))
        assert native_sampler.enable().available
        assert seen[-1] is kept


@pytest.mark.parametrize("options", [{}, {"io_iterations": 5}])
def test_register_gives_the_same_registration_with_and_without_the_kernel(kernel, monkeypatch, tiny_model_files,
                                                                          options):
    """End to end (network, field-mode instance optimisation, warp, QA maps): the network's fields within 1e-4 mm
    and the warped image and IC map within float rounding; after instance optimisation within 0.01 mm (Adam
    normalises each gradient, so rounding-level differences in tiny gradients become steps of up to the learning
    rate: the same spread as between thread counts; the speed issue's bound for a fast path is 0.05 voxel)."""
    import SimpleITK as sitk
    from conftest import blob_volume, make_image
    from ICONRegistrationLib import register
    from ICONRegistrationLib.models import load_model

    spec_file, weights = tiny_model_files
    loaded = load_model(str(spec_file), weights, device="cpu")
    fixed = make_image(blob_volume((30, 32, 28), seed=1), spacing=(1.2, 1.0, 1.1))
    moving = make_image(blob_volume((30, 32, 28), centre=(16, 14, 15), seed=2), spacing=(1.2, 1.0, 1.1))
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", setting)
        results[setting] = register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri", **options)
    plain, fast = results["0"], results["1"]
    bound = 1e-2 if options else 1e-4
    for name, tolerance in (("forward_field", bound), ("inverse_field", bound), ("warped", bound),
                            ("ic_error", bound)):
        a = sitk.GetArrayFromImage(getattr(plain, name))
        b = sitk.GetArrayFromImage(getattr(fast, name))
        assert np.abs(a - b).max() <= tolerance * max(1.0, np.abs(a).max()), name
    assert abs(plain.metrics.ic_error_mean_mm - fast.metrics.ic_error_mean_mm) < bound


def test_an_unknown_switch_value_is_auto_with_one_warning(monkeypatch, caplog):
    """sample_at reads the switch on every call: an unknown value warns once, not at every sampling."""
    monkeypatch.setattr(native_sampler, "_warned_values", set())
    monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", "maybe")
    image = torch.rand(1, 1, 5, 6, 7)
    with caplog.at_level("WARNING", logger=native_sampler.__name__):
        for _ in range(3):
            assert torch.allclose(sample_at(image, identity_map((5, 6, 7))), image, atol=1e-6)
    assert native_sampler.status().mode == "auto"
    assert sum("is not 0, 1 or auto" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_sparse_points_take_two_passes_with_the_same_gradients(kernel, monkeypatch, padding):
    """A backward with both gradients runs as two passes over sparse points (point gradients, then the image
    gradient): the same bits as the one pass, whichever path a density takes."""
    generator = torch.Generator().manual_seed(8)
    image = torch.randn(2, 3, 12, 13, 14, generator=generator)
    points = _finite_difference_quads(2, (5, 6, 7), (12, 13, 14), generator)  # 0.46 points per voxel
    results = []
    calls = _CountingModule(native_sampler._module, "sample_backward")
    monkeypatch.setattr(native_sampler, "_module", calls)
    for limit in (float("inf"), 0.0):  # two passes, then one
        monkeypatch.setattr(native_sampler, "SEPARATE_PASSES_POINTS_PER_VOXEL", limit)
        img, pts = image.clone().requires_grad_(True), points.reshape(2, 3, -1, 1, 1).clone().requires_grad_(True)
        out = native_sampler.sample(img, pts, padding)
        results.append(torch.autograd.grad(out, (img, pts), torch.ones_like(out).mul_(0.5) + out.detach()))
    assert calls.calls == 3
    for two, one in zip(*results):
        assert torch.equal(two.nan_to_num(7.0), one.nan_to_num(7.0))
