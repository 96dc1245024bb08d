"""Build the torch network a ``ModelSpec`` describes."""

from __future__ import annotations

from torch import nn

from ..core.constricon import build_constricon
from ..core.networks import UNet2
from ..core.sitreg import SITRegNetwork
from ..core.registration_modules import (DownsampleRegistration, FunctionFromVectorField, RegistrationModule,
                                         TwoStepRegistration)
from .spec import ModelSpec


def build_network(spec: ModelSpec) -> RegistrationModule:
    """The registration network of ``spec``, in eval mode, with freshly initialised weights.

    For ``architecture == "gradicon"`` with ``levels = L`` and ``last_step``::

        Ψ1 at 1/2^(L-1) → TwoStep(Down(…), Ψ2) → … → TwoStep(Down(…), ΨL) at full resolution
        → TwoStep(…, ΨL+1) if last_step → TwoStep(…, ΨL+2) … (``options["final_steps"]`` of them, default 1)

    which for L = 3 is icon_registration's TwoStep(TwoStep(Down(TwoStep(Down(Ψ1), Ψ2)), Ψ3), Ψ4): the
    ``state_dict()`` keys equal those of an official uniGradICON ``regis_net``.
    ``net(image_A, image_B)`` returns Φ_AB, a callable on unit-cube coordinates ``[B, 3, D, H, W]``.

    ``"constricon"``: ``TSC{Ψ1, TSC{Ψ2, TSC{Ξ1, Ξ2}}}`` (affine Ψ, SVF Ξ; counts from ``spec.options``), see
    :mod:`ICONRegistrationLib.core.constricon`. ``"sitreg"``: ``spec.levels`` symmetric levels, see
    :mod:`ICONRegistrationLib.core.sitreg`. Both also offer ``net.forward_and_inverse(A, B) -> (Φ_AB, Φ_BA)``.
    """
    options = spec.options
    if spec.architecture == "constricon":
        net = build_constricon(spec.unet["num_layers"], spec.unet["channels"],
                               affine_steps=int(options.get("affine_steps", 2)),
                               svf_steps=int(options.get("svf_steps", 2)),
                               affine_channels=options.get("affine_channels", (2, 16, 32, 64, 128)),
                               integration_steps=int(options.get("integration_steps", 7)),
                               svf_downsample=options.get("svf_downsample"))
        return net.eval()
    if spec.architecture == "sitreg":
        return SITRegNetwork(spec.levels, spec.unet["num_layers"], spec.unet["channels"],
                             max_gradient=float(options.get("max_gradient", 0.9)),
                             inversion_tolerance=float(options.get("inversion_tolerance", 1e-3))).eval()
    def step() -> FunctionFromVectorField:
        return FunctionFromVectorField(UNet2(spec.unet["num_layers"], spec.unet["channels"], dimension=3))

    net: nn.Module = step()
    for _ in range(spec.levels - 1):
        net = TwoStepRegistration(DownsampleRegistration(net, dimension=3), step())
    if spec.last_step:
        for _ in range(int(options.get("final_steps", 1))):
            net = TwoStepRegistration(net, step())
    return net.eval()
