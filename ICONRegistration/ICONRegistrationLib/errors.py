"""The one exception type for mistakes a user can make, the cancellation signal, and how front ends collect the
engine's warnings to show them."""

from __future__ import annotations

import logging
import warnings
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad input image, missing weights, unknown model, no GPU…).

    The message says what is wrong and what to do; front ends show it instead of a traceback.
    """


class Cancelled(Exception):
    """Raised when a progress callback asked to stop a long operation."""


def collect_user_warnings(call: Callable[[], T], log: bool = True) -> tuple[T, list[str]]:
    """Run ``call()`` and return its result with the texts of the ``UserWarning`` warnings it gave (each once, in order),
    so that a front end can show them (the Slicer module's status line, the web page, the command line's
    ``iconreg: warning:`` lines) instead of leaving them in a log. With ``log``, every warning is also logged.
    Exceptions propagate unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = call()
    for warning in caught if log else ():
        logging.warning("ICONRegistration: %s: %s", warning.category.__name__, warning.message)
    said = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
    return result, list(dict.fromkeys(said))
