"""Convolutional networks that predict displacement fields.

``UNet2`` has the parameter names and the maths of icon_registration's ``UNet2`` so that official
uniGradICON / GradICON checkpoints load with ``strict=True`` and give the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TALL_UNET2_CHANNELS = [[2, 16, 32, 64, 256, 512], [16, 32, 64, 128, 256]]


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``; if it has fewer, zero-pad at the front."""
    y = x[:, :channels]
    missing = channels - x.shape[1]
    if missing > 0:
        pad = [0, 0] * (x.dim() - 2) + [missing, 0]
        y = F.pad(y, pad)
    return y


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order for the convolutions that gain from it.

    oneDNN runs the transposed convolutions and the wide-to-3 last convolution 2–3× faster on a CPU when the
    input is channels-last (same numbers); the rest of the UNet (pooling, interpolation, batch norm,
    concatenation) is faster in the default order, so only those inputs are converted, except on the last
    (full-resolution) level, which stays channels-last from its transposed convolution to the last convolution:
    converting its largest tensors back and forth cost more than the layout saves there.
    """
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


#: PyTorch's CPU convolution picks oneDNN for a batch-1 float32 input only when N·C·D·H > 20480 (ATen's
#: ``ConvParams::use_mkldnn`` ignores the last axis); below that it runs its slow native path, which for the
#: wide-to-3 last convolution at 33³ is 13× slower than oneDNN on the same work, forward + backward.
_NATIVE_CONV_MAX_SIZE = 20480


def _convolve(conv: nn.Module, x: torch.Tensor, max_growth: float) -> torch.Tensor:
    """``conv(x)`` for a 3-D convolution with padding ``k // 2``, on oneDNN where PyTorch would take its slow path.

    A small batch-1 CPU float32 input is padded at the far end of the first spatial axis with zero planes until
    PyTorch's size test chooses oneDNN, if that grows the volume by at most ``max_growth``; the output is cropped
    to the planes of the unpadded input. The conv's own zero padding makes the result the same up to the order of
    summation (float32 rounding). Any other input goes to ``conv`` unchanged.
    """
    if x.dim() != 5 or x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] != 1:
        return conv(x)
    channels, depth, height = x.shape[1:4]
    size = channels * depth * height
    if size > _NATIVE_CONV_MAX_SIZE:
        return conv(x)
    padded_depth = _NATIVE_CONV_MAX_SIZE // (channels * height) + 1
    if padded_depth > max_growth * depth:
        return conv(x)
    kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    out_depth = (depth + 2 * padding - kernel) // stride + 1
    padded = F.pad(x, (0, 0, 0, 0, 0, padded_depth - depth)).contiguous(memory_format=torch.channels_last_3d)
    return conv(padded)[:, :, :out_depth]


class _ChannelsLastGradient(torch.autograd.Function):
    """The identity; the gradient that comes back is made channels-last.

    Between the last level's batch norm (channels-last input) and the crop and concatenation after it: their
    backward hands back a gradient in the default memory order, and PyTorch's CPU batch-norm backward on a
    channels-last input with such a gradient takes a path 8× slower (111 against 14 ms for 16 channels at 66³,
    one thread) than with a channels-last one; the copy costs a few milliseconds.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last_3d)


def _concatenate_channels_last(*parts: torch.Tensor) -> torch.Tensor:
    """``torch.cat(parts, dim=1)``, written in channels-last memory order when 3-D (the order of the last
    convolution's input)."""
    if parts[0].dim() != 5:
        return torch.cat(parts, dim=1)
    shape = (parts[0].shape[0], sum(part.shape[1] for part in parts), *parts[0].shape[2:])
    out = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device, memory_format=torch.channels_last_3d)
    start = 0
    for part in parts:
        out[:, start:start + part.shape[1]] = part
        start += part.shape[1]
    return out


class UNet2(nn.Module):
    """The residual U-Net of GradICON / uniGradICON.

    ``channels = [down, up]``: ``down[0]`` is the number of input channels (2 for an image pair), ``down[i+1]``
    the width after the i-th stride-2 convolution, ``up[i]`` the width of the i-th transposed convolution.
    Input: two images ``[B, C, *S]``; output: ``[B, dimension, *S]``, a displacement in the unit-cube map
    convention, divided by 10 as in the original so that training starts near the identity.
    """

    def __init__(self, num_layers: int, channels: Sequence[Sequence[int]], dimension: int = 3):
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError("UNet2 supports 2-D and 3-D images")
        self.dimension = dimension
        self.num_layers = int(num_layers)
        conv = nn.Conv3d if dimension == 3 else nn.Conv2d
        conv_transpose = nn.ConvTranspose3d if dimension == 3 else nn.ConvTranspose2d
        batch_norm = nn.BatchNorm3d if dimension == 3 else nn.BatchNorm2d
        self._avg_pool = F.avg_pool3d if dimension == 3 else F.avg_pool2d
        self._interpolate_mode = "trilinear" if dimension == 3 else "bilinear"

        down = [int(c) for c in channels[0]]
        up_out = [int(c) for c in channels[1]]
        if len(down) != self.num_layers + 1 or len(up_out) != self.num_layers:
            raise ValueError(f"UNet2 with {num_layers} layers needs {num_layers + 1} down and {num_layers} up channels")
        # Each transposed conv sees the deeper down-path features concatenated with the up-path output.
        up_in = [down[i + 1] + (up_out[i + 1] if i + 1 < self.num_layers else 0) for i in range(self.num_layers)]

        self.downConvs = nn.ModuleList(
            conv(down[i], down[i + 1], kernel_size=3, padding=1, stride=2) for i in range(self.num_layers))
        self.upConvs = nn.ModuleList(
            conv_transpose(up_in[i], up_out[i], kernel_size=4, padding=1, stride=2) for i in range(self.num_layers))
        self.batchNorms = nn.ModuleList(batch_norm(num_features=up_out[i]) for i in range(self.num_layers))
        self.lastConv = conv(down[0] + up_out[0], dimension, kernel_size=3, padding=1)
        # A fresh network predicts the identity transform.
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image_A, image_B], dim=1)
        skips = []
        for depth in range(self.num_layers):
            skips.append(x)
            y = _convolve(self.downConvs[depth], F.leaky_relu(x), max_growth=1.25)
            x = y + _match_channels(self._avg_pool(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(self.num_layers)):
            y = self.upConvs[depth](_channels_last(F.leaky_relu(x)))
            coarse = _match_channels(x, y.shape[1])
            if depth > 0:
                y = y.contiguous()
            else:  # the last level stays channels-last up to the last convolution: two full-size copies fewer
                coarse = _channels_last(coarse)
            x = y + F.interpolate(coarse, scale_factor=2, mode=self._interpolate_mode, align_corners=False)
            x = self.batchNorms[depth](x)
            if depth == 0 and x.dim() == 5 and x.requires_grad:
                x = _ChannelsLastGradient.apply(x)
            skip = skips[depth]
            x = x[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])]
            x = torch.cat([x, skip], dim=1) if depth > 0 else _concatenate_channels_last(x, skip)
        return _convolve(self.lastConv, x, max_growth=4.0).contiguous() / 10


def tallUNet2(dimension: int = 3, input_channels: int = 1) -> UNet2:  # noqa: N802 (icon_registration's name)
    """The 5-layer UNet2 used by every uniGradICON / GradICON step."""
    channels = [[2 * input_channels] + TALL_UNET2_CHANNELS[0][1:], list(TALL_UNET2_CHANNELS[1])]
    return UNet2(5, channels, dimension)
