"""The registration pipeline: SimpleITK images in, fields, warped image and QA maps out.

Names are imported on first use, so numpy-only helpers (``preprocessing.guess_modality``) load without torch.
"""

import importlib

_EXPORTS = {"Grid": ".grid", "RegistrationResult": ".registration", "register": ".registration",
            "as_transform": ".resampling", "warp": ".resampling"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
