"""Convolutional networks that predict displacement fields.

``UNet2`` has the parameter names and the maths of icon_registration's ``UNet2`` so that official
uniGradICON / GradICON checkpoints load with ``strict=True`` and give the same numbers.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import native_sampler

#: the up path's concatenations written channels-last, counted from the full-resolution level: the last level's (the
#: last convolution's input) and the one before (the last transposed convolution's input, which is channels-last
#: without a transposing copy then): 1.02–1.05× per training step against the last level alone (same process,
#: alternating; more levels were slower). The same levels keep the transposed convolution's output channels-last
#: through the upsampling addition and batch norm (compiled kernels) up to the concatenation.
_CHANNELS_LAST_LEVELS = 2
TALL_UNET2_CHANNELS = [[2, 16, 32, 64, 256, 512], [16, 32, 64, 128, 256]]


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``; if it has fewer, zero-pad at the front."""
    if (channels < x.shape[1] and torch.is_grad_enabled() and x.requires_grad
            and _memory_format(x) == torch.channels_last_3d):
        return _LeadingChannels.apply(x, channels)
    y = x[:, :channels]
    missing = channels - x.shape[1]
    if missing > 0:
        pad = [0, 0] * (x.dim() - 2) + [missing, 0]
        y = F.pad(y, pad)
    return y


class _LeadingChannels(torch.autograd.Function):
    """``x[:, :channels]`` of a channels-last ``x``, whose gradient comes back channels-last.

    PyTorch's slice backward writes the gradient into a zero tensor in the default memory order; added to ``x``'s
    other, channels-last gradient, that made the sum default-order and its consumers copy it back (the UNet's
    second-to-last level: 48 channels at 2×40×48×40)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channels: int) -> torch.Tensor:
        ctx.x_shape, ctx.channels = x.shape, channels
        return x[:, :channels]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty(ctx.x_shape, dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last_3d)
        out[:, ctx.channels:] = 0
        out[:, :ctx.channels] = grad
        return out, None


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order for the convolutions that gain from it.

    oneDNN runs the transposed convolutions and the wide-to-3 last convolution 2–3× faster on a CPU when the
    input is channels-last (same numbers); the rest of the UNet (pooling, interpolation, batch norm,
    concatenation) is faster in the default order, so only those inputs are converted, except on the last
    (full-resolution) level, which stays channels-last from its transposed convolution to the last convolution:
    converting its largest tensors back and forth cost more than the layout saves there.
    """
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


#: Below the channels-last levels, a transposed convolution's input with fewer voxels per channel than this stays in
#: the default memory order: for the deep levels' few voxels and large weights, converting the weight to channels-last
#: (and its gradient back) costs more than the layout saves. Float32 forward + backward, batch 2, 2 cores, 512 → 256
#: channels: 20 against 53 ms at 1³, 24 against 42 at 2³, 32 against 49 at 3³; 512 → 128 at 5×6×5: 38 against 45;
#: level from 10×12×10 (1200 voxels) on; bfloat16 alike except at 1³. Forward only at 175³'s levels: 19 against 24 ms
#: at 6³, channels-last faster from 22³ on.
_CHANNELS_LAST_MIN_VOXELS = 1000


def _transposed_convolution_input(x: torch.Tensor, depth: int) -> torch.Tensor:
    """The input of level ``depth``'s transposed convolution in the memory order it runs fastest in: channels-last on
    the last ``_CHANNELS_LAST_LEVELS`` levels and wherever it has at least ``_CHANNELS_LAST_MIN_VOXELS`` voxels per
    channel, else as it comes."""
    if depth < _CHANNELS_LAST_LEVELS or x[0, 0].numel() >= _CHANNELS_LAST_MIN_VOXELS:
        return _channels_last(x)
    return x


#: PyTorch's CPU convolution picks oneDNN for a batch-1 float32 input only when N·C·D·H > 20480 (ATen's
#: ``ConvParams::use_mkldnn`` ignores the last axis); below that it runs its slow native path, which for the
#: wide-to-3 last convolution at 33³ is 13× slower than oneDNN on the same work, forward + backward.
_NATIVE_CONV_MAX_SIZE = 20480


def _slow_path(x: torch.Tensor) -> bool:
    """Whether PyTorch's CPU convolution would take its slow native path for ``x``: a batch-1 float32 5-D CPU input
    with N·C·D·H ≤ ``_NATIVE_CONV_MAX_SIZE`` (a batch of two or more always goes to oneDNN)."""
    return x.device.type == "cpu" and _slow_path_shape(x.shape, x.dtype)


def _slow_path_shape(shape: Sequence[int], dtype: torch.dtype) -> bool:
    """:func:`_slow_path` for a CPU input of this shape and dtype."""
    return (len(shape) == 5 and dtype == torch.float32 and shape[0] == 1
            and shape[2] >= 2 and shape[1] * shape[2] * shape[3] <= _NATIVE_CONV_MAX_SIZE)


def _depth_slabs(x: torch.Tensor, starts: Sequence[int], length: int) -> torch.Tensor:
    """The planes ``starts[i] … starts[i] + length − 1`` of batch-1 ``x`` ``[1, C, D, H, W]`` along its first spatial
    axis (zero planes outside ``0 … D − 1``) as a batch ``[len(starts), C, length, H, W]`` in ``x``'s memory order."""
    before = max(0, -min(starts))
    after = max(0, max(starts) + length - x.shape[2])
    padded = F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x
    slabs = torch.cat([padded[:, :, start + before:start + before + length] for start in starts])
    return slabs.contiguous(memory_format=_memory_format(x))


