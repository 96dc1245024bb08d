"""The browser front end's rules without a browser: which files a page may read, upload checks, and the
session controller on a real MRML scene (slicer-core)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image

from ICONRegistrationLib.errors import Cancelled, UserError
from ICONRegistrationLib.webapp.files import list_data_files, resolve_data_file, safe_upload_name, save_upload


@pytest.fixture
def data_dir(tmp_path):
    """data/ with a nested image and links; secret.nii.gz outside it."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    image = make_image(blob_volume((12, 14, 10)))
    sitk.WriteImage(image, str(root / "a.nii.gz"))
    sitk.WriteImage(image, str(root / "sub" / "b.nrrd"))
    (root / "notes.txt").write_text("not an image")
    sitk.WriteImage(image, str(tmp_path / "secret.nii.gz"))
    os.symlink(tmp_path / "secret.nii.gz", root / "link-out.nii.gz")
    os.symlink(tmp_path, root / "folder-out")
    os.symlink(root / "a.nii.gz", root / "link-in.nii.gz")
    return root


def test_data_files_listed_and_resolved_inside_the_folder_only(data_dir, tmp_path):
    assert list_data_files(data_dir) == ["a.nii.gz", "link-in.nii.gz", "sub/b.nrrd"]
    assert resolve_data_file(data_dir, "sub/b.nrrd") == (data_dir / "sub" / "b.nrrd").resolve()
    assert resolve_data_file(data_dir, "link-in.nii.gz") == (data_dir / "a.nii.gz").resolve()
    refused = {
        str(tmp_path / "secret.nii.gz"): "absolute path",
        "/etc/passwd": "absolute path",
        "../secret.nii.gz": "leaves the data folder",
        "sub/../../secret.nii.gz": "leaves the data folder",
        "sub\\..\\..\\secret.nii.gz": "leaves the data folder",
        "link-out.nii.gz": "outside the data folder",
        "folder-out/secret.nii.gz": "outside the data folder",
        "missing.nii.gz": "does not exist",
        "notes.txt": "not an image",
        "sub": "not a file",
        "": "Choose a file",
    }
    for relative, message in refused.items():
        with pytest.raises(UserError, match=message):
            resolve_data_file(data_dir, relative)


def test_uploads_are_checked_before_anything_runs(tmp_path):
    folder = tmp_path / "uploads"
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(make_image(blob_volume((12, 14, 10))), str(good))
    path, image = save_upload("../../good.nii.gz", good.read_bytes(), folder, "fixed")
    assert path.parent == folder and image.GetSize() == (10, 14, 12)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(20, 20).astype(np.float32)), str(flat))
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(5, 6, 7, 3).astype(np.float32), isVector=True), str(rgb))
    cases = {
        ("flat.nii.gz", flat.read_bytes(), 2**30): "2-D",
        ("rgb.nrrd", rgb.read_bytes(), 2**30): "components",
        ("notes.nii.gz", b"hello, not an image", 2**30): "damaged|Could not read",
        ("notes.txt", b"hello", 2**30): "not a single-file 3-D image",
        ("head.mhd", b"ObjectType = Image", 2**30): "not a single-file 3-D image",
        ("big.nii.gz", good.read_bytes(), 100): "limit is",
        ("empty.nii", b"", 2**30): "empty",
    }
    for (name, content, limit), message in cases.items():
        with pytest.raises(UserError, match=message):
            save_upload(name, content, folder, "moving", limit)
    assert sorted(p.name for p in folder.iterdir()) == ["fixed-good.nii.gz"]  # refused uploads leave nothing
    assert safe_upload_name("C:\\x\\évil name;rm.nii") == "_vil_name_rm.nii"


# ----- the session controller on a real scene ----------------------------------------------------------------
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e '.[test]')")


def require_rendering() -> None:
    """Views need the app extra and EGL (offscreen OpenGL); skip with what to install otherwise."""
    import ctypes.util

    pytest.importorskip("trame_slicer", reason="the app extra is not installed: pip install -e '.[app]'")
    if ctypes.util.find_library("EGL") is None:
        pytest.skip("no EGL library for offscreen rendering: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri")


