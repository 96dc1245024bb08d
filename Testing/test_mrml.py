"""The MRML layer under slicer-core: real MRML nodes, Slicer's own transforms, storage and segmentations.

An analytic network gives a known transform T (fixed → moving, LPS mm), so every number is checked against
the truth in Slicer's RAS terms, not against another copy of our own code.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core==5.11.0.6)")
import vtk  # noqa: E402

from analytic import analytic_model, oblique_pair  # noqa: E402
from conftest import blob_volume, make_image, rotation  # noqa: E402
from ICONRegistrationLib.errors import Cancelled, UserError  # noqa: E402
from ICONRegistrationLib.frames import flip_lps_ras  # noqa: E402
from ICONRegistrationLib.mrml import display  # noqa: E402
from ICONRegistrationLib.mrml.logic import (ICONRegistrationLogic, RegistrationSettings,  # noqa: E402
                                            metrics_from_table)
from ICONRegistrationLib.mrml.nodes import (field_from_grid_transform, image_from_volume,  # noqa: E402
                                            update_volume_from_image)

AFFINE = (np.eye(3) + np.array([[0.04, -0.03, 0.02], [0.05, -0.02, 0.01], [-0.02, 0.03, 0.06]]),
          np.array([3.0, -2.5, 4.0]))


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


def volume_node(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    return node


def geometry_of(node) -> tuple:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4))


def node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def ras_points_inside(image: sitk.Image, count: int, margin: float, seed: int = 0) -> np.ndarray:
    """Random RAS points well inside ``image`` (LPS geometry)."""
    rng = np.random.default_rng(seed)
    size = np.array(image.GetSize())
    indices = rng.uniform(margin, 1 - margin, (count, 3)) * (size - 1)
    lps = np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in indices])
    return flip_lps_ras(lps)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ----- 1. volume node <-> SimpleITK ------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [np.eye(3), rotation(2, 25) @ rotation(0, -15),
                                       rotation(1, 30) @ np.diag([1.0, -1.0, -1.0]),
                                       np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1]], float)])
def test_volume_round_trip_keeps_voxels_and_geometry_exactly(scene, direction):
    array = (np.random.default_rng(0).random((13, 17, 19)) * 1000).astype(np.int16)
    image = make_image(array, spacing=(0.7, 1.3, 2.9), origin=(-12.5, 40.25, 7.0), direction=direction)
    node = volume_node(scene, image, "volume")
    # MRML holds RAS: the node maps voxel (i, j, k) to the RAS image of SimpleITK's LPS point.
    for index in [(0, 0, 0), (18, 0, 0), (3, 16, 12)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = np.array(geometry_of(node)).reshape(4, 4) @ np.array([*index, 1.0])
        assert np.allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    back = image_from_volume(node)
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetDirection() == image.GetDirection()
    assert back.GetPixelID() == image.GetPixelID()
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    # and node -> image -> node
    again = volume_node(scene, back, "again")
    assert geometry_of(again) == geometry_of(node)


def test_linear_parent_transform_is_part_of_the_geometry_and_nonlinear_is_refused(scene):
    image = make_image(blob_volume((10, 12, 14)), spacing=(1.0, 2.0, 1.5), origin=(1.0, 2.0, 3.0))
    node = volume_node(scene, image, "volume")
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # 10 mm towards Right
    parent.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(parent.GetID())
    moved = image_from_volume(node)
    assert np.allclose(moved.GetOrigin(), (1.0 - 10.0, 2.0, 3.0))  # RAS +x is LPS −x
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    grid.SetAndObserveTransformFromParent(slicer.vtkOrientedGridTransform())
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(UserError, match="harden"):
        image_from_volume(node)


# ----- 2. the grid transform in Slicer's terms -------------------------------------------------------------
def _same_grid_pair():
    """Fixed and moving on one oblique, anisotropic grid (so Slicer's in-place hardening is comparable)."""
    direction = rotation(2, 20) @ rotation(0, -10)
    fixed = make_image(blob_volume((36, 44, 40), seed=1), spacing=(1.3, 0.9, 1.7), origin=(-20.0, 15.0, 7.0),
                       direction=direction)
    moving = make_image(blob_volume((36, 44, 40), seed=2), spacing=(1.3, 0.9, 1.7), origin=(-20.0, 15.0, 7.0),
                        direction=direction)
    return fixed, moving


def test_transform_node_maps_points_like_the_analytic_map_and_hardening_matches_the_engine(scene):
    fixed, moving = _same_grid_pair()
    matrix, offset = AFFINE
    model = analytic_model(fixed, moving, matrix, offset, bulge=2.0)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    transform = outputs.transform

    # one vtkOrientedGridTransform, as the from-parent (resampling) transform, with the registration's roles
    assert isinstance(transform.GetTransformFromParent(), slicer.vtkOrientedGridTransform)
    assert transform.GetNodeReference(transform.GetMovingNodeReferenceRole()) is moving_node
    assert transform.GetNodeReference(transform.GetFixedNodeReferenceRole()) is fixed_node
    assert moving_node.GetParentTransformNode() is transform

    # a point mapped by the transform node equals the analytic map (RAS in, RAS out)
    network = model.net
    points_ras = ras_points_inside(fixed, 300, margin=0.1)
    import torch
    expected_lps = network.physical_map(torch.as_tensor(flip_lps_ras(points_ras).T[None], dtype=torch.float64))
    expected_ras = flip_lps_ras(expected_lps[0].T.numpy())
    from_parent = transform.GetTransformFromParent()
    mapped = np.array([from_parent.TransformPoint(p.tolist()) for p in points_ras])
    assert np.abs(mapped - expected_ras).max() < 0.05  # mm

    # Slicer hardens the moving volume (resampling on its own grid = the fixed grid here)
    hardened = volume_node(scene, moving, "hardened")
    hardened.ApplyTransform(transform.GetTransformToParent())
    slicer_warped = slicer.util.arrayFromVolume(hardened).astype(np.float64)
    engine_warped = sitk.GetArrayFromImage(outputs.result.warped).astype(np.float64)
    # inside the field of view: where T(x) lands well inside the moving image
    index = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.GetSize()[::-1]], indexing="ij"), -1)[..., ::-1]
    points_lps = (np.array(fixed.GetDirection()).reshape(3, 3) @ (index.reshape(-1, 3) * fixed.GetSpacing()).T).T \
        + fixed.GetOrigin()
    landed = network.physical_map(torch.as_tensor(points_lps.T[None], dtype=torch.float64))[0].T.numpy()
    continuous = np.array([moving.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in landed])
    inside = np.all((continuous > 1) & (continuous < np.array(moving.GetSize()) - 2), axis=1).reshape(index.shape[:3])
    assert inside.mean() > 0.5
    correlation = np.corrcoef(slicer_warped[inside], engine_warped[inside])[0, 1]
    assert correlation >= 0.999, correlation