def _in_two_slabs(x: torch.Tensor, kernel: int, stride: int, padding: int,
                  convolve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A convolution along the first spatial axis (``kernel``, ``stride``, zero ``padding``) of batch-1 ``x``, run as a
    batch of two: ``convolve`` (the convolution with no padding along that axis) takes the two slabs of planes that
    the first and second half of the output planes read, and the two outputs are put back together."""
    out_depth = (x.shape[2] + 2 * padding - kernel) // stride + 1
    first = (out_depth + 1) // 2
    y = convolve(_depth_slabs(x, [-padding, first * stride - padding], (first - 1) * stride + kernel))
    return torch.cat([y[:1], y[1:, :, :out_depth - first]], dim=2)


def _convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3-D convolution (cubic kernel, no dilation or groups), on oneDNN where PyTorch would take
    its slow path.

    A small batch-1 CPU float32 input (:func:`_slow_path`) is cut along its first spatial axis into two slabs, each
    with the planes its half of the output reads (:func:`_in_two_slabs`), convolved as a batch of two, which PyTorch
    always gives to oneDNN: at most ``kernel − stride`` planes more work. A zero-padded deeper volume, the way before,
    did 1.6× the work for the last convolution's input gradient at 65³, and was out of reach for the UNet's first
    convolution (2 input channels). The same numbers up to the order of summation (float32 rounding). Any other
    input goes to ``conv`` unchanged. A convolution to a few channels (the last one) runs through
    :func:`_few_channel_conv` either way (with its 'same' padding: the outputs of each slab's ``k // 2`` outer planes
    on each side are dropped).
    """
    if _polyphase_eligible(conv, x):
        return _PolyphaseInputGradientConv.apply(x, conv.weight, conv.bias)
    if not _slow_path(x) or _cpu_autocast_dtype() is not None or not isinstance(conv, nn.Conv3d) \
            or conv.groups != 1 or conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1, 1) \
            or len(set(conv.kernel_size)) != 1:  # (under autocast the convolution computes in bfloat16 on oneDNN)
        return _few_channel_conv(conv, x)
    kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if _few_channel_eligible(conv, x):  # its own 'same' padding: the outputs of each slab's outer planes go
        def convolve(slabs: torch.Tensor) -> torch.Tensor:
            return _few_channel_conv(conv, slabs)[:, :, padding:slabs.shape[2] - padding]
    else:
        def convolve(slabs: torch.Tensor) -> torch.Tensor:
            return F.conv3d(slabs, conv.weight, conv.bias, conv.stride, (0, *conv.padding[1:]), 1, 1)
    return _in_two_slabs(x, kernel, stride, padding, convolve)


#: A stride-2, 3×3×3, padding-1 convolution from at most this many channels (the UNet's first: the image pair) whose
#: input needs a gradient takes that gradient by polyphase decomposition (:class:`_PolyphaseInputGradientConv`).
_POLYPHASE_MAX_CHANNELS = 4


