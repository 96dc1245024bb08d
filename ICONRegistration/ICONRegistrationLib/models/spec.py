"""``ModelSpec``: everything needed to build, feed and load a registration network, as JSON."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

ARCHITECTURES = ("gradicon", "constricon", "sitreg")
SIMILARITIES = ("lncc", "lncc2", "squared_lncc", "ssd", "mind", "mind_ssc", "mindssc")
REQUIRED_FIELDS = ("name", "unet", "input_shape", "similarity", "lambda", "preprocessing")
REQUIRED_FIELDS_HELP = {"name": "the model's name", "unet": '{"num_layers": N, "channels": [[down…], [up…]]}',
                        "input_shape": "the network grid [D, H, W] in voxels",
                        "similarity": 'the objective of training and instance optimisation, e.g. {"name": "lncc", '
                                      '"sigma": 5}',
                        "lambda": "the regularisation weight, e.g. 1.5",
                        "preprocessing": 'the intensity rules, e.g. {"ct_window": [-1000, 1000], '
                                         '"mri_percentile": 99}'}
MAX_REFINEMENTS = 3  # recursive test-time refinements (ModelSpec.test_time_refinements, register(refinements=…))
# The training regulariser each architecture's paper uses (``iconreg train --penalty`` overrides it).
DEFAULT_PENALTIES = {"gradicon": "gradicon", "constricon": "bending", "sitreg": "diffusion"}
# The keys each object of a spec may hold: any other key (a misspelt one) would be ignored and its default used.
OPTION_KEYS = {"gradicon": ("final_steps", "penalty"),
               "constricon": ("affine_steps", "svf_steps", "affine_channels", "integration_steps", "svf_downsample",
                              "penalty"),
               "sitreg": ("max_gradient", "inversion_tolerance", "penalty")}
SIMILARITY_KEYS = {"lncc": ("sigma",), "lncc2": ("sigma",), "squared_lncc": ("sigma",), "ssd": (),
                   "mind": ("radius", "dilation"), "mind_ssc": ("radius", "dilation"),
                   "mindssc": ("radius", "dilation")}
PREPROCESSING_KEYS = ("ct_window", "mri_percentile", "scale_max_to", "require_mask")
WEIGHTS_KEYS = ("url", "sha256", "file", "bundled")


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
      ``affine_channels``, ``integration_steps`` (7), ``svf_downsample`` (per SVF step, coarse to fine, how
      many times its inputs are pooled by 2; default ``svf_steps − 1 … 0``); sitreg: ``max_gradient`` (0.9),
      ``inversion_tolerance`` (voxels, 1e-3); gradicon: ``final_steps`` (1: how many full-resolution steps
      ``last_step`` adds, each refining the composed map so far); any: ``penalty`` (the training regulariser).
    * ``input_shape``: the network grid ``[D, H, W]`` (tensor axis order) both images are resampled to.
    * ``similarity`` / ``lambda``: the training and instance-optimisation objective.
    * ``preprocessing``: intensity rules, see :mod:`ICONRegistrationLib.pipeline.preprocessing`.
    * ``weights``: ``{"url", "sha256", "file"}``; ``sha256`` may be ``null`` when unknown.
    * ``test_time_flips``: network-grid tensor axes (0 = D, 1 = H, 2 = W) whose flips ``register()`` averages over
      by default (the mean displacement over every combination of flips of both images, ``2^k`` network passes
      per direction); list only axes the model was trained to flip (``iconreg train --flip-axes``). Default
      ``[]``: one prediction.
    * ``test_time_refinements``: how many times ``register()`` refines the network's prediction by default
      (0…:data:`MAX_REFINEMENTS`): each refinement registers the moving image warped so far to the fixed image
      again and composes the correction, ``Φ ← Φ ∘ Ψ[A ∘ Φ, B]`` (one more prediction each). Default 0.
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
    test_time_flips: list = dataclasses.field(default_factory=list)
    test_time_refinements: int = 0
    description: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)
        smallest = self.minimum_size
        if min(self.input_shape) < smallest:
            raise UserError(f"Model '{self.name}': every input_shape size must be ≥ {smallest} for {self.levels} "
                            f"levels of {self.unet['num_layers']}-layer UNets, got {self.input_shape}.")

    @property
    def coarsest_pooling(self) -> int:
        """How many times the coarsest UNet's input is pooled by 2."""
        if self.architecture == "constricon":
            if "svf_downsample" in self.options:
                return max(self.options["svf_downsample"], default=0)
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
        """A spec from its JSON form. ``name``, ``unet``, ``input_shape``, ``similarity``, ``lambda`` and
        ``preprocessing`` are required (a default for any of them would silently change the result; the network's
        structure — architecture, levels, last step — is checked by the strict weight loading); every field is
        checked by type and range. A key that nothing would read is refused rather than ignored: any unknown key of
        ``options`` (per architecture), ``similarity`` (per similarity), ``preprocessing`` and ``weights``, and a
        top-level key that looks like a misspelt field (other top-level keys are kept in ``extra`` as notes)."""
        if not isinstance(data, dict):
            raise UserError(f"A model spec must be a JSON object, got {type(data).__name__}.")
        data = copy.deepcopy(dict(data))
        if "lambda" in data:
            data["lmbda"] = data.pop("lambda")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        for key in extra:  # free metadata (licence, use, validation…) is kept; a misspelt field is not
            close = difflib.get_close_matches(key, sorted((known | {"lambda"}) - {"lmbda", "extra"}), n=1, cutoff=0.8)
            if close:
                raise UserError(f"Model spec '{data.get('name', '?')}' has a field '{key}': did you mean "
                                f"'{close[0]}'? (Unknown fields are kept as notes, so this one would be ignored.)")
        for required in REQUIRED_FIELDS:
            if {"lambda": "lmbda"}.get(required, required) not in data:
                raise UserError(f"Model spec '{data.get('name', '?')}' has no '{required}' field; it is required "
                                f"({REQUIRED_FIELDS_HELP[required]}).")
        spec = cls(**data)
        spec.extra.update(extra)
        return spec

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
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
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @property
    def sha256(self) -> Optional[str]:
        return self.weights.get("sha256")


