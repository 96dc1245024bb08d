"""One browser session's registration state on one MRML scene (no trame, no browser: tested directly).

The page's controls map onto :class:`RegistrationSession` calls; every scene change goes through the module's
:class:`~ICONRegistrationLib.mrml.logic.ICONRegistrationLogic`, so the web page shows exactly what the Slicer
module shows. A registration runs in three parts so the slow one can leave the main (render) thread:

* :meth:`RegistrationSession.prepare` (main thread) copies the input nodes into SimpleITK images;
* :func:`run_engine` (any thread) runs the engine and writes the downloadable files into a new folder;
* :meth:`RegistrationSession.finish` (main thread) replaces the previous result's nodes with the new ones.

A failure or a cancel before :meth:`~RegistrationSession.finish` leaves the scene and the previous result's files
as they were.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import SimpleITK as sitk

from ..errors import UserError, collect_user_warnings
from ..io.transforms import check_nifti_geometry
from ..mrml.logic import OVERLAYS, ICONRegistrationLogic, RegistrationInputs, RegistrationOutputs, \
    RegistrationSettings
from ..mrml.metrics_table import metrics_rows
from ..mrml.nodes import update_volume_from_image
from ..mrml import display
from ..progress import ProgressCallback

#: files a page can download after a registration, as :func:`~ICONRegistrationLib.io.write_result` names them
DOWNLOADS = ("transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz", "metrics.json",
             "report.png")


@dataclasses.dataclass
class EngineRun:
    """What :func:`run_engine` hands back to the main thread: the engine's result, its files and the warnings the
    engine gave (each once, in order)."""

    result: object  # RegistrationResult
    folder: Path
    warnings: list[str] = dataclasses.field(default_factory=list)


def run_engine(inputs: RegistrationInputs, settings: RegistrationSettings, work_dir: Path,
               progress: Optional[ProgressCallback] = None) -> EngineRun:
    """Register and write the downloadable files into a new folder under ``work_dir``; touches no MRML node.

    On any error (or a cancel through ``progress``) the new folder is removed and nothing else changes. The
    engine's warnings (``UserWarning``: modality, fields of view, inversion…) are collected for the page and logged,
    not only printed in the server's log.
    """
    from ..io import write_result

    result, said = collect_user_warnings(lambda: ICONRegistrationLogic.runRegistration(inputs, settings, progress))
    folder = Path(tempfile.mkdtemp(prefix="result-", dir=work_dir))
    try:
        write_result(result, folder, fixed=inputs.fixed, moving=inputs.moving)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return EngineRun(result, folder, said)


def _session_settings(settings: RegistrationSettings) -> RegistrationSettings:
    """The page's settings with what a session always uses: a warped volume (the moving volume never goes under a
    transform, so a second registration starts from the same scene) and the inverse transform."""
    return dataclasses.replace(settings, outputMode="warped", createInverse=True)


class RegistrationSession:
    """Inputs, settings, result nodes and result files of one user on ``scene``.

    ``on_display_change`` is called after every change of what the slice views show (the web app schedules a
    render of each view there: changing composite nodes alone does not always trigger one).
    """

    def __init__(self, scene, work_dir: str | Path, on_display_change: Optional[Callable[[], None]] = None):
        self.logic = ICONRegistrationLogic(scene)
        self.scene = scene
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.fixed_node = None
        self.moving_node = None
        self.outputs: Optional[RegistrationOutputs] = None
        self.results_dir: Optional[Path] = None
        self.warnings: list[str] = []  # the engine's warnings about the current result
        self.overlay = "folds"
        self.opacity = 0.5
        self._on_display_change = on_display_change or (lambda: None)
        self._prepared: Optional[tuple] = None  # (fixed node, moving node, RegistrationInputs) of the running one

    # ----- inputs ---------------------------------------------------------------------------------
    def set_inputs(self, fixed: sitk.Image, moving: sitk.Image, fixed_name: str, moving_name: str) -> None:
        """Replace the input volumes (and drop the previous result): new scalar volume nodes named after the
        files, fixed as background and moving as foreground in every slice view."""
        from ..pipeline.images import image_array

        image_array(fixed, "fixed")  # the engine's input check, before the scene changes
        image_array(moving, "moving")
        display.set_slice_layers(self.scene, clear=True)  # no view may show a node while it is removed
        self._clear_result()
        for node in (self.fixed_node, self.moving_node):
            if node is not None:
                self._remove(node)
        self.fixed_node = self._add_volume(fixed, fixed_name)
        self.moving_node = self._add_volume(moving, moving_name)
        self.show()

    def _add_volume(self, image: sitk.Image, name: str):
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(name))
        update_volume_from_image(node, image)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().AutoWindowLevelOn()
        return node

    @property
    def has_inputs(self) -> bool:
        return self.fixed_node is not None and self.moving_node is not None

    # ----- registration ---------------------------------------------------------------------------
    def prepare(self, settings: RegistrationSettings) -> RegistrationInputs:
        """Main thread: the settings stored on the parameter node and the inputs copied out of the scene."""
        if not self.has_inputs:
            raise UserError("Load a fixed and a moving image first (sample pair, data folder or upload).")
        settings = _session_settings(settings)
        self.logic.setSettings(settings)
        inputs = self.logic.prepareInputs(self.fixed_node, self.moving_node)
        try:  # the downloadable results are NIfTI on the fixed image's grid: refused before the work, not after it
            check_nifti_geometry(inputs.fixed, "warped.nii.gz")
        except UserError:
            raise UserError("The fixed image's axes are not orthogonal (a sheared grid), which the downloadable "
                            "NIfTI results cannot store; resample it onto a grid with orthogonal axes first.") from None
        self._prepared = (self.fixed_node, self.moving_node, inputs)
        return inputs

    def finish(self, run: EngineRun, settings: RegistrationSettings) -> RegistrationOutputs:
        """Main thread: the new result's nodes replace the previous result's (inputs untouched)."""
        settings = _session_settings(settings)
        prepared, self._prepared = self._prepared, None
        try:
            if prepared is None or prepared[:2] != (self.fixed_node, self.moving_node):  # replaced while it ran
                raise UserError("Other images were loaded while registering; that result was dropped. "
                                "Register again.")
            outputs = self.logic.createOutputNodes(self.fixed_node, self.moving_node, run.result, settings,
                                                   prepared[2])
        except BaseException:
            shutil.rmtree(run.folder, ignore_errors=True)
            raise
        previous = (self.outputs, self.results_dir)
        self.outputs, self.results_dir, self.warnings = outputs, run.folder, list(run.warnings)
        self.show()  # the views show the new nodes before the old ones are removed
        self._remove_result(*previous)
        return outputs

    def register(self, settings: RegistrationSettings,
                 progress: Optional[ProgressCallback] = None) -> RegistrationOutputs:
        """All three parts on the calling thread."""
        inputs = self.prepare(settings)
        return self.finish(run_engine(inputs, settings, self.work_dir, progress), settings)

    def _clear_result(self) -> None:
        """Remove the current result's nodes and files, and forget it."""
        outputs, folder = self.outputs, self.results_dir
        self.outputs, self.results_dir, self.warnings = None, None, []
        self._remove_result(outputs, folder)

    def _remove_result(self, outputs: Optional[RegistrationOutputs], folder: Optional[Path]) -> None:
        """Remove a result's nodes (never the inputs) and its files."""
        if outputs is not None:
            for node in outputs.nodes():
                if node is not self.moving_node and node is not self.fixed_node:
                    self._remove(node)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _remove(self, node) -> None:
        """Remove ``node`` with its display and storage nodes (removing a node alone leaves those behind)."""
        companions = []
        for count, getter in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                              ("GetNumberOfStorageNodes", "GetNthStorageNode")):
            if hasattr(node, count):
                companions += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
        self.scene.RemoveNode(node)
        for companion in companions:
            if companion is not None and self.scene.IsNodePresent(companion):
                self.scene.RemoveNode(companion)

    # ----- display --------------------------------------------------------------------------------
    def set_overlay(self, overlay: str) -> None:
        if overlay not in OVERLAYS:
            raise UserError(f"Unknown overlay '{overlay}': use {', '.join(OVERLAYS)}.")
        self.overlay = overlay
        self.show()

    def set_opacity(self, opacity: float) -> None:
        opacity = float(opacity)
        if not 0.0 <= opacity <= 1.0:
            raise UserError(f"The opacity must be in [0, 1], got {opacity}.")
        self.opacity = opacity
        self.show()

    def show(self) -> None:
        """Fixed image under the warped (after a registration) or moving image, and the chosen QA overlay."""
        if self.outputs is not None:
            self.logic.showResults(self.outputs, self.fixed_node, self.overlay, foregroundOpacity=self.opacity)
        elif self.has_inputs:
            display.set_slice_layers(self.scene, background=self.fixed_node, foreground=self.moving_node,
                                     foreground_opacity=self.opacity, overlay=None)
        self._on_display_change()

    def legend(self) -> Optional[dict]:
        """The colour legend of the overlay shown (``None`` without a result or overlay)."""
        if self.outputs is None or self.overlay == "none":
            return None
        return display.overlay_legend(self.overlay)

    # ----- results --------------------------------------------------------------------------------
    def metrics(self) -> list[tuple[str, str, str]]:
        """The metrics table node's rows ``(label, value, unit)``, as the Slicer module shows them."""
        return metrics_rows(self.outputs.metrics_table) if self.outputs is not None else []

    def summary(self) -> tuple[str, str]:
        """The page's message about the current result and its kind: ``"success"``, or ``"warning"`` with the
        engine's warnings appended. Where much of the field maps outside the moving image (register warns), the IC
        error inside the overlap is given beside the mean, as ``iconreg register`` prints it."""
        if self.outputs is None:
            return "", "info"
        metrics = self.outputs.result.metrics
        overlap = metrics.overlap_note(3)
        text = (f"Registered with {metrics.model} on {metrics.device} (fixed {metrics.fixed_modality}, moving "
                f"{metrics.moving_modality}) in {metrics.total_seconds:.2f} s: {metrics.folds} folded voxels, "
                f"IC error {metrics.ic_error_mean_mm:.3f} mm mean{overlap}.")
        if not self.warnings:
            return text, "success"
        return text + " Warning: " + " ".join(self.warnings), "warning"

    def download_path(self, name: str) -> Path:
        """The file ``name`` (one of :data:`DOWNLOADS`) of the current result."""
        if name not in DOWNLOADS:
            raise UserError(f"Unknown download '{name}': choose one of {', '.join(DOWNLOADS)}.")
        if self.results_dir is None:
            raise UserError("Register first; there is nothing to download yet.")
        path = self.results_dir / name
        if not path.is_file():
            raise UserError(f"'{name}' was not written for this result"
                            f"{' (report.png needs matplotlib)' if name == 'report.png' else ''}.")
        return path
