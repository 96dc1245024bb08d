"""Training data: volumes (and optional label maps) listed by :mod:`~ICONRegistrationLib.datasets`, resampled once
onto a spec's grid.

Volumes are preprocessed with the spec's rules and placed on the network grid exactly as :func:`register` does
(:meth:`Grid.over_image`), so training sees what inference sees. Labels (for validation Dice and the optional label
loss) are resampled nearest-neighbour. A prepared set can be saved as one compact file (float16 images, uint8 labels).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..datasets import VolumeEntry
from ..errors import UserError
from ..io.atomic import atomic_path
from ..io.images import read_image
from ..models.spec import ModelSpec
from ..pipeline.grid import Grid
from ..pipeline.images import image_array
from ..pipeline.preprocessing import check_modality, normalize_intensities

@dataclasses.dataclass
class PreparedSet:
    """Volumes on the network grid: ``images`` float16 ``[N, 1, D, H, W]`` in [0, 1], ``labels`` uint8 or None."""

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    names: list[str]
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        return self.images.shape[0]

    def check_grid(self, spec: ModelSpec, role: str) -> None:
        """Raise :class:`UserError` unless the volumes (and labels) lie on ``spec``'s network grid: a set prepared
        for another grid would train or validate the network at a resolution it is never used at. ``role`` names
        the set in the message."""
        expected = tuple(int(n) for n in spec.input_shape)
        shapes = {tuple(self.shape), tuple(self.images.shape[2:])}
        if self.labels is not None:
            shapes.add(tuple(self.labels.shape[2:]))
        if shapes != {expected}:
            found = " and ".join("×".join(map(str, shape)) for shape in sorted(shapes))
            raise UserError(f"The {role} data are on a {found} grid, not on the spec '{spec.name}''s network grid "
                            f"{'×'.join(map(str, expected))}; prepare them again with this spec (iconreg train "
                            "--data FOLDER --save-prepared).")

    def identity(self) -> dict:
        """What identifies the set in a checkpoint: its volume names (in order) and grid."""
        return {"names": list(self.names), "shape": [int(n) for n in self.shape]}

    def save(self, path: str | Path) -> None:
        """A compressed ``.npz`` (float16 images, uint8 labels; about 1/6 of the raw size for skull-stripped
        brains, whose background is zero), written atomically."""
        path = Path(path)
        arrays = {"images": self.images.to(torch.float16).numpy(), "names": np.array(self.names),
                  "shape": np.array(self.shape, dtype=np.int64)}
        if self.labels is not None:
            arrays["labels"] = self.labels.to(torch.uint8).numpy()
        with atomic_path(path) as temporary, open(temporary, "wb") as stream:
            np.savez_compressed(stream, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "PreparedSet":
        """A set written by :meth:`save` (``.npz``; the older ``.pt`` layout also loads)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Prepared data '{path}' does not exist.")
        if path.suffix == ".pt":
            data = torch.load(str(path), map_location="cpu", weights_only=True)
            return cls(data["images"], data["labels"], list(data["names"]), tuple(data["shape"]))
        try:
            with np.load(path, allow_pickle=False) as data:
                labels = torch.from_numpy(data["labels"]) if "labels" in data else None
                return cls(torch.from_numpy(data["images"]), labels, [str(n) for n in data["names"]],
                           tuple(int(n) for n in data["shape"]))
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"'{path}' is not prepared training data ({error}).") from None


PREPARED_SUFFIXES = (".npz", ".pt")


def labels_to_network(labels: np.ndarray, grid: Grid) -> torch.Tensor:
    """A label map (tensor order, on the image the grid was placed over) onto the grid, nearest neighbour."""
    tensor = torch.as_tensor(np.ascontiguousarray(labels)).permute(*grid.source_axes)
    flips = [t for t in range(3) if grid.flipped[t]]
    if flips:
        tensor = tensor.flip(flips)
    tensor = tensor[None, None].float()
    return F.interpolate(tensor, size=grid.shape, mode="nearest-exact").to(torch.uint8)


def prepare(entries: Sequence[VolumeEntry], spec: ModelSpec, modality: str = "auto") -> PreparedSet:
    """Read, normalise and resample every entry onto ``spec``'s network grid (as :func:`register` does)."""
    shape = tuple(spec.input_shape)
    images, labels, names = [], [], []
    with_labels = all(e.label is not None for e in entries)
    for entry in entries:
        image = read_image(entry.image, "training")
        voxels = image_array(image, entry.image.name)
        grid = Grid.over_image(image, shape)
        normalized = normalize_intensities(voxels, check_modality(modality, voxels, "training"), spec.preprocessing)
        images.append(grid.to_network(normalized).clamp_(0, 1).to(torch.float16))
        if with_labels:
            label = sitk.GetArrayFromImage(read_image(entry.label, "label"))
            if label.shape != voxels.shape:
                raise UserError(f"Label map '{entry.label}' does not match its image's size.")
            labels.append(labels_to_network(label.astype(np.int64), grid))
        names.append(entry.image.name)
    return PreparedSet(torch.cat(images), torch.cat(labels) if with_labels else None, names, shape)
