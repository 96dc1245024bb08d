"""Moving segmentations through a registration with Slicer's own resampling (every segment, names, colours and
overlaps kept)."""

from __future__ import annotations

import slicer
import vtk

from ..errors import UserError


def local_to_world(node, skip=()) -> "vtk.vtkGeneralTransform":
    """``node``'s local coordinates → world (RAS): its parent transforms, innermost first, leaving out the
    transform nodes in ``skip`` (a registration's own nodes: a volume placed under its result is, for that
    registration, where it was before)."""
    transform = vtk.vtkGeneralTransform()
    transform.PostMultiply()  # each Concatenate applies after the ones before
    skipped = {item.GetID() for item in skip if item is not None}
    parent = node.GetParentTransformNode()
    while parent is not None:
        if parent.GetID() not in skipped:
            transform.Concatenate(parent.GetTransformToParent())
        parent = parent.GetParentTransformNode()
    return transform


def move_segmentation(scene, segmentationNode, reference, to_reference, registration_nodes=()):
    """A new segmentation node: each segment's binary labelmap of ``segmentationNode`` resampled nearest-neighbour
    onto ``reference``'s voxel grid, through the segmentation's parent transforms to world, then ``to_reference``
    (a VTK transform of world points, source → reference, as the registration saw them), then from world into the
    reference volume's own coordinates; placed under the reference volume's parent transform, so the two stay
    overlaid (shown where the reference is shown, e.g. the moving volume under the registration's transform), with
    the reference volume's voxel grid as its reference image geometry. ``registration_nodes`` (the registration's
    transform nodes) are left out of both parent chains. On any failure the new node is removed."""
    through = vtk.vtkGeneralTransform()
    through.PostMultiply()
    through.Concatenate(local_to_world(segmentationNode, registration_nodes))
    through.Concatenate(to_reference)
    through.Concatenate(local_to_world(reference, registration_nodes).GetInverse())
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
        # under the reference's parent first: Slicer expresses the reference geometry in the segmentation's own
        # frame, through the transform between the two parents (set the other way round, a linear parent of the
        # reference was applied twice and the Segment Editor and exports worked on a displaced grid)
        output.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
        output.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            source = segmentation.GetSegment(segment_id)
            labelmap = slicer.vtkOrientedImageData()
            segmentationNode.GetBinaryLabelmapRepresentation(segment_id, labelmap)
            moved = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    labelmap, reference_geometry, moved, False, False, through):
                raise UserError(f"Slicer could not resample segment '{source.GetName()}'.")
            segment = slicer.vtkSegment()
            segment.SetName(source.GetName())
            segment.SetColor(source.GetColor())
            segment.AddRepresentation(labelmap_name, moved)
            output.GetSegmentation().AddSegment(segment, segment_id)
        output.CreateDefaultDisplayNodes()
    except BaseException:
        scene.RemoveNode(output)
        raise
    return output
