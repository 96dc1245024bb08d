"""``iconreg app`` in a real browser: headless Chromium (Playwright) against the launcher and its session processes.

Needs the ``app`` extra, Playwright's Python package and a Chromium (``apt-get install chromium``; the README's test
command installs them when it runs as root). Without them these tests skip with a message saying what to install.
Screenshots go to ``$ICONREG_SCREENSHOTS`` (default: a temporary folder).
"""

from __future__ import annotations

import ctypes.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, blob_volume, make_image

pytest.importorskip("trame_slicer", reason="the app extra is not installed: pip install -e '.[app]'")
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="Playwright is not installed: pip install playwright")
CHROMIUM = os.environ.get("ICONREG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium: apt-get install chromium (or set ICONREG_CHROMIUM)", allow_module_level=True)
if ctypes.util.find_library("EGL") is None:
    pytest.skip("no EGL library for offscreen rendering: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri",
                allow_module_level=True)
from PIL import Image  # noqa: E402 (pillow comes with the app extra)

WAIT_MS = 180_000  # session start and first render on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder with the sample pair, a 2-D image, and a link to a file outside it."""
    from ICONRegistrationLib.demo import sample_pair

    root = tmp_path_factory.mktemp("app-data")
    sample = sample_pair()
    shutil.copy(sample["fixed"], root / "fixed.nii.gz")
    shutil.copy(sample["moving"], root / "moving.nii.gz")
    secret = root.parent / "secret.nii.gz"
    shutil.copy(sample["fixed"], secret)
    os.symlink(secret, root / "outside.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(30, 30).astype(np.float32)), str(root / "flat.nii.gz"))
    (root / "notes.nii.gz").write_bytes(b"this is text, not an image")
    sitk.WriteImage(make_image(blob_volume((64, 64, 64))), str(root / "big.nii"))  # 1 MB uncompressed
    return root


@pytest.fixture(scope="module")
def app_url(data_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "ICONRegistration")}
    process = subprocess.Popen([sys.executable, "-m", "ICONRegistrationLib.cli", "app", "--port", str(port),
                                "--data-dir", str(data_dir), "--max-upload-mb", "0.5", "--idle-timeout", "30"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"iconreg app stopped: {process.stdout.read()}")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/"
    process.terminate()
    output = process.communicate(timeout=30)[0]
    assert "loopback only" in output  # it says where it serves


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ICONREG_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1500, "height": 850}, accept_downloads=True)
    page = context.new_page()
    page.goto(url, timeout=WAIT_MS)
    page.wait_for_selector("#load-sample", timeout=WAIT_MS)
    return page


def wait_views(page) -> None:
    """Every slice view has received an image."""
    page.wait_for_function("document.querySelectorAll('img.image-display-area').length === 3 && "
                           "Array.from(document.querySelectorAll('img.image-display-area'))"
                           ".every(i => i.naturalWidth > 0)", timeout=WAIT_MS)


def view_pixels(page, settle_s: float = 2.0) -> list[np.ndarray]:
    """The three views as RGB arrays, once two reads a moment apart agree (the stream has settled)."""
    previous = None
    for _ in range(20):
        time.sleep(settle_s)
        current = [np.asarray(Image.open(io.BytesIO(page.locator("img.image-display-area").nth(i).screenshot()))
                              .convert("RGB"), dtype=np.int16) for i in range(3)]
        if previous is not None and all(a.shape == b.shape and np.abs(a - b).mean() < 0.5
                                        for a, b in zip(current, previous)):
            return current
        previous = current
    return current


def coloured_fraction(pixels: np.ndarray) -> float:
    """Fraction of the pixels whose RGB channels differ by more than 12 (0 for grey images)."""
    return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 12).mean())


def message(page) -> str:
    page.wait_for_function("document.querySelector('#message') && "
                           "document.querySelector('#message').innerText.trim().length > 0", timeout=WAIT_MS)
    return page.inner_text("#message")


def metric(page, label: str) -> str:
    return page.locator(f"#metrics td[data-metric='{label}']").inner_text().split()[0]