# ----- 3. storage node -> .h5 -> SimpleITK --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".h5", ".nii.gz"])
def test_transform_written_by_slicer_storage_reads_back_in_simpleitk_as_the_same_field(scene, tmp_path, suffix):
    fixed, moving = oblique_pair()
    model = analytic_model(fixed, moving, *AFFINE, bulge=1.5)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    path = logic.exportTransform(outputs.transform, tmp_path / f"forward{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"forward{suffix}"]  # no temporary left
    if suffix == ".h5":
        read = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(path))).GetDisplacementField()
    else:
        read = sitk.ReadImage(str(path))
    expected = outputs.result.forward_field
    assert read.GetSize() == expected.GetSize()
    assert np.allclose(read.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    assert np.allclose(read.GetSpacing(), expected.GetSpacing(), atol=1e-5)
    assert np.allclose(read.GetDirection(), expected.GetDirection(), atol=1e-5)
    difference = sitk.GetArrayFromImage(read) - sitk.GetArrayFromImage(expected)
    assert np.abs(difference).max() < 1e-4  # mm (float32 storage in NIfTI)
    # the field held by the node equals the engine's exactly
    held = field_from_grid_transform(outputs.transform.GetTransformFromParent())
    assert np.abs(sitk.GetArrayFromImage(held) - sitk.GetArrayFromImage(expected)).max() < 1e-12
    with pytest.raises(UserError):
        logic.exportTransform(outputs.transform, tmp_path / "forward.xyz")


# ----- 4. segmentations, both directions ----------------------------------------------------------------------
def _labels_like(image: sitk.Image, seed: int, centres_lps: np.ndarray) -> sitk.Image:
    """Three ellipsoids on ``image``'s grid around the given LPS points (labels 1, 2, 3; first one wins)."""
    size = image.GetSize()[::-1]
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in size], indexing="ij")
    rng = np.random.default_rng(seed)
    labels = np.zeros(size, np.uint8)
    for label, point in zip((1, 2, 3), centres_lps):
        centre = np.array(image.TransformPhysicalPointToContinuousIndex(point.tolist()))[::-1]
        radii = rng.uniform(0.08, 0.12, 3) * np.array(size)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
        labels[inside & (labels == 0)] = label
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    return result


def _overlap_points(fixed: sitk.Image, moving: sitk.Image, seed: int) -> np.ndarray:
    """Three LPS points in the middle of both images: fixed points whose image under T is central in moving."""
    candidates = flip_lps_ras(ras_points_inside(fixed, 4000, margin=0.1, seed=seed))
    landed = candidates @ AFFINE[0].T + AFFINE[1]
    size = np.array(moving.GetSize())
    central = [p for p, q in zip(candidates, landed)
               if np.all(np.abs(np.array(moving.TransformPhysicalPointToContinuousIndex(q.tolist())) / size - 0.5)
                         < 0.33)]
    assert len(central) >= 3
    chosen = [central[0]]  # spread out: each next point far from the chosen ones
    for _ in range(2):
        chosen.append(max(central, key=lambda p: min(np.linalg.norm(p - c) for c in chosen)))
    return np.array(chosen)


