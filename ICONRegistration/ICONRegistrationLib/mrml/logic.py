"""``ICONRegistrationLogic``: register two volume nodes and put the results in the MRML scene.

Runs in desktop Slicer, in the web front end and under the ``slicer-core`` wheel: it imports ``slicer`` (MRML)
and ``vtk``, never ``qt`` or ``slicer.app``. torch is imported on the first registration, not before.

Outputs of :meth:`ICONRegistrationLogic.register` (all new nodes; the inputs are never modified):

* a transform node holding one ``vtkOrientedGridTransform`` (RAS mm) as its *from parent* transform, i.e. the
  resampling transform fixed → moving points, with the moving and fixed volumes referenced under Slicer's
  ``spatialRegistrationMoving`` / ``spatialRegistrationFixed`` roles; optionally the inverse transform node;
* the moving volume placed under that transform (default), or a new warped volume on the fixed grid;
* a Jacobian-determinant volume (fold map) and an inverse-consistency error volume (mm), with fixed windows
  and colour tables (see :mod:`.display`);
* a table node with the metrics.

Work is split so a GUI can run the slow part in a worker thread: :meth:`prepareInputs` and
:meth:`createOutputNodes` touch the scene (main thread), :meth:`runRegistration` does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import SimpleITK as sitk
import slicer

from ..errors import UserError
from ..io.atomic import atomic_path
from ..models.zoo import DEFAULT_MODEL
from ..progress import ProgressCallback
from . import display
from .metrics_table import fill_metrics_table, metrics_from_table  # noqa: F401 (part of the logic's API)
from .nodes import grid_transform_from_field, image_from_volume, update_volume_from_image, volume_geometry_ras
from .segmentations import move_segmentation

if TYPE_CHECKING:
    from ..pipeline.metrics import RegistrationMetrics

MODULE_NAME = "ICONRegistration"
DIRECTIONS = ("moving_to_fixed", "fixed_to_moving")
OVERLAYS = ("folds", "ic", "none")
INVERSE_ROLE = "ICONRegistration.inverseTransform"


#: (value, label) of ``RegistrationSettings.ioGrid``, for the module's form and the browser page
IO_GRID_CHOICES = (("network", "Network grid (fast)"), ("fixed", "Fixed image's resolution (more accurate)"))


@dataclasses.dataclass
class RegistrationSettings:
    """Every form setting; stored as parameters of the module's parameter node (so saved scenes keep them).

    ``model`` is a zoo name or the path of a model spec JSON ("Load from file…"); ``weightsFile`` optionally
    overrides the model's weights. ``outputMode`` is ``"transform"`` (moving volume placed under the transform)
    or ``"warped"`` (a new resampled volume). ``exactInverse`` makes the inverse transform the numerical inverse of
    the forward one (fixed-point inversion to 0.01 voxel) rather than the network's reverse prediction.
    ``overlay`` is the QA map shown over the images. ``ioMode`` is the instance optimisation's mode: ``"fields"``
    (the two displacement fields, fast) or ``"weights"`` (the network's weights). ``ioGrid`` is where the field
    mode compares the images: ``"network"`` (the network grid) or ``"fixed"`` (as fine as the fixed image, at most
    twice the network grid per axis; more accurate, several times the cost per step). ``testTimeFlips`` averages
    the network's prediction over the flips the model lists (its spec's ``test_time_flips``; off: one prediction).
    ``symmetric`` makes the network's two directions consistent (each the mean of itself and the exact inverse of
    the other; see :func:`~ICONRegistrationLib.pipeline.registration.register`). ``refinements`` is how many times
    the network's prediction is refined recursively (each registers the moving image warped so far again and
    composes the correction); −1 uses the model's ``test_time_refinements``.
    """

    model: str = DEFAULT_MODEL
    weightsFile: str = ""
    fixedModality: str = "auto"
    movingModality: str = "auto"
    ioIterations: int = 0
    ioMode: str = "fields"
    ioGrid: str = "network"
    testTimeFlips: bool = True
    symmetric: bool = False
    refinements: int = -1
    device: str = "auto"
    fieldGrid: str = "network"
    outputMode: str = "transform"
    createInverse: bool = True
    exactInverse: bool = False
    overlay: str = "folds"


#: node-reference roles of the parameter node for the outputs of the last registration (the inputs are
#: "fixedVolume", "movingVolume", "fixedMask", "movingMask")
OUTPUT_ROLES = ("outputTransform", "outputInverseTransform", "outputVolume", "outputJacobian", "outputICError",
                "outputMetrics")


@dataclasses.dataclass
class RegistrationInputs:
    """Copies of the input volumes as SimpleITK images (taken on the main thread) and their node names."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: Optional[sitk.Image]
    moving_mask: Optional[sitk.Image]
    fixed_name: str
    moving_name: str
    #: the two volume nodes' state when they were copied (:func:`input_state`): ``createOutputNodes`` refuses a
    #: result whose inputs moved or changed while the engine ran in the background
    state: tuple = ()


