"""One progress/cancel convention for every long operation.

A progress callback has the signature ``callback(stage: str, fraction: float) -> bool | None``:
``stage`` names the step ("preprocessing", "network", "instance optimisation", …) and ``fraction``
is the progress of that step in [0, 1]. Returning ``False`` asks the operation to stop; it then
raises :class:`~ICONRegistrationLib.errors.Cancelled` and leaves its inputs untouched.
"""

from __future__ import annotations

from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[str, float], Optional[bool]]


def report(progress: Optional[ProgressCallback], stage: str, fraction: float) -> None:
    """Call ``progress`` if given and raise :class:`Cancelled` when it returns ``False``."""
    if progress is None:
        return
    if progress(stage, float(min(max(fraction, 0.0), 1.0))) is False:
        raise Cancelled(f"cancelled during {stage}")
