"""The one exception type for mistakes a user can make, and the cancellation signal."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input image, missing weights, unknown model, no GPU…).

    The message says what is wrong and what to do; front ends show it instead of a traceback.
    """


class Cancelled(Exception):
    """Raised when a progress callback asked to stop a long operation."""