def register(page) -> None:
    page.click("#register")
    page.wait_for_selector("#metrics", timeout=WAIT_MS)
    page.wait_for_function("!document.querySelector('#register').disabled", timeout=WAIT_MS)


def choose(page, select_id: str, option: str) -> None:
    page.locator(f"#{select_id}").click(force=True)  # the selection text lies over the select's input
    page.get_by_role("option", name=option, exact=True).click()


def set_state(page, name: str, value) -> None:
    """What a crafted client could send: any value for a state variable."""
    page.evaluate(f"window.trame.state.set({json.dumps(name)}, {json.dumps(value)})")
    time.sleep(0.5)


def test_register_sample_pair_matches_the_engine(browser, app_url, shots, tmp_path):
    from ICONRegistrationLib.demo import sample_pair
    from ICONRegistrationLib.io.images import read_image
    from ICONRegistrationLib.pipeline.registration import register as engine_register

    page = open_page(browser, app_url)
    page.click("#load-sample")
    page.wait_for_function("document.querySelector('#inputs-text').innerText.includes('Fixed:')", timeout=WAIT_MS)
    wait_views(page)
    before = view_pixels(page)
    page.screenshot(path=str(shots / "app-before.png"))
    for pixels in before:
        assert pixels.std() > 10, "a slice view is blank before registration"
    register(page)
    page.screenshot(path=str(shots / "app-folds.png"))
    folds_view = view_pixels(page)

    sample = sample_pair()
    fixed, moving = read_image(sample["fixed"]), read_image(sample["moving"])
    engine = engine_register(fixed, moving, sample["model"], fixed_modality=sample["modality"],
                             moving_modality=sample["modality"])
    assert int(metric(page, "Folded voxels (det J ≤ 0)")) == engine.metrics.folds
    assert abs(float(metric(page, "IC error mean")) - engine.metrics.ic_error_mean_mm) < 1e-3

    with page.expect_download(timeout=WAIT_MS) as download:
        page.click("#download-metrics-json")
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["folds"] == engine.metrics.folds
    assert abs(saved["ic_error_mean_mm"] - engine.metrics.ic_error_mean_mm) < 1e-3
    with page.expect_download(timeout=WAIT_MS) as download:
        page.click("#download-transform-h5")
    transform_path = tmp_path / "transform.h5"
    download.value.save_as(transform_path)
    transform = sitk.ReadTransform(str(transform_path))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    difference = np.abs(sitk.GetArrayFromImage(warped) - sitk.GetArrayFromImage(engine.warped))
    scale = float(np.abs(sitk.GetArrayFromImage(engine.warped)).max())
    # Both follow ITK's rule (a point within half a voxel of the outer voxel centres takes the edge value, else 0);
    # a point that lands on that boundary to within float32 rounding may fall on either side. Any other voxel
    # must agree.
    for index in np.argwhere(difference >= 1e-3 * scale):
        point = transform.TransformPoint(fixed.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]]))
        continuous = np.array(moving.TransformPhysicalPointToContinuousIndex(point))
        edge = np.minimum(np.abs(continuous + 0.5), np.abs(continuous - (np.array(moving.GetSize()) - 0.5)))
        assert edge.min() < 1e-3, f"resampling with the downloaded transform differs from the engine at {index}"
    for name in ("inverse-h5", "warped-nii-gz", "jacobian-nii-gz", "ic_error-nii-gz", "report-png"):
        with page.expect_download(timeout=WAIT_MS) as download:
            page.click(f"#download-{name}")
        assert Path(download.value.path()).stat().st_size > 100

    # overlays: the fold map and the IC map add colour; registration changed the picture
    choose(page, "overlay", "Inverse-consistency error")
    page.wait_for_function("document.querySelector('#legend') && "
                           "document.querySelector('#legend').innerText.includes('mm')", timeout=WAIT_MS)
    ic_view = view_pixels(page)
    page.screenshot(path=str(shots / "app-ic.png"))
    choose(page, "overlay", "None")
    page.wait_for_function("!document.querySelector('#legend')", timeout=WAIT_MS)
    plain = view_pixels(page)
    for index in range(3):
        assert coloured_fraction(before[index]) < 0.01 and coloured_fraction(plain[index]) < 0.01, \
            "the images alone are grey"
        assert coloured_fraction(folds_view[index]) > 0.1, "the fold map adds no colour"
        assert coloured_fraction(ic_view[index]) > 0.05, "the IC map adds no colour"
        assert np.abs(plain[index] - before[index]).mean() > 1, "registration did not change the picture"
    page.context.close()


