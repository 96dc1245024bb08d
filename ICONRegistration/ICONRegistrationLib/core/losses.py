"""Similarity measures and inverse-consistency penalties.

Similarities are losses (lower is better) between two images ``[B, C, *S]`` on the same grid, with an
optional mask ``[B, 1, *S]`` (non-zero = counted) on the reference image. Penalties act on transforms
(callables on unit-cube coordinates, see :mod:`.registration_modules`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .coordinates import identity_map
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


def gaussian_blur(tensor: torch.Tensor, sigma: float, kernel_size: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian smoothing along every spatial axis, zero ("same") padding, per channel."""
    kernel = gaussian_kernel1d(sigma, kernel_size, dtype=tensor.dtype, device=tensor.device)
    dimension = tensor.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dimension]
    groups = tensor.shape[1]
    out = tensor
    for axis in range(dimension):
        shape = [groups, 1] + [1] * dimension
        shape[2 + axis] = kernel.numel()
        weight = kernel.reshape([1, 1] + shape[2:]).expand(shape)
        out = conv(out, weight, padding="same", groups=groups)
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

    def blur(self, tensor: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(tensor, self.sigma)

    def local_correlation(self, image_I: torch.Tensor, image_J: torch.Tensor) -> torch.Tensor:
        mean_I, mean_J = self.blur(image_I), self.blur(image_J)
        covariance = self.blur(image_I * image_J) - mean_I * mean_J
        variance_I = torch.relu(self.blur(image_I * image_I) - mean_I ** 2) + 1e-5
        variance_J = torch.relu(self.blur(image_J * image_J) - mean_J ** 2) + 1e-5
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
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Identity grid plus Gaussian noise of one voxel of the last axis (the GradICON sampling)."""
    base = identity_map(shape, dtype=dtype, device=device)
    noise = torch.randn((batch, *base.shape[1:]), generator=generator, dtype=dtype).to(device)
    return base + noise / shape[-1]


def icon_penalty(phi_AB: Transform, phi_BA: Transform, samples: torch.Tensor) -> torch.Tensor:
    """ICON: mean ‖Φ_AB(Φ_BA(x)) − x‖² over the sample coordinates ``x`` (unit cube)."""
    return torch.mean((samples - phi_AB(phi_BA(samples))) ** 2)


def gradicon_penalty(phi_AB: Transform, phi_BA: Transform, samples: torch.Tensor, delta: float = 1e-3) -> torch.Tensor:
    """GradICON: ‖∇(Φ_AB∘Φ_BA) − I‖²_F by forward finite differences of step ``delta`` at ``samples``.

    Sum over the spatial directions of the mean squared directional derivative of the inverse-consistency
    error, as in Tian et al. (CVPR 2023) and icon_registration.
    """
    dimension = samples.shape[1]
    error = samples - phi_AB(phi_BA(samples))
    total = samples.new_zeros(())
    for axis in range(dimension):
        step = torch.zeros((1, dimension) + (1,) * dimension, dtype=samples.dtype, device=samples.device)
        step[0, axis] = delta
        shifted = samples + step
        error_shifted = shifted - phi_AB(phi_BA(shifted))
        total = total + torch.mean(((error - error_shifted) / delta) ** 2)
    return total
