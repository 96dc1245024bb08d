"""ConstrICON: registration networks that are inverse consistent by construction (Greer et al., MICCAI 2023).

A *Lie-group step* predicts an element ``g`` of a Lie algebra from both orderings of the pair and returns

    Φ[A, B] = exp(N(A, B) − N(B, A))

so swapping the inputs negates ``g`` and Φ[B, A] = exp(−g) = Φ[A, B]⁻¹. Two groups are implemented:

* affine maps: ``g`` is a 4×4 matrix with a zero last row, ``exp`` the matrix exponential. It acts on unit-cube
  coordinates centred on the cube's centre (0.5, 0.5, 0.5), so a rotation turns about the image centre.
* diffeomorphisms from stationary velocity fields (SVF): ``g`` is a velocity field ``v`` on the network grid,
  ``exp(v)`` is integrated by scaling and squaring (``v / 2^K`` composed with itself ``K`` times).

``TwoStepConsistent{Φ, Ψ}[A, B] = √Φ[A,B] ∘ Ψ[Â, B̂] ∘ √Φ[A,B]`` with ``Â = A ∘ √Φ[A,B]``, ``B̂ = B ∘ √Φ[B,A]`` and
``√exp(g) = exp(g / 2)``: both images meet half-way, Ψ registers them there, and the whole stays inverse
consistent whenever Ψ is (Ψ may itself be a TwoStepConsistent, so steps nest to any depth).

Every module here also has ``forward_and_inverse(A, B) -> (Φ_AB, Φ_BA)``, computing both directions from one
pass of each network (the inverse reuses the negated algebra elements), which training and inference use.
Maps follow :mod:`.coordinates` (``I_A ∘ Φ_AB ≈ I_B``, unit-cube coordinates, channels in tensor order).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .coordinates import identity_map, resample_displacement, voxel_scale, sample_at
from .networks import UNet2
from .registration_modules import RegistrationModule, Transform, displacement_transform


def _pool(image: torch.Tensor, times: int) -> torch.Tensor:
    for _ in range(times):
        image = F.avg_pool3d(image, 2, ceil_mode=True)
    return image


def compose_transforms(*transforms: Transform) -> Transform:
    """``t1 ∘ t2 ∘ … ∘ tn`` (the last is applied first)."""
    def composed(coordinates: torch.Tensor) -> torch.Tensor:
        for transform in reversed(transforms):
            coordinates = transform(coordinates)
        return coordinates
    return composed


class InverseConsistentModule(RegistrationModule):
    """A registration module whose Φ[B, A] is Φ[A, B]⁻¹ by construction."""

    def forward_and_inverse(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Transform, Transform]:
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Transform:
        return self.forward_and_inverse(image_A, image_B)[0]


class LieGroupStep(InverseConsistentModule):
    """A step ``exp(N(A, B) − N(B, A))``; subclasses define ``predict`` (N on a batch) and ``exponential``."""

    def predict(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def exponential(self, algebra: torch.Tensor, shape: Sequence[int]) -> Transform:
        raise NotImplementedError  # pragma: no cover - abstract

    def algebra(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        """``N(A, B) − N(B, A)``: one network pass on the batch ``[A; B]`` against ``[B; A]``."""
        batch = image_A.shape[0]
        both = self.predict(torch.cat([image_A, image_B]), torch.cat([image_B, image_A]))
        return both[:batch] - both[batch:]

    def forward_and_inverse(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Transform, Transform]:
        g = self.algebra(image_A, image_B)
        shape = image_A.shape[2:]
        return self.exponential(g, shape), self.exponential(-g, shape)


class AffineEncoder(nn.Module):
    """A strided ConvNet with global average pooling: image pair → 12 numbers (the top 3×4 of a 4×4 matrix).

    The last linear layer starts at zero, so a fresh step predicts the identity.
    """

    def __init__(self, channels: Sequence[int] = (2, 16, 32, 64, 128)):
        super().__init__()
        channels = [int(c) for c in channels]
        self.convs = nn.ModuleList(nn.Conv3d(channels[i], channels[i + 1], kernel_size=3, stride=2, padding=1)
                                   for i in range(len(channels) - 1))
        self.linear = nn.Linear(channels[-1], 12)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image_A, image_B], dim=1)
        for conv in self.convs:
            x = F.leaky_relu(conv(x))
        return self.linear(x.mean(dim=(2, 3, 4))).view(-1, 3, 4)


def affine_exponential(algebra: torch.Tensor) -> torch.Tensor:
    """``exp`` of ``[B, 3, 4]`` algebra elements (4×4 with a zero last row) as ``[B, 4, 4]`` matrices."""
    full = F.pad(algebra, (0, 0, 0, 1))
    return torch.linalg.matrix_exp(full)


def affine_transform(matrix: torch.Tensor) -> Transform:
    """The map ``x ↦ M (x − c) + c`` (``c`` = unit-cube centre) of homogeneous matrices ``[B, 4, 4]``."""
    def transform(coordinates: torch.Tensor) -> torch.Tensor:
        batch = max(matrix.shape[0], coordinates.shape[0])
        centred = (coordinates - 0.5).expand(batch, *coordinates.shape[1:])
        linear = matrix[:, :3, :3].to(coordinates.dtype).expand(batch, 3, 3)
        shift = matrix[:, :3, 3].to(coordinates.dtype).expand(batch, 3)
        moved = torch.einsum("brc,bc...->br...", linear, centred)
        return moved + shift.view(batch, 3, *[1] * (coordinates.dim() - 2)) + 0.5
    return transform


class AffineStep(LieGroupStep):
    """Affine Lie-group step: ``Φ = exp(N(A,B) − N(B,A))`` with ``N`` an :class:`AffineEncoder`."""

    def __init__(self, channels: Sequence[int] = (2, 16, 32, 64, 128)):
        super().__init__()
        self.net = AffineEncoder(channels)

    def predict(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        return self.net(image_A, image_B)

    def exponential(self, algebra: torch.Tensor, shape: Sequence[int]) -> Transform:
        return affine_transform(affine_exponential(algebra))

    def matrices(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The homogeneous matrices ``[B, 4, 4]`` of Φ[A, B] and Φ[B, A] (exact inverses of each other)."""
        g = self.algebra(image_A, image_B)
        return affine_exponential(g), affine_exponential(-g)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of ``exp(v)`` by scaling and squaring: ``φ ← φ ∘ φ`` ``steps`` times from ``Id + v / 2^steps``.

    ``velocity`` ``[B, 3, *S]`` and the result are in the unit-cube map convention on the same grid.
    """
    displacement = velocity / (2 ** steps)
    grid = identity_map(velocity.shape[2:], dtype=velocity.dtype, device=velocity.device)
    for _ in range(steps):
        displacement = displacement + sample_at(displacement, grid + displacement, padding="border")
    return displacement


def bending_energy(field: torch.Tensor) -> torch.Tensor:
    """Mean over voxels and batch of Σ_ij (∂²v/∂x_i∂x_j)², with ``v`` and ``x`` in voxels of the field's grid.

    Second differences are taken inside the grid only (no padding).
    """
    v = field * voxel_scale(field.shape[2:], dtype=field.dtype, device=field.device)
    total = field.new_zeros(())
    dims = field.dim() - 2
    for i in range(dims):
        for j in range(i, dims):
            if i == j:
                n = v.shape[2 + i]
                if n < 3:
                    continue
                second = v.narrow(2 + i, 2, n - 2) - 2 * v.narrow(2 + i, 1, n - 2) + v.narrow(2 + i, 0, n - 2)
                total = total + second.pow(2).mean()
            else:
                first = v.narrow(2 + i, 1, v.shape[2 + i] - 1) - v.narrow(2 + i, 0, v.shape[2 + i] - 1)
                mixed = first.narrow(2 + j, 1, first.shape[2 + j] - 1) - first.narrow(2 + j, 0, first.shape[2 + j] - 1)
                total = total + 2 * mixed.pow(2).mean()
    return total


class SVFStep(LieGroupStep):
    """Stationary-velocity-field step: a UNet2 predicts ``v`` on the images pooled ``downsample`` times;
    ``v = N(A,B) − N(B,A)`` is upsampled to the input grid and integrated by scaling and squaring.

    The last predicted velocity field (both orderings' difference, before upsampling) is kept in
    ``last_velocity`` for the bending-energy regulariser.
    """

    def __init__(self, num_layers: int, channels: Sequence[Sequence[int]], downsample: int = 0,
                 integration_steps: int = 7):
        super().__init__()
        self.net = UNet2(num_layers, channels, dimension=3)
        self.downsample = int(downsample)
        self.integration_steps = int(integration_steps)
        self.last_velocity: Optional[torch.Tensor] = None

    def predict(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        return self.net(_pool(image_A, self.downsample), _pool(image_B, self.downsample))

    def algebra(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        velocity = super().algebra(image_A, image_B)
        self.last_velocity = velocity
        return resample_displacement(velocity, image_A.shape[2:])

    def exponential(self, algebra: torch.Tensor, shape: Sequence[int]) -> Transform:
        return displacement_transform(integrate_velocity(algebra, self.integration_steps))


class TwoStepConsistent(InverseConsistentModule):
    """``TSC{Φ, Ψ}[A, B] = √Φ[A,B] ∘ Ψ[A ∘ √Φ[A,B], B ∘ √Φ[B,A]] ∘ √Φ[A,B]`` (Φ a Lie-group step)."""

    def __init__(self, netPhi: LieGroupStep, netPsi: InverseConsistentModule):  # noqa: N803 (icon names)
        super().__init__()
        if not isinstance(netPhi, LieGroupStep):
            raise TypeError("TwoStepConsistent needs a Lie-group step (affine or SVF) as its first step")
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward_and_inverse(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Transform, Transform]:
        g = self.netPhi.algebra(image_A, image_B)
        shape = image_A.shape[2:]
        root_AB = self.netPhi.exponential(g / 2, shape)
        root_BA = self.netPhi.exponential(-g / 2, shape)
        grid = identity_map(shape, dtype=image_A.dtype, device=image_A.device)
        halfway_A = sample_at(image_A, root_AB(grid), padding="border")
        halfway_B = sample_at(image_B, root_BA(grid), padding="border")
        psi, psi_inverse = self.netPsi.forward_and_inverse(halfway_A, halfway_B)
        return (compose_transforms(root_AB, psi, root_AB), compose_transforms(root_BA, psi_inverse, root_BA))


def velocity_bending_energy(net: nn.Module) -> torch.Tensor:
    """Σ over the SVF steps of ``net`` of the bending energy of their last velocity fields (0 if none ran)."""
    total: Optional[torch.Tensor] = None
    for module in net.modules():
        if isinstance(module, SVFStep) and module.last_velocity is not None:
            energy = bending_energy(module.last_velocity)
            total = energy if total is None else total + energy
    if total is None:
        parameter = next(net.parameters())
        return parameter.new_zeros(())
    return total


def build_constricon(num_layers: int, channels: Sequence[Sequence[int]], affine_steps: int = 2,
                     svf_steps: int = 2, affine_channels: Sequence[int] = (2, 16, 32, 64, 128),
                     integration_steps: int = 7,
                     svf_downsample: Optional[Sequence[int]] = None) -> InverseConsistentModule:
    """``TSC{Ψ1, TSC{Ψ2, … TSC{Ξ1, Ξ2}}}``: ``affine_steps`` affine steps, then ``svf_steps`` SVF steps, the
    i-th SVF step at 1/2^(svf_steps − i) resolution (the last at full resolution). The paper's 3-D network is
    ``affine_steps = svf_steps = 2``.

    ``svf_downsample`` (one whole number ≥ 0 per SVF step, coarse to fine) replaces that schedule: how many
    times each SVF step's inputs are pooled by 2; ``[1, 0, 0]`` mirrors GradICON's
    TwoStep(TwoStep(Down(Ψ1), Ψ2), Ψ3).
    """
    if svf_downsample is None:
        svf_downsample = [svf_steps - 1 - i for i in range(svf_steps)]
    if len(svf_downsample) != svf_steps or any(int(d) < 0 for d in svf_downsample):
        raise ValueError(f"svf_downsample needs {svf_steps} whole numbers ≥ 0, got {list(svf_downsample)}")
    steps: list[LieGroupStep] = [AffineStep(affine_channels) for _ in range(affine_steps)]
    steps += [SVFStep(num_layers, channels, downsample=int(d), integration_steps=integration_steps)
              for d in svf_downsample]
    if not steps:
        raise ValueError("a ConstrICON network needs at least one step")
    net: InverseConsistentModule = steps[-1]
    for step in reversed(steps[:-1]):
        net = TwoStepConsistent(step, net)
    return net