def _segmentation_from_labels(scene, labels: sitk.Image, name: str):
    labelmap = volume_node(scene, labels, f"{name} labelmap", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return segmentation


def _labels_on(scene, segmentation, reference_node) -> np.ndarray:
    """The segmentation exported as a label map on ``reference_node``'s grid (label = segment index + 1)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(ids)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap,
                                                                                 reference_node)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    scene.RemoveNode(labelmap)
    return array


def test_segmentation_moves_like_a_nearest_neighbour_warp_of_its_label_map_both_ways(scene):
    fixed, moving = oblique_pair()
    model = analytic_model(fixed, moving, *AFFINE)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    result = outputs.result
    fixed_centres = _overlap_points(fixed, moving, seed=7)
    moving_centres = fixed_centres @ AFFINE[0].T + AFFINE[1]
    for direction, labels, reference, through in (
            ("moving_to_fixed", _labels_like(moving, 3, moving_centres), fixed, result.forward_transform()),
            ("fixed_to_moving", _labels_like(fixed, 4, fixed_centres), moving, result.inverse_transform())):
        source = _segmentation_from_labels(scene, labels, f"labels {direction}")
        before = _labels_on(scene, source, volume_node(scene, labels, "grid of source"))
        moved = logic.applyToSegmentation(source, outputs.transform, direction)
        reference_node = fixed_node if direction == "moving_to_fixed" else moving_node
        assert moved.GetSegmentation().GetNumberOfSegments() == 3
        names = [moved.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
        assert names == [source.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
        slicer_labels = _labels_on(scene, moved, reference_node)
        expected = sitk.GetArrayFromImage(sitk.Resample(labels, reference, through, sitk.sitkNearestNeighbor, 0))
        for label in (1, 2, 3):
            assert (expected == label).sum() > 100
            score = dice(slicer_labels == label, expected == label)
            assert score >= 0.98, (direction, label, score)
        # the input segmentation is unchanged
        assert np.array_equal(_labels_on(scene, source, volume_node(scene, labels, "grid again")), before)
        assert source.GetParentTransformNode() is None


def _linear_parent(scene, shift_ras):
    matrix = vtk.vtkMatrix4x4()
    for axis, value in enumerate(shift_ras):
        matrix.SetElement(axis, 3, value)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(matrix)
    return node


def test_segmentations_and_volumes_under_linear_parents_move_as_the_registration_saw_them(scene):
    """The fixed volume under a 20 mm shift, the moving volume and the segmentations drawn on each under their
    volume's parent: the moved segmentation must overlap a warp of the labels in world geometry. The parents were
    applied twice (reference) or not at all (source): Dice 0, 15–20 mm off."""
    fixed, moving = oblique_pair()
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    fixed_parent, moving_parent = _linear_parent(scene, (20.0, 0.0, 0.0)), _linear_parent(scene, (0.0, 15.0, 0.0))
    fixed_node.SetAndObserveTransformNodeID(fixed_parent.GetID())
    moving_node.SetAndObserveTransformNodeID(moving_parent.GetID())
    fixed_world, moving_world = image_from_volume(fixed_node), image_from_volume(moving_node)
    model = analytic_model(fixed_world, moving_world, *AFFINE)
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    result = outputs.result
    # "transform" output mode cannot place a volume that has a parent under the result: it says so
    assert outputs.output_volume is not moving_node and "warped copy" in outputs.note
    fixed_centres = _overlap_points(fixed_world, moving_world, seed=7)
    moving_centres = fixed_centres @ AFFINE[0].T + AFFINE[1]
    for direction, world, local, centres, parent, reference_node, reference, through in (
            ("moving_to_fixed", moving_world, moving, moving_centres, moving_parent, fixed_node, fixed_world,
             result.forward_transform()),
            ("fixed_to_moving", fixed_world, fixed, fixed_centres, fixed_parent, moving_node, moving_world,
             result.inverse_transform())):
        labels_world = _labels_like(world, 3, centres)
        labels_local = sitk.Image(labels_world)
        labels_local.CopyInformation(local)  # the same voxels in the volume's own coordinates, under its parent
        source = _segmentation_from_labels(scene, labels_local, f"labels {direction}")
        source.SetAndObserveTransformNodeID(parent.GetID())
        moved = logic.applyToSegmentation(source, outputs.transform, direction)
        got = _labels_on(scene, moved, reference_node)
        expected = sitk.GetArrayFromImage(sitk.Resample(labels_world, reference, through,
                                                        sitk.sitkNearestNeighbor, 0))
        for label in (1, 2, 3):
            assert (expected == label).sum() > 100
            assert dice(got == label, expected == label) >= 0.98, (direction, label)


def test_a_segmentation_moved_onto_a_volume_under_a_linear_parent_has_that_volumes_grid_as_its_geometry(scene):
    """The moved segmentation is placed under the reference volume's parent. Its reference image geometry (the grid
    the Segment Editor edits on and exports use) was set before that, so Slicer expressed it through the parent
    as well: the fixed volume's grid shifted a second time, by 20.3 mm, and a label map exported from the
    segmentation sat 0.33–0.71 voxel off the fixed volume's voxels. It must be the fixed volume's own grid."""
    fixed, moving = oblique_pair()
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    fixed_node.SetAndObserveTransformNodeID(_linear_parent(scene, (20.3, 0.0, 0.0)).GetID())
    fixed_world, moving_world = image_from_volume(fixed_node), image_from_volume(moving_node)
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, analytic_model(fixed_world, moving_world, *AFFINE),
                             fixedModality="mri", movingModality="mri")
    centres = _overlap_points(fixed_world, moving_world, seed=7) @ AFFINE[0].T + AFFINE[1]
    source = _segmentation_from_labels(scene, _labels_like(moving_world, 3, centres), "moving labels")
    moved = logic.applyToSegmentation(source, outputs.transform, "moving_to_fixed")
    assert moved.GetParentTransformNode() is fixed_node.GetParentTransformNode()
    ijk_to_ras = vtk.vtkMatrix4x4()
    fixed_node.GetIJKToRASMatrix(ijk_to_ras)
    expected = slicer.vtkSegmentationConverter.SerializeImageGeometry(ijk_to_ras, fixed_node.GetImageData())
    geometry = moved.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert np.allclose([float(v) for v in geometry.split(";") if v], [float(v) for v in expected.split(";") if v],
                       atol=1e-6), (geometry, expected)
    # what a user sees: a label map exported without naming a reference lies on the fixed volume's voxels
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    moved.GetSegmentation().GetSegmentIDs(ids)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(moved, ids, labelmap, None)
    exported = image_from_volume(labelmap)
    corner = np.array(fixed_world.TransformPhysicalPointToContinuousIndex(exported.GetOrigin()))
    assert np.abs(corner - np.round(corner)).max() < 1e-4, corner
    assert np.allclose(exported.GetSpacing(), fixed_world.GetSpacing())
    assert np.allclose(exported.GetDirection(), fixed_world.GetDirection())


def test_a_result_whose_inputs_moved_or_changed_while_it_ran_is_dropped(scene):
    """The module registers in a background thread while the scene stays editable. A moving volume whose +10 mm
    parent transform was removed meanwhile was placed under the result (which had seen it shifted): 10 mm off,
    without a word. ``createOutputNodes`` with the prepared inputs now refuses such a result, adds no node, and
    places it when nothing changed."""
    fixed, moving = oblique_pair()
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    parent = _linear_parent(scene, (10.0, 0.0, 0.0))
    moving_node.SetAndObserveTransformNodeID(parent.GetID())
    logic = ICONRegistrationLogic(scene)
    settings = RegistrationSettings(fixedModality="mri", movingModality="mri")
    inputs = logic.prepareInputs(fixed_node, moving_node)
    model = analytic_model(inputs.fixed, inputs.moving, *AFFINE)
    result = logic.runRegistration(inputs, settings, loaded_model=model)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    changes = (lambda: moving_node.SetAndObserveTransformNodeID(None),  # the parent removed
               lambda: parent.SetMatrixTransformToParent(vtk.vtkMatrix4x4()),  # the parent edited
               lambda: fixed_node.SetSpacing(1.0, 1.0, 1.0),  # the fixed volume resampled
               lambda: slicer.util.updateVolumeFromArray(moving_node,  # its voxels edited in place
                                                         slicer.util.arrayFromVolume(moving_node) * 2))
    for change in changes:
        moving_node.SetAndObserveTransformNodeID(parent.GetID())
        inputs = logic.prepareInputs(fixed_node, moving_node)
        change()
        with pytest.raises(UserError, match="was moved or changed while registering"):
            logic.createOutputNodes(fixed_node, moving_node, result, settings, inputs)
        assert {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} == before
    moving_node.SetAndObserveTransformNodeID(None)
    inputs = logic.prepareInputs(fixed_node, moving_node)
    outputs = logic.createOutputNodes(fixed_node, moving_node, result, settings, inputs)  # unchanged: placed
    assert moving_node.GetParentTransformNode() is outputs.transform


def test_a_result_whose_inputs_were_removed_or_whose_scene_was_closed_while_it_ran_is_dropped(scene):
    """The scene stays editable while the module registers in the background. A result whose input volume was
    deleted meanwhile used to be placed anyway (outputs referring to a node no longer in the scene); after a scene
    close, the next scene's nodes reuse the old IDs, so the result's references and the slice views named another
    patient's volumes. Both are refused now, and no node is added."""
    fixed, moving = oblique_pair()
    logic = ICONRegistrationLogic(scene)
    settings = RegistrationSettings(fixedModality="mri", movingModality="mri")
    for change in ("remove moving", "remove fixed", "close scene"):
        scene.Clear(0)
        fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
        inputs = logic.prepareInputs(fixed_node, moving_node)
        result = logic.runRegistration(inputs, settings, loaded_model=analytic_model(fixed, moving, *AFFINE))
        if change == "close scene":
            scene.Clear(0)
            for index in range(2):  # the next patient's volumes get the old nodes' IDs
                volume_node(scene, moving, f"other {index}")
            assert scene.GetNodeByID(moving_node.GetID()) is not None
        else:
            scene.RemoveNode(moving_node if change == "remove moving" else fixed_node)
        before = node_ids(scene)
        with pytest.raises(UserError, match="was removed from the scene while registering"):
            logic.createOutputNodes(fixed_node, moving_node, result, settings, inputs)
        assert node_ids(scene) == before

    # outputs kept across a scene close (the module's overlay buttons) are not shown in place of other nodes
    scene.Clear(0)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    outputs = logic.register(fixed_node, moving_node, analytic_model(fixed, moving, *AFFINE), fixedModality="mri",
                             movingModality="mri", outputMode="warped")
    scene.Clear(0)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    for index in range(6):
        volume_node(scene, fixed, f"other {index}")
    assert scene.GetNodeByID(outputs.output_volume.GetID()) is not None  # an ID now naming another volume
    with pytest.raises(UserError, match="no longer in the scene"):
        logic.showResults(outputs, overlay="ic")
    assert composite.GetForegroundVolumeID() is None


