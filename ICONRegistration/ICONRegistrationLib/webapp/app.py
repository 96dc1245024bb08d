"""The page of ``iconreg app``: one browser session = one process with its own MRML scene (trame-slicer).

The launcher (:mod:`.launcher`) starts one of these per browser tab, so two tabs never share state. Every action
goes through :class:`~.session.RegistrationSession` (and so through the Slicer module's logic); this file only
wires widgets to it. Slice views are real Slicer slice views rendered offscreen (EGL) and streamed as images.

Run one session directly (without the launcher): ``python -m ICONRegistrationLib.webapp.app --port 8081``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no X server: render with EGL

from ..errors import Cancelled, UserError  # noqa: E402
from ..io.atomic import file_suffix  # noqa: E402
from ..models.spec import MAX_REFINEMENTS  # noqa: E402
from ..mrml.logic import IO_GRID_CHOICES, ICONRegistrationLogic, RegistrationSettings, gpu_names  # noqa: E402
from .files import DEFAULT_MAX_UPLOAD_MB, list_data_files, resolve_data_file, save_upload  # noqa: E402
from .session import DOWNLOADS, RegistrationSession, run_engine  # noqa: E402

MODALITY_CHOICES = ("auto", "mri", "ct")
OVERLAY_CHOICES = (("Fold map (Jacobian)", "folds"), ("Inverse-consistency error", "ic"), ("None", "none"))
MIME = {".h5": "application/x-hdf5", ".gz": "application/gzip", ".json": "application/json", ".png": "image/png"}


def default_model(choices: list[tuple[str, str]], preferred: Optional[str]) -> str:
    """``preferred`` if its weights are available, else the first model with weights, else the first model."""
    available = [name for name, state in choices if state != "not downloaded"]
    if preferred and preferred in available:
        return preferred
    return available[0] if available else choices[0][0]


class RegistrationApp:
    """Builds the page on ``server`` and connects it to a :class:`RegistrationSession`."""

    def __init__(self, server, *, data_dir: Optional[str] = None, fixed: Optional[str] = None,
                 moving: Optional[str] = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server = server
        self.state = server.state
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, server)
        self.layout_manager.register_layout_dict({"three slices": Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
            ViewLayoutDefinition.sagittal_view()])})
        self.layout_manager.set_layout("three slices")
        self.work_dir = Path(tempfile.mkdtemp(prefix="iconreg-app-"))
        self.session = RegistrationSession(self.slicer_app.scene, self.work_dir / "session",
                                           on_display_change=self._render_views)
        self._cancel = threading.Event()
        self._uploads: dict[str, tuple] = {}  # role → (checked image, name) until both roles have one
        self._task = None
        self._fit_views_on_resize()
        self._init_state()
        self._build_ui()
        if fixed and moving:
            self._load_paths(Path(fixed), Path(moving))

    # ----- state ----------------------------------------------------------------------------------
    def _init_state(self) -> None:
        from ..demo import sample_pair

        choices = ICONRegistrationLogic.modelChoices()
        try:
            sample_model = sample_pair().get("model")
        except UserError:
            sample_model = None
        state = self.state
        state.trame__title = "ICONRegistration"
        state.models = [{"title": f"{name} ({weights})", "value": name} for name, weights in choices]
        state.model = default_model(choices, sample_model)
        state.modalities = list(MODALITY_CHOICES)
        state.fixed_modality = state.moving_modality = "auto"
        state.io_iterations = 0
        state.io_grids = [{"title": title, "value": value} for value, title in IO_GRID_CHOICES]
        state.io_grid = "network"
        state.symmetric = False
        state.refinement_choices = [{"title": "model default", "value": -1}] + [
            {"title": str(n), "value": n} for n in range(MAX_REFINEMENTS + 1)]
        state.refinements = -1
        state.devices = ["auto", "cpu"] + (["cuda"] if gpu_names() else [])
        state.device = "auto"
        state.overlays = [{"title": title, "value": value} for title, value in OVERLAY_CHOICES]
        state.overlay = "folds"
        state.opacity = 0.5
        state.data_files = list_data_files(self.data_dir) if self.data_dir else []
        state.has_data_dir = self.data_dir is not None
        state.fixed_file = state.moving_file = None
        state.inputs_text = "No images loaded."
        state.has_inputs = False
        state.busy = False
        state.progress = 0
        state.progress_text = ""
        state.message = ""
        state.message_type = "error"
        state.metrics = []
        state.has_result = False
        state.legend = None
        state.downloads = list(DOWNLOADS)
        state.max_upload_bytes = self.max_upload_bytes
        state.change("overlay")(self._on_overlay)
        state.change("opacity")(self._on_opacity)

    def _say(self, text: str, kind: str = "error") -> None:
        with self.state:
            self.state.message, self.state.message_type = text, kind

    # ----- views ----------------------------------------------------------------------------------
    def _slice_views(self) -> list:
        return self.slicer_app.view_manager.get_slice_views()

    def _render_views(self) -> None:
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    def _fit_views(self) -> None:
        for view in self._slice_views():
            view.fit_view_to_content()
        self._render_views()

    def _fit_views_on_resize(self) -> None:
        """Views are created before the browser reports their size: fit them again whenever one is resized."""
        from vtkmodules.vtkCommonCore import vtkCommand

        for view in self._slice_views():
            view.render_window().AddObserver(vtkCommand.WindowResizeEvent,
                                             lambda *_args, view=view: view.fit_view_to_content())

    # ----- inputs ---------------------------------------------------------------------------------
    def _load_images(self, fixed, moving, fixed_name: str, moving_name: str) -> None:
        if self.state.busy:  # the page disables loading meanwhile; a request may still arrive (or a script's)
            raise UserError("A registration is running: wait for it or cancel it before loading other images.")
        self.session.set_inputs(fixed, moving, fixed_name, moving_name)
        self._fit_views()
        with self.state:
            self.state.has_inputs = True
            self.state.has_result = False
            self.state.metrics = []
            self.state.legend = None
            self.state.inputs_text = f"Fixed: {fixed_name} · Moving: {moving_name}"
            self.state.message = ""

    def _load_paths(self, fixed: Path, moving: Path) -> None:
        from ..io.images import read_image

        self._load_images(read_image(fixed, "fixed"), read_image(moving, "moving"),
                          _stem(fixed.name), _stem(moving.name))

    def load_sample(self) -> None:
        """The bundled sample pair, with the model and modality that ship for it."""
        from ..demo import sample_pair

        try:
            sample = sample_pair()
            self._load_paths(Path(sample["fixed"]), Path(sample["moving"]))
        except UserError as error:
            self._say(str(error))
            return
        with self.state:
            if sample.get("model") in [item["value"] for item in self.state.models]:
                self.state.model = sample["model"]
            modality = sample.get("modality", "auto")
            self.state.fixed_modality = self.state.moving_modality = modality

    def load_data_files(self) -> None:
        """The two files chosen under ``--data-dir`` (paths checked: nothing outside the folder is read)."""
        if self.data_dir is None:
            self._say("The app was started without --data-dir; upload files or load the sample pair.")
            return
        try:
            fixed = resolve_data_file(self.data_dir, self.state.fixed_file)
            moving = resolve_data_file(self.data_dir, self.state.moving_file)
            self._load_paths(fixed, moving)
        except UserError as error:
            self._say(str(error))

    def upload(self, role: str, files: Any) -> None:
        """One uploaded file for ``role`` (``"fixed"``/``"moving"``): size, format and 3-D scalar checks first;
        the pair is loaded once both roles have a good file."""
        from trame.app.file_upload import ClientFile

        if isinstance(files, list):
            files = files[0] if files else None
        if not files:
            return
        upload = ClientFile(files)
        try:
            path, image = save_upload(upload.name, upload.content or b"", self.work_dir / "uploads", role,
                                      self.max_upload_bytes)
        except UserError as error:
            self._say(str(error))
            return
        self._uploads[role] = (image, _stem(upload.name))
        if len(self._uploads) == 2:
            (fixed, fixed_name), (moving, moving_name) = self._uploads["fixed"], self._uploads["moving"]
            try:
                self._load_images(fixed, moving, fixed_name, moving_name)
            except UserError as error:
                self._say(str(error))
                return
            self._uploads = {}
        else:
            self._say(f"{role.capitalize()} image '{upload.name}' checked; now upload the "
                      f"{'moving' if role == 'fixed' else 'fixed'} image.", "info")

    # ----- registration ---------------------------------------------------------------------------
    def settings(self) -> RegistrationSettings:
        state = self.state
        try:
            number = float(state.io_iterations or 0)
            iterations = int(number) if number.is_integer() else None  # 2.5 is refused, not run as 2
        except (TypeError, ValueError, OverflowError):
            iterations = None
        if iterations is None:
            raise UserError(f"Instance-optimisation iterations must be a whole number, got "
                            f"'{state.io_iterations}'.")
        if not 0 <= iterations <= 1000:
            raise UserError(f"Instance-optimisation iterations must be between 0 and 1000, got {iterations}.")
        return RegistrationSettings(model=state.model, fixedModality=state.fixed_modality,
                                    movingModality=state.moving_modality, ioIterations=iterations,
                                    ioGrid=state.io_grid, symmetric=bool(state.symmetric),
                                    refinements=self._refinements(state.refinements), device=state.device,
                                    overlay=state.overlay)

    @staticmethod
    def _refinements(value) -> int:
        """The page's refinements choice: −1 (the model's default) or 0…MAX_REFINEMENTS."""
        try:
            refinements = int(-1 if value is None or value == "" else value)
        except (TypeError, ValueError):
            refinements = -2
        if not -1 <= refinements <= MAX_REFINEMENTS:
            raise UserError(f"Refinements must be the model's default or 0 to {MAX_REFINEMENTS}, got '{value}'.")
        return refinements

    def register(self) -> None:
        """Start a registration as a task and return at once: the page's messages (Cancel among them) are
        handled one after the other, so a trigger that awaited the registration would hold Cancel back."""
        from trame_server.utils.asynchronous import create_task

        if not self.state.busy:
            self._task = create_task(self.register_and_show())

    async def register_and_show(self) -> None:
        """Register in a worker thread with progress; a cancel or an error leaves the scene as it was."""
        if self.state.busy:
            return
        try:
            settings = self.settings()
            inputs = self.session.prepare(settings)
        except UserError as error:
            self._say(str(error))
            return
        loop = asyncio.get_running_loop()
        self._cancel.clear()
        with self.state:
            self.state.busy, self.state.progress, self.state.progress_text = True, 0, "starting"
            self.state.message = ""

        def progress(stage: str, fraction: float) -> bool:
            loop.call_soon_threadsafe(self._show_progress, stage, fraction)
            return not self._cancel.is_set()

        try:
            run = await loop.run_in_executor(None, run_engine, inputs, settings, self.session.work_dir, progress)
            if self._cancel.is_set():  # cancelled after the engine's last check: drop the result
                shutil.rmtree(run.folder, ignore_errors=True)
                raise Cancelled("cancelled")
            self.session.finish(run, settings)
        except Cancelled:
            self._say("Registration cancelled; the previous state is kept.", "info")
        except UserError as error:
            self._say(str(error))
        except MemoryError:
            self._say("Out of memory: close other programs or use smaller images.")
        except Exception as error:  # anything else: said and logged, never a silent page showing the last result
            logging.exception("ICONRegistration web app: registration failed")
            self._say(f"Registration failed ({type(error).__name__}: {error}); the previous result is kept. "
                      "Details are in the server's log.")
        else:
            with self.state:
                self.state.metrics = [list(row) for row in self.session.metrics()]
                self.state.has_result = True
                self.state.legend = self.session.legend()
                self.state.message, self.state.message_type = self.session.summary()
        finally:
            with self.state:
                self.state.busy = False
                self.state.progress_text = ""

    def _show_progress(self, stage: str, fraction: float) -> None:
        with self.state:
            self.state.progress = round(100 * fraction)
            self.state.progress_text = stage

    def cancel(self) -> None:
        self._cancel.set()
        with self.state:
            self.state.progress_text = "cancelling…"

    # ----- display and downloads ------------------------------------------------------------------
    def _on_overlay(self, overlay, **_) -> None:
        try:
            self.session.set_overlay(overlay)
        except UserError as error:
            self._say(str(error))
            return
        self.state.legend = self.session.legend()

    def _on_opacity(self, opacity, **_) -> None:
        try:
            self.session.set_opacity(float(opacity))
        except (UserError, TypeError, ValueError) as error:
            self._say(str(error))

    def download(self, name: str):
        """The bytes of a result file as a websocket attachment (``None`` with a message when unavailable)."""
        try:
            path = self.session.download_path(name)
        except UserError as error:
            self._say(str(error))
            return None
        return self.server.protocol.addAttachment(path.read_bytes())

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ----- page -----------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        from trame.widgets import client, html
        from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame_vuetify.widgets import vuetify3 as v

        ctrl = self.server.controller
        trigger = ctrl.trigger_name
        upload_name = trigger(self.upload)
        download_name = trigger(self.download)
        with SinglePageWithDrawerLayout(self.server, width=340) as layout:
            self.ui = layout
            client.Style("html { overflow-y: auto; } .legend-bar { height: 14px; border: 1px solid #888; }")
            layout.title.set_text("ICONRegistration")
            with layout.toolbar:
                v.VSpacer()
                html.Div("{{ inputs_text }}", id="inputs-text", classes="text-body-2 mx-4")
            with layout.drawer:
                with v.VContainer(classes="pa-3"):
                    html.Div("Inputs", classes="text-subtitle-2")
                    v.VBtn("Load sample pair", id="load-sample", click=self.load_sample, block=True,
                           disabled=("busy",), classes="my-2", variant="tonal")
                    with html.Div(v_if="has_data_dir"):
                        v.VSelect(label="Fixed (data folder)", v_model=("fixed_file",), items=("data_files",),
                                  density="compact", hide_details=True, id="fixed-file", classes="my-1")
                        v.VSelect(label="Moving (data folder)", v_model=("moving_file",), items=("data_files",),
                                  density="compact", hide_details=True, id="moving-file", classes="my-1")
                        v.VBtn("Load from data folder", id="load-data", click=self.load_data_files, block=True,
                               disabled=("busy || !fixed_file || !moving_file",), classes="my-1", variant="tonal")
                    for role in ("fixed", "moving"):
                        guard = (f"$event.target.files[0] && $event.target.files[0].size > max_upload_bytes ? "
                                 f"(message_type = 'error', message = 'The {role} upload is larger than the "
                                 f"limit (' + Math.round(max_upload_bytes / 1048576) + ' MB).') : "
                                 f"trigger('{upload_name}', ['{role}', $event.target.files])")
                        v.VFileInput(label=f"Upload {role} image", change=guard, density="compact",
                                     hide_details=True, id=f"upload-{role}", classes="my-1",
                                     accept=".nii,.nii.gz,.gz,.nrrd,.mha", disabled=("busy",))
                    v.VDivider(classes="my-3")
                    html.Div("Settings", classes="text-subtitle-2")
                    v.VSelect(label="Model", v_model=("model",), items=("models",), density="compact",
                              hide_details=True, id="model", classes="my-1")
                    with v.VRow(dense=True):
                        with v.VCol():
                            v.VSelect(label="Fixed modality", v_model=("fixed_modality",), items=("modalities",),
                                      density="compact", hide_details=True, id="fixed-modality")
                        with v.VCol():
                            v.VSelect(label="Moving modality", v_model=("moving_modality",),
                                      items=("modalities",), density="compact", hide_details=True,
                                      id="moving-modality")
                    v.VTextField(label="Instance-optimisation iterations", v_model=("io_iterations",),
                                 type="number", min=0, max=1000, density="compact", hide_details=True,
                                 id="io-iterations", classes="my-1")
                    v.VSelect(label="Instance optimisation compares images on", v_model=("io_grid",),
                              items=("io_grids",), density="compact", hide_details=True, id="io-grid",
                              classes="my-1", disabled=("!(io_iterations > 0)",))
                    v.VCheckbox(label="Symmetric prediction (forward and inverse agree)", v_model=("symmetric",),
                                density="compact", hide_details=True, id="symmetric", classes="my-1")
                    v.VSelect(label="Refinements of the prediction",
                              v_model=("refinements",), items=("refinement_choices",), density="compact",
                              hide_details=True, id="refinements", classes="my-1")
                    v.VSelect(label="Device", v_model=("device",), items=("devices",), density="compact",
                              hide_details=True, id="device", classes="my-1")
                    with v.VRow(dense=True, classes="my-2"):
                        with v.VCol():
                            v.VBtn("Register", id="register", click=self.register, color="primary", block=True,
                                   disabled=("busy || !has_inputs",))
                        with v.VCol():
                            v.VBtn("Cancel", id="cancel", click=self.cancel, block=True, disabled=("!busy",))
                    v.VProgressLinear(v_model=("progress",), v_show="busy", height=18, id="progress",
                                      color="primary", children=["{{ progress_text }}"])
                    v.VAlert(v_show="message", text=("message",), type=("message_type",), density="compact",
                             id="message", classes="my-2")
                    v.VDivider(classes="my-3")
                    html.Div("Display", classes="text-subtitle-2")
                    v.VSelect(label="Overlay", v_model=("overlay",), items=("overlays",), density="compact",
                              hide_details=True, id="overlay", classes="my-1")
                    v.VSlider(label="Moving opacity", v_model=("opacity",), min=0, max=1, step=0.05,
                              density="compact", hide_details=True, id="opacity", classes="my-1")
                    with html.Div(v_if="legend", id="legend", classes="my-2"):
                        html.Div("{{ legend.title }}", classes="text-caption")
                        html.Div(classes="legend-bar", style=("{ background: legend.gradient }",))
                        with html.Div(style="position: relative; height: 16px;", classes="text-caption"):
                            html.Span("{{ tick.label }}", v_for="tick in legend.ticks", key="tick.label",
                                      style=("{ position: 'absolute', left: tick.percent + '%', "
                                             "transform: 'translateX(-' + tick.percent + '%)' }",))
                    v.VDivider(classes="my-3")
                    html.Div("Downloads", classes="text-subtitle-2")
                    with html.Div(classes="d-flex flex-wrap"):
                        for name in DOWNLOADS:
                            v.VBtn(name, id=f"download-{name.replace('.', '-')}", size="small",
                                   variant="outlined", classes="ma-1", disabled=("!has_result || busy",),
                                   click=(f"utils.download('{name}', trigger('{download_name}', ['{name}']), "
                                          f"'{MIME[Path(name).suffix]}')"))
            with layout.content:
                with html.Div(style="display: flex; flex-direction: row; height: calc(100vh - 100px); width: 100%;"):
                    with html.Div(style="flex: 1 1 auto; min-width: 300px; position: relative;"):
                        self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(style="flex: 0 0 330px; overflow-y: auto; border-left: 1px solid #ddd;",
                                  classes="pa-2"):
                        html.Div("Metrics", classes="text-subtitle-2")
                        html.Div("Register to see folds, Jacobian statistics and inverse-consistency error.",
                                 v_if="!has_result", classes="text-body-2 text-medium-emphasis")
                        with v.VTable(v_if="has_result", density="compact", id="metrics"):
                            with html.Tbody():
                                with html.Tr(v_for="row in metrics", key="row[0]"):
                                    html.Td("{{ row[0] }}", classes="text-caption")
                                    html.Td("{{ row[1] }} {{ row[2] }}", classes="text-caption",
                                            __properties=[("data_metric", "data-metric")],
                                            data_metric=("row[0]",))


def _stem(name: str) -> str:
    """A file name without its suffix (``.nii.gz`` counts as one), for node names."""
    suffix = file_suffix(Path(name))
    return name[: -len(suffix)] if suffix and len(suffix) < len(name) else name


def serve(host: str = "127.0.0.1", port: int = 0, *, data_dir: Optional[str] = None, fixed: Optional[str] = None,
          moving: Optional[str] = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          idle_timeout: int = 0) -> None:
    """Serve one session's page (blocking). ``idle_timeout`` > 0 stops the process that many seconds after its
    last browser tab disconnected (the launcher's sessions use this)."""
    from trame.app import get_server
    from trame_slicer import module as trame_slicer_module

    server = get_server(client_type="vue3")
    server.enable_module(trame_slicer_module)
    app = RegistrationApp(server, data_dir=data_dir, fixed=fixed, moving=moving, max_upload_mb=max_upload_mb)
    try:
        server.start(host=host, port=port, open_browser=False, timeout=idle_timeout, show_connection_info=False)
    finally:
        app.close()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="One ICONRegistration browser session (see 'iconreg app').")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--fixed")
    parser.add_argument("--moving")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--idle-timeout", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.host, args.port, data_dir=args.data_dir, fixed=args.fixed, moving=args.moving,
          max_upload_mb=args.max_upload_mb, idle_timeout=args.idle_timeout)


if __name__ == "__main__":
    main()
