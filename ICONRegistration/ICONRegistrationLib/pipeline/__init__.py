"""The registration pipeline: SimpleITK images in, fields, warped image and QA maps out.

Names are imported on first use, so numpy-only helpers (``preprocessing.guess_modality``) load without torch.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"Grid": ".grid", "RegistrationResult": ".registration", "register": ".registration",
            "as_transform": ".resampling", "warp": ".resampling"}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .grid import Grid
    from .registration import RegistrationResult, register
    from .resampling import as_transform, warp