def _fail(spec_name: str, field: str, expected: str, value: Any) -> None:
    raise UserError(f"Model spec '{spec_name}': field '{field}' must be {expected}, got {value!r}.")


def are_flip_axes(axes: list) -> bool:
    """Whether ``axes`` (ints) are distinct tensor axes 0, 1, 2 of the network grid: the rule for a spec's
    ``test_time_flips`` and for ``register(flips=…)``."""
    return all(axis in (0, 1, 2) for axis in axes) and len(set(axes)) == len(axes)


def _whole(value: Any) -> Optional[int]:
    """``value`` as an int if it is a whole number (``36`` or ``36.0``; never ``36.7``, ``True`` or ``"36"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _plain_file_name(value: Any) -> bool:
    """A non-empty name of a file in a folder (no separators, not ``.`` or ``..``)."""
    return (isinstance(value, str) and value.strip() != "" and value not in (".", "..")
            and Path(value).name == value and "\\" not in value)


def _check_keys(spec_name: str, field: str, value: dict, allowed: tuple, context: str = "") -> None:
    """Refuse a key of the spec object ``field`` that is not in ``allowed`` (it would be silently ignored)."""
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            known = ", ".join(allowed) or "none"
            raise UserError(f"Model spec '{spec_name}': field '{field}' has an unknown key '{key}' that would be "
                            f"ignored ({hint}known{context}: {known}).")


def _validate(spec: ModelSpec) -> None:
    """Check every field by type and range (a message names the field); normalise whole numbers to ``int``."""
    if not _plain_file_name(spec.name):
        _fail(str(spec.name), "name", "a non-empty name without folders (it names the cache folder)", spec.name)
    name = spec.name
    if spec.architecture not in ARCHITECTURES:
        raise UserError(f"Model '{name}': unknown architecture '{spec.architecture}' "
                        f"(known: {', '.join(ARCHITECTURES)}).")
    unet = spec.unet
    if not isinstance(unet, dict) or set(unet) - {"num_layers", "channels"} or "channels" not in unet:
        _fail(name, "unet", '{"num_layers": N, "channels": [[down…], [up…]]}', unet)
    layers = _whole(unet.get("num_layers", 5))
    channels = unet["channels"]
    if layers is None or layers < 1:
        _fail(name, "unet.num_layers", "a whole number ≥ 1", unet.get("num_layers"))
    if (not isinstance(channels, list) or len(channels) != 2 or not all(isinstance(c, list) for c in channels)
            or any(_whole(n) is None or _whole(n) < 1 for c in channels for n in c)):
        _fail(name, "unet.channels", "two lists of whole numbers ≥ 1 ([[down…], [up…]])", channels)
    if len(channels[0]) != layers + 1 or len(channels[1]) != layers:
        _fail(name, "unet.channels", f"[{layers + 1} down sizes, {layers} up sizes] for num_layers {layers}",
              channels)
    spec.unet = {"num_layers": layers, "channels": [[_whole(n) for n in c] for c in channels]}
    levels = _whole(spec.levels)
    if levels is None or levels < 1:
        _fail(name, "levels", "a whole number ≥ 1", spec.levels)
    spec.levels = levels
    if not isinstance(spec.last_step, bool):
        _fail(name, "last_step", "true or false", spec.last_step)
    shape = spec.input_shape
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or any(_whole(n) is None or _whole(n) < 2 for n in shape)):
        _fail(name, "input_shape", "three whole numbers ≥ 2 ([D, H, W] voxels)", shape)
    spec.input_shape = [_whole(n) for n in shape]
    similarity = spec.similarity
    if not isinstance(similarity, dict) or str(similarity.get("name", "")).lower().replace("-", "_") \
            not in SIMILARITIES:
        _fail(name, "similarity", f'{{"name": one of {", ".join(SIMILARITIES)}, …}}', similarity)
    similarity_name = str(similarity["name"]).lower().replace("-", "_")
    _check_keys(name, "similarity", similarity, ("name",) + SIMILARITY_KEYS[similarity_name],
                f" for {similarity_name}")
    spec.similarity = {**similarity, "name": similarity_name}  # one spelling for code that compares names
    for key in ("sigma", "radius", "dilation"):
        if key in similarity and (_number(similarity[key]) is None or similarity[key] <= 0):
            _fail(name, f"similarity.{key}", "a positive number", similarity[key])
    lmbda = _number(spec.lmbda)
    if lmbda is None or lmbda < 0:
        _fail(name, "lambda", "a number ≥ 0", spec.lmbda)
    spec.lmbda = lmbda
    rules = spec.preprocessing
    if not isinstance(rules, dict):
        _fail(name, "preprocessing", "an object", rules)
    _check_keys(name, "preprocessing", rules, PREPROCESSING_KEYS)
    window = rules.get("ct_window")
    if window is not None and (not isinstance(window, list) or len(window) != 2
                               or any(_number(v) is None for v in window) or window[0] >= window[1]):
        _fail(name, "preprocessing.ct_window", "[low, high] Hounsfield units with low < high", window)
    percentile = rules.get("mri_percentile")
    if percentile is not None and (_number(percentile) is None or not 0 < percentile <= 100):
        _fail(name, "preprocessing.mri_percentile", "a number in (0, 100]", percentile)
    if "scale_max_to" in rules and (_number(rules["scale_max_to"]) is None or rules["scale_max_to"] <= 0):
        _fail(name, "preprocessing.scale_max_to", "a positive number", rules["scale_max_to"])
    if not isinstance(rules.get("require_mask", False), bool):
        _fail(name, "preprocessing.require_mask", "true or false", rules["require_mask"])
    weights = spec.weights
    if not isinstance(weights, dict):
        _fail(name, "weights", '{"file", "url", "sha256"}', weights)
    _check_keys(name, "weights", weights, WEIGHTS_KEYS)
    if not isinstance(weights.get("bundled", False), bool):
        _fail(name, "weights.bundled", "true or false", weights["bundled"])
    sha = weights.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdef" for c in sha.lower())):
        _fail(name, "weights.sha256", "64 hexadecimal digits or null", sha)
    if weights.get("url") is not None and not isinstance(weights["url"], str):
        _fail(name, "weights.url", "a string", weights["url"])
    if weights.get("file") is not None and not _plain_file_name(weights["file"]):
        _fail(name, "weights.file", "a file name without folders", weights["file"])
    if not isinstance(spec.options, dict):
        _fail(name, "options", "an object", spec.options)
    for key, smallest in (("affine_steps", 0), ("svf_steps", 0), ("integration_steps", 1), ("final_steps", 1)):
        if key in spec.options and (_whole(spec.options[key]) is None or spec.options[key] < smallest):
            _fail(name, f"options.{key}", f"a whole number ≥ {smallest}", spec.options[key])
    if "svf_downsample" in spec.options:
        poolings = spec.options["svf_downsample"]
        steps = spec.options.get("svf_steps", 2)
        if (spec.architecture != "constricon" or not isinstance(poolings, list) or len(poolings) != steps
                or any(_whole(d) is None or d < 0 for d in poolings)):
            _fail(name, "options.svf_downsample", "a list of svf_steps whole numbers ≥ 0 (constricon only)",
                  poolings)
    if "final_steps" in spec.options and not (spec.architecture == "gradicon" and spec.last_step):
        _fail(name, "options.final_steps", "absent unless the architecture is gradicon with last_step true",
              spec.options["final_steps"])
    for key in ("max_gradient", "inversion_tolerance"):
        if key in spec.options and (_number(spec.options[key]) is None or spec.options[key] <= 0):
            _fail(name, f"options.{key}", "a positive number", spec.options[key])
    if "max_gradient" in spec.options and spec.options["max_gradient"] >= 1:  # SITReg's updates must stay invertible
        _fail(name, "options.max_gradient", "a number in (0, 1)", spec.options["max_gradient"])
    if "penalty" in spec.options and spec.options["penalty"] not in ("gradicon", "icon", "bending", "diffusion"):
        _fail(name, "options.penalty", "gradicon, icon, bending or diffusion", spec.options["penalty"])
    _check_keys(name, "options", spec.options, OPTION_KEYS[spec.architecture], f" for {spec.architecture}")
    flips = spec.test_time_flips
    if not isinstance(flips, list) or not are_flip_axes([_whole(a) for a in flips]):
        _fail(name, "test_time_flips", "a list of distinct tensor axes 0, 1, 2", flips)
    spec.test_time_flips = sorted(_whole(a) for a in flips)
    refinements = _whole(spec.test_time_refinements)
    if refinements is None or not 0 <= refinements <= MAX_REFINEMENTS:
        _fail(name, "test_time_refinements", f"a whole number from 0 to {MAX_REFINEMENTS}",
              spec.test_time_refinements)
    spec.test_time_refinements = refinements