def _sample_images():
    from ICONRegistrationLib.demo import sample_pair
    from ICONRegistrationLib.io.images import read_image

    sample = sample_pair()
    return sample, read_image(sample["fixed"]), read_image(sample["moving"])


@pytest.fixture
def session(tmp_path):
    from ICONRegistrationLib.webapp.session import RegistrationSession

    scene = slicer.vtkMRMLScene()
    for name in ("Red", "Green", "Yellow"):  # the composite nodes the app's three slice views own
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    renders = []
    yield RegistrationSession(scene, tmp_path / "work", on_display_change=lambda: renders.append(1)), renders


def _node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def test_session_registers_like_the_engine_and_replaces_its_result(session):
    from ICONRegistrationLib.mrml.logic import RegistrationSettings
    from ICONRegistrationLib.pipeline.registration import register

    session, renders = session
    sample, fixed, moving = _sample_images()
    session.set_inputs(fixed, moving, "fixed", "moving")
    composite = session.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetBackgroundVolumeID() == session.fixed_node.GetID()
    assert composite.GetForegroundVolumeID() == session.moving_node.GetID() and renders
    settings = RegistrationSettings(model=sample["model"], fixedModality="mri", movingModality="mri")
    outputs = session.register(settings)
    engine = register(fixed, moving, sample["model"], fixed_modality="mri", moving_modality="mri")
    rows = {label: value for label, value, _ in session.metrics()}
    assert int(rows["Folded voxels (det J ≤ 0)"]) == engine.metrics.folds
    assert abs(float(rows["IC error mean"]) - engine.metrics.ic_error_mean_mm) < 1e-3
    saved = json.loads(session.download_path("metrics.json").read_text())
    assert abs(saved["ic_error_mean_mm"] - engine.metrics.ic_error_mean_mm) < 1e-6
    assert composite.GetForegroundVolumeID() == outputs.output_volume.GetID()
    assert composite.GetNthLayerVolumeID(3) == outputs.jacobian.GetID()
    session.set_overlay("ic")
    assert composite.GetNthLayerVolumeID(3) == outputs.ic_error.GetID()
    assert session.legend()["unit"] == "mm"
    session.set_overlay("none")
    assert composite.GetNthLayerVolumeID(3) is None and session.legend() is None
    session.set_opacity(0.8)
    assert composite.GetForegroundOpacity() == pytest.approx(0.8)
    first_folder = session.results_dir

    # a second registration with other settings replaces the first: same number of nodes, the old ones gone
    count = session.scene.GetNumberOfNodes()
    old = {node.GetID() for node in outputs.nodes()}
    second = session.register(RegistrationSettings(model=sample["model"], fixedModality="mri",
                                                   movingModality="mri", ioIterations=3))
    assert session.scene.GetNumberOfNodes() == count
    assert not old & _node_ids(session.scene)
    assert second.result.metrics.io_iterations == 3 and not first_folder.exists()
    assert session.moving_node.GetParentTransformNode() is None  # inputs untouched
    with pytest.raises(UserError, match="Unknown download"):
        session.download_path("../secret")


def test_a_cancelled_or_failed_registration_leaves_the_scene_as_it_was(session):
    from ICONRegistrationLib.mrml.logic import RegistrationSettings

    session, _ = session
    sample, fixed, moving = _sample_images()
    session.set_inputs(fixed, moving, "fixed", "moving")
    settings = RegistrationSettings(model=sample["model"], fixedModality="mri", movingModality="mri")
    session.register(settings)
    before, outputs, folder = _node_ids(session.scene), session.outputs, session.results_dir
    with pytest.raises(Cancelled):
        session.register(settings, progress=lambda stage, fraction: stage != "network")
    with pytest.raises(UserError):
        session.register(RegistrationSettings(model="no-such-model"))
    assert _node_ids(session.scene) == before and session.outputs is outputs and session.results_dir == folder
    assert sorted(p.name for p in session.work_dir.iterdir()) == [folder.name]  # no half-written result folders
    with pytest.raises(UserError, match="3-D"):
        session.set_inputs(sitk.GetImageFromArray(np.ones((4, 4), np.float32)), moving, "flat", "moving")
    assert _node_ids(session.scene) == before