def test_registering_a_volume_left_under_an_earlier_result_says_to_take_it_out(scene):
    """In the default output mode the moving volume stays under the result. Registering it again used to advise
    hardening that transform, which registers the warped voxels and loses the original."""
    fixed, moving = oblique_pair()
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, analytic_model(fixed, moving, *AFFINE),
                             fixedModality="mri", movingModality="mri")
    assert moving_node.GetParentTransformNode() is outputs.transform and outputs.note == ""
    with pytest.raises(UserError, match="earlier registration: take it out") as error:
        logic.register(fixed_node, moving_node, analytic_model(fixed, moving, *AFFINE))
    assert "harden that transform" not in str(error.value)
    moving_node.SetAndObserveTransformNodeID(None)
    logic.register(fixed_node, moving_node, analytic_model(fixed, moving, *AFFINE), fixedModality="mri",
                   movingModality="mri")


def test_fixed_to_moving_without_an_inverse_node_uses_slicers_inverse(scene):
    fixed, moving = oblique_pair()
    model = analytic_model(fixed, moving, *AFFINE)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri",
                             createInverse=False)
    assert outputs.inverse_transform is None
    labels = _labels_like(fixed, 5, _overlap_points(fixed, moving, seed=8))
    moved = logic.applyToSegmentation(_segmentation_from_labels(scene, labels, "fixed labels"), outputs.transform,
                                      "fixed_to_moving")
    expected = sitk.GetArrayFromImage(sitk.Resample(labels, moving, outputs.result.inverse_transform(),
                                                    sitk.sitkNearestNeighbor, 0))
    slicer_labels = _labels_on(scene, moved, moving_node)
    for label in (1, 2, 3):
        assert dice(slicer_labels == label, expected == label) >= 0.98


