"""``ModelSpec``: everything needed to build, feed and load a registration network, as JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

ARCHITECTURES = ("gradicon", "constricon", "sitreg")
# The training regulariser each architecture's paper uses (``iconreg train --penalty`` overrides it).
DEFAULT_PENALTIES = {"gradicon": "gradicon", "constricon": "bending", "sitreg": "diffusion"}


@dataclasses.dataclass
class ModelSpec:
    """A model description (JSON on disk; see ``to_dict`` for the layout).

    * ``architecture``: ``"gradicon"`` — GradICON / uniGradICON multi-resolution network;
      ``"constricon"`` — ConstrICON, inverse consistent by construction (affine and SVF Lie-group steps nested
      in TwoStepConsistent); ``"sitreg"`` — SITReg-style symmetric multi-resolution network with a
      deformation-inversion layer. See :func:`ICONRegistrationLib.models.build.build_network`.
    * ``unet``: ``{"num_layers": 5, "channels": [[down…], [up…]]}`` of every step's UNet2.
    * ``levels``: resolution levels; 3 means Ψ1 at 1/4, Ψ2 at 1/2, Ψ3 at full resolution (gradicon, sitreg).
    * ``last_step``: add Ψ4 at full resolution after the pyramid (gradicon only).
    * ``options``: architecture-specific settings — constricon: ``affine_steps`` (2), ``svf_steps`` (2),
      ``affine_channels``, ``integration_steps`` (7); sitreg: ``max_gradient`` (0.9),
      ``inversion_tolerance`` (voxels, 1e-3); any: ``penalty`` (the training regulariser).
    * ``input_shape``: the network grid ``[D, H, W]`` (tensor axis order) both images are resampled to.
    * ``similarity`` / ``lambda``: the training and instance-optimisation objective.
    * ``preprocessing``: intensity rules, see :mod:`ICONRegistrationLib.pipeline.preprocessing`.
    * ``weights``: ``{"url", "sha256", "file"}``; ``sha256`` may be ``null`` when unknown.
    """

    name: str
    architecture: str = "gradicon"
    unet: dict = dataclasses.field(default_factory=lambda: {
        "num_layers": 5, "channels": [[2, 16, 32, 64, 256, 512], [16, 32, 64, 128, 256]]})
    levels: int = 3
    last_step: bool = True
    input_shape: list = dataclasses.field(default_factory=lambda: [175, 175, 175])
    similarity: dict = dataclasses.field(default_factory=lambda: {"name": "lncc", "sigma": 5})
    lmbda: float = 1.5
    preprocessing: dict = dataclasses.field(default_factory=lambda: {"ct_window": [-1000, 1000], "mri_percentile": 99})
    weights: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"Model '{self.name}': unknown architecture '{self.architecture}' "
                            f"(known: {', '.join(ARCHITECTURES)}).")
        if len(self.input_shape) != 3 or any(int(n) < 2 for n in self.input_shape):
            raise UserError(f"Model '{self.name}': input_shape must be three sizes ≥ 2, got {self.input_shape}.")
        if int(self.levels) < 1:
            raise UserError(f"Model '{self.name}': levels must be ≥ 1.")
        self.input_shape = [int(n) for n in self.input_shape]
        self.levels = int(self.levels)
        smallest = self.minimum_size
        if min(self.input_shape) < smallest:
            raise UserError(f"Model '{self.name}': every input_shape size must be ≥ {smallest} for {self.levels} "
                            f"levels of {self.unet['num_layers']}-layer UNets, got {self.input_shape}.")

    @property
    def coarsest_pooling(self) -> int:
        """How many times the coarsest UNet's input is pooled by 2."""
        if self.architecture == "constricon":
            return max(int(self.options.get("svf_steps", 2)) - 1, 0)
        return self.levels - 1

    @property
    def minimum_size(self) -> int:
        """Smallest grid size per axis: the coarsest level's UNet must keep ≥ 2 voxels at its deepest layer."""
        return 2 ** self.coarsest_pooling * 2 ** (int(self.unet["num_layers"]) - 1) + 1

    @property
    def penalty(self) -> str:
        """The training regulariser: ``options["penalty"]`` or the architecture's (gradicon, bending, diffusion)."""
        return str(self.options.get("penalty", DEFAULT_PENALTIES[self.architecture]))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = copy.deepcopy(dict(data))
        if "lambda" in data:
            data["lmbda"] = data.pop("lambda")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        if "name" not in data:
            raise UserError("A model spec needs a 'name'.")
        spec = cls(**data)
        spec.extra.update(extra)
        return spec

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"Model spec file '{path}' does not exist.") from None
        except json.JSONDecodeError as error:
            raise UserError(f"Model spec file '{path}' is not valid JSON: {error}.") from None
        spec = cls.from_dict(data)
        spec.extra.setdefault("spec_dir", str(path.resolve().parent))
        return spec

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lambda"] = data.pop("lmbda")
        extra = data.pop("extra")
        data.update({k: v for k, v in extra.items() if k != "spec_dir"})
        return data

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def sha256(self) -> Optional[str]:
        return self.weights.get("sha256")
