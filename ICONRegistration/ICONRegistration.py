"""ICONRegistration: deformable registration with pretrained inverse-consistent networks, in 3D Slicer.

The module is thin: the form reads and writes the parameter node, and everything else is done by
``ICONRegistrationLib.mrml.logic.ICONRegistrationLogic`` (tested outside Slicer under slicer-core).
torch is imported only when Register is first pressed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from ICONRegistrationLib.errors import Cancelled, UserError, collect_user_warnings
from ICONRegistrationLib.mrml import logic as mrml_logic
from ICONRegistrationLib.mrml.logic import RegistrationSettings

HELP_TEXT = """
<p>Register a moving volume to a fixed volume with a pretrained inverse-consistent network, in about a second
on a GPU. Select the volumes (and optional masks), a model and press <b>Register</b>.</p>
<p>Outputs: a grid transform (moving → fixed, applied to the moving volume or as a new warped volume), optionally
its inverse, a <b>Jacobian fold map</b> (red where det J ≤ 0, i.e. the transform folds; window −1…3) and an
<b>inverse-consistency heatmap</b> ‖Φ<sub>BA</sub>∘Φ<sub>AB</sub>(x) − x‖ in mm (window 0…1 mm), and a metrics
table. Transforms export as ITK files (.h5) that ANTs, elastix and ITK read; segmentations can be moved either way.
<b>Exact inverse</b> replaces the network's reverse prediction by the numerical inverse of the forward transform
(fixed-point inversion, round-trip error below 0.01 voxel), for moving segmentations back and forth. ConstrICON and
SITReg-style models are inverse consistent by construction.</p>
<p>Weights are kept in the per-user cache (set ICONREG_CACHE to move it), never in the extension folder.
Offline: download a model's file elsewhere and run <code>iconreg models install NAME --from FILE</code>.</p>
<p>Documentation: <a href="https://github.com/ICONRegistration/ICONRegistration">github.com/ICONRegistration</a>.</p>
"""

ACKNOWLEDGEMENT_TEXT = """
<p>If you use this module, please cite the methods it implements:</p>
<ul>
<li>ICON: Greer, Kwitt, Vialard, Niethammer. <i>ICON: Learning Regular Maps Through Inverse Consistency.</i> ICCV 2021.</li>
<li>GradICON: Tian, Greer, Niethammer, Kwitt, Vialard. <i>GradICON: Approximate Diffeomorphisms via Gradient
Inverse Consistency.</i> CVPR 2023.</li>
<li>uniGradICON: Tian, Greer, Kwitt, Vialard, Estépar, Bouix, Rushmore, Niethammer. <i>uniGradICON: A Foundation
Model for Medical Image Registration.</i> MICCAI 2024 (and multiGradICON, Demir et al., 2024).</li>
<li>ConstrICON: Greer, Tian, Kwitt, Vialard, Estépar, Niethammer. <i>Inverse Consistency by Construction for
Multistep Deep Registration.</i> MICCAI 2023.</li>
<li>SITReg: Honkamaa, Marttinen. <i>SITReg: Multi-resolution architecture for symmetric, inverse consistent, and
topology preserving image registration.</i> MELBA 2024.</li>
</ul>
"""

OUTPUT_MODES = (("transform", "Place moving volume under the transform"), ("warped", "Create a warped volume"))
MODALITIES = (("auto", "Auto"), ("mri", "MRI"), ("ct", "CT"))
DEVICES = (("auto", "Auto"), ("cuda", "GPU"), ("cpu", "CPU"))
FIELD_GRIDS = (("network", "Network grid over the fixed image"), ("fixed", "Fixed image's own grid"))
POLL_MILLISECONDS = 100


class ICONRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ICON Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["The ICONRegistration authors"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT


class ICONRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The form. Reads/writes the parameter node; registration runs in a worker thread, results on the main one."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._worker = None
        self._messages = queue.Queue()
        self._cancelRequested = threading.Event()
        self._pending = None
        self._outputs = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.timeout.connect(self.onPollWorker)

    # ----- setup ------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ICONRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ICONRegistrationLogic()

        for combo, items in ((self.ui.fixedModalityComboBox, MODALITIES), (self.ui.movingModalityComboBox, MODALITIES),
                             (self.ui.deviceComboBox, DEVICES), (self.ui.outputModeComboBox, OUTPUT_MODES),
                             (self.ui.fieldGridComboBox, FIELD_GRIDS),
                             (self.ui.ioGridComboBox, mrml_logic.IO_GRID_CHOICES)):
            for value, label in items:
                combo.addItem(label, value)
        self.ui.directionComboBox.addItem("Moving → fixed", "moving_to_fixed")
        self.ui.directionComboBox.addItem("Fixed → moving", "fixed_to_moving")
        self.populateModels()
        self.ui.deviceLabel.text = self.gpuDescription()
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.ui.resultsCollapsibleButton.collapsed = True

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for selector in (self.ui.fixedVolumeSelector, self.ui.movingVolumeSelector, self.ui.fixedMaskSelector,
                         self.ui.movingMaskSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.fixedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onFixedVolumeChanged)
        self.ui.movingVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMovingVolumeChanged)
        for combo in (self.ui.modelComboBox, self.ui.fixedModalityComboBox, self.ui.movingModalityComboBox,
                      self.ui.deviceComboBox, self.ui.outputModeComboBox, self.ui.fieldGridComboBox,
                      self.ui.ioGridComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.ioIterationsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.createInverseCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.exactInverseCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.testTimeFlipsCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.symmetricCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.refinementsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.loadModelFileButton.connect("clicked(bool)", self.onLoadModelFile)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.showFoldsRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.showICRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.showNoneRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.applyToSegmentationButton.connect("clicked(bool)", self.onApplyToSegmentation)
        self.ui.exportTransformButton.connect("clicked(bool)", self.onExportTransform)

        self.initializeParameterNode()

    def cleanup(self):
        self.onCancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, slicer.vtkMRMLNode.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self._outputs = None  # its nodes go with the scene, and their IDs are reused by the next one's
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ----- parameter node <-> form ------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("fixedVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.SetNodeReferenceID("fixedVolume", first.GetID())

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, slicer.vtkMRMLNode.ModifiedEvent,
                                self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, slicer.vtkMRMLNode.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            settings = self.logic.settings(self._parameterNode, strict=False)  # shown, then written back
            node = self._parameterNode.GetNodeReference
            self.ui.fixedVolumeSelector.setCurrentNode(node("fixedVolume"))
            self.ui.movingVolumeSelector.setCurrentNode(node("movingVolume"))
            self.ui.fixedMaskSelector.setCurrentNode(node("fixedMask"))
            self.ui.movingMaskSelector.setCurrentNode(node("movingMask"))
            if self.ui.modelComboBox.findData(settings.model) < 0:
                self.ui.modelComboBox.addItem(os.path.basename(settings.model), settings.model)
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(settings.model))
            for combo, value in ((self.ui.fixedModalityComboBox, settings.fixedModality),
                                 (self.ui.movingModalityComboBox, settings.movingModality),
                                 (self.ui.deviceComboBox, settings.device),
                                 (self.ui.outputModeComboBox, settings.outputMode),
                                 (self.ui.fieldGridComboBox, settings.fieldGrid),
                                 (self.ui.ioGridComboBox, settings.ioGrid)):
                combo.setCurrentIndex(max(combo.findData(value), 0))
            self.ui.ioIterationsSpinBox.value = settings.ioIterations
            self.ui.ioGridComboBox.enabled = settings.ioIterations > 0 and settings.ioMode == "fields"
            self.ui.createInverseCheckBox.checked = settings.createInverse
            self.ui.exactInverseCheckBox.checked = settings.exactInverse
            self.ui.exactInverseCheckBox.enabled = settings.createInverse
            self.ui.testTimeFlipsCheckBox.checked = settings.testTimeFlips
            self.ui.symmetricCheckBox.checked = settings.symmetric
            self.ui.refinementsSpinBox.value = settings.refinements
            {"folds": self.ui.showFoldsRadioButton, "ic": self.ui.showICRadioButton,
             "none": self.ui.showNoneRadioButton}.get(settings.overlay, self.ui.showFoldsRadioButton).checked = True
            ready = bool(node("fixedVolume") and node("movingVolume"))
            busy = self._worker is not None
            self.ui.registerButton.enabled = ready and not busy
            self.ui.registerButton.toolTip = ("Register the moving volume to the fixed volume" if ready
                                              else "Select a fixed and a moving volume")
            transform = node("outputTransform")
            self.ui.applyToSegmentationButton.enabled = transform is not None and not busy
            self.ui.exportTransformButton.enabled = transform is not None and not busy
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *unused):
        if self._parameterNode is None or self._updatingGUI:
            return
        wasModifying = self._parameterNode.StartModify()
        try:
            self._parameterNode.SetNodeReferenceID("fixedVolume", self.ui.fixedVolumeSelector.currentNodeID)
            self._parameterNode.SetNodeReferenceID("movingVolume", self.ui.movingVolumeSelector.currentNodeID)
            self._parameterNode.SetNodeReferenceID("fixedMask", self.ui.fixedMaskSelector.currentNodeID)
            self._parameterNode.SetNodeReferenceID("movingMask", self.ui.movingMaskSelector.currentNodeID)
            self.logic.setSettings(self.settingsFromGUI(), self._parameterNode)
        finally:
            self._parameterNode.EndModify(wasModifying)

    def settingsFromGUI(self) -> RegistrationSettings:
        overlay = "ic" if self.ui.showICRadioButton.checked else "none" if self.ui.showNoneRadioButton.checked \
            else "folds"
        previous = self.logic.settings(self._parameterNode, strict=False)
        return RegistrationSettings(
            model=self.ui.modelComboBox.currentData or previous.model, weightsFile=previous.weightsFile,
            fixedModality=self.ui.fixedModalityComboBox.currentData,
            movingModality=self.ui.movingModalityComboBox.currentData,
            ioIterations=int(self.ui.ioIterationsSpinBox.value), ioMode=previous.ioMode,
            ioGrid=self.ui.ioGridComboBox.currentData, device=self.ui.deviceComboBox.currentData,
            fieldGrid=self.ui.fieldGridComboBox.currentData, outputMode=self.ui.outputModeComboBox.currentData,
            createInverse=bool(self.ui.createInverseCheckBox.checked),
            exactInverse=bool(self.ui.exactInverseCheckBox.checked),
            testTimeFlips=bool(self.ui.testTimeFlipsCheckBox.checked),
            symmetric=bool(self.ui.symmetricCheckBox.checked), refinements=int(self.ui.refinementsSpinBox.value),
            overlay=overlay)

    # ----- form helpers -----------------------------------------------------------------------------
    def populateModels(self):
        self.ui.modelComboBox.clear()
        for name, state in self.logic.modelChoices():
            self.ui.modelComboBox.addItem(f"{name} ({state})", name)

    @staticmethod
    def gpuDescription() -> str:
        names = mrml_logic.gpu_names()
        return f"GPU: {', '.join(names)}" if names else "No NVIDIA GPU found: Auto runs on the CPU"

    def onFixedVolumeChanged(self, node):
        self._showModalityGuess(node, self.ui.fixedModalityComboBox)

    def onMovingVolumeChanged(self, node):
        self._showModalityGuess(node, self.ui.movingModalityComboBox)

    def _showModalityGuess(self, node, combo):
        guess = self.logic.guessModality(node) if node is not None and node.GetImageData() else None
        combo.setItemText(0, f"Auto ({guess.upper() if guess == 'ct' else 'MRI'})" if guess else "Auto")

    def onLoadModelFile(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Load a model spec (JSON) or weights", "",
                                              "Model spec (*.json);;Weights (*.pth *.pt *.trch)")
        if not path:
            return
        settings = self.settingsFromGUI()
        if path.lower().endswith(".json"):
            settings.model, settings.weightsFile = path, ""
        else:
            settings.weightsFile = path
        self.logic.setSettings(settings, self._parameterNode)

    def onOverlayChanged(self, checked):
        if not checked or self._updatingGUI:
            return
        self.updateParameterNodeFromGUI()
        if self._outputs is not None:
            overlay = self.logic.settings(self._parameterNode, strict=False).overlay
            try:
                self.logic.showResults(self._outputs, overlay=overlay)
            except UserError as error:  # its nodes were removed meanwhile
                self._outputs = None
                self.ui.statusLabel.text = str(error)

    # ----- register ---------------------------------------------------------------------------------
    def onRegister(self):
        if self._worker is not None or not ensureTorch():
            return
        self.updateParameterNodeFromGUI()
        node = self._parameterNode.GetNodeReference
        try:
            settings = self.logic.settings(self._parameterNode)
            inputs = self.logic.prepareInputs(node("fixedVolume"), node("movingVolume"), node("fixedMask"),
                                              node("movingMask"))
        except UserError as error:
            slicer.util.errorDisplay(str(error))
            return
        self._pending = (node("fixedVolume"), node("movingVolume"), settings, inputs)
        self._cancelRequested.clear()
        self._messages = queue.Queue()
        self._worker = threading.Thread(target=self._runInWorker, args=(inputs, settings, self._messages),
                                        name="ICONRegistration", daemon=True)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.ui.statusLabel.text = "Starting…"
        self.updateGUIFromParameterNode()
        self._worker.start()
        self._timer.start()

    def _runInWorker(self, inputs, settings, messages):
        """Worker thread: the engine only (no MRML, no Qt); talks to the GUI through ``messages``."""
        def progress(stage, fraction):
            messages.put(("progress", stage, fraction))
            return not self._cancelRequested.is_set()

        try:
            result, said = collect_user_warnings(lambda: self.logic.runRegistration(inputs, settings, progress))
            messages.put(("done", result, said))
        except Cancelled:
            messages.put(("cancelled",))
        except UserError as error:
            messages.put(("error", str(error)))
        except Exception as error:  # shown to the user and logged with its traceback
            logging.exception("ICONRegistration failed")
            messages.put(("error", f"Registration failed: {error}"))

    def onPollWorker(self):
        while True:
            try:
                message = self._messages.get_nowait()
            except queue.Empty:
                return
            kind = message[0]
            if kind == "progress":
                _, stage, fraction = message
                self.ui.statusLabel.text = f"{stage.capitalize()}…"
                self.ui.progressBar.value = int(round(100 * fraction))
                continue
            self._finishWorker()
            if kind == "done" and self._cancelRequested.is_set():  # cancelled after the engine's last check
                self.ui.statusLabel.text = "Cancelled; nothing was changed."
            elif kind == "done":
                self._showResult(message[1], message[2])
            elif kind == "cancelled":
                self.ui.statusLabel.text = "Cancelled; nothing was changed."
            else:
                self.ui.statusLabel.text = "Failed."
                slicer.util.errorDisplay(message[1])
            return

    def _finishWorker(self):
        self._timer.stop()
        self._worker = None
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.updateGUIFromParameterNode()

    def _showResult(self, result, warningTexts=()):
        fixed, moving, settings, inputs = self._pending
        try:
            self._outputs = self.logic.createOutputNodes(fixed, moving, result, settings, inputs)
        except UserError as error:
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(str(error))
            return
        self.logic.showResults(self._outputs, fixed, overlay=settings.overlay)
        self.ui.metricsTableView.setMRMLTableNode(self._outputs.metrics_table)
        metrics = result.metrics
        self.ui.statusLabel.text = (
            f"Done in {metrics.total_seconds:.1f} s on {metrics.device}: {metrics.folds} folded voxels "
            f"({metrics.folds_percent:.3f} %), IC error {metrics.ic_error_mean_mm:.3f} mm mean"
            f"{metrics.overlap_note(3)}."
            + (f" {self._outputs.note}" if self._outputs.note else "")
            + ("".join(f" Warning: {text}" for text in warningTexts)))
        self.ui.resultsCollapsibleButton.collapsed = False
        self.updateGUIFromParameterNode()

    def onCancel(self):
        if self._worker is not None:
            self._cancelRequested.set()
            self.ui.statusLabel.text = "Cancelling…"

    # ----- using the result -------------------------------------------------------------------------
    def onApplyToSegmentation(self):
        transform = self._parameterNode.GetNodeReference("outputTransform")
        segmentation = self.ui.segmentationSelector.currentNode()
        try:
            with slicer.util.WaitCursor():
                moved = self.logic.applyToSegmentation(segmentation, transform,
                                                       self.ui.directionComboBox.currentData)
        except UserError as error:
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusLabel.text = f"Created segmentation '{moved.GetName()}'."

    def onExportTransform(self):
        transform = self._parameterNode.GetNodeReference("outputTransform")
        if transform is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export transform", f"{transform.GetName()}.h5",
                                              "ITK transform (*.h5 *.tfm);;Displacement field (*.nii.gz *.mha *.nrrd)")
        if not path:
            return
        try:
            written = self.logic.exportTransform(transform, path)
        except UserError as error:
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusLabel.text = f"Wrote {written}."


def torchImportable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def ensureTorch() -> bool:
    """Import torch, offering to install it (PyTorch extension first, else pip) when it is missing."""
    if torchImportable():
        return True
    try:
        import PyTorchUtils  # the PyTorch extension, declared in EXTENSION_DEPENDS
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if not slicer.util.confirmOkCancelDisplay(
                    "ICON Registration needs PyTorch. Install it now with the PyTorch extension "
                    "(a GPU build when a GPU is present)? This can take several minutes."):
                return False
            return torchLogic.installTorch(askConfirmation=False) is not None
        return True
    if not slicer.util.confirmOkCancelDisplay(
            "ICON Registration needs PyTorch, and the PyTorch extension is not installed. Install the 'torch' "
            "package with pip now? (Numpy, SimpleITK and VTK are left as they are.)"):
        return False
    with slicer.util.WaitCursor():
        # plain 'torch' only: its own requirements never include numpy, SimpleITK or vtk
        slicer.util.pip_install("torch")
    if torchImportable():
        return True
    slicer.util.errorDisplay("PyTorch could not be installed; see the Python console for details.")
    return False


class ICONRegistrationLogic(mrml_logic.ICONRegistrationLogic, ScriptedLoadableModuleLogic):
    """The engine's MRML logic with Slicer's module-logic base class (for scripted-module conventions)."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        mrml_logic.ICONRegistrationLogic.__init__(self, scene)

    def getParameterNode(self):
        return mrml_logic.ICONRegistrationLogic.getParameterNode(self)


class ICONRegistrationTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: Reload and Test, or ``Slicer --no-main-window --python-script
    ICONRegistration/Testing/Python/run_module_test.py`` (see the README)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_sample_data()

    def test_register_sample_data(self):
        """MRBrainTumor1 → MRBrainTumor2 with the smallest available model: no folds, better similarity."""
        import numpy as np
        import SimpleITK as sitk

        import SampleData

        self.delayDisplay("Loading sample data")
        fixed = SampleData.downloadSample("MRBrainTumor1")
        moving = SampleData.downloadSample("MRBrainTumor2")
        logic = ICONRegistrationLogic()
        model = smallest_available_model()
        self.assertIsNotNone(model, "no model with weights available: run 'iconreg models list'")
        self.delayDisplay(f"Registering with {model}")
        outputs = logic.register(fixed, moving, model, fixedModality="mri", movingModality="mri",
                                 outputMode="warped")
        metrics = outputs.result.metrics
        self.assertLess(metrics.folds_percent, 0.1)
        self.assertLess(metrics.ic_error_mean_mm, 1.0)
        inputs = logic.prepareInputs(fixed, moving)
        fixed_image, moving_image = inputs.fixed, inputs.moving
        before = sitk.Resample(moving_image, fixed_image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

        def correlation(a, b):
            a, b = sitk.GetArrayFromImage(a).ravel(), sitk.GetArrayFromImage(b).ravel()
            return float(np.corrcoef(a, b)[0, 1])

        fixed_float = sitk.Cast(fixed_image, sitk.sitkFloat32)
        self.assertGreater(correlation(fixed_float, outputs.result.warped), correlation(fixed_float, before))
        self.assertTrue(logic.exportTransform(outputs.transform, os.path.join(slicer.app.temporaryPath,
                                                                              "ICONRegistrationTest.h5")).is_file())
        self.delayDisplay("Test passed")


def smallest_available_model():
    """The zoo model with the smallest network input whose weights are bundled or downloaded, or ``None``."""
    from ICONRegistrationLib.models.zoo import zoo_spec

    available = [zoo_spec(name) for name, state in mrml_logic.ICONRegistrationLogic.modelChoices()
                 if state in ("bundled", "downloaded")]
    if not available:
        return None
    return min(available, key=lambda spec: spec.input_shape[0] * spec.input_shape[1] * spec.input_shape[2]).name