def test_a_sheared_fixed_image_is_refused_before_the_registration_runs(session):
    """The results are NIfTI files on the fixed grid, which cannot store a shear: the registration used to run to
    the end and fail while writing warped.nii.gz, with advice the page cannot follow."""
    from ICONRegistrationLib.mrml.logic import RegistrationSettings

    session, _ = session
    sample, fixed, moving = _sample_images()
    sheared = sitk.Image(fixed)
    sheared.SetDirection((1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    session.set_inputs(sheared, moving, "sheared", "moving")
    before = _node_ids(session.scene)
    with pytest.raises(UserError, match="not orthogonal"):
        session.prepare(RegistrationSettings(model=sample["model"], fixedModality="mri", movingModality="mri"))
    added = _node_ids(session.scene) - before  # only the parameter node, which stores the settings
    assert all(node.startswith("vtkMRMLScriptedModuleNode") for node in added)
    assert not session.work_dir.exists() or not any(session.work_dir.iterdir())


def test_a_result_is_not_attached_to_images_loaded_while_it_ran(session):
    """prepare → other images loaded → finish used to attach the first pair's warped volume and metrics to the
    second pair's nodes; the result is now dropped with a message, and its files removed."""
    from ICONRegistrationLib.mrml.logic import RegistrationSettings
    from ICONRegistrationLib.webapp.session import run_engine

    session, _ = session
    sample, fixed, moving = _sample_images()
    session.set_inputs(fixed, moving, "fixedA", "movingA")
    settings = RegistrationSettings(model=sample["model"], fixedModality="mri", movingModality="mri")
    inputs = session.prepare(settings)
    run = run_engine(inputs, settings, session.work_dir)
    session.set_inputs(moving, fixed, "fixedB", "movingB")
    before = _node_ids(session.scene)
    with pytest.raises(UserError, match="loaded while registering"):
        session.finish(run, settings)
    assert _node_ids(session.scene) == before and session.outputs is None and not run.folder.exists()
    session.register(settings)  # the next registration of the new pair works
    assert session.outputs is not None


def test_overlay_legend_matches_the_colour_tables():
    from ICONRegistrationLib.mrml.display import IC_ERROR_WINDOW_MM, JACOBIAN_WINDOW, overlay_legend

    folds, ic = overlay_legend("folds"), overlay_legend("ic")
    assert (folds["low"], folds["high"]) == JACOBIAN_WINDOW and (ic["low"], ic["high"]) == IC_ERROR_WINDOW_MM
    assert folds["gradient"].startswith("linear-gradient(to right, rgb(255,0,0) 0.0%")  # det ≤ 0 is red
    assert ic["unit"] == "mm" and [t["label"] for t in ic["ticks"]] == ["0 mm", "0.5 mm", "≥ 1 mm"]
    with pytest.raises(ValueError):
        overlay_legend("none")


def test_offscreen_slice_views_show_the_registration(tmp_path):
    """The app's slice views rendered without a browser: every view shows the images, the fold and IC overlays
    add colour, and the registration changed the picture."""
    require_rendering()
    from ICONRegistrationLib.mrml.logic import RegistrationSettings
    from ICONRegistrationLib.webapp.render import render_registration

    sample, fixed, moving = _sample_images()
    settings = RegistrationSettings(model=sample["model"], fixedModality="mri", movingModality="mri")
    try:
        rendered = render_registration(tmp_path / "views.png", fixed, moving, settings, size=160)
    except RuntimeError as error:  # no EGL/OpenGL on this machine
        pytest.skip(f"offscreen rendering unavailable ({error}); install libegl1 libegl-mesa0 libgl1-mesa-dri")
    pictures = rendered["pictures"]

    def coloured(picture):
        picture = picture.astype(int)
        return float(((picture.max(axis=2) - picture.min(axis=2)) > 12).mean())

    assert (tmp_path / "views.png").stat().st_size > 10_000
    for index in range(3):
        assert pictures["none"][index].std() > 10 and coloured(pictures["none"][index]) < 0.01
        assert coloured(pictures["folds"][index]) > 0.1
        assert coloured(pictures["ic"][index]) > 0.05


def test_app_command_refuses_bad_arguments_before_serving(tmp_path, capsys):
    from ICONRegistrationLib.cli import main

    assert main(["app", "--data-dir", str(tmp_path / "missing"), "--port", "0"]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert main(["app", "--fixed", str(tmp_path / "missing.nii.gz"), "--port", "0"]) == 3
    image = tmp_path / "a.nii.gz"
    sitk.WriteImage(make_image(blob_volume((8, 8, 8))), str(image))
    assert main(["app", "--fixed", str(image), "--port", "0"]) == 3
    assert "both --fixed and --moving" in capsys.readouterr().err
    assert main(["app", "--max-sessions", "0"]) == 3


def test_app_says_so_when_a_registration_fails_with_an_unexpected_error(tmp_path, monkeypatch):
    """Only user errors, cancels and MemoryError were caught: anything else (torch.OutOfMemoryError is a
    RuntimeError, a CUDA runtime error, an ITK error while writing) escaped the page's task after the message had
    been cleared, so the page showed the previous run's numbers and files with no error."""
    import asyncio

    require_rendering()
    from trame.app import get_server
    from trame_slicer import module as trame_slicer_module

    from ICONRegistrationLib.webapp import app as app_module

    sample, _, _ = _sample_images()
    server = get_server("failure-test", client_type="vue3")
    server.enable_module(trame_slicer_module)
    app = app_module.RegistrationApp(server, data_dir=str(tmp_path), fixed=str(sample["fixed"]),
                                     moving=str(sample["moving"]))

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(app_module, "run_engine", failing)
    try:
        asyncio.run(app.register_and_show())  # nothing escapes
        state = server.state
        assert state.message_type == "error" and not state.busy
        assert state.message.startswith("Registration failed (RuntimeError: CUDA error")
        assert "previous result is kept" in state.message
    finally:
        app.close()


def test_register_turns_out_of_memory_while_loading_into_a_user_error(monkeypatch):
    from ICONRegistrationLib.pipeline import registration

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(registration, "load_model", out_of_memory)
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32))
    with pytest.raises(UserError, match="Out of memory while loading the model"):
        registration.register(image, image, "gradicon-hippocampus", device="cpu", fixed_modality="mri",
                              moving_modality="mri")


def _app_with_sample_pair(name: str, data_dir):
    """A page (trame server named ``name``) with the bundled sample pair preloaded: ``(server, app, sample)``."""
    require_rendering()
    from trame.app import get_server
    from trame_slicer import module as trame_slicer_module

    from ICONRegistrationLib.webapp.app import RegistrationApp

    sample, _, _ = _sample_images()
    server = get_server(name, client_type="vue3")
    server.enable_module(trame_slicer_module)
    app = RegistrationApp(server, data_dir=str(data_dir), fixed=str(sample["fixed"]), moving=str(sample["moving"]))
    return server, app, sample


def test_app_page_preloads_a_pair_and_lists_models_with_their_weight_state(tmp_path):
    """The page's state without a browser: --fixed/--moving preload, every zoo model listed with its weight state,
    the default model one whose weights are there, and a bad data-folder choice gives a message."""
    from ICONRegistrationLib.models.zoo import model_names

    server, app, sample = _app_with_sample_pair("preload-test", tmp_path)
    try:
        state = server.state
        assert state.has_inputs and "hippocampus_269" in state.inputs_text
        titles = {item["value"]: item["title"] for item in state.models}
        assert set(titles) == set(model_names())
        assert titles[sample["model"]].endswith("(bundled)") and state.model == sample["model"]
        assert all(title.endswith(("(bundled)", "(downloaded)", "(not downloaded)")) for title in titles.values())
        assert [item["value"] for item in state.io_grids] == ["network", "fixed"] and state.io_grid == "network"
        state.io_grid, state.io_iterations = "fixed", "20"
        assert app.settings().ioGrid == "fixed" and app.settings().ioIterations == 20
        assert app.settings().symmetric is False
        state.symmetric = True
        assert app.settings().symmetric is True
        assert app.settings().refinements == -1
        assert [c["value"] for c in state.refinement_choices] == [-1, 0, 1, 2, 3]
        state.refinements = 1
        assert app.settings().refinements == 1
        state.refinements = "7"
        with pytest.raises(UserError, match="Refinements"):
            app.settings()
        state.refinements = -1
        state.fixed_file, state.moving_file = "../etc/passwd", "x.nii.gz"
        app.load_data_files()
        assert "leaves the data folder" in state.message
        # while a registration runs, no other pair may be loaded (the page disables it; a request may still come)
        nodes = (app.session.fixed_node, app.session.moving_node)
        state.busy = True
        app.load_sample()
        assert "registration is running" in state.message
        assert (app.session.fixed_node, app.session.moving_node) == nodes
        state.busy = False
    finally:
        app.close()


def test_the_engines_warnings_and_the_overlap_ic_error_reach_the_page_message(session):
    """register's UserWarnings (here: a "CT" without a voxel below 0 HU) went to the server's log only, and the page
    said "success"; they are now in the message (kind "warning") until the next result, which has its own. Where
    much of the field maps outside the moving image, the IC error inside the overlap stands beside the mean."""
    import dataclasses

    from ICONRegistrationLib.mrml.logic import RegistrationSettings

    session, _ = session
    sample, fixed, moving = _sample_images()
    session.set_inputs(fixed, moving, "fixed", "moving")
    assert session.summary() == ("", "info")
    session.register(RegistrationSettings(model=sample["model"], fixedModality="ct", movingModality="mri"))
    text, kind = session.summary()
    assert kind == "warning" and "(fixed ct, moving mri)" in text
    assert "Warning: The fixed image was given as CT but has no voxel below 0 HU" in text
    assert len(session.warnings) == 1
    metrics = session.outputs.result.metrics
    assert f"{metrics.folds} folded voxels, IC error {metrics.ic_error_mean_mm:.3f} mm mean." in text

    session.register(RegistrationSettings(model=sample["model"], fixedModality="mri", movingModality="mri"))
    text, kind = session.summary()
    assert kind == "success" and session.warnings == [] and "Warning" not in text and "outside" not in text
    result = session.outputs.result
    result.metrics = dataclasses.replace(result.metrics, ic_outside_percent=35.0, ic_error_overlap_mean_mm=0.25)
    assert (f"IC error {result.metrics.ic_error_mean_mm:.3f} mm mean (35.0 % of the field maps outside the moving "
            "image; inside: 0.250 mm).") in session.summary()[0]
    result.metrics = dataclasses.replace(result.metrics, ic_outside_percent=100.0, ic_error_overlap_mean_mm=None)
    assert "(100.0 % of the field maps outside the moving image; inside: no overlap)" in session.summary()[0]
    session.set_inputs(fixed, moving, "fixed", "moving")  # new images: no result, no warnings of the old one
    assert session.warnings == [] and session.summary() == ("", "info")


def test_app_shows_the_engines_warnings_and_refuses_fractional_iterations(tmp_path):
    """The page's message after a registration that warned is the warning kind and says why; 2.5
    instance-optimisation iterations ran as 2 without a word."""
    import asyncio

    server, app, sample = _app_with_sample_pair("warnings-test", tmp_path)
    try:
        state = server.state
        state.model, state.fixed_modality, state.moving_modality = sample["model"], "ct", "mri"
        asyncio.run(app.register_and_show())
        assert state.has_result and state.message_type == "warning", state.message
        assert state.message.startswith(f"Registered with {sample['model']}")
        assert "given as CT but has no voxel below 0 HU" in state.message
        for text in ("2.5", "1e400", "two"):
            state.io_iterations = text
            with pytest.raises(UserError, match="whole number"):
                app.settings()
        state.io_iterations = "3.0"
        assert app.settings().ioIterations == 3
    finally:
        app.close()