def _polyphase_eligible(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` goes through :class:`_PolyphaseInputGradientConv`: a CPU float32 or bfloat16 (or CPU
    autocast) 3-D convolution, kernel 3, stride 2, padding 1, no dilation or groups, at most
    ``_POLYPHASE_MAX_CHANNELS`` input channels, with a gradient to take for ``x``, and its polyphase convolution
    (``[N, O, *S/2]``) on oneDNN (:func:`_slow_path`)."""
    if not (isinstance(conv, nn.Conv3d) and x.dim() == 5 and x.device.type == "cpu" and torch.is_grad_enabled()
            and x.requires_grad and conv.in_channels <= _POLYPHASE_MAX_CHANNELS and conv.groups == 1
            and conv.padding_mode == "zeros" and tuple(conv.kernel_size) == (3, 3, 3)
            and tuple(conv.stride) == (2, 2, 2) and tuple(conv.padding) == (1, 1, 1)
            and tuple(conv.dilation) == (1, 1, 1) and x.dtype in (torch.float32, torch.bfloat16)
            and conv.weight.dtype == torch.float32):
        return False
    if _cpu_autocast_dtype() is None and x.dtype != conv.weight.dtype:  # PyTorch refuses mixed dtypes: so does this
        return False
    padded = [(n + 1) // 2 + 1 for n in x.shape[2:]]  # the output gradient, zero-padded
    return not _slow_path_shape((x.shape[0], conv.out_channels, *padded), _cpu_autocast_dtype() or x.dtype)


class _PolyphaseInputGradientConv(torch.autograd.Function):
    """``F.conv3d(x, weight, bias, stride=2, padding=1)`` (3×3×3) for an input of a few channels, whose input gradient
    is one stride-1 convolution and a reordering instead of oneDNN's backward-data.

    oneDNN's backward-data to 2 channels (the UNet's first convolution, whose image pair needs a gradient in every
    registration step after the first: the moving image is warped by the earlier steps' map) runs at a tenth of its
    usual rate: 15 ms for 16 → 2 channels at 2×80×96×80 float32.
    Along each axis, input voxel ``2m`` takes the gradient ``g[m]`` through kernel tap 1, and ``2m + 1`` takes
    ``g[m]`` through tap 2 plus ``g[m + 1]`` through tap 0. So all eight parities of the input gradient are one
    convolution of ``g`` (zero-padded by one voxel at the end of each axis) with a 2×2×2 kernel to ``8·C`` channels
    (:func:`_polyphase_weight`), whose channels are then interleaved into the input's voxels: 7 against 15 ms there,
    about twice as fast at every size measured, float32 and bfloat16. The same sums up to their order. The forward
    and the weight gradient are PyTorch's. Under CPU autocast the convolution computes in autocast's dtype (as
    autocast's own would) and the weight and bias gradients come back in their own dtypes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = _cpu_autocast_dtype() or x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        with torch.autocast("cpu", enabled=False):
            y = F.conv3d(xc, wc, bc, stride=2, padding=1)
        ctx.save_for_backward(xc, wc)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xc, wc = ctx.saved_tensors
        grad = grad.to(wc.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _polyphase_input_gradient(grad, wc, xc.shape[2:]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, xc, wc, [wc.shape[0]] if ctx.has_bias else None, [2, 2, 2], [1, 1, 1], [1, 1, 1], False,
                [0, 0, 0], 1, [False, True, ctx.has_bias])
            grad_weight = grad_weight.to(ctx.weight_dtype)
            grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def _polyphase_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[O, C, 3, 3, 3]`` of a stride-2, padding-1 convolution as the 2×2×2 kernel ``[8·C, O, 2, 2, 2]`` that
    maps its output gradient to its input gradient's eight parities (channel ``(r_d·4 + r_h·2 + r_w)·C + c``). Along
    an axis, parity 0 takes tap 1 at window offset 0; parity 1 takes tap 2 at offset 0 and tap 0 at offset 1."""
    per_axis = weight.new_zeros(2, 2, 3)  # [parity, window offset, kernel tap]: which tap each window offset uses
    per_axis[0, 0, 1] = per_axis[1, 0, 2] = per_axis[1, 1, 0] = 1
    polyphase = torch.einsum("pui,qvj,rwk,onijk->pqrnouvw", per_axis, per_axis, per_axis, weight)
    return polyphase.reshape(8 * weight.shape[1], weight.shape[0], 2, 2, 2)


def _polyphase_input_gradient(grad: torch.Tensor, weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The input gradient ``[N, C, *size]`` (default memory order) of ``F.conv3d(x, weight, stride=2, padding=1)``
    (3×3×3) from its output gradient ``grad`` ``[N, O, *M]``: one convolution to the eight parities and their
    interleaving (see :class:`_PolyphaseInputGradientConv`)."""
    batch, channels, coarse = grad.shape[0], weight.shape[1], grad.shape[2:]
    parities = F.conv3d(F.pad(grad, (0, 1, 0, 1, 0, 1)), _polyphase_weight(weight).to(grad.dtype))
    interleaved = parities.reshape(batch, 2, 2, 2, channels, *coarse).permute(0, 4, 5, 1, 6, 2, 7, 3)
    full = interleaved.reshape(batch, channels, *(2 * m for m in coarse))
    return full[:, :, :size[0], :size[1], :size[2]].contiguous()


def _same_convolution(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv3d(x, weight, padding=k // 2)`` (stride 1, odd cubic kernel ``k``), on oneDNN where PyTorch would take
    its slow path, as :func:`_convolve` does."""
    padding = weight.shape[-1] // 2
    if not _slow_path(x):
        return F.conv3d(x, weight, padding=padding)
    return _in_two_slabs(x, weight.shape[-1], 1, padding,
                         lambda slabs: F.conv3d(slabs, weight, padding=(0, padding, padding)))


#: At most this many output channels take :class:`_ConvToFewChannels` (the last convolution: 2 or 3).
_FEW_CHANNELS = 8
#: Bytes of one slab of shifted gradient copies in :class:`_ConvToFewChannels`'s weight gradient.
_SLAB_BYTES = 16 * 2**20


class _ConvToFewChannels(torch.autograd.Function):
    """``F.conv3d(x, weight, bias, padding=k // 2)`` (stride 1, odd cubic kernel) with a backward made for a
    convolution to a few output channels, such as the UNet's last one (18 → 3 channels, 3×3×3).

    oneDNN's weight gradient for so few output channels ran at a tenth of its usual rate on a CPU (65 ms of a
    79 ms backward for 18 → 3 channels at 80×96×80 in bfloat16, the largest single layer of a training step).
    Here the weight gradient of a channels-last float32 or bfloat16 input is oneDNN's with the channel roles
    swapped (:func:`_few_channel_weight_gradient_swapped`) where PyTorch runs that on oneDNN, and otherwise one
    matrix product per slab of planes (:func:`_few_channel_weight_gradient`: the output gradient ``g`` ``[O, *S]``
    copied at the ``k³`` shifts into ``[k³·O, slab]`` and multiplied by the input's ``[slab, C]`` rows, the slabs'
    products summed in float32). The input gradient is the forward convolution of ``g`` with the transposed,
    flipped kernel (oneDNN's forward path, zero-padded onto it where PyTorch would take its slow one; the same
    numbers as its backward-data path). The forward is :func:`_few_channel_forward`. Same values as PyTorch's
    backward up to the order of summation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                weight_low: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _few_channel_forward(x, weight, bias, weight_low)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of going through the slabs
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        kernel = weight.shape[-1]
        grad_x = grad_weight = grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:  # from the incoming gradient (float32 under autocast)
            grad_bias = grad.sum(dim=(0, 2, 3, 4), dtype=_accumulator(grad.dtype)).to(weight.dtype)
        # the forward may return its accumulator's dtype (see _few_channel_forward); the convolutions take x's
        grad = grad.to(x.dtype).contiguous(memory_format=_memory_format(x))
        if ctx.needs_input_grad[0]:
            flipped = weight.transpose(0, 1).flip(2, 3, 4).contiguous()
            grad_x = _same_convolution(grad, flipped).contiguous(memory_format=_memory_format(x))
        if ctx.needs_input_grad[1]:
            # oneDNN's swapped weight gradient where PyTorch runs it on oneDNN (its native path is 3× slower)
            if x.dtype != torch.float64 and _memory_format(x) == torch.channels_last_3d and not _slow_path(grad):
                grad_weight = _few_channel_weight_gradient_swapped(x, grad, kernel)
            elif x.dtype == torch.float32 and _memory_format(x) == torch.channels_last_3d:
                # a batch-1 volume PyTorch would convolve on its slow path: the same sum over two slabs of planes,
                # x's halves against the gradient's planes they meet (k // 2 more, or zeros, on each side)
                half, padding = (x.shape[2] + 1) // 2, kernel // 2
                x_halves = _depth_slabs(x, [0, half], half)
                grad_slabs = _depth_slabs(grad, [-padding, half - padding], half + 2 * padding)
                grad_weight = _few_channel_weight_gradient_swapped(x_halves, grad_slabs, kernel, depth_padding=0)
            else:
                grad_weight = _few_channel_weight_gradient(x, grad, kernel)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None


def _few_channel_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         weight_low: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2)`` for a convolution to a few output channels (stride 1, odd cubic
    kernel ``k``), plane by plane for a channels-last input.

    oneDNN vectorises a convolution over its output channels, so with 3 of them most of each vector is idle: 18 → 3
    channels at 3×3×3 took 51 ms for 2×80×96×80 in bfloat16, where 16 output channels took 61 ms. Here a channels-last
    ``x`` goes through one convolution with a ``1×k×k`` kernel to ``k·O`` channels (the ``k`` kernel planes along the
    first spatial axis as separate outputs: 19 ms), and the ``k`` partial results are added, each shifted by its
    plane's offset along that axis, in the accumulator dtype (float32; float64 for float64): 29 ms in all, and 65
    against 95 ms in float32. Where the compiled library is loaded, that sum is one pass over the convolution's
    channels-last output (:func:`native_sampler.plane_sum`, the same operations in the same order), without first
    copying it to the default order. Returns ``[N, O, *S]`` in the default memory order and the accumulator dtype (the
    sum of the bfloat16 partial results is not rounded to bfloat16 again). Any other input takes ``F.conv3d``.

    ``weight_low`` (optional, ``weight``'s shape and dtype) is added to ``weight``: the part of a float32 weight that
    its bfloat16 copy ``weight`` lost, so that the kernel keeps about 16 significant bits (see
    :func:`_few_channel_conv`). Its planes are computed by the same convolution, as more output channels."""
    kernel = weight.shape[-1]
    padding = kernel // 2
    accumulator = _accumulator(x.dtype)
    if _memory_format(x) != torch.channels_last_3d or kernel == 1:
        out = F.conv3d(x, weight, bias, padding=padding)
        if weight_low is not None:
            out = out.to(accumulator) + F.conv3d(x, weight_low, None, padding=padding)
        return out
    outputs, depth = weight.shape[0], x.shape[2]
    planes = weight.permute(2, 0, 1, 3, 4).reshape(kernel * outputs, weight.shape[1], 1, kernel, kernel)
    if weight_low is not None:  # its planes as more output channels of the same convolution, then summed
        planes = torch.cat([planes, weight_low.permute(2, 0, 1, 3, 4).reshape(planes.shape)])
    partial = F.conv3d(x, planes.contiguous(), padding=(0, padding, padding))  # [N, k·O, *S], channels-last
    if native_sampler.plane_sum_eligible(partial) and partial.is_contiguous(memory_format=torch.channels_last_3d):
        return native_sampler.plane_sum(partial.permute(0, 2, 3, 4, 1), outputs, kernel, weight_low is not None, bias)
    partial = partial.contiguous()
    if weight_low is not None:
        partial = partial[:, :kernel * outputs].to(accumulator) + partial[:, kernel * outputs:]
    out = partial[:, padding * outputs:(padding + 1) * outputs].to(accumulator)  # the centre plane
    for a in range(kernel):
        shift = a - padding  # plane a reads x at depth d + shift
        if a == padding or abs(shift) >= depth:
            continue
        part = partial[:, a * outputs:(a + 1) * outputs]
        if shift > 0:
            out[:, :, :depth - shift] += part[:, :, shift:]
        else:
            out[:, :, -shift:] += part[:, :, :depth + shift]
    if bias is not None:
        out += bias.to(accumulator).view(1, -1, 1, 1, 1)
    return out


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32: the dtype sums of ``dtype`` values are accumulated in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _few_channel_weight_gradient(x: torch.Tensor, grad: torch.Tensor, kernel: int) -> torch.Tensor:
    """``∂L/∂weight`` ``[O, C, k, k, k]`` (float32; float64 for float64 inputs) of a stride-1 'same' convolution
    of ``x`` ``[N, C, *S]`` whose output gradient is ``grad`` ``[N, O, *S]``: Σ over voxels m of
    x[c, m] · g[o, m − (a − p)] for each kernel offset a (p = k // 2, zero outside), slab by slab of planes along
    the first spatial axis."""
    batch, channels, depth, height, width = x.shape
    outputs = grad.shape[1]
    padding = kernel // 2
    shifts = kernel ** 3
    plane = height * width
    slab = max(1, min(depth, _SLAB_BYTES // max(1, shifts * outputs * plane * grad.element_size())))
    total = torch.zeros(shifts * outputs, channels, dtype=_accumulator(x.dtype), device=x.device)
    columns = torch.empty(shifts, outputs, slab, height, width, dtype=grad.dtype, device=grad.device)
    channels_last = _memory_format(x) == torch.channels_last_3d
    for n in range(batch):
        padded = F.pad(grad[n], (padding,) * 6)  # [O, D + 2p, H + 2p, W + 2p]
        rows = x[n].permute(1, 2, 3, 0) if channels_last else x[n]  # [D, H, W, C] (a view) or [C, D, H, W]
        for start in range(0, depth, slab):
            size = min(slab, depth - start)
            shift = 0
            for a in range(kernel):
                for b in range(kernel):
                    for c in range(kernel):
                        # g at m − (a − p): padded index m + (k − 1 − a) along each axis
                        columns[shift, :, :size] = padded[:, start + kernel - 1 - a:start + kernel - 1 - a + size,
                                                          kernel - 1 - b:kernel - 1 - b + height,
                                                          kernel - 1 - c:kernel - 1 - c + width]
                        shift += 1
            block = columns[:, :, :size].reshape(shifts * outputs, size * plane)
            if channels_last:
                product = block @ rows[start:start + size].reshape(size * plane, channels)
            else:
                product = block @ rows[:, start:start + size].reshape(channels, size * plane).t()
            total += product
    return total.reshape(shifts, outputs, channels).permute(1, 2, 0).reshape(outputs, channels, *(kernel,) * 3)


def _few_channel_weight_gradient_swapped(x: torch.Tensor, grad: torch.Tensor, kernel: int,
                                         depth_padding: Optional[int] = None) -> torch.Tensor:
    """:func:`_few_channel_weight_gradient` for channels-last float32 or bfloat16 ``x`` and ``grad``, by oneDNN with
    the roles swapped: the weight gradient of the convolution from ``grad``'s ``O`` channels to ``x``'s ``C`` (output
    gradient ``x``) is ``Σ_m x[c, m] · g[o, m + a − p]``, our gradient with the kernel flipped and its two channel
    axes exchanged. oneDNN's weight gradient is fast for ``C`` output channels where it is slow for ``O``: 35 against
    84 ms (float32; bfloat16 55 against 63) for 18 → 3 channels at 2×80×96×80; accumulated in float32 by oneDNN.
    ``depth_padding`` (``k // 2`` by default) is the zero padding along the first spatial axis: 0 for slabs of
    ``grad`` that carry ``k // 2`` more planes on each side than the matching slabs of ``x``."""
    padding = kernel // 2
    depth_padding = padding if depth_padding is None else depth_padding
    template = torch.empty((x.shape[1], grad.shape[1]) + (kernel,) * 3, dtype=x.dtype, device=x.device)
    _, swapped, _ = torch.ops.aten.convolution_backward(x, grad, template, None, [1, 1, 1],
                                                        [depth_padding, padding, padding], [1, 1, 1],
                                                        False, [0, 0, 0], 1, [False, True, False])
    return swapped.transpose(0, 1).flip(2, 3, 4)


def _few_channel_eligible(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`_few_channel_conv` computes ``conv(x)`` itself (else it calls ``conv``)."""
    kernel = conv.kernel_size[0] if isinstance(conv, nn.Conv3d) else 0
    return (x.dim() == 5 and x.device.type == "cpu"
            and isinstance(conv, nn.Conv3d) and conv.out_channels <= _FEW_CHANNELS and conv.groups == 1
            and kernel % 2 == 1
            and tuple(conv.kernel_size) == (kernel,) * 3 and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.dilation) == (1, 1, 1) and tuple(conv.padding) == (kernel // 2,) * 3
            and conv.padding_mode == "zeros" and x.dtype in (torch.float32, torch.float64, torch.bfloat16))


def _few_channel_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a CPU convolution to a few channels (3-D, stride 1, no dilation or groups, odd cubic kernel
    with 'same' zero padding): through :class:`_ConvToFewChannels` when a gradient will be needed, else
    :func:`_few_channel_forward` alone. Under autocast the input is cast to autocast's dtype, and the weight and
    bias to the input's (as autocast does); the result may come in the accumulator's dtype (float32 for bfloat16).

    Under autocast the forward also convolves with what the weight lost in its rounding to autocast's dtype
    (``weight_low`` of :func:`_few_channel_forward`), as more output channels of the same convolution: this layer's
    output is the displacement, and the rounding of its weight was most of a bfloat16 training step's objective
    difference (uniGradICON width, 80×96×80, random weights, in one check: 1.3e-4 relative to float32, 7.3e-5 with the
    split kernel; in a float32 last convolution its weight's rounding alone gave 9.5e-5, its input's 8e-6). Its
    gradients use the rounded weight, as autocast's would.
    """
    if not _few_channel_eligible(conv, x):
        return conv(x)
    autocast = _cpu_autocast_dtype()
    if autocast is not None and x.dtype != torch.float64:  # autocast's dtype (it leaves float64 alone)
        x = x.to(autocast)
    elif conv.weight.dtype != x.dtype:  # without autocast PyTorch refuses mixed dtypes: so does this
        return conv(x)
    weight = conv.weight.to(x.dtype)
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    weight_low = None
    if weight.dtype != conv.weight.dtype and weight.dtype != torch.float64:
        with torch.no_grad():  # a constant correction of the forward's value
            weight_low = (conv.weight - weight.to(conv.weight.dtype)).to(x.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _ConvToFewChannels.apply(x, weight, bias, weight_low)
    return _few_channel_forward(x, weight, bias, weight_low)


def _cpu_autocast_dtype() -> Optional[torch.dtype]:
    """The dtype CPU autocast computes convolutions in, or None when it is off (PyTorch 2.1+)."""
    try:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    except (TypeError, AttributeError):  # before PyTorch 2.4: CPU-specific functions
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _transposed_convolution_without_bias(conv: nn.ConvTranspose3d | nn.ConvTranspose2d,
                                         x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` without its bias, which :class:`UNet2` adds to the coarse path before the trilinear upsampling
    instead (interpolation with weights that sum to one keeps a per-channel constant, so the sum is the same).

    Why: for a bfloat16 transposed convolution on a CPU, oneDNN computes the bias gradient with its reference
    kernel (``ref_deconvolution_bwd_weights_t::compute_bwd_bias_ndhwc``), one element at a time: 4 % of a
    uniGradICON-width bfloat16 training step at 80×96×80 (``perf``). Added at the coarse level, the bias costs an
    eighth of a full-size add and its gradient an eighth of a full-size sum.

    A channels-last CPU input takes the weight converted to channels-last here, by one autograd-tracked copy:
    given a weight in the default order, PyTorch converted it in the forward and again in the backward, and the
    weight gradient back (three copies of up to 33 MB per use at uniGradICON width, against two).
    Measured with the last two levels channels-last (``_CHANNELS_LAST_LEVELS``): a float32 uniGradICON-width training
    step at 80×96×80 went from 4.60 to 4.43 s, the small UNets' from 1.80 to 1.77 s (same process, alternating)."""
    transpose = F.conv_transpose3d if x.dim() == 5 else F.conv_transpose2d
    weight = conv.weight
    if _by_matrix_product(conv, x):
        return _transposed_convolution_by_matrix_product(x, weight, conv.stride[0], conv.padding[0])
    if x.dim() == 5 and x.device.type == "cpu" and _memory_format(x) == torch.channels_last_3d:
        # once here, not in the convolution's forward and again in its backward (three copies per use become two)
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    return transpose(x, weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups,
                     conv.dilation)


#: A CPU transposed convolution whose input has at most this many voxels per channel (the deepest levels, 1³–3³ at
#: uniGradICON width: 512 channels, a 33 MB weight) runs as one matrix product and a scatter-add: oneDNN's kernels for
#: these few voxels ran at a fraction of its usual rate. Float32 forward + backward, batch 2, 2 cores, 512 → 256
#: channels: 14 against 20 ms at 1³, 17 against 24 at 2³, 27 against 32 at 3³; 512 → 128 at 2³: 7 against 12.
_MATRIX_PRODUCT_MAX_VOXELS = 27


def _by_matrix_product(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`_transposed_convolution_without_bias` computes ``conv(x)`` by
    :func:`_transposed_convolution_by_matrix_product`: a 3-D CPU input with at most ``_MATRIX_PRODUCT_MAX_VOXELS``
    voxels per channel and a cubic kernel, stride and padding with no output padding, dilation or groups."""
    return (x.dim() == 5 and x.device.type == "cpu" and x[0, 0].numel() <= _MATRIX_PRODUCT_MAX_VOXELS
            and isinstance(conv, nn.ConvTranspose3d) and conv.groups == 1
            and len(set(conv.kernel_size)) == 1 and len(set(conv.stride)) == 1 and len(set(conv.padding)) == 1
            and tuple(conv.output_padding) == (0, 0, 0) and tuple(conv.dilation) == (1, 1, 1)
            and conv.padding_mode == "zeros")


def _transposed_convolution_by_matrix_product(x: torch.Tensor, weight: torch.Tensor, stride: int,
                                              padding: int) -> torch.Tensor:
    """``F.conv_transpose3d(x, weight, None, stride, padding)`` for a cubic kernel ``k`` (no output padding, dilation
    or groups): the input's voxels ``[N·V, C_in]`` times the weight ``[C_in, C_out·k³]``, each voxel's ``k³`` products
    added into the uncropped output at ``stride · i + offset`` (``index_add_``, whose backward is a gather), summed in
    float32, then cropped by ``padding``. Same values to rounding; the output in the product's dtype, as the
    convolution's would be (bfloat16 under autocast)."""
    batch, inputs, *size = x.shape
    outputs, kernel = weight.shape[1], weight.shape[-1]
    full = [(n - 1) * stride + kernel for n in size]
    products = x.permute(0, 2, 3, 4, 1).reshape(-1, inputs) @ weight.reshape(inputs, outputs * kernel ** 3)
    taps = [(torch.arange(n, device=x.device) * stride).view(-1, 1) + torch.arange(kernel, device=x.device)
            for n in size]  # [size, k] per axis: where each voxel's taps land
    index = ((taps[0].view(-1, 1, 1, kernel, 1, 1) * full[1] + taps[1].view(1, -1, 1, 1, kernel, 1)) * full[2]
             + taps[2].view(1, 1, -1, 1, 1, kernel)).reshape(-1)  # [V·k³], voxel-major as the products' rows
    products = products.view(batch, -1, outputs, kernel ** 3).transpose(1, 2).reshape(batch, outputs, -1)
    out = torch.zeros(batch, outputs, full[0] * full[1] * full[2], dtype=_accumulator(products.dtype),
                      device=x.device).index_add_(2, index, products.to(_accumulator(products.dtype)))
    crop = tuple(slice(padding, n - padding) for n in full)
    return out.view(batch, outputs, *full)[(slice(None), slice(None)) + crop].to(products.dtype)


def _per_channel(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` ``[C]`` as ``[1, C, 1, …]`` for broadcasting against a ``dim``-dimensional ``[B, C, …]`` tensor."""
    return values.view((1, -1) + (1,) * (dim - 2))


def _upsample_twice(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)`` (``mode`` trilinear or bilinear).

    A contiguous CPU input goes through :class:`_LinearUpsampleTwice` (the same numbers to rounding, 2.5–4× faster
    forward and backward than PyTorch's kernels on the UNet's contiguous levels: 25 → 7 ms and 27 → 10 ms for
    32 channels from 20×24×20, one thread); channels-last inputs, where PyTorch's kernel is the faster, and other
    devices keep ``F.interpolate``."""
    if x.device.type == "cpu" and x.is_contiguous() and x.dim() in (4, 5) and x.is_floating_point():
        return _LinearUpsampleTwice.apply(x)
    return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


def _add_upsampled_twice(y: torch.Tensor, coarse: torch.Tensor, mode: str) -> torch.Tensor:
    """``y + _upsample_twice(coarse, mode)`` for ``y`` ``[B, C, *2S]`` and ``coarse`` ``[B, C, *S]``.

    Where both are channels-last 5-D CPU tensors (the UNet's last level), ``coarse`` float32 and ``y`` float32 or
    bfloat16, and the compiled library is loaded, one kernel upsamples and adds (:class:`_ChannelsLastUpsampleAdd`:
    the same numbers to float rounding, 19 → 6 ms forward and 15 → 7 ms backward for 16 channels from 2×40×48×40,
    two threads, against PyTorch's channels-last ``trilinear`` and the addition)."""
    if (y.dim() == 5 and coarse.dim() == 5 and coarse.dtype == torch.float32
            and y.dtype in (torch.float32, torch.bfloat16) and y.device.type == "cpu"
            and y.shape[:2] == coarse.shape[:2] and list(y.shape[2:]) == [2 * n for n in coarse.shape[2:]]
            and _memory_format(y) == torch.channels_last_3d == _memory_format(coarse)
            and native_sampler.kernels_eligible(coarse)):
        return _ChannelsLastUpsampleAdd.apply(y, coarse)
    return y + _upsample_twice(coarse, mode)


class _ChannelsLastUpsampleAdd(torch.autograd.Function):
    """``y + upsample(coarse)`` (linear, by 2, ``align_corners=False``) of channels-last 5-D CPU tensors through the
    compiled library's kernels (``native_sampler.upsample_add`` and its adjoint); float32 output in channels-last
    order, the gradient of a bfloat16 ``y`` rounded to bfloat16 as PyTorch's addition does."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        ctx.y_dtype = y.dtype
        return native_sampler.upsample_add(coarse.movedim(1, -1), y.movedim(1, -1)).movedim(-1, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_coarse = native_sampler.upsample_adjoint(grad.movedim(1, -1)).movedim(-1, 1)
        return grad.to(ctx.y_dtype), grad_coarse


class _LinearUpsampleTwice(torch.autograd.Function):
    """Linear upsampling by 2 along every spatial axis with ``align_corners=False`` (PyTorch's ``trilinear`` /
    ``bilinear`` at scale 2), one axis at a time: output ``2i`` is ¾ x[i] + ¼ x[i−1] and ``2i+1`` is ¾ x[i] +
    ¼ x[i+1], the border values repeated. Input ``[B, C, *S]``, output ``[B, C, *2S]``. The backward is the
    adjoint, again one axis at a time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        for axis in range(2, x.dim()):
            x = _LinearUpsampleTwice.along(x, axis)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        for axis in reversed(range(2, grad.dim())):
            grad = _LinearUpsampleTwice.adjoint_along(grad, axis)
        return grad

    @staticmethod
    def along(x: torch.Tensor, axis: int) -> torch.Tensor:
        n = x.shape[axis]
        shape = list(x.shape)
        shape[axis] = 2 * n
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        pair = out.unflatten(axis, (n, 2))
        even, odd = pair.select(axis + 1, 0), pair.select(axis + 1, 1)
        low, high = x.narrow(axis, 0, n - 1), x.narrow(axis, 1, n - 1)
        torch.lerp(high, low, 0.25, out=even.narrow(axis, 1, n - 1))
        torch.lerp(low, high, 0.25, out=odd.narrow(axis, 0, n - 1))
        even.narrow(axis, 0, 1).copy_(x.narrow(axis, 0, 1))
        odd.narrow(axis, n - 1, 1).copy_(x.narrow(axis, n - 1, 1))
        return out

    @staticmethod
    def adjoint_along(grad: torch.Tensor, axis: int) -> torch.Tensor:
        n = grad.shape[axis] // 2
        pair = grad.unflatten(axis, (n, 2))
        even, odd = pair.select(axis + 1, 0), pair.select(axis + 1, 1)
        out = torch.add(even, odd).mul_(0.75)
        out.narrow(axis, 1, n - 1).add_(odd.narrow(axis, 0, n - 1), alpha=0.25)
        out.narrow(axis, 0, n - 1).add_(even.narrow(axis, 1, n - 1), alpha=0.25)
        out.narrow(axis, 0, 1).add_(even.narrow(axis, 0, 1), alpha=0.25)
        out.narrow(axis, n - 1, 1).add_(odd.narrow(axis, n - 1, 1), alpha=0.25)
        return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """``channels_last_3d`` for a 5-D tensor laid out channels-last (and not also plainly contiguous, as a
    one-channel or one-voxel tensor is), else ``contiguous_format``."""
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class _ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels-last 5-D CPU tensor with accurately accumulated statistics.

    PyTorch's CPU batch norm on a channels-last input accumulates its per-channel sums naively in float32: for 16
    channels of 2×80×96×80 voxels its output is off by up to 2e-3, its input gradient by 6e-3 and its weight
    gradient by 1e-3 relative (in the default memory order: 7e-7, 3e-6, 1e-5). Here the per-channel sums are
    accumulated in float64: where the compiled library is loaded (``native_sampler.kernels_eligible``), by its
    kernels on the voxels as ``[voxels, C]`` rows — Σx and Σx² in one pass, the output ``(x − mean)·w/σ + b`` in a
    second, and in the backward Σg and Σg·x in one pass and the input gradient in another (47 → 15 ms for 16
    channels of 2×80×96×80, forward and backward, two threads; float32 only: in float64 the sums Σx² and Σg·x of
    an input far from zero mean would lose digits to cancellation that float64 inputs are used to avoid) — and
    otherwise as ``torch.sum`` (cascaded, accurate in either memory order) of the input, of the squared centred
    input, of the gradient and of its product with the centred input.

    ``groups`` ``G`` splits the batch into ``G`` equal parts of consecutive samples, each normalised with its own
    statistics as if it had its own call (both directions of a training step in one batch, see
    :func:`grouped_batch_norm`): the compiled sums of a part are those of a separate call, bit for bit, and the
    weight and bias gradients are the parts' float32 gradients added in order, as autograd adds those of separate
    calls. Returns the output and each part's batch mean and (biased) variance ``[G, C]``, for the running
    statistics.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int = 1):
        ctx.groups = groups
        ctx.compiled = x.dtype == torch.float32 and native_sampler.kernels_eligible(x)
        if ctx.compiled:
            out, mean, var = _ChannelsLastBatchNorm.compiled_forward(ctx, x, weight, bias, eps)
        else:
            out, mean, var = _ChannelsLastBatchNorm.tensor_forward(ctx, x, weight, bias, eps)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean, _grad_var):
        if ctx.compiled:
            grad_x, grad_weight, grad_bias = _ChannelsLastBatchNorm.compiled_backward(ctx, grad)
        else:
            grad_x, grad_weight, grad_bias = _ChannelsLastBatchNorm.tensor_backward(ctx, grad)
        # [G, C] per part, in the parameters' dtype, then added in order as autograd adds separate calls' gradients
        grad_weight, grad_bias = grad_weight.to(ctx.weight_dtype), grad_bias.to(ctx.weight_dtype)
        return grad_x, _sum_in_order(grad_weight), _sum_in_order(grad_bias), None, None

    @staticmethod
    def rows(x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` → ``[B·ΠS, C]`` (a view for a channels-last tensor)."""
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    @staticmethod
    def part_sums(rows: torch.Tensor, groups: int, other: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``native_sampler.channel_sums`` of each of ``groups`` equal runs of ``rows`` (and ``other``): ``[G, 2, C]``."""
        n = rows.shape[0] // groups
        return torch.stack([native_sampler.channel_sums(rows[g * n:(g + 1) * n],
                                                        None if other is None else other[g * n:(g + 1) * n])
                            for g in range(groups)])

    @staticmethod
    def compiled_forward(ctx, x, weight, bias, eps):
        rows = _ChannelsLastBatchNorm.rows(x)
        count = rows.shape[0] // ctx.groups
        sums = _ChannelsLastBatchNorm.part_sums(rows, ctx.groups)
        mean = sums[:, 0] / count
        var = (sums[:, 1] / count - mean.square()).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        scale = weight.double() * invstd
        out = native_sampler.channel_affine(rows, mean, scale, bias.expand_as(scale))
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.invstd, ctx.weight_dtype = mean, invstd, weight.dtype
        out = out.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)
        return out, mean.to(x.dtype), var.to(x.dtype)

    @staticmethod
    def compiled_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mean, invstd = ctx.mean, ctx.invstd
        rows, grad_rows = _ChannelsLastBatchNorm.rows(x), _ChannelsLastBatchNorm.rows(grad)
        count = rows.shape[0] // ctx.groups
        sums = _ChannelsLastBatchNorm.part_sums(grad_rows, ctx.groups, rows)  # Σg, Σg·x per part
        grad_bias = sums[:, 0]
        grad_weight = (sums[:, 1] - mean * sums[:, 0]) * invstd  # Σ g · x̂
        # ∂x = w·σ⁻¹·(g − Σg/n − x̂·Σ(g x̂)/n) = scale·g + slope·(x − mean) + offset
        scale = weight.double() * invstd
        slope = -scale * invstd * grad_weight / count
        offset = -scale * grad_bias / count
        grad_x = native_sampler.channel_affine(rows, mean, slope, offset, other=grad_rows, other_scale=scale)
        grad_x = grad_x.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def tensor_forward(ctx, x, weight, bias, eps):
        parts = x.unflatten(0, (ctx.groups, -1))  # [G, B/G, C, *S]
        dims, per_channel = (1, 3, 4, 5), (ctx.groups, 1, -1, 1, 1, 1)
        count = parts[0].numel() // x.shape[1]
        mean = parts.sum(dim=dims) / count
        centred = parts - mean.view(per_channel)
        var = centred.square().sum(dim=dims) / count
        invstd = torch.rsqrt(var + eps)
        out = torch.addcmul(bias.view(1, 1, -1, 1, 1, 1), centred, (weight * invstd).view(per_channel))
        ctx.save_for_backward(centred, weight, invstd)
        ctx.weight_dtype = weight.dtype
        return out.flatten(0, 1), mean, var

    @staticmethod
    def tensor_backward(ctx, grad):
        centred, weight, invstd = ctx.saved_tensors
        dims, per_channel = (1, 3, 4, 5), (ctx.groups, 1, -1, 1, 1, 1)
        grad = grad.unflatten(0, (ctx.groups, -1))
        count = centred[0].numel() // centred.shape[2]
        grad_bias = grad.sum(dim=dims)
        grad_weight = (grad * centred).sum(dim=dims) * invstd  # Σ g · x̂
        scale = weight * invstd
        slope = -scale * invstd * grad_weight / count
        offset = -scale * grad_bias / count
        grad_x = torch.addcmul(offset.view(per_channel), centred, slope.view(per_channel))
        grad_x.addcmul_(grad, scale.view(per_channel))
        return grad_x.flatten(0, 1), grad_weight, grad_bias


def _sum_in_order(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + …`` along the first axis, left to right (autograd's order for separate calls)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _batch_norm(norm: nn.BatchNorm3d | nn.BatchNorm2d, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``norm(x)``; in training mode with ``groups`` > 1, ``norm`` of each of ``groups`` equal parts of the batch in
    turn (their own statistics, the running statistics updated part after part), concatenated. A channels-last 5-D
    CPU input in training mode goes through :class:`_ChannelsLastBatchNorm` (same maths, accurate sums, all parts in
    one pass), with the running statistics updated as ``norm`` would."""
    if not (norm.training and x.dim() == 5 and x.device.type == "cpu" and norm.affine
            and norm.track_running_stats and _memory_format(x) == torch.channels_last_3d):
        if groups == 1 or not norm.training:
            return norm(x)
        return torch.cat([norm(part) for part in x.chunk(groups)])
    out, means, variances = _ChannelsLastBatchNorm.apply(x, norm.weight, norm.bias, norm.eps, groups)
    with torch.no_grad():
        count = x.numel() // x.shape[1] // groups
        for mean, var in zip(means, variances):
            norm.num_batches_tracked.add_(1)
            momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.lerp_(mean, momentum)
            norm.running_var.lerp_(var * (count / max(count - 1, 1)), momentum)
    return out


def _crop_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The first ``shape`` voxels of ``x`` along each spatial axis (a view; ``x`` itself when nothing is cut)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return x[(slice(None), slice(None)) + tuple(slice(0, n) for n in shape)]


class _CropAndConcatenateChannelsLast(torch.autograd.Function):
    """``torch.cat([x cropped to skip's size, skip], dim=1)`` in channels-last memory order, with each input's
    gradient handed back in that input's own memory order.

    The last level's ``x`` (batch norm output) is channels-last. Through PyTorch's own crop and concatenation its
    gradient came back in the default order, through a slow transposing copy (the crop's backward fills a
    default-order tensor from a strided channels-last slice), and the batch norm's backward then ran on mixed
    orders (PyTorch's own kernel 8× slower: 111 against 14 ms for 16 channels at 66³, one thread).
    Here the backward hands each input its channel range of the gradient: for a channels-last input the slice itself
    (a view in the same order, which the compiled batch norm reads in place: the copy of 16 of 18 channels at
    2×80×96×80 took 6.5 ms), otherwise one plain copy into the input's order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        ctx.x_shape, ctx.x_format, ctx.skip_format = x.shape, _memory_format(x), _memory_format(skip)
        cropped = _crop_to(x, skip.shape[2:])
        shape = (skip.shape[0], x.shape[1] + skip.shape[1], *skip.shape[2:])
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
        out[:, :x.shape[1]] = cropped
        out[:, x.shape[1]:] = skip
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        channels = ctx.x_shape[1]
        grad_x = grad_skip = None  # only for the inputs that need one (the first step's image pair does not)
        if ctx.needs_input_grad[0]:
            if tuple(ctx.x_shape[2:]) == tuple(grad.shape[2:]):
                grad_x = _in_order(grad[:, :channels], ctx.x_format)
            else:
                grad_x = torch.empty(ctx.x_shape, dtype=grad.dtype, device=grad.device,
                                     memory_format=ctx.x_format).zero_()
                _crop_to(grad_x, grad.shape[2:]).copy_(grad[:, :channels])
        if ctx.needs_input_grad[1]:
            grad_skip = _in_order(grad[:, channels:], ctx.skip_format)
        return grad_x, grad_skip


def _in_order(channels: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A channel slice of a channels-last gradient as it is for a channels-last input, else copied into
    ``memory_format``."""
    return channels if memory_format == torch.channels_last_3d else channels.contiguous(memory_format=memory_format)


def _crop_and_concatenate(x: torch.Tensor, skip: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``torch.cat([x cropped to skip's spatial size, skip], dim=1)``; written channels-last when
    ``channels_last`` and 3-D (the order of the last convolution's input, see
    :class:`_CropAndConcatenateChannelsLast`)."""
    if channels_last and x.dim() == 5:
        return _CropAndConcatenateChannelsLast.apply(x, skip)
    return torch.cat([_crop_to(x, skip.shape[2:]), skip], dim=1)


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
        #: ``None``: float32. ``torch.bfloat16``: the UNet runs under autocast and returns float32 (see
        #: :func:`low_precision`). Not part of the state dict.
        self.low_precision: Optional[torch.dtype] = None
        #: in training mode, the batch is this many equal parts of consecutive samples, each batch-normalised with
        #: its own statistics (see :func:`grouped_batch_norm`). Not part of the state dict.
        self.batch_groups = 1

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        if self.low_precision is None:
            return self._forward(image_A, image_B)
        with torch.autocast(image_A.device.type, dtype=self.low_precision):
            return self._forward(image_A, image_B).float()

    def _forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        if image_A.shape[0] % self.batch_groups:
            raise ValueError(f"a batch of {image_A.shape[0]} does not split into {self.batch_groups} equal parts")
        x = torch.cat([image_A, image_B], dim=1)
        skips = []
        for depth in range(self.num_layers):
            skips.append(x)
            y = _convolve(self.downConvs[depth], F.leaky_relu(x))
            x = y + _match_channels(self._avg_pool(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(self.num_layers)):
            y = _transposed_convolution_without_bias(self.upConvs[depth],
                                                     _transposed_convolution_input(F.leaky_relu(x), depth))
            # the transposed convolution's bias is added before the upsampling, which keeps constants: the same sum
            # at an eighth of the voxels (see _transposed_convolution_without_bias)
            coarse = _match_channels(x, y.shape[1]) + _per_channel(self.upConvs[depth].bias, x.dim())
            if depth >= _CHANNELS_LAST_LEVELS:
                y = y.contiguous()
            else:  # the last levels stay channels-last up to their concatenation (the last one up to the last
                # convolution): two full-size copies fewer per level, and the compiled upsampling and batch norm
                coarse = _channels_last(coarse)
            x = _add_upsampled_twice(y, coarse, self._interpolate_mode)
            x = _crop_and_concatenate(_batch_norm(self.batchNorms[depth], x, self.batch_groups), skips[depth],
                                      channels_last=depth < _CHANNELS_LAST_LEVELS)
        return _convolve(self.lastConv, x).contiguous() / 10


@contextlib.contextmanager
def low_precision(net: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[nn.Module]:
    """Within the block, every :class:`UNet2` in ``net`` runs under autocast to ``dtype`` (``torch.bfloat16``:
    its convolutions compute in bfloat16) and returns its displacement as float32; ``None`` leaves the network in
    float32. The previous setting comes back on leaving the block.

    Everything outside the UNets — maps, composition, sampling, similarity, penalties — stays float32. Used for
    training (``iconreg train --mixed-precision``): on a CPU with native bfloat16 (AVX512-BF16) training steps were
    1.08–1.27× faster; the objective moved by at most 1.1e-4 (random weights) to 5.6e-4 (the trained hippocampus
    model) relative (measured before the last convolution kept its weight's lost bits, see :func:`_few_channel_conv`),
    the gradient by 3 % to 23 % (cosine 0.974 on the trained model, where the float32 gradients of two batches have
    0.855), and runs at equal steps reached the same validation Dice (``benchmarks/README.md``;
    keeping each UNet's first and last convolutions in float32 lost most of the gain). Inference stays float32: at
    175³ the uniGradICON network's forward pass was only 1.17× faster, and the shipped LPBA40 model's maps moved by
    up to 0.18 voxel.
    """
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"low precision is bfloat16 or float16, not {dtype}")
    with _on_every_unet(net, "low_precision", dtype):
        yield net


@contextlib.contextmanager
def grouped_batch_norm(net: nn.Module, groups: int) -> Iterator[nn.Module]:
    """Within the block, every :class:`UNet2` in ``net`` treats its batch as ``groups`` equal parts of consecutive
    samples: in training mode each part is batch-normalised with its own statistics, exactly as if each part ran
    through the network in its own call (the running statistics are updated part after part). Used to run both
    directions of a GradICON step as one batch ``[A; B]`` (``objective.symmetric_objective``) with the objective of
    two calls. The previous setting comes back on leaving the block."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    with _on_every_unet(net, "batch_groups", int(groups)):
        yield net


@contextlib.contextmanager
def _on_every_unet(net: nn.Module, setting: str, value) -> Iterator[None]:
    """Every :class:`UNet2` in ``net`` has ``setting`` = ``value`` within the block, its previous value after."""
    unets = [module for module in net.modules() if isinstance(module, UNet2)]
    before = [getattr(unet, setting) for unet in unets]
    for unet in unets:
        setattr(unet, setting, value)
    try:
        yield
    finally:
        for unet, previous in zip(unets, before):
            setattr(unet, setting, previous)


def tallUNet2(dimension: int = 3, input_channels: int = 1) -> UNet2:  # noqa: N802 (icon_registration's name)
    """The 5-layer UNet2 used by every uniGradICON / GradICON step."""
    channels = [[2 * input_channels] + TALL_UNET2_CHANNELS[0][1:], list(TALL_UNET2_CHANNELS[1])]
    return UNet2(5, channels, dimension)
