"""Warm starts for training from a trained GradICON network: a ConstrICON network of the same UNets
(:func:`constricon_from_gradicon`), or the same GradICON steps with wider UNets (:func:`widen_gradicon`).

GradICON's ``TwoStep(TwoStep(Down(Ψ1), Ψ2), Ψ3)`` predicts displacements ``u_i = N_i(A, B)`` step by step; the
ConstrICON network ``TSC{Ξ1, TSC{Ξ2, Ξ3}}`` whose SVF steps see the images pooled the same number of times
(``options.svf_downsample = [1, 0, 0]``) predicts velocities ``v_i = N_i(A, B) − N_i(B, A)``. Copying each UNet
and halving its last convolution gives ``v_i = (u_i[A, B] − u_i[B, A]) / 2``: for a GradICON network that is close
to inverse consistent (``u[B, A] ≈ −u[A, B]`` to first order) each step starts near the displacement it was
trained to predict, and the new network is inverse consistent by construction from its first step on.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..core.constricon import AffineStep, SVFStep
from ..core.networks import UNet2
from ..core.registration_modules import DownsampleRegistration, FunctionFromVectorField, TwoStepRegistration
from ..errors import UserError


def gradicon_steps(net: nn.Module, pooled: int = 0) -> Iterator[tuple[int, UNet2]]:
    """The UNets of a GradICON network, coarse to fine, each with how many times its inputs are pooled by 2."""
    if isinstance(net, TwoStepRegistration):
        yield from gradicon_steps(net.netPhi, pooled)
        yield from gradicon_steps(net.netPsi, pooled)
    elif isinstance(net, DownsampleRegistration):
        yield from gradicon_steps(net.net, pooled + 1)
    elif isinstance(net, FunctionFromVectorField) and isinstance(net.net, UNet2):
        yield pooled, net.net
    else:
        raise UserError(f"Not a GradICON network of UNet steps: found a {type(net).__name__}.")


def constricon_from_gradicon(gradicon: nn.Module, constricon: nn.Module) -> nn.Module:
    """Copy the UNets of ``gradicon`` into the SVF steps of ``constricon`` (in place; returned), coarse to fine.

    Both networks must have the same number of UNet steps, each pooled as often as its counterpart, with the same
    channels. Affine steps of ``constricon`` are set to predict the identity (their last layer to zero).
    Raises :class:`UserError` when the two do not correspond.
    """
    sources = list(gradicon_steps(gradicon))
    targets = [m for m in constricon.modules() if isinstance(m, SVFStep)]
    source_poolings = [pooled for pooled, _ in sources]
    target_poolings = [step.downsample for step in targets]
    if source_poolings != target_poolings:
        raise UserError(f"The GradICON network's steps are pooled {source_poolings} times and the ConstrICON "
                        f"network's SVF steps {target_poolings} times (options.svf_downsample): they must match "
                        "step by step.")
    for (_, unet), step in zip(sources, targets):
        state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        for key in ("lastConv.weight", "lastConv.bias"):
            state[key] = state[key] / 2
        try:
            step.net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError("The GradICON and ConstrICON UNets differ (unet.num_layers or unet.channels): "
                            f"{str(error).splitlines()[0]}") from None
    with torch.no_grad():
        for module in constricon.modules():
            if isinstance(module, AffineStep):
                module.net.linear.weight.zero_()
                module.net.linear.bias.zero_()
    return constricon


def _down_layout(previous: list[int], old: tuple[int, int], new: tuple[int, int]) -> list[int]:
    """Where the old channels of a down-path activation lie in the wider one, from those of the level before.

    :func:`_match_channels` pads at the front, so the pooled input's channel ``i`` is added to channel
    ``out − in + i``: an old channel that receives old input channel ``i`` must sit where the wider network adds
    that channel; the old channels that receive nothing take the first indices, which receive nothing either.
    """
    (old_in, old_out), (new_in, new_out) = old, new
    old_offset, new_offset = old_out - old_in, new_out - new_in
    if old_offset < 0 or new_offset < old_offset:
        raise UserError("A down-path convolution that narrows, or whose widening adds fewer channels than its "
                        "input's, cannot keep the residual path's pairing.")
    return list(range(old_offset)) + [new_offset + index for index in previous]


def widen_unet(source: UNet2, target: UNet2, noise: float = 1e-2, generator: torch.Generator | None = None) -> UNet2:
    """Copy ``source`` into the wider ``target`` (in place; returned) so that ``target`` computes almost the same
    displacement: a warm start for training a wider network from a trained one.

    Each activation of the wider UNet holds the source's channels at indices chosen so that its residual paths
    (:func:`_match_channels`: crop to the first channels, or zero-pad at the front) add the same source channels
    to each other as before; the added channels fill the other indices. Each weight that touches an added channel
    is drawn from a normal distribution with ``noise`` times the standard deviation of that layer's trained
    weights: small enough that the output moves little (added channels reach the source's channels only through
    these weights and the front-padded residuals), large enough that no added channel starts exactly at zero,
    where its gradient could stay zero. The added batch-norm channels start as the identity. ``noise = 0`` copies
    the source's function exactly (the added channels then start dead). Raises :class:`UserError` unless both
    UNets have the same depth and ``target`` is at least as wide as ``source`` in every layer.
    """
    if source.num_layers != target.num_layers or source.dimension != target.dimension:
        raise UserError("The two UNets differ in depth or dimension (unet.num_layers): only widths can grow.")
    layers = source.num_layers
    down_o = [source.downConvs[0].in_channels] + [conv.out_channels for conv in source.downConvs]
    down_n = [target.downConvs[0].in_channels] + [conv.out_channels for conv in target.downConvs]
    up_o = [conv.out_channels for conv in source.upConvs]
    up_n = [conv.out_channels for conv in target.upConvs]
    if down_o[0] != down_n[0] or any(n < o for o, n in zip(down_o + up_o, down_n + up_n)):
        raise UserError(f"The target UNet (channels {[down_n, up_n]}) must take the same inputs and be at least "
                        f"as wide as the source ({[down_o, up_o]}) in every layer.")

    down = [list(range(down_o[0]))]  # old channel -> index in the wider network, per down-path activation
    for depth in range(layers):
        down.append(_down_layout(down[depth], (down_o[depth], down_o[depth + 1]),
                                 (down_n[depth], down_n[depth + 1])))
    up: list[list[int]] = [[] for _ in range(layers)]  # the same for each level's batch-norm output
    inputs: list[list[int]] = [[] for _ in range(layers)]  # and for each transposed convolution's input
    for depth in reversed(range(layers)):
        if depth == layers - 1:
            inputs[depth] = down[layers]
        else:
            inputs[depth] = up[depth + 1] + [up_n[depth + 1] + index for index in down[depth + 1]]
        if len(inputs[depth]) < up_o[depth]:
            raise UserError("A transposed convolution with more output than input channels (a zero-padded residual) "
                            "is not supported for widening.")
        # the residual adds the input's first channels: old channel j of the output receives old input channel j
        up[depth] = inputs[depth][:up_o[depth]]
        if max(up[depth]) >= up_n[depth]:
            raise UserError(f"Widening level {depth} to {up_n[depth]} channels would pair other channels in its "
                            "residual path; widen the levels below it less.")
    last_inputs = up[0] + [up_n[0] + index for index in down[0]]

    def fill(target_tensor: torch.Tensor, source_tensor: torch.Tensor, first: list[int],
             second: list[int] | None = None) -> None:
        """The source's values at (first[i], second[j]) of the first two dimensions, noise elsewhere."""
        scale = float(source_tensor.float().std()) if source_tensor.numel() > 1 else 0.0
        values = torch.randn(target_tensor.shape, generator=generator, dtype=torch.float32) * (noise * scale)
        rows = torch.tensor(first, dtype=torch.long)
        if second is None:
            values[rows] = source_tensor.float()
        else:
            values[rows[:, None], torch.tensor(second, dtype=torch.long)[None, :]] = source_tensor.float()
        target_tensor.copy_(values.to(target_tensor.dtype))

    with torch.no_grad():
        for depth in range(layers):
            small, wide = source.downConvs[depth], target.downConvs[depth]
            fill(wide.weight, small.weight, down[depth + 1], down[depth])
            fill(wide.bias, small.bias, down[depth + 1])
            small, wide = source.upConvs[depth], target.upConvs[depth]  # weights [in, out, *kernel]
            fill(wide.weight, small.weight, inputs[depth], up[depth])
            fill(wide.bias, small.bias, up[depth])
            small, wide = source.batchNorms[depth], target.batchNorms[depth]
            wide.reset_parameters()
            index = torch.tensor(up[depth], dtype=torch.long)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(wide, name)[index] = getattr(small, name)
            wide.num_batches_tracked.copy_(small.num_batches_tracked)
        fill(target.lastConv.weight, source.lastConv.weight, list(range(source.lastConv.out_channels)), last_inputs)
        target.lastConv.bias.copy_(source.lastConv.bias)
    return target


def widen_gradicon(source: nn.Module, target: nn.Module, noise: float = 1e-2, seed: int = 0) -> nn.Module:
    """:func:`widen_unet` for each UNet step of two GradICON networks of the same structure (in place; returned)."""
    sources, targets = list(gradicon_steps(source)), list(gradicon_steps(target))
    if [p for p, _ in sources] != [p for p, _ in targets]:
        raise UserError(f"The two GradICON networks' steps are pooled {[p for p, _ in sources]} and "
                        f"{[p for p, _ in targets]} times: they must have the same steps (levels, last_step).")
    generator = torch.Generator().manual_seed(seed)
    for (_, small), (_, wide) in zip(sources, targets):
        widen_unet(small, wide, noise=noise, generator=generator)
    return target
