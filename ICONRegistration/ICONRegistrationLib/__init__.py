"""ICONRegistrationLib: inverse-consistent deep registration (ICON, GradICON, uniGradICON) for SimpleITK images.

Public API::

    from ICONRegistrationLib import register, warp, build_network, identity_map, ModelSpec, UserError
    result = register(fixed, moving, "unigradicon", fixed_modality="mri", moving_modality="mri")

Names are imported on first use: ``import ICONRegistrationLib`` (and the zoo, errors and progress modules)
does not import torch, so a GUI can list models before torch is installed. The pipeline imports torch, numpy
and SimpleITK only.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "identity_map": ".core.coordinates", "Cancelled": ".errors", "UserError": ".errors",
    "DEFAULT_MODEL": ".models.zoo", "ModelSpec": ".models.spec", "build_network": ".models.build",
    "load_model": ".models.weights", "Grid": ".pipeline.grid", "RegistrationResult": ".pipeline.registration",
    "register": ".pipeline.registration", "warp": ".pipeline.resampling",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
