"""ICONRegistrationLib: inverse-consistent deep registration (ICON, GradICON, uniGradICON) for SimpleITK images.

Public API::

    from ICONRegistrationLib import register, warp, build_network, identity_map, ModelSpec, UserError
    result = register(fixed, moving, "unigradicon", fixed_modality="mri", moving_modality="mri")

Names are imported on first use: ``import ICONRegistrationLib`` (and the zoo, errors and progress modules)
does not import torch, so a GUI can list models before torch is installed. The pipeline imports torch, numpy
and SimpleITK only.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "identity_map": ".core.coordinates", "Cancelled": ".errors", "UserError": ".errors",
    "DEFAULT_MODEL": ".models.zoo", "ModelSpec": ".models.spec", "build_network": ".models.build",
    "load_model": ".models.weights", "Grid": ".pipeline.grid", "RegistrationResult": ".pipeline.registration",
    "register": ".pipeline.registration", "warp": ".pipeline.resampling",
}

__all__ = [*_EXPORTS, "__version__"]


__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from .core.coordinates import identity_map
    from .errors import Cancelled, UserError
    from .models.build import build_network
    from .models.spec import ModelSpec
    from .models.weights import load_model
    from .models.zoo import DEFAULT_MODEL
    from .pipeline.grid import Grid
    from .pipeline.registration import RegistrationResult, register
    from .pipeline.resampling import warp
