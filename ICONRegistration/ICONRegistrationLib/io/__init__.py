"""File adapters: the one image reader, transforms and displacement images, result folders, the PNG report.

Names are imported on first use (the pipeline imports the image reader; the result writer imports nothing of the
pipeline at run time).
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"read_image": ".images", "RESULT_FILES": ".results", "write_json": ".results",
            "write_result": ".results", "atomic_path": ".atomic", "result_folder": ".atomic",
            "check_output_file": ".atomic", "check_output_folder": ".atomic", "read_displacement_field": ".transforms",
            "write_displacement_field": ".transforms", "write_image": ".transforms"}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .images import read_image
    from .results import RESULT_FILES, write_json, write_result
    from .atomic import atomic_path, check_output_file, check_output_folder, result_folder
    from .transforms import read_displacement_field, write_displacement_field, write_image
