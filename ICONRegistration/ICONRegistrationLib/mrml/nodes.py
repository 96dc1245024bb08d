"""MRML nodes ↔ SimpleITK images and displacement fields.

MRML geometry is RAS millimetres (``IJKToRAS``); SimpleITK is LPS. Every conversion between the two goes
through :func:`ICONRegistrationLib.frames.flip_lps_ras`. Voxel arrays keep their order (k, j, i) and dtype.
Works in Slicer and under the ``slicer-core`` wheel (no ``qt``, no ``slicer.app``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import UserError
from ..frames import LPS_RAS_FLIP, flip_lps_ras


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_geometry_ras(volume_node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(origin, spacing, directions)`` of a volume in world RAS mm; directions are columns (i, j, k axes).

    Without a parent transform the node's own values are returned unchanged (bit-exact round trips). A linear
    parent transform is folded in, so the image is where the user sees it; a non-linear one raises
    :class:`UserError` (harden it first, in the Transforms module).
    """
    origin = np.array(volume_node.GetOrigin(), dtype=float)
    spacing = np.array(volume_node.GetSpacing(), dtype=float)
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return origin, spacing, directions
    if not parent.IsTransformToWorldLinear():
        if parent.GetAttribute("ICONRegistration.metrics") is not None:  # an earlier registration's result
            raise UserError(f"Volume '{volume_node.GetName()}' is under '{parent.GetName()}', the result of an "
                            "earlier registration: take it out of that transform (Data module) to register its "
                            "original voxels again (hardening it would register the warped image instead).")
        raise UserError(f"Volume '{volume_node.GetName()}' is under the non-linear transform "
                        f"'{parent.GetName()}'; harden that transform (Transforms module) before registering.")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    world = _matrix_to_numpy(to_world) @ _matrix_to_numpy(ijk_to_ras)
    columns = world[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    return world[:3, 3].copy(), spacing, columns / spacing


def image_from_volume(volume_node) -> sitk.Image:
    """A SimpleITK image (LPS) with a copy of ``volume_node``'s voxels and its world geometry."""
    if volume_node is None or volume_node.GetImageData() is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise UserError(f"Volume '{name}' has no image data; load or select another volume.")
    voxels = slicer.util.arrayFromVolume(volume_node)
    components = volume_node.GetImageData().GetNumberOfScalarComponents()
    image = sitk.GetImageFromArray(np.array(voxels, copy=True), isVector=components > 1)
    origin, spacing, directions = volume_geometry_ras(volume_node)
    image.SetOrigin(tuple(float(v) for v in flip_lps_ras(origin)))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in (LPS_RAS_FLIP @ directions).ravel()))
    return image


def update_volume_from_image(volume_node, image: sitk.Image) -> None:
    """Set ``volume_node``'s voxels (a copy, same dtype) and IJKToRAS from a SimpleITK image (LPS)."""
    voxels = sitk.GetArrayFromImage(image)
    slicer.util.updateVolumeFromArray(volume_node, voxels)
    volume_node.SetOrigin(*(float(v) for v in flip_lps_ras(np.array(image.GetOrigin()))))
    volume_node.SetSpacing(*(float(v) for v in image.GetSpacing()))
    directions = LPS_RAS_FLIP @ np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    volume_node.SetIJKToRASDirections(directions)


def grid_transform_from_field(field: sitk.Image) -> "slicer.vtkOrientedGridTransform":
    """A ``vtkOrientedGridTransform`` (RAS mm) equal to the displacement field ``field`` (LPS mm vectors).

    As a transform it maps ``x ↦ x + u(x)``; set as a node's *from parent* transform it resamples, exactly as
    the field does as an ITK ``DisplacementFieldTransform``.
    """
    if field.GetNumberOfComponentsPerPixel() != 3 or field.GetDimension() != 3:
        raise UserError("A 3-D displacement field with three components per voxel is needed.")
    vectors = flip_lps_ras(sitk.GetArrayViewFromImage(field).astype(np.float64)).reshape(-1, 3)
    grid = vtk.vtkImageData()
    grid.SetDimensions(*field.GetSize())
    grid.SetSpacing(*field.GetSpacing())
    grid.SetOrigin(*flip_lps_ras(np.array(field.GetOrigin())))
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors), deep=True, array_type=vtk.VTK_DOUBLE)
    array.SetName("displacement")
    grid.GetPointData().SetScalars(array)
    direction = np.eye(4)
    direction[:3, :3] = LPS_RAS_FLIP @ np.array(field.GetDirection(), dtype=float).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(_numpy_to_matrix(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def field_from_grid_transform(transform) -> sitk.Image:
    """The displacement field (LPS mm, vector float64) held by a ``vtkOrientedGridTransform``."""
    grid = transform.GetDisplacementGrid()
    if grid is None:
        raise UserError("The grid transform holds no displacement grid.")
    size = grid.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).astype(np.float64)
    vectors = vectors * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    field = sitk.GetImageFromArray(flip_lps_ras(vectors.reshape(size[2], size[1], size[0], 3)), isVector=True)
    field.SetSpacing(grid.GetSpacing())
    field.SetOrigin(tuple(float(v) for v in flip_lps_ras(np.array(grid.GetOrigin()))))
    direction = np.eye(3)
    matrix = transform.GetGridDirectionMatrix()
    if matrix is not None:
        direction = _matrix_to_numpy(matrix)[:3, :3]
    field.SetDirection(tuple(float(v) for v in (LPS_RAS_FLIP @ direction).ravel()))
    return field