def test_exact_inverse_node_undoes_the_forward_transform(scene):
    """The analytic network's reverse prediction is deliberately wrong (identity where it bulges); with
    exactInverse the inverse node is the numerical inverse of the forward node, checked through Slicer's own
    transform evaluation in RAS."""
    fixed, moving = oblique_pair()
    model = analytic_model(fixed, moving, *AFFINE, bulge=1.5)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri",
                             exactInverse=True)
    forward = outputs.transform.GetTransformFromParent()
    inverse = outputs.inverse_transform.GetTransformFromParent()
    fixed_box = fixed_node.GetImageData().GetDimensions()
    errors = []
    for y in ras_points_inside(moving, 300, margin=0.15, seed=3):
        x = inverse.TransformPoint(y)
        ijk = np.linalg.inv(_ras_to_ijk_matrix(fixed_node)) @ np.append(x, 1.0)
        if all(1 <= c <= n - 2 for c, n in zip(ijk[:3], fixed_box)):  # forward field analytic there
            errors.append(np.linalg.norm(np.array(forward.TransformPoint(x)) - y))
    assert len(errors) >= 50 and max(errors) <= 0.05  # tolerance 0.01 voxel + interpolation, mm
    assert metrics_from_table(outputs.metrics_table)["Inverse transform"] == "exact"


def _ras_to_ijk_matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# ----- 5. inputs untouched, nothing half-made ----------------------------------------------------------------
def _snapshot(node):
    return slicer.util.arrayFromVolume(node).copy(), geometry_of(node), node.GetTransformNodeID()