def test_bad_uploads_and_paths_give_messages_and_the_app_keeps_working(browser, app_url, data_dir):
    page = open_page(browser, app_url)
    page.set_input_files("#upload-fixed", str(data_dir / "flat.nii.gz"))
    assert "2-D" in message(page)
    page.set_input_files("#upload-fixed", str(data_dir / "notes.nii.gz"))
    page.wait_for_function("document.querySelector('#message').innerText.includes('notes.nii.gz')",
                           timeout=WAIT_MS)
    page.set_input_files("#upload-moving", str(data_dir / "big.nii"))
    page.wait_for_function("document.querySelector('#message').innerText.includes('limit')", timeout=WAIT_MS)
    for crafted, expected in (("../secret.nii.gz", "leaves the data folder"),
                              (str(data_dir.parent / "secret.nii.gz"), "absolute path"),
                              ("outside.nii.gz", "outside the data folder")):
        set_state(page, "fixed_file", crafted)
        set_state(page, "moving_file", "moving.nii.gz")
        page.click("#load-data")
        page.wait_for_function(f"document.querySelector('#message').innerText.includes({json.dumps(expected)})",
                               timeout=WAIT_MS)
    assert "No images loaded" in page.inner_text("#inputs-text")
    # a good upload pair still loads, and registers
    page.set_input_files("#upload-fixed", str(data_dir / "fixed.nii.gz"))
    page.wait_for_function("document.querySelector('#message').innerText.includes('now upload the moving')",
                           timeout=WAIT_MS)
    page.set_input_files("#upload-moving", str(data_dir / "moving.nii.gz"))
    page.wait_for_function("document.querySelector('#inputs-text').innerText.includes('Fixed: fixed')",
                           timeout=WAIT_MS)
    register(page)
    assert "Registered with" in message(page)
    page.context.close()


def test_cancel_keeps_the_result_and_two_sessions_are_separate(browser, app_url):
    first, second = open_page(browser, app_url), open_page(browser, app_url)
    for page in (first, second):
        set_state(page, "fixed_file", "fixed.nii.gz")
        set_state(page, "moving_file", "moving.nii.gz")
        page.click("#load-data")
        page.wait_for_function("document.querySelector('#inputs-text').innerText.includes('Fixed: fixed')",
                               timeout=WAIT_MS)
    register(first)
    ic_first = metric(first, "IC error mean")
    assert metric(first, "Instance-optimisation steps") == "0"
    assert second.locator("#metrics").count() == 0  # the other tab has no result

    # the second tab registers with instance optimisation; the first tab's result does not change
    second.fill("#io-iterations", "5")
    register(second)
    assert metric(second, "Instance-optimisation steps") == "5"
    assert metric(first, "IC error mean") == ic_first and metric(first, "Instance-optimisation steps") == "0"

    # cancel a long run: the message says so and the previous result stays
    first.fill("#io-iterations", "1000")
    first.click("#register")
    first.wait_for_function("document.querySelector('#cancel') && !document.querySelector('#cancel').disabled",
                            timeout=WAIT_MS)
    first.click("#cancel")
    first.wait_for_function("document.querySelector('#message').innerText.includes('cancelled')", timeout=WAIT_MS)
    assert metric(first, "IC error mean") == ic_first and metric(first, "Instance-optimisation steps") == "0"
    first.fill("#io-iterations", "0")
    register(first)
    assert metric(first, "IC error mean") == ic_first  # a new Register after a cancel works
    for page in (first, second):
        page.context.close()
