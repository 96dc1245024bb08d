"""Build the torch network a ``ModelSpec`` describes."""

from __future__ import annotations

from torch import nn

from ..core.networks import UNet2
from ..core.registration_modules import (DownsampleRegistration, FunctionFromVectorField, RegistrationModule,
                                         TwoStepRegistration)
from .spec import ModelSpec


def build_network(spec: ModelSpec) -> RegistrationModule:
    """The registration network of ``spec``, in eval mode, with freshly initialised weights.

    For ``architecture == "gradicon"`` with ``levels = L`` and ``last_step``::

        Ψ1 at 1/2^(L-1) → TwoStep(Down(…), Ψ2) → … → TwoStep(Down(…), ΨL) at full resolution
        → TwoStep(…, ΨL+1) if last_step

    which for L = 3 is icon_registration's TwoStep(TwoStep(Down(TwoStep(Down(Ψ1), Ψ2)), Ψ3), Ψ4): the
    ``state_dict()`` keys equal those of an official uniGradICON ``regis_net``.
    ``net(image_A, image_B)`` returns Φ_AB, a callable on unit-cube coordinates ``[B, 3, D, H, W]``.
    """
    def step() -> FunctionFromVectorField:
        return FunctionFromVectorField(UNet2(spec.unet["num_layers"], spec.unet["channels"], dimension=3))

    net: nn.Module = step()
    for _ in range(spec.levels - 1):
        net = TwoStepRegistration(DownsampleRegistration(net, dimension=3), step())
    if spec.last_step:
        net = TwoStepRegistration(net, step())
    return net.eval()
