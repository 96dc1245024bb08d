"""The MRML (scene) layer: Slicer nodes ↔ the registration pipeline. Imports ``slicer`` and ``vtk``, never ``qt``."""
