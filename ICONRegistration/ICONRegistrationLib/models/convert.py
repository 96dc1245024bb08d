"""Start a ConstrICON network from a trained GradICON network of the same UNets (a warm start for training).

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