@dataclasses.dataclass
class RegistrationOutputs:
    """The nodes :meth:`ICONRegistrationLogic.register` created, and the engine's result."""

    transform: Any
    inverse_transform: Any
    output_volume: Any
    jacobian: Any
    ic_error: Any
    metrics_table: Any
    result: Any
    #: what the user should know about how the outputs differ from the settings ("" when nothing)
    note: str = ""

    def nodes(self) -> list:
        return [n for n in (self.transform, self.inverse_transform, self.output_volume, self.jacobian,
                            self.ic_error, self.metrics_table) if n is not None]


class ICONRegistrationLogic:
    """Registration of MRML volume nodes with inverse-consistent networks (no GUI needed).

    ``scene`` defaults to ``slicer.mrmlScene``.
    """

    def __init__(self, scene=None):
        self._scene = scene

    @property
    def scene(self):
        scene = self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise UserError("No MRML scene: pass one to ICONRegistrationLogic(scene) or set slicer.mrmlScene.")
        return scene

    # ----- parameter node -------------------------------------------------------------------------
    def getParameterNode(self):
        """The module's singleton parameter node (created with default settings on first use)."""
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(self.scene.GenerateUniqueName(MODULE_NAME))
            node.SetAttribute("ModuleName", MODULE_NAME)
            self.setSettings(RegistrationSettings(), node)
            node = self.scene.AddNode(node)
        return node

    def settings(self, parameterNode=None, strict: bool = True) -> RegistrationSettings:
        """The settings stored on the parameter node (the defaults for missing values).

        A value that cannot be read — a switch other than true/false/1/0/yes/no/on/off (any case), a count that is
        not a whole number — is a :class:`UserError` naming it, never silently the default (``ioIterations`` "50.0"
        is read as 50; "fifty" used to turn instance optimisation off). ``strict=False`` gives the default instead,
        for the form showing a scene it is about to overwrite.
        """
        node = parameterNode or self.getParameterNode()
        values, unreadable = {}, []
        for field in dataclasses.fields(RegistrationSettings):
            text = node.GetParameter(field.name)
            if not text:
                continue
            value = _parse_setting(text, field.default)
            if value is None:
                unreadable.append(f"{field.name}={text!r}")
            else:
                values[field.name] = value
        if unreadable and strict:
            raise UserError(f"The parameter node '{node.GetName()}' has values that cannot be read: "
                            f"{', '.join(unreadable)} (switches: true or false; counts: whole numbers).")
        return RegistrationSettings(**values)

    def setSettings(self, settings: RegistrationSettings, parameterNode=None) -> None:
        """Store ``settings`` on the parameter node (one Modified event)."""
        node = parameterNode or self.getParameterNode()
        with slicer.util.NodeModify(node):
            for key, value in dataclasses.asdict(settings).items():
                node.SetParameter(key, str(value).lower() if isinstance(value, bool) else str(value))

    # ----- helpers the form uses ------------------------------------------------------------------
    @staticmethod
    def guessModality(volumeNode) -> str:
        """``"ct"`` or ``"mri"`` from the volume's intensities (no torch)."""
        from ..pipeline.preprocessing import guess_modality

        return guess_modality(slicer.util.arrayFromVolume(volumeNode))

    @staticmethod
    def modelChoices() -> list[tuple[str, str]]:
        """``(name, weights state)`` of each zoo model ("bundled", "downloaded", "not downloaded"…), no torch."""
        from ..models.weights import weights_state
        from ..models.zoo import model_names, zoo_spec

        return [(name, weights_state(zoo_spec(name))) for name in model_names()]

    # ----- registration ---------------------------------------------------------------------------
    def prepareInputs(self, fixedVolumeNode, movingVolumeNode, fixedMaskNode=None,
                      movingMaskNode=None) -> RegistrationInputs:
        """Copy the input volumes (and masks) into SimpleITK images (LPS, world geometry). Main thread."""
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise UserError("Select a fixed and a moving volume.")
        if fixedVolumeNode is movingVolumeNode or fixedVolumeNode.GetID() == movingVolumeNode.GetID():
            raise UserError(f"'{fixedVolumeNode.GetName()}' is selected as both the fixed and the moving volume; "
                            "select two different volumes.")
        for role, node in (("fixed", fixedVolumeNode), ("moving", movingVolumeNode)):
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise UserError(f"The {role} volume '{node.GetName()}' is a label map (a segmentation); select an "
                                "image volume, and use label maps as masks or move them with the transform.")
            if not node.IsA("vtkMRMLScalarVolumeNode"):
                raise UserError(f"'{node.GetName()}' is not a scalar volume; select a scalar volume.")
        return RegistrationInputs(
            image_from_volume(fixedVolumeNode), image_from_volume(movingVolumeNode),
            image_from_volume(fixedMaskNode) if fixedMaskNode is not None else None,
            image_from_volume(movingMaskNode) if movingMaskNode is not None else None,
            fixedVolumeNode.GetName(), movingVolumeNode.GetName(),
            (input_state(fixedVolumeNode), input_state(movingVolumeNode)))

    @staticmethod
    def runRegistration(inputs: RegistrationInputs, settings: RegistrationSettings,
                        progress: Optional[ProgressCallback] = None, random_weights: bool = False,
                        loaded_model=None):
        """Run the engine on prepared inputs; touches no MRML node, so it may run in a worker thread.

        ``loaded_model`` (a ``LoadedModel``) replaces ``settings.model``, e.g. a network already in memory.
        """
        from ..pipeline.registration import register

        if settings.fieldGrid not in ("network", "fixed"):
            raise UserError(f"Unknown field grid '{settings.fieldGrid}': use network or fixed.")
        return register(inputs.fixed, inputs.moving, loaded_model if loaded_model is not None else settings.model,
                        fixed_modality=settings.fixedModality, moving_modality=settings.movingModality,
                        fixed_mask=inputs.fixed_mask, moving_mask=inputs.moving_mask,
                        io_iterations=int(settings.ioIterations), io_mode=settings.ioMode, io_grid=settings.ioGrid,
                        device=settings.device,
                        progress=progress,
                        weights=settings.weightsFile or None, field_grid=settings.fieldGrid,
                        exact_inverse=bool(settings.exactInverse and settings.createInverse),
                        flips=None if settings.testTimeFlips else [], symmetric=bool(settings.symmetric),
                        refinements=None if settings.refinements == -1 else int(settings.refinements),
                        random_weights=random_weights)

    def register(self, fixedVolumeNode, movingVolumeNode, model=None, *,
                 fixedModality: Optional[str] = None, movingModality: Optional[str] = None,
                 fixedMaskNode=None, movingMaskNode=None, ioIterations: Optional[int] = None,
                 ioMode: Optional[str] = None, ioGrid: Optional[str] = None, device: Optional[str] = None,
                 progress: Optional[ProgressCallback] = None,
                 weightsFile: Optional[str] = None, fieldGrid: Optional[str] = None,
                 outputMode: Optional[str] = None, createInverse: Optional[bool] = None,
                 exactInverse: Optional[bool] = None, testTimeFlips: Optional[bool] = None,
                 symmetric: Optional[bool] = None, refinements: Optional[int] = None,
                 settings: Optional[RegistrationSettings] = None,
                 random_weights: bool = False) -> RegistrationOutputs:
        """Register ``movingVolumeNode`` to ``fixedVolumeNode`` and create the output nodes.

        Options default to ``settings`` (or :class:`RegistrationSettings` defaults); keyword arguments override
        them. ``model`` is a zoo name, a spec JSON path or a ``LoadedModel``. ``progress(stage, fraction)``
        returning ``False`` cancels (raises ``Cancelled``). On an error or a cancel no node is left behind and
        the inputs are unchanged.
        """
        loaded_model = None
        if model is not None and not isinstance(model, (str, Path)):
            loaded_model, model = model, model.spec.name
        settings = dataclasses.replace(settings or RegistrationSettings(), **{k: v for k, v in {
            "fixedModality": fixedModality, "movingModality": movingModality,
            "ioIterations": ioIterations, "ioMode": ioMode, "ioGrid": ioGrid, "device": device,
            "weightsFile": weightsFile,
            "fieldGrid": fieldGrid,
            "model": str(model) if model is not None else None,
            "outputMode": outputMode, "createInverse": createInverse,
            "exactInverse": exactInverse, "testTimeFlips": testTimeFlips,
            "symmetric": symmetric, "refinements": refinements}.items() if v is not None})
        inputs = self.prepareInputs(fixedVolumeNode, movingVolumeNode, fixedMaskNode, movingMaskNode)
        result = self.runRegistration(inputs, settings, progress, random_weights=random_weights,
                                      loaded_model=loaded_model)
        return self.createOutputNodes(fixedVolumeNode, movingVolumeNode, result, settings, inputs)

    def createOutputNodes(self, fixedVolumeNode, movingVolumeNode, result, settings: RegistrationSettings,
                          inputs: Optional[RegistrationInputs] = None) -> RegistrationOutputs:
        """Turn an engine result into scene nodes (main thread). All or nothing: a failure removes them all.

        With ``inputs`` (from :meth:`prepareInputs`), a result whose input volumes were moved (parent transform
        changed, added or removed), resampled or edited since they were copied is a :class:`UserError`: the
        engine registered the volumes as they were, and placing its outputs on the volumes as they are would put
        them in the wrong place without a word. So is a result whose input volumes were removed from the scene
        (or whose scene was closed) meanwhile: node IDs are reused, so its references would name other nodes.
        """
        for node in (fixedVolumeNode, movingVolumeNode):
            if node is None or not self.scene.IsNodePresent(node):
                raise UserError(f"'{node.GetName() if node is not None else 'an input volume'}' was removed from the "
                                "scene while registering; that result was dropped. Register again.")
        if inputs is not None and inputs.state != (input_state(fixedVolumeNode), input_state(movingVolumeNode)):
            raise UserError(f"'{fixedVolumeNode.GetName()}' or '{movingVolumeNode.GetName()}' was moved or changed "
                            "while registering (transform, geometry or voxels); that result was dropped. "
                            "Register again.")
        if settings.outputMode not in ("transform", "warped"):
            raise UserError(f"Unknown output mode '{settings.outputMode}': use transform or warped.")
        scene = self.scene
        before = _node_ids(scene)

        def add(class_name: str, name: str):
            return scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))

        moving_name, fixed_name = movingVolumeNode.GetName(), fixedVolumeNode.GetName()
        try:
            transform = add("vtkMRMLGridTransformNode", f"{moving_name}-to-{fixed_name}")
            transform.SetAndObserveTransformFromParent(grid_transform_from_field(result.forward_field))
            transform.SetNodeReferenceID(transform.GetMovingNodeReferenceRole(), movingVolumeNode.GetID())
            transform.SetNodeReferenceID(transform.GetFixedNodeReferenceRole(), fixedVolumeNode.GetID())
            inverse = None
            if settings.createInverse:
                inverse = add("vtkMRMLGridTransformNode", f"{fixed_name}-to-{moving_name}")
                inverse.SetAndObserveTransformFromParent(grid_transform_from_field(result.inverse_field))
                inverse.SetNodeReferenceID(inverse.GetMovingNodeReferenceRole(), fixedVolumeNode.GetID())
                inverse.SetNodeReferenceID(inverse.GetFixedNodeReferenceRole(), movingVolumeNode.GetID())
                transform.SetNodeReferenceID(INVERSE_ROLE, inverse.GetID())
                inverse.SetNodeReferenceID(INVERSE_ROLE, transform.GetID())

            # A moving volume already under a transform keeps it; it gets a resampled copy instead.
            under_transform = (settings.outputMode == "transform"
                               and movingVolumeNode.GetParentTransformNode() is None)
            if under_transform:
                output_volume = movingVolumeNode
            else:
                output_volume = add("vtkMRMLScalarVolumeNode", f"{moving_name} warped")
                update_volume_from_image(output_volume, result.warped)
                output_volume.CreateDefaultDisplayNodes()
                _copy_window_level(movingVolumeNode, output_volume)

            jacobian = add("vtkMRMLScalarVolumeNode", f"{moving_name}-to-{fixed_name} Jacobian")
            update_volume_from_image(jacobian, result.jacobian)
            display.show_with_fixed_window(jacobian, display.fold_colour_table(scene), display.JACOBIAN_WINDOW)
            _set_units(jacobian, "1", "no units")
            ic_error = add("vtkMRMLScalarVolumeNode", f"{moving_name}-to-{fixed_name} IC error mm")
            update_volume_from_image(ic_error, result.ic_error)
            display.show_with_fixed_window(ic_error, display.ic_error_colour_table(scene),
                                           display.IC_ERROR_WINDOW_MM, visible_from=display.IC_VISIBLE_FROM_MM)
            _set_units(ic_error, "mm", "millimeter")
            table = add("vtkMRMLTableNode", f"{moving_name}-to-{fixed_name} metrics")
            fill_metrics_table(table, result.metrics)
            for node in (transform, inverse, jacobian, ic_error, table):
                if node is not None:
                    node.SetAttribute("ICONRegistration.metrics", json.dumps(_compact(result.metrics)))
            if under_transform:
                movingVolumeNode.SetAndObserveTransformNodeID(transform.GetID())
        except BaseException:
            _remove_nodes_added_since(scene, before)
            raise
        note = ""
        if settings.outputMode == "transform" and not under_transform:
            note = (f"'{moving_name}' is already under the transform "
                    f"'{movingVolumeNode.GetParentTransformNode().GetName()}', so a warped copy "
                    f"'{output_volume.GetName()}' was made instead of placing it under the result.")
            logging.info(note)
        outputs = RegistrationOutputs(transform, inverse, output_volume, jacobian, ic_error, table, result, note)
        self._remember(fixedVolumeNode, movingVolumeNode, outputs)
        return outputs

    def _remember(self, fixedVolumeNode, movingVolumeNode, outputs: RegistrationOutputs) -> None:
        node = self.getParameterNode()
        with slicer.util.NodeModify(node):
            node.SetNodeReferenceID("fixedVolume", fixedVolumeNode.GetID())
            node.SetNodeReferenceID("movingVolume", movingVolumeNode.GetID())
            for role, output in zip(OUTPUT_ROLES, (outputs.transform, outputs.inverse_transform,
                                                   outputs.output_volume, outputs.jacobian, outputs.ic_error,
                                                   outputs.metrics_table)):
                node.SetNodeReferenceID(role, output.GetID() if output is not None else None)

    # ----- using the result -----------------------------------------------------------------------
    def showResults(self, outputs: RegistrationOutputs, fixedVolumeNode=None, overlay: str = "folds",
                    foregroundOpacity: float = 0.5) -> int:
        """Fixed image as background, moving/warped as foreground (``foregroundOpacity``, default 50 %), the fold
        map (``"folds"``) or IC map (``"ic"``) or nothing (``"none"``) as overlay, in every slice view. Returns the
        number of views set (0 when the scene has no layout)."""
        if overlay not in OVERLAYS:
            raise UserError(f"Unknown overlay '{overlay}': use {', '.join(OVERLAYS)}.")
        if any(not self.scene.IsNodePresent(node) for node in outputs.nodes() + [fixedVolumeNode] if node is not None):
            # after a scene close, other nodes may carry the removed nodes' IDs: never show those in their place
            raise UserError("That registration's nodes are no longer in the scene (removed, or the scene was "
                            "closed); register again.")
        if fixedVolumeNode is None and outputs.transform is not None:
            fixedVolumeNode = outputs.transform.GetNodeReference(outputs.transform.GetFixedNodeReferenceRole())
        overlay_node, opacity = {"folds": (outputs.jacobian, display.FOLD_OVERLAY_OPACITY),
                                 "ic": (outputs.ic_error, display.IC_OVERLAY_OPACITY), "none": (None, 1.0)}[overlay]
        if not 0.0 <= foregroundOpacity <= 1.0:
            raise UserError(f"The foreground opacity must be in [0, 1], got {foregroundOpacity}.")
        return display.set_slice_layers(self.scene, background=fixedVolumeNode, foreground=outputs.output_volume,
                                        foreground_opacity=foregroundOpacity, overlay=overlay_node, overlay_opacity=opacity)

    def applyToSegmentation(self, segmentationNode, transformNode, direction: str = "moving_to_fixed",
                            referenceVolumeNode=None):
        """A new segmentation node: ``segmentationNode`` moved through a registration (the input is unchanged).

        ``transformNode`` is the forward (moving → fixed) node :meth:`register` made. ``direction``:
        ``"moving_to_fixed"`` moves a segmentation drawn on the moving image onto the fixed image;
        ``"fixed_to_moving"`` the reverse, through the inverse transform node (or, without one, Slicer's
        iterative inverse of the forward transform). Each segment's binary labelmap is resampled nearest-neighbour
        by Slicer onto the reference volume's voxel grid (default: the fixed volume, resp. the moving volume),
        keeping names, colours and overlaps. Parent transforms of the segmentation and of the reference count as
        the registration saw them (it registered the volumes' world geometry), except the registration's own
        nodes: a segmentation or volume placed under the result counts where it was before. The new segmentation
        is placed under the reference volume's parent transform, so the two stay overlaid in the views.
        """
        if direction not in DIRECTIONS:
            raise UserError(f"Unknown direction '{direction}': use {' or '.join(DIRECTIONS)}.")
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise UserError("Select a segmentation to move.")
        if transformNode is None:
            raise UserError("Register first, or select the registration's transform.")
        moving = transformNode.GetNodeReference(transformNode.GetMovingNodeReferenceRole())
        fixed = transformNode.GetNodeReference(transformNode.GetFixedNodeReferenceRole())
        inverse = transformNode.GetNodeReference(INVERSE_ROLE)
        if direction == "moving_to_fixed":
            reference = referenceVolumeNode or fixed
            to_reference = transformNode.GetTransformToParent()
        else:
            reference = referenceVolumeNode or moving
            to_reference = (inverse.GetTransformToParent() if inverse is not None
                            else transformNode.GetTransformFromParent())
        if reference is None:
            raise UserError("The transform does not say which volumes it registered; choose a reference volume.")
        segmentation = segmentationNode.GetSegmentation()
        labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if segmentation.GetNumberOfSegments() == 0:
            raise UserError(f"Segmentation '{segmentationNode.GetName()}' has no segments.")
        if not segmentation.ContainsRepresentation(labelmap_name):
            raise UserError(f"Segmentation '{segmentationNode.GetName()}' has no binary labelmap; create one in "
                            "the Segmentations module (Representations: Binary labelmap → Create).")
        return move_segmentation(self.scene, segmentationNode, reference, to_reference,
                                 registration_nodes=(transformNode, inverse))

    def exportTransform(self, transformNode, path: "str | Path") -> Path:
        """Write ``transformNode`` with Slicer's transform storage node (``.h5``/``.tfm``: ITK transform files,
        ``.nii.gz``/``.mha``/``.nrrd``: displacement images, LPS as ITK expects), atomically."""
        path = Path(path)
        if transformNode is None:
            raise UserError("Select a transform to export.")
        if not path.parent.is_dir():
            raise UserError(f"Folder '{path.parent}' does not exist.")
        suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
        if suffix.lower() not in (".h5", ".hdf5", ".tfm", ".txt", ".mat", ".nii.gz", ".nii", ".mha", ".nrrd", ".nhdr"):
            raise UserError(f"Unknown transform file type '{path.name}': use .h5, .tfm, .nii.gz, .mha or .nrrd.")
        with atomic_path(path) as temporary:
            storage = slicer.vtkMRMLTransformStorageNode()
            storage.SetFileName(str(temporary))
            if not storage.WriteData(transformNode):
                raise UserError(f"Slicer could not write '{path.name}'; check the folder is writable.")
        return path


