"""Test helper: an analytic "network" returning a known physical transform, and an oblique test pair.

The network returns T (fixed mm → moving mm) in the network's unit-cube convention, so every exported transform
can be checked against T in physical space (SimpleITK geometry, or Slicer's transform nodes).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image, rotation, tiny_spec
from ICONRegistrationLib.models import LoadedModel
from ICONRegistrationLib.pipeline import Grid
from ICONRegistrationLib.pipeline.preprocessing import normalize_intensities


class AnalyticNetwork(torch.nn.Module):
    """Φ_AB = T and Φ_BA = T⁻¹ for an affine-plus-bulge physical map, on the given network grids."""

    def __init__(self, grid_B: Grid, grid_A: Grid, matrix: np.ndarray, offset: np.ndarray, bulge: float = 0.0):
        super().__init__()
        self.grid_B, self.grid_A = grid_B, grid_A
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        self.offset = torch.as_tensor(offset, dtype=torch.float64)
        self.bulge = bulge
        self.centre = torch.as_tensor(grid_B.unit_to_physical(torch.full((1, 3, 1, 1, 1), 0.5, dtype=torch.float64))
                                      .flatten(), dtype=torch.float64)

    def physical_map(self, points: torch.Tensor) -> torch.Tensor:
        """T(x) = M x + t + bulge · sin(x_0 / 9 mm) along axis 0, in LPS mm. points [B, 3, ...]."""
        out = torch.einsum("rc,bc...->br...", self.matrix, points) + self.offset.view(1, 3, *[1] * (points.dim() - 2))
        if self.bulge:
            out[:, 0] = out[:, 0] + self.bulge * torch.sin((points[:, 0] - self.centre[0]) / 9.0)
        return out

    def inverse_physical_map(self, points: torch.Tensor) -> torch.Tensor:
        assert not self.bulge, "the analytic inverse is only used for affine maps"
        inverse = torch.linalg.inv(self.matrix)
        shifted = points - self.offset.view(1, 3, *[1] * (points.dim() - 2))
        return torch.einsum("rc,bc...->br...", inverse, shifted)

    def forward(self, image_A, image_B):
        # Which pairs are (moving, fixed)? The pipeline may send both directions as one batch or one at a time.
        is_forward = [bool(torch.equal(image_B[k], self.fixed_network_image[0])) for k in range(image_B.shape[0])]

        def transform(coordinates):
            coordinates = coordinates.double()
            if coordinates.shape[0] == 1:
                coordinates = coordinates.expand(len(is_forward), *coordinates.shape[1:])
            outputs = []
            for k, forward in enumerate(is_forward):
                c = coordinates[k:k + 1]
                if forward:
                    outputs.append(self.grid_A.physical_to_unit(self.physical_map(self.grid_B.unit_to_physical(c))))
                elif self.bulge:
                    outputs.append(c)  # only the forward direction is checked with a bulge
                else:
                    outputs.append(self.grid_B.physical_to_unit(
                        self.inverse_physical_map(self.grid_A.unit_to_physical(c))))
            return torch.cat(outputs).float()
        return transform


def oblique_pair():
    """Fixed: oblique and anisotropic. Moving: other size and spacing, axes flipped and transposed."""
    fixed = make_image(blob_volume((36, 44, 40), seed=1), spacing=(1.3, 0.9, 1.7), origin=(-20.0, 15.0, 7.0),
                       direction=rotation(2, 20) @ rotation(0, -10))
    moving_direction = rotation(2, 20) @ rotation(0, -10) @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1]], float)
    moving = make_image(blob_volume((30, 50, 42), seed=2), spacing=(1.1, 1.2, 1.4), origin=(-5.0, 30.0, 60.0),
                        direction=moving_direction)
    return fixed, moving


def analytic_model(fixed, moving, matrix, offset, bulge=0.0) -> LoadedModel:
    spec = tiny_spec()
    grid_B = Grid.over_image(fixed, spec.input_shape)
    grid_A = Grid.over_image(moving, spec.input_shape, align_to=grid_B)
    network = AnalyticNetwork(grid_B, grid_A, matrix, offset, bulge)
    network.fixed_network_image = grid_B.to_network(
        normalize_intensities(sitk.GetArrayFromImage(fixed).astype(np.float32), "mri", spec.preprocessing))
    return LoadedModel(spec, network, torch.device("cpu"), None, None)