def test_inputs_unchanged_and_no_stray_nodes_after_register_cancel_and_error(scene, monkeypatch):
    fixed, moving = oblique_pair()
    model = analytic_model(fixed, moving, *AFFINE)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    logic.getParameterNode()
    fixed_before, moving_before = _snapshot(fixed_node), _snapshot(moving_node)
    nodes_before = node_ids(scene)

    def same(node, snapshot, transform_id=None):
        array, geometry, _ = snapshot
        return (np.array_equal(slicer.util.arrayFromVolume(node), array) and geometry_of(node) == geometry
                and node.GetTransformNodeID() == transform_id)

    # cancel during the network
    with pytest.raises(Cancelled):
        logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri",
                       progress=lambda stage, fraction: stage != "network")
    assert node_ids(scene) == nodes_before
    assert same(fixed_node, fixed_before) and same(moving_node, moving_before)

    # an error from the engine (a user error) and one while making the nodes
    with pytest.raises(UserError):
        logic.register(fixed_node, moving_node, "no-such-model")
    import ICONRegistrationLib.mrml.logic as logic_module

    def broken_table(*args, **kwargs):
        raise RuntimeError("table failed")

    monkeypatch.setattr(logic_module, "fill_metrics_table", broken_table)
    with pytest.raises(RuntimeError):
        logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    assert node_ids(scene) == nodes_before
    assert same(fixed_node, fixed_before) and same(moving_node, moving_before)
    monkeypatch.undo()

    # a normal run: new nodes only; the moving volume is only placed under the transform
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri",
                             outputMode="warped")
    assert same(fixed_node, fixed_before) and same(moving_node, moving_before)
    assert outputs.output_volume is not moving_node
    added = node_ids(scene) - nodes_before
    assert {n.GetID() for n in outputs.nodes()} <= added
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    assert same(fixed_node, fixed_before)
    assert same(moving_node, moving_before, transform_id=outputs.transform.GetID())


# ----- outputs: QA volumes, metrics table, parameter node, slice views ---------------------------------------
def test_qa_volumes_metrics_table_and_display(scene):
    fixed, moving = oblique_pair()
    matrix, offset = AFFINE
    model = analytic_model(fixed, moving, matrix, offset)
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, model, fixedModality="mri", movingModality="mri")
    jacobian = slicer.util.arrayFromVolume(outputs.jacobian)
    assert np.abs(jacobian - np.linalg.det(matrix)).max() < 1e-4
    assert outputs.ic_error.GetVoxelValueUnits().GetCodeValue() == "mm"
    jacobian_display = outputs.jacobian.GetDisplayNode()
    assert jacobian_display.GetColorNode().GetName() == display.FOLD_TABLE_NAME
    assert (jacobian_display.GetWindowLevelMin(), jacobian_display.GetWindowLevelMax()) == display.JACOBIAN_WINDOW
    ic_display = outputs.ic_error.GetDisplayNode()
    assert ic_display.GetColorNode().GetName() == display.IC_TABLE_NAME
    assert (ic_display.GetWindowLevelMin(), ic_display.GetWindowLevelMax()) == display.IC_ERROR_WINDOW_MM
    # the fold colour table makes det ≤ 0 saturated red, det = 1 neutral grey, compression blue
    table = jacobian_display.GetColorNode()
    low, high = display.JACOBIAN_WINDOW
    rgba = [0.0] * 4
    table.GetColor(int((0.0 - low) / (high - low) * 255) - 1, rgba)
    assert rgba == [1.0, 0.0, 0.0, 1.0]
    table.GetColor(int(round((1.0 - low) / (high - low) * 255)), rgba)
    assert np.allclose(rgba[:3], 0.5, atol=0.02)
    table.GetColor(int(round((0.3 - low) / (high - low) * 255)), rgba)
    assert rgba[2] > rgba[0] + 0.2
    # IC errors below the visibility threshold are transparent in slice views
    assert ic_display.GetApplyThreshold() and ic_display.GetLowerThreshold() == display.IC_VISIBLE_FROM_MM
    # metrics table: numbers equal to the engine's
    metrics = metrics_from_table(outputs.metrics_table)
    assert metrics["Folded voxels (det J ≤ 0)"] == str(outputs.result.metrics.folds) == "0"
    assert float(metrics["IC error mean"]) == pytest.approx(outputs.result.metrics.ic_error_mean_mm, rel=1e-3)
    assert metrics["Model"] == "tiny"
    assert metrics["Prediction averaged over flips of network axes"] == "—"  # the model lists no test-time flips
    assert json.loads(outputs.transform.GetAttribute("ICONRegistration.metrics"))["folds"] == 0
    # slice views: none in a bare scene, then three
    assert logic.showResults(outputs) == 0
    for _ in range(3):
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    assert logic.showResults(outputs, overlay="ic") == 3
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == fixed_node.GetID()
    assert composite.GetForegroundVolumeID() == moving_node.GetID()
    assert composite.GetForegroundOpacity() == 0.5
    assert composite.GetNthLayerVolumeID(display.OVERLAY_LAYER) == outputs.ic_error.GetID()
    assert composite.GetNthLayerOpacity(display.OVERLAY_LAYER) == display.IC_OVERLAY_OPACITY
    logic.showResults(outputs, overlay="folds")
    assert composite.GetNthLayerVolumeID(display.OVERLAY_LAYER) == outputs.jacobian.GetID()
    with pytest.raises(UserError):
        logic.showResults(outputs, overlay="rainbow")