def input_state(volume_node) -> tuple:
    """What a registration of ``volume_node`` depends on: its parent transform, its world geometry (linear parents
    folded in, as the engine got it), its size and when its voxels last changed."""
    parent = volume_node.GetParentTransformNode()
    try:
        geometry = tuple(np.round(np.concatenate([a.ravel() for a in volume_geometry_ras(volume_node)]), 9))
    except UserError:  # a non-linear parent (refused by prepareInputs): the parent's identity and time stand in
        geometry = (parent.GetID(), parent.GetMTime())
    image = volume_node.GetImageData()
    return (volume_node.GetID(), parent.GetID() if parent is not None else None, geometry,
            tuple(image.GetDimensions()) if image is not None else None,
            image.GetMTime() if image is not None else None)


_SWITCH_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}


def _parse_setting(text: str, default):
    """``text`` read as the type of ``default`` (bool, int or str); ``None`` when it cannot be."""
    value = text.strip()
    if isinstance(default, bool):
        return _SWITCH_WORDS.get(value.lower())
    if isinstance(default, int):
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return text


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs ``nvidia-smi`` reports (empty without one), for the form, without importing torch."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        output = subprocess.run([executable, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in output.splitlines() if line.strip()]


# ----- module helpers -------------------------------------------------------------------------------
def _node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def _remove_nodes_added_since(scene, before: set[str]) -> None:
    """Undo a half-finished output: remove every node the scene did not hold before (children first)."""
    for node_id in sorted(_node_ids(scene) - before, reverse=True):
        node = scene.GetNodeByID(node_id)
        if node is not None:
            scene.RemoveNode(node)


def _set_units(volume_node, code: str, meaning: str) -> None:
    units = slicer.vtkCodedEntry()
    units.SetValueSchemeMeaning(code, "UCUM", meaning)
    volume_node.SetVoxelValueUnits(units)


def _compact(metrics: "RegistrationMetrics") -> dict:
    """The metrics' JSON form without the per-step objective (a node attribute stays small)."""
    data = metrics.to_dict()
    data.pop("io_objective")
    return data


def _copy_window_level(source, target) -> None:
    source_display, target_display = source.GetDisplayNode(), target.GetDisplayNode()
    if source_display is None or target_display is None:
        return
    target_display.AutoWindowLevelOff()
    target_display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
    if source_display.GetColorNodeID():
        target_display.SetAndObserveColorNodeID(source_display.GetColorNodeID())
