"""ICONRegistrationLib: inverse-consistent deep registration (ICON, GradICON, uniGradICON) for SimpleITK images.

Public API::

    from ICONRegistrationLib import register, warp, build_network, identity_map, ModelSpec, UserError
    result = register(fixed, moving, "unigradicon", fixed_modality="mri", moving_modality="mri")

Importing this package imports torch, numpy and SimpleITK only.
"""

from .core.coordinates import identity_map
from .errors import Cancelled, UserError
from .models import DEFAULT_MODEL, ModelSpec, build_network, load_model
from .pipeline import Grid, RegistrationResult, register, warp

__version__ = "0.1.0"

__all__ = ["identity_map", "Cancelled", "UserError", "DEFAULT_MODEL", "ModelSpec", "build_network", "load_model",
           "Grid", "RegistrationResult", "register", "warp", "__version__"]