def test_parameter_node_survives_saving_and_reopening_the_scene(scene, tmp_path):
    logic = ICONRegistrationLogic(scene)
    fixed_node = volume_node(scene, make_image(blob_volume((8, 9, 10))), "fixed")
    settings = RegistrationSettings(model="gradicon-brain", fixedModality="ct", ioIterations=25, device="cpu",
                                    outputMode="warped", createInverse=False, overlay="ic", fieldGrid="fixed",
                                    exactInverse=True, ioMode="weights", ioGrid="fixed")
    logic.setSettings(settings)
    logic.getParameterNode().SetNodeReferenceID("fixedVolume", fixed_node.GetID())
    assert logic.getParameterNode() is logic.getParameterNode()  # a singleton
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    reopened = slicer.vtkMRMLScene()
    reopened.SetLoadFromXMLString(1)
    reopened.SetSceneXMLString(xml)
    reopened.Import()
    logic_again = ICONRegistrationLogic(reopened)
    assert logic_again.settings() == settings
    assert logic_again.getParameterNode().GetNodeReference("fixedVolume").GetName() == "fixed"
    # values are read leniently where the meaning is clear ...
    node = logic_again.getParameterNode()
    for name, text, value in (("ioIterations", "50.0", 50), ("refinements", " 2 ", 2), ("exactInverse", "On", True),
                              ("createInverse", "True ", True), ("symmetric", "no", False)):
        node.SetParameter(name, text)
        assert getattr(logic_again.settings(), name) == value, (name, text)
    # ... and a value that cannot be read is a user error naming it, never silently the default ("fifty" turned
    # instance optimisation off, "y" symmetric off); the form, about to overwrite them, can still show a scene
    for name, text in (("ioIterations", "fifty"), ("ioIterations", "2.5"), ("symmetric", "y")):
        node.SetParameter(name, text)
        with pytest.raises(UserError, match=f"{name}='{text}'"):
            logic_again.settings()
        assert getattr(logic_again.settings(strict=False), name) == getattr(RegistrationSettings(), name)
        node.SetParameter(name, str(getattr(RegistrationSettings(), name)).lower())


def test_register_with_a_model_file_runs_the_real_network(scene, tiny_model_files):
    fixed = make_image(blob_volume((30, 34, 32), seed=1), spacing=(1.2, 1.0, 1.1))
    moving = make_image(blob_volume((30, 34, 32), seed=2), spacing=(1.2, 1.0, 1.1))
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    stages = []
    spec_path, _ = tiny_model_files
    outputs = logic.register(fixed_node, moving_node, str(spec_path), fixedModality="mri",
                             movingModality="mri", progress=lambda stage, fraction: stages.append(stage))
    assert "network" in stages
    assert outputs.result.metrics.weights_sha256
    assert metrics_from_table(outputs.metrics_table)["Weights sha256"] == outputs.result.metrics.weights_sha256
    assert logic.getParameterNode().GetNodeReference("outputTransform") is outputs.transform


def test_instance_optimisation_grid_reaches_the_engine(scene, tiny_model_files):
    """``ioGrid="fixed"`` compares the images on a grid finer than the network's; a bad value is a user error."""
    fixed = make_image(blob_volume((72, 78, 75), seed=1), spacing=(0.6, 0.5, 0.55))  # finer than the 66³ network grid
    moving = make_image(blob_volume((72, 78, 75), seed=2), spacing=(0.6, 0.5, 0.55))
    fixed_node, moving_node = volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")
    logic = ICONRegistrationLogic(scene)
    spec_path, _ = tiny_model_files
    shapes = {}
    for grid in ("network", "fixed"):
        outputs = logic.register(fixed_node, moving_node, str(spec_path), fixedModality="mri", movingModality="mri",
                                 ioIterations=2, ioGrid=grid, outputMode="warped")
        shapes[grid] = outputs.result.metrics.io_similarity_shape
        assert metrics_from_table(outputs.metrics_table)["Instance-optimisation image grid"] == \
            " × ".join(str(n) for n in shapes[grid])
    network_shape = list(outputs.result.metrics.network_shape)
    assert shapes["network"] == network_shape
    assert all(f > n for f, n in zip(shapes["fixed"], network_shape)), shapes
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(UserError, match="io_grid"):
        logic.register(fixed_node, moving_node, str(spec_path), fixedModality="mri", movingModality="mri",
                       ioIterations=2, ioGrid="finest", outputMode="warped")
    assert scene.GetNumberOfNodes() == nodes_before


def _random_tiny_model_and_pair(scene, tmp_path, seed: int, output_scale: float, **spec_options):
    """A logic, two blob volumes in ``scene`` and ``tmp_path/tiny.json`` (+ ``tiny.pt``): a 66³ tiny model whose
    output layers are random (``seed``, ``output_scale``)."""
    from conftest import random_state, tiny_spec

    spec = tiny_spec(shape=(66, 66, 66), **spec_options)
    spec.to_file(tmp_path / "tiny.json")
    torch.save(random_state(spec, seed=seed, output_scale=output_scale), tmp_path / "tiny.pt")
    fixed = make_image(blob_volume((40, 44, 42), seed=1))
    moving = make_image(blob_volume((40, 44, 42), seed=2))
    return ICONRegistrationLogic(scene), volume_node(scene, fixed, "fixed"), volume_node(scene, moving, "moving")


