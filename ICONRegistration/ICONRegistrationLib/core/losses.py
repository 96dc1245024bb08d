"""Similarity measures and inverse-consistency penalties.

Similarities are losses (lower is better) between two images ``[B, C, *S]`` on the same grid, with an
optional mask ``[B, 1, *S]`` (non-zero = counted) on the reference image. Penalties act on transforms
(callables on unit-cube coordinates, see :mod:`.registration_modules`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref

from typing import Optional

import torch
import torch.nn.functional as F

from . import native_sampler
from .coordinates import identity_map, jacobian_determinant
from .registration_modules import Transform


def gaussian_kernel1d(sigma: float, kernel_size: Optional[int] = None, *, dtype=torch.float32,
                      device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` voxels; default size ``4σ + 1``."""
    if kernel_size is None:
        kernel_size = int(4 * sigma + 1)
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(device=device, dtype=dtype)


def gaussian_matrix(size: int, sigma: float, kernel_size: Optional[int] = None, *, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """The ``size × size`` matrix ``G`` of a 1-D Gaussian blur with zero ("same") padding: ``blur(x) = G @ x``.

    ``G[i, j] = kernel[j − i + half]`` within the kernel's reach, 0 elsewhere (banded Toeplitz).
    """
    kernel = gaussian_kernel1d(sigma, kernel_size, dtype=torch.float64)
    half = (kernel.numel() - 1) // 2
    offsets = torch.arange(size)[None, :] - torch.arange(size)[:, None] + half  # j − i + half
    inside = (offsets >= 0) & (offsets < kernel.numel())
    matrix = torch.where(inside, kernel[offsets.clamp(0, kernel.numel() - 1)], torch.zeros((), dtype=torch.float64))
    return matrix.to(device=device, dtype=dtype)


#: Output rows per matrix product of the banded CPU blur (the fastest of 8–32 at 80×96×80, σ 2–5).
BLUR_BLOCK = 16


def gaussian_blur(tensor: torch.Tensor, sigma: float, kernel_size: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian smoothing along every spatial axis of ``[B, C, *S]``, zero ("same") padding, per channel.

    Each axis is a matrix product with its banded blur matrix (:func:`gaussian_matrix`). That gives the same
    numbers as a 1-D convolution of odd size ``4σ + 1`` along each axis, but runs as BLAS matrix products, many
    times faster than PyTorch's depthwise 3-D convolution on a CPU, forward and backward. On a CPU each product
    takes only the matrix's band: :data:`BLUR_BLOCK` output rows at a time against the input rows they reach
    (1.3–1.4× faster than the whole matrix at 80×96×80 for σ 2–3; the same sums). Where the package's compiled
    library is loaded (``core/native_sampler.py``), a CPU float32 or float64 blur instead runs its per-axis kernel,
    a multiply-add of contiguous runs per tap (``native_sampler.blur_axis``: the same sums in another order,
    1.7–2.9× faster than the banded products at 80×96×80 on two threads). The backward is the blur with the
    transposed matrices (nothing saved from the forward).
    """
    return _GaussianBlur.apply(tensor, float(sigma), kernel_size, False)


class _GaussianBlur(torch.autograd.Function):
    """:func:`gaussian_blur` (``transposed``: with every axis's matrix transposed, its adjoint)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sigma: float, kernel_size: Optional[int], transposed: bool):
        ctx.sigma, ctx.kernel_size, ctx.transposed = sigma, kernel_size, transposed
        # every product in the input's dtype, also inside an autocast region (CPU and CUDA have one)
        off = (torch.autocast(tensor.device.type, enabled=False) if tensor.device.type in ("cpu", "cuda")
               else contextlib.nullcontext())
        with off:
            return _separable_blur(tensor, sigma, kernel_size, transposed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _GaussianBlur.apply(grad, ctx.sigma, ctx.kernel_size, not ctx.transposed), None, None, None


#: whether CPU blurs take the compiled per-axis kernel when it is loaded (a switch for comparisons and tests)
NATIVE_BLUR = True


def _separable_blur(tensor: torch.Tensor, sigma: float, kernel_size: Optional[int], transposed: bool) -> torch.Tensor:
    length = gaussian_kernel1d(sigma, kernel_size).numel()
    below, above = (length - 1) // 2, length - 1 - (length - 1) // 2  # row i reaches columns i − below … i + above
    if transposed:
        below, above = above, below
    native = NATIVE_BLUR and native_sampler.kernels_eligible(tensor)
    if native:  # the matrix's rows as taps: G[i, j] = kernel[j − i + half]; transposed, the kernel reversed
        taps = gaussian_kernel1d(sigma, kernel_size, dtype=torch.float64).to(tensor.dtype)
        if transposed:
            taps = taps.flip(0)
    out = tensor
    for axis in range(tensor.dim() - 2):
        size = tensor.shape[2 + axis]
        trailing = math.prod(tensor.shape[3 + axis:])
        if native:
            out = native_sampler.blur_axis(out.reshape(-1, size, trailing), taps, below)
        else:
            matrix = gaussian_matrix(size, sigma, kernel_size, dtype=tensor.dtype, device=tensor.device)
            if transposed:
                matrix = matrix.t()
            rows = out.reshape(-1, size) if trailing == 1 else out.reshape(-1, size, trailing)
            out = _blur_rows(rows, matrix, below, above)
        out = out.reshape(tensor.shape)
    return out


def _banded(size: int, below: int, above: int) -> bool:
    """Whether a CPU blur along an axis of ``size`` voxels takes band products: when a block with its band covers at
    most half the axis (beyond that no gain was measured)."""
    return BLUR_BLOCK + below + above <= size // 2


def _blur_rows(rows: torch.Tensor, matrix: torch.Tensor, below: int, above: int) -> torch.Tensor:
    """``matrix`` ``[n, n]`` applied along axis 1 of ``rows`` (``[R, n]`` or ``[L, n, T]``; a view, no copy),
    band by band on a CPU when the band is narrow enough to pay."""
    size = matrix.shape[0]
    last = rows.dim() == 2
    if rows.device.type != "cpu" or not _banded(size, below, above):
        return rows @ matrix.t() if last else matrix @ rows
    out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    for start in range(0, size, BLUR_BLOCK):
        stop = min(size, start + BLUR_BLOCK)
        low, high = max(0, start - below), min(size, stop + above)
        if last:  # written in place (a strided view is a valid BLAS output): no copy of the block
            torch.mm(rows[:, low:high], matrix[start:stop, low:high].t(), out=out[:, start:stop])
        else:  # a copy: matmul into a strided [L, block, T] view took 4× longer than the product and the copy
            out[:, start:stop] = matrix[start:stop, low:high] @ rows[:, low:high]
    return out


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over voxels where ``mask`` is non-zero, per sample, then over samples (plain mean without a mask)."""
    if mask is None:
        return values.mean()
    included = (mask != 0).expand_as(values).to(values.dtype)
    dims = tuple(range(1, values.dim()))
    counts = included.sum(dim=dims).clamp_min(1)
    return ((values * included).sum(dim=dims) / counts).mean()


class LNCC:
    """Local normalised cross-correlation loss ``1 − mean(lncc)`` with Gaussian windows of σ voxels.

    lncc = (G(IJ) − G(I)G(J)) / sqrt((relu(G(I²) − G(I)²) + 1e-5)(relu(G(J²) − G(J)²) + 1e-5)),
    exactly as icon_registration defines it (kernel size 4σ + 1, zero padding).
    """

    squared = False

    def __init__(self, sigma: float = 5):
        self.sigma = sigma
        # the blurred moments G(J), G(J²) of the last few constant images (weakly referenced): instance
        # optimisation compares its warped images with the same two fixed images at every step
        self._constant_moments: list[tuple[weakref.ref, int, torch.Tensor]] = []

    def blur(self, tensor: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(tensor, self.sigma)

    def _moments_of_constant(self, image: torch.Tensor) -> torch.Tensor:
        """``G(J), G(J²)`` of an image that needs no gradient, ``[B, 2C, *S]``; reused while the same tensor, unchanged
        (same version counter), comes back."""
        for reference, version, moments in self._constant_moments:
            if reference() is image and version == image._version:
                return moments
        with torch.no_grad():
            moments = self.blur(torch.cat([image, image * image], dim=1))
        self._constant_moments = [(weakref.ref(image), image._version, moments)] + self._constant_moments[:1]
        return moments

    def local_correlation(self, image_I: torch.Tensor, image_J: torch.Tensor) -> torch.Tensor:
        channels = image_I.shape[1]
        if torch.is_grad_enabled() and image_I.requires_grad != image_J.requires_grad:
            # one image is constant (the fixed image): its two moments need no gradient and are blurred apart
            # (and kept while it comes back), so the backward blurs three moment images instead of five
            varying, constant = (image_I, image_J) if image_I.requires_grad else (image_J, image_I)
            mean_V, mean_VC, mean_VV = self.blur(torch.cat([varying, varying * constant, varying * varying],
                                                           dim=1)).split(channels, dim=1)
            mean_C, mean_CC = self._moments_of_constant(constant).split(channels, dim=1)
            mean_I, mean_J, mean_IJ = (mean_V, mean_C, mean_VC) if image_I.requires_grad else (mean_C, mean_V, mean_VC)
            mean_II, mean_JJ = (mean_VV, mean_CC) if image_I.requires_grad else (mean_CC, mean_VV)
        else:
            moments = self.blur(torch.cat([image_I, image_J, image_I * image_J, image_I * image_I,
                                           image_J * image_J], dim=1))  # one blur of the five moment images
            mean_I, mean_J, mean_IJ, mean_II, mean_JJ = moments.split(channels, dim=1)
        covariance = mean_IJ - mean_I * mean_J
        variance_I = torch.relu(mean_II - mean_I ** 2) + 1e-5
        variance_J = torch.relu(mean_JJ - mean_J ** 2) + 1e-5
        return covariance / torch.sqrt(variance_I * variance_J)

    def __call__(self, image_A: torch.Tensor, image_B: torch.Tensor, mask_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        lncc = self.local_correlation(image_A, image_B)
        return 1 - masked_mean(lncc ** 2 if self.squared else lncc, mask_B)


class SquaredLNCC(LNCC):
    """``1 − mean(lncc²)``: rewards strong correlation of either sign (multi-modal pairs)."""

    squared = True


class SSD:
    """Mean squared intensity difference."""

    def __call__(self, image_A: torch.Tensor, image_B: torch.Tensor, mask_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_mean((image_A - image_B) ** 2, mask_B)


class MINDSSC:
    """Mean squared difference of MIND-SSC descriptors (Heinrich et al., MICCAI 2013), 3-D only.

    The 12 self-similarity-context channels compare pairs of the 6-neighbourhood at distance √2,
    patch distances averaged over a ``(2·radius + 1)³`` box; robust to modality differences.
    """

    def __init__(self, radius: int = 1, dilation: int = 2):
        self.radius = radius
        self.dilation = dilation

    def descriptor(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 5:
            raise ValueError("MIND-SSC is defined for 3-D images [B, 1, D, H, W]")
        neighbours = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])
        # Pairs of 6-neighbours at squared distance 2 (12 of them): the SSC pattern.
        pairs = [(i, j) for i in range(6) for j in range(i) if int(((neighbours[i] - neighbours[j]) ** 2).sum()) == 2]
        first = torch.zeros(len(pairs), 1, 3, 3, 3, dtype=image.dtype, device=image.device)
        second = torch.zeros_like(first)
        for k, (i, j) in enumerate(pairs):
            first[(k, 0, *neighbours[i].tolist())] = 1
            second[(k, 0, *neighbours[j].tolist())] = 1
        channels = image.shape[1]
        padded = F.pad(image, [self.dilation] * 6, mode="replicate")
        difference = (F.conv3d(padded, first.repeat(1, channels, 1, 1, 1) / channels, dilation=self.dilation)
                      - F.conv3d(padded, second.repeat(1, channels, 1, 1, 1) / channels, dilation=self.dilation))
        size = 2 * self.radius + 1
        ssd = F.avg_pool3d(F.pad(difference ** 2, [self.radius] * 6, mode="replicate"), size, stride=1)
        mind = ssd - ssd.min(dim=1, keepdim=True).values
        variance = mind.mean(dim=1, keepdim=True)
        reference = variance.mean().detach()
        variance = torch.clamp(variance, min=float(reference) * 1e-3 + 1e-12, max=float(reference) * 1e3 + 1e-12)
        return torch.exp(-mind / variance)

    def __call__(self, image_A: torch.Tensor, image_B: torch.Tensor, mask_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        difference = self.descriptor(image_A) - self.descriptor(image_B)
        return masked_mean(difference ** 2, mask_B)


def make_similarity(name: str, **options) -> object:
    """Similarity by name: ``lncc`` (σ), ``lncc2`` / ``squared_lncc`` (σ), ``ssd``, ``mind`` / ``mind_ssc``."""
    key = name.lower().replace("-", "_")
    if key == "lncc":
        return LNCC(sigma=options.get("sigma", 5))
    if key in ("lncc2", "squared_lncc"):
        return SquaredLNCC(sigma=options.get("sigma", 5))
    if key == "ssd":
        return SSD()
    if key in ("mind", "mind_ssc", "mindssc"):
        return MINDSSC(radius=options.get("radius", 1), dilation=options.get("dilation", 2))
    raise ValueError(f"unknown similarity '{name}': use lncc, squared_lncc, ssd or mind_ssc")


def jittered_identity(shape, batch: int = 1, *, dtype=torch.float32, device=None,
                      generator: Optional[torch.Generator] = None, fraction: float = 1.0) -> torch.Tensor:
    """GradICON's sample points: grid points plus Gaussian noise of one voxel of the last axis (unit-cube units).

    ``fraction = 1``: every grid point, ``[batch, d, *shape]``. ``fraction < 1``: for each sample of the batch a
    uniformly random subset of ``max(1, round(fraction · N))`` distinct grid points (``N`` = grid size), shaped
    ``[batch, d, M, 1, …]``. A mean over a uniform subset is an unbiased estimate of the mean over all grid
    points, so a penalty evaluated on it has the full penalty's expectation; its variance grows by about a
    factor ``1 / fraction`` for the point sampling, which Adam averages over steps.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    base = identity_map(shape, dtype=dtype, device=device)
    dimension = base.shape[1]
    if fraction < 1:
        count = base[0, 0].numel()
        keep = max(1, int(round(fraction * count)))
        flat = base.reshape(dimension, count)
        # Sorted, so that the sampler visits memory in order (random order costs cache misses, 2–4× the time).
        # int32: the same permutation from the same generator state, in half the time (614,400 points: 5 → 2.6 ms)
        index_type = torch.int32 if count < 2 ** 31 else torch.int64
        chosen = torch.stack([torch.randperm(count, generator=generator, dtype=index_type)[:keep].sort().values
                              for _ in range(batch)]).long().to(flat.device)
        base = flat[:, chosen].permute(1, 0, 2).reshape(batch, dimension, keep, *[1] * (dimension - 1))
    noise = torch.randn((batch, *base.shape[1:]), generator=generator, dtype=dtype).to(device)
    return base + noise / shape[-1]


#: The fold penalty's margin: voxels whose Jacobian determinant is below it are pushed up (1 = volume kept).
FOLD_MARGIN = 0.1


def fold_penalty(maps: torch.Tensor, margin: float = FOLD_MARGIN) -> torch.Tensor:
    """Mean over the grid's voxels of ``relu(margin − det J)``: zero where every voxel keeps at least ``margin`` of
    its volume, growing with how far voxels are folded (det J ≤ 0) or nearly so.

    ``maps`` ``[B, 3, *S]`` in the unit-cube map convention on the identity grid ``S`` (as the objective's
    ``maps``); det J is :func:`~ICONRegistrationLib.core.coordinates.jacobian_determinant`'s (central differences
    inside, one-sided at the faces; the identity has det J = 1 on any grid), the one folds are counted with.
    """
    if maps.dim() != 5 or maps.shape[1] != 3 or min(maps.shape[2:]) < 2:
        raise ValueError(f"fold_penalty takes 3-D maps [B, 3, D, H, W] with 2+ voxels per axis, got "
                         f"{tuple(maps.shape)}")
    if native_sampler.kernels_eligible(maps):
        return _FoldPenalty.apply(maps, float(margin))
    return torch.relu(margin - jacobian_determinant(maps)).mean()


class _FoldPenalty(torch.autograd.Function):
    """:func:`fold_penalty` from the compiled kernels (``native_sampler.fold_sum``, ``fold_gradient``): one pass over
    the voxels forward, two backward (the cofactors where the penalty is active, then the finite differences'
    adjoint), instead of some forty tensor operations: 30 → 8.5 ms forward and backward for the hippocampus training
    batch's maps (8 × 3 × 36×48×36, 2 threads)."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, margin: float) -> torch.Tensor:
        scale = math.prod(1.0 / (n - 1) for n in maps.shape[2:])  # the unit cube's grid determinant
        count = maps.shape[0] * math.prod(maps.shape[2:])
        ctx.save_for_backward(maps)
        ctx.margin, ctx.scale, ctx.count = margin, scale, count
        return maps.new_tensor(native_sampler.fold_sum(maps, margin, scale) / count)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        maps, = ctx.saved_tensors
        return native_sampler.fold_gradient(maps, ctx.margin, ctx.scale, float(grad) / ctx.count), None


def icon_penalty(phi_AB: Transform, phi_BA: Transform, samples: torch.Tensor) -> torch.Tensor:
    """ICON: mean ‖Φ_AB(Φ_BA(x)) − x‖² over the sample coordinates ``x`` (unit cube)."""
    return torch.mean((samples - phi_AB(phi_BA(samples))) ** 2)


def gradicon_penalty(phi_AB: Transform, phi_BA: Transform, samples: torch.Tensor, delta: float = 1e-3) -> torch.Tensor:
    """GradICON: ‖∇(Φ_AB∘Φ_BA) − I‖²_F by forward finite differences of step ``delta`` at ``samples``.

    Sum over the spatial directions of the mean squared directional derivative of the inverse-consistency
    error, as in Tian et al. (CVPR 2023) and icon_registration. The samples and their ``d`` shifted copies go
    through the maps as one tensor (each point's copies side by side along the last axis): the same numbers as
    ``d + 1`` separate evaluations, with ``d + 1`` times fewer sampling calls.
    """
    return gradicon_and_round_trip(phi_AB, phi_BA, samples, delta)[0]


def gradicon_and_round_trip(phi_AB: Transform, phi_BA: Transform, samples: torch.Tensor, delta: float = 1e-3
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gradicon_penalty` and, from the same map evaluations, the round trip's error Φ_AB(Φ_BA(x)) − x at
    ``samples`` ``[b, d, …]`` itself (unit-cube units, same shape as ``samples``): what the gradient penalty leaves
    free (a constant offset of the round trip costs it nothing)."""
    dimension = samples.shape[1]
    steps = torch.zeros((dimension + 1, 1, dimension) + (1,) * dimension, dtype=samples.dtype, device=samples.device)
    for axis in range(dimension):
        steps[axis + 1, 0, axis] = delta
    # x, x + δe_0, …, x + δe_{d-1} side by side along the last axis: the d + 1 copies of a point fall in the same cell
    # of the maps, one after the other (as d + 1 blocks of all points the sampler went through the maps d + 1 times,
    # and its time was about 25 % longer in a training step and 35 % in a field-mode iteration)
    points = torch.stack([samples + step for step in steps], dim=-1).flatten(-2)
    errors = (points - phi_AB(phi_BA(points))).unflatten(-1, (samples.shape[-1], dimension + 1)).unbind(-1)
    total = samples.new_zeros(())
    for axis in range(dimension):
        total = total + torch.mean(((errors[0] - errors[axis + 1]) / delta) ** 2)
    return total, -errors[0]


def label_fractions(labels: torch.Tensor, values: torch.Tensor, factor: int = 1,
                    dtype=torch.float32) -> torch.Tensor:
    """Label maps ``[b, 1, *S]`` (integer values) as one channel per label of ``values`` (``[K]``, foreground
    values, in channel order): ``[b, K, *S/factor]``, each voxel the fraction of its ``factor``^d block that has
    the label (one-hot for ``factor = 1``). Voxels whose value is not in ``values`` count as background. Block
    ``i`` covers fine voxels ``factor·i … factor·i + factor − 1``; every size of ``S`` must divide by ``factor``.
    """
    shape = labels.shape[2:]
    if any(size % factor for size in shape):
        raise ValueError(f"grid {tuple(shape)} does not divide by {factor}")
    index = label_indices(labels, values)[:, None]  # 0: background, k: values[k − 1]
    coarse = [size // factor for size in shape]
    out = torch.zeros((labels.shape[0], values.numel() + 1, *coarse), dtype=dtype, device=labels.device)
    weight = torch.full((labels.shape[0], 1, *coarse), 1.0 / factor ** len(shape), dtype=dtype,
                        device=labels.device)
    for offset in itertools.product(range(factor), repeat=len(shape)):
        block = index[(slice(None), slice(None)) + tuple(slice(o, None, factor) for o in offset)]
        out.scatter_add_(1, block, weight)
    return out[:, 1:]


def label_indices(labels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Label maps ``[b, 1, *S]`` (integer values) as channel numbers ``[b, *S]`` (long): ``k + 1`` for
    ``values[k]``, 0 for background and for values not in ``values`` (the channels of :func:`label_fractions`
    plus one)."""
    table = torch.zeros(int(max(labels.max().item(), values.max().item())) + 1, dtype=torch.long,
                        device=labels.device)
    table[values.to(labels.device)] = torch.arange(1, values.numel() + 1, device=labels.device)
    return table[labels[:, 0].long()]


def soft_dice_loss_of_warped_labels(moving: torch.Tensor, fixed: torch.Tensor, coordinates: torch.Tensor,
                                    channels: int, eps: float = 1e-5) -> torch.Tensor:
    """``soft_dice_loss(sample_at(one_hot(moving), coordinates, padding="zeros"), one_hot(fixed))`` without the
    one-hot maps: the same value and gradient, at a cost independent of the number of labels.

    ``moving`` and ``fixed`` are channel numbers ``[b, *S]`` (:func:`label_indices`; 0 = background, not scored),
    ``coordinates`` the maps ``[b, d, *T]`` at which ``moving`` is sampled (unit cube of ``moving``'s grid, voxel
    ``i`` at ``i / (N − 1)``, as :func:`~.coordinates.sample_at`), with ``T`` the shape of ``fixed``;
    ``channels`` the number of foreground labels ``K``. Each point's trilinear weights go to the labels of its
    2^d neighbours (corners outside the grid count as background, like zero padding): the overlap with the fixed
    label needs one comparison per corner, and the warped label volumes are a scatter-add of the weights, so the
    loss costs ``O(b·T·2^d)`` instead of ``O(b·K·T·2^d)`` (56 LPBA40 labels: a sampling of 56 channels).

    In 3-D on a CPU with the compiled library loaded (``native_sampler.kernels_eligible``) the per-channel sums and
    their gradient come from two compiled passes over the points (:class:`_WarpedLabelSums`, sums in float64): 79 →
    24 ms forward and backward for the hippocampus training batch (8 × 36×48×36, 2 labels), 537 → 70 ms for 4 ×
    80×96×80 with 56 labels (2 threads); otherwise from the tensor operations below (the same sums in the
    coordinates' dtype).
    """
    batch, dimension = coordinates.shape[0], coordinates.shape[1]
    sizes = moving.shape[1:]
    bins = channels + 1
    flat_fixed = fixed.reshape(batch, -1)
    offsets = (torch.arange(batch, device=moving.device) * bins).view(-1, 1)
    fixed_volume = torch.bincount((flat_fixed + offsets).flatten(), minlength=batch * bins).view(batch, bins)
    if dimension == 3 and coordinates.dtype in (torch.float32, torch.float64) \
            and native_sampler.kernels_eligible(coordinates):
        overlap, warped_volume = _WarpedLabelSums.apply(coordinates.flatten(2), moving.reshape(batch, -1).long(),
                                                        flat_fixed.long(), tuple(sizes), bins)
        return _soft_dice_of_sums(overlap, warped_volume + fixed_volume.double(), eps).to(coordinates.dtype)
    points = coordinates.flatten(2)  # [b, d, P]
    scale = torch.tensor([size - 1 for size in sizes], dtype=points.dtype, device=points.device).view(1, -1, 1)
    position = points * scale
    low = position.detach().floor()
    fraction = position - low  # differentiable: the trilinear weights' dependence on the coordinates
    low = low.long()
    strides = [1] * dimension
    for axis in range(dimension - 2, -1, -1):
        strides[axis] = strides[axis + 1] * sizes[axis + 1]
    flat_moving = moving.reshape(batch, -1)
    overlap_per_point = torch.zeros_like(fraction[:, 0])
    warped_volume = torch.zeros(batch * bins, dtype=fraction.dtype, device=fraction.device)
    for corner in itertools.product((0, 1), repeat=dimension):
        weight = torch.ones_like(fraction[:, 0])
        index = torch.zeros_like(low[:, 0])
        inside = torch.ones_like(low[:, 0], dtype=torch.bool)
        for axis, step in enumerate(corner):
            weight = weight * (fraction[:, axis] if step else 1 - fraction[:, axis])
            at = low[:, axis] + step
            inside &= (at >= 0) & (at < sizes[axis])
            index = index + at.clamp(0, sizes[axis] - 1) * strides[axis]
        label = torch.gather(flat_moving, 1, index) * inside  # outside the grid: background
        overlap_per_point = overlap_per_point + weight * (label == flat_fixed)
        warped_volume = warped_volume.index_add(0, (label + offsets).flatten(), weight.flatten())
    overlap = torch.zeros(batch * bins, dtype=fraction.dtype, device=fraction.device).index_add(
        0, (flat_fixed + offsets).flatten(), overlap_per_point.flatten())
    return _soft_dice_of_sums(overlap.view(batch, bins), warped_volume.view(batch, bins) + fixed_volume.to(
        fraction.dtype), eps)


def _soft_dice_of_sums(overlap: torch.Tensor, total: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 − mean soft Dice`` from per-sample, per-channel overlaps and total volumes ``[b, K + 1]`` (channel 0, the
    background, not scored; channels empty in both maps skipped)."""
    overlap, total = overlap[:, 1:], total[:, 1:]
    present = total > eps
    if not bool(present.any()):
        return total.new_zeros(())
    dice = (2 * overlap + eps) / (total + eps)
    return 1 - dice[present].mean()


class _WarpedLabelSums(torch.autograd.Function):
    """Per sample and channel, the overlap and the warped volume of :func:`soft_dice_loss_of_warped_labels` from the
    compiled kernels (``native_sampler.warped_label_sums``, float64), and their gradient with respect to the points
    (``native_sampler.warped_label_gradient``). Inputs: points ``[b, 3, P]``, ``moving`` ``[b, M]`` and ``fixed``
    ``[b, P]`` int64 channel numbers, the moving grid's sizes, the number of channels with the background."""

    @staticmethod
    def forward(ctx, points: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, sizes: tuple, bins: int):
        ctx.save_for_backward(points, moving, fixed)
        ctx.sizes = sizes
        return native_sampler.warped_label_sums(moving, fixed, points, sizes, bins)

    @staticmethod
    def backward(ctx, grad_overlap: torch.Tensor, grad_volume: torch.Tensor):
        points, moving, fixed = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = native_sampler.warped_label_gradient(moving, fixed, points, ctx.sizes, grad_overlap, grad_volume)
        return grad, None, None, None, None


def soft_dice_loss(warped: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 − mean soft Dice of one-hot (or probabilistic) label maps ``[b, K, *S]``, over the samples and the
    channels present in either map (a channel empty in both is skipped, so absent labels do not count as
    perfect matches). Linear in each map's values, as used by VoxelMorph's auxiliary segmentation loss."""
    dims = tuple(range(2, warped.dim()))
    overlap = (warped * fixed).sum(dims)
    total = warped.sum(dims) + fixed.sum(dims)
    present = total > eps
    if not bool(present.any()):
        return warped.new_zeros(())
    dice = (2 * overlap + eps) / (total + eps)
    return 1 - dice[present].mean()
