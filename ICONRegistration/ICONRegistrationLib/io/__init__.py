"""File adapters: transforms and displacement images, result folders, the PNG report."""

from .images import read_image
from .results import RESULT_FILES, write_json, write_result
from .transforms import atomic_path, read_displacement_field, write_displacement_field, write_image

__all__ = ["read_image", "RESULT_FILES", "write_json", "write_result", "atomic_path", "read_displacement_field",
           "write_displacement_field", "write_image"]
