"""The registration pipeline: SimpleITK images in, fields, warped image and QA maps out."""

from .grid import Grid
from .register import RegistrationResult, register
from .warp import as_transform, warp

__all__ = ["Grid", "RegistrationResult", "register", "as_transform", "warp"]
