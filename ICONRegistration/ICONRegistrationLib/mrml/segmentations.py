"""Moving segmentations through a registration with Slicer's own resampling (every segment, names, colours and
overlaps kept)."""

from __future__ import annotations

import slicer
import vtk

from ..errors import UserError


def move_segmentation(scene, segmentationNode, reference, to_reference):
    """A new segmentation node: each segment's binary labelmap of ``segmentationNode``, in the segmentation's own
    coordinates, resampled nearest-neighbour through ``to_reference`` (a VTK transform, reference → segmentation
    world points) onto ``reference``'s voxel grid; placed under the reference volume's parent transform. On any
    failure the new node is removed."""
    segmentation = segmentationNode.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    reference_geometry = slicer.vtkOrientedImageData()
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(ijk_to_ras)
    reference_geometry.SetImageToWorldMatrix(ijk_to_ras)
    reference_geometry.SetExtent(reference.GetImageData().GetExtent())

    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(
        f"{segmentationNode.GetName()} on {reference.GetName()}"))
    try:
        output.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            source = segmentation.GetSegment(segment_id)
            labelmap = slicer.vtkOrientedImageData()
            segmentationNode.GetBinaryLabelmapRepresentation(segment_id, labelmap)
            moved = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    labelmap, reference_geometry, moved, False, False, to_reference):
                raise UserError(f"Slicer could not resample segment '{source.GetName()}'.")
            segment = slicer.vtkSegment()
            segment.SetName(source.GetName())
            segment.SetColor(source.GetColor())
            segment.AddRepresentation(labelmap_name, moved)
            output.GetSegmentation().AddSegment(segment, segment_id)
        output.CreateDefaultDisplayNodes()
        # shown where its reference is shown (e.g. the moving volume under the registration's transform)
        output.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    except BaseException:
        scene.RemoveNode(output)
        raise
    return output