def test_test_time_flips_setting_reaches_the_engine_and_the_parameter_node(scene, tmp_path):
    """On by default: the model's ``test_time_flips`` are used (the metrics table says which); off: one
    prediction. The setting survives the parameter node."""
    logic, fixed_node, moving_node = _random_tiny_model_and_pair(scene, tmp_path, 0, 1e-3, test_time_flips=[2])
    averaged = logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                              movingModality="mri", outputMode="warped")
    assert averaged.result.metrics.flips == [2]
    assert metrics_from_table(averaged.metrics_table)["Prediction averaged over flips of network axes"] == "2"
    single = logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                            movingModality="mri", outputMode="warped", testTimeFlips=False)
    assert single.result.metrics.flips == []
    difference = np.abs(sitk.GetArrayFromImage(averaged.result.forward_field)
                        - sitk.GetArrayFromImage(single.result.forward_field)).max()
    assert difference > 1e-4  # the average is not the single prediction
    node = logic.getParameterNode()
    logic.setSettings(dataclasses.replace(logic.settings(node), testTimeFlips=False), node)
    assert logic.settings(node).testTimeFlips is False


def test_user_mistakes_raise_user_errors(scene):
    logic = ICONRegistrationLogic(scene)
    fixed_node = volume_node(scene, make_image(blob_volume((8, 9, 10))), "fixed")
    with pytest.raises(UserError, match="Select a fixed and a moving"):
        logic.register(fixed_node, None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(UserError, match="no image data"):
        logic.register(fixed_node, empty)
    with pytest.raises(UserError, match="direction"):
        logic.applyToSegmentation(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), None, "sideways")
    # the same node as fixed and moving, and a label map as an input, are user errors; nothing is added or moved
    moving_node = volume_node(scene, make_image(blob_volume((8, 9, 10), seed=1)), "moving")
    labels = volume_node(scene, make_image((blob_volume((8, 9, 10)) > 0.5).astype(np.uint8)), "labels",
                         class_name="vtkMRMLLabelMapVolumeNode")
    before = node_ids(scene)
    with pytest.raises(UserError, match="both the fixed and the moving"):
        logic.register(fixed_node, fixed_node)
    with pytest.raises(UserError, match="fixed volume 'labels' is a label map"):
        logic.register(labels, moving_node)
    with pytest.raises(UserError, match="moving volume 'labels' is a label map"):
        logic.register(fixed_node, labels)
    assert node_ids(scene) == before
    assert fixed_node.GetParentTransformNode() is None and labels.GetParentTransformNode() is None


def test_guess_modality_and_model_choices_need_no_torch(scene):
    ct = volume_node(scene, make_image(np.full((6, 6, 6), -1000.0, np.float32)), "ct")
    assert ICONRegistrationLogic.guessModality(ct) == "ct"
    choices = dict(ICONRegistrationLogic.modelChoices())
    assert "unigradicon" in choices and choices["unigradicon"] in ("not downloaded", "downloaded", "bundled")


def test_symmetric_setting_reaches_the_engine_the_metrics_table_and_the_parameter_node(scene, tmp_path):
    logic, fixed_node, moving_node = _random_tiny_model_and_pair(scene, tmp_path, 5, 0.02)
    plain = logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                           movingModality="mri", outputMode="warped")
    symmetric = logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                               movingModality="mri", outputMode="warped", symmetric=True)
    assert not plain.result.metrics.symmetric and symmetric.result.metrics.symmetric
    assert symmetric.result.metrics.ic_error_mean_mm < 0.3 * plain.result.metrics.ic_error_mean_mm
    assert metrics_from_table(symmetric.metrics_table)["Directions made consistent (symmetric prediction)"] == "True"
    node = logic.getParameterNode()
    logic.setSettings(dataclasses.replace(logic.settings(node), symmetric=True), node)
    assert logic.settings(node).symmetric is True


def test_refinements_setting_reaches_the_engine_the_metrics_table_and_the_parameter_node(scene, tmp_path):
    logic, fixed_node, moving_node = _random_tiny_model_and_pair(scene, tmp_path, 5, 0.02)
    default = logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                             movingModality="mri", outputMode="warped")
    twice = logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                           movingModality="mri", outputMode="warped", refinements=1)
    assert default.result.metrics.refinements == 0 and twice.result.metrics.refinements == 1  # the model's: 0
    assert metrics_from_table(twice.metrics_table)["Recursive refinements of the prediction"] == "1"
    one, two = (sitk.GetArrayFromImage(r.result.forward_field) for r in (default, twice))
    assert np.abs(two - one).max() > 1e-3  # the refinement moved the result
    node = logic.getParameterNode()
    assert logic.settings(node).refinements == -1  # the model's
    logic.setSettings(dataclasses.replace(logic.settings(node), refinements=2), node)
    assert logic.settings(node).refinements == 2
    with pytest.raises(UserError, match="refinements must be"):  # only −1 means the model's: −2 is a mistake
        logic.register(fixed_node, moving_node, str(tmp_path / "tiny.json"), fixedModality="mri",
                       movingModality="mri", outputMode="warped", refinements=-2)
