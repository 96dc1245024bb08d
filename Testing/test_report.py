"""Tests of the PNG quality report (``ICONRegistrationLib.io.report.write_report``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import ICONRegistrationLib
from ICONRegistrationLib import ModelSpec
from ICONRegistrationLib.io.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_SPEC = {"name": "tiny", "unet": {"num_layers": 5, "channels": [[2, 8, 8, 16, 16, 16], [8, 8, 16, 16, 16]]},
             "input_shape": [66, 72, 68], "similarity": {"name": "lncc", "sigma": 5}, "lambda": 1.5, "preprocessing": {"mri_percentile": 99}}


def _blobs(size_xyz, spacing, centres_mm, sigma_mm=8.0) -> sitk.Image:
    """Sum of Gaussian blobs on a grid with origin (−10, 5, 20) mm and identity direction."""
    origin = np.array([-10.0, 5.0, 20.0])
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.arange(nz) * spacing[2] + origin[2], np.arange(ny) * spacing[1] + origin[1],
                          np.arange(nx) * spacing[0] + origin[0], indexing="ij")
    array = np.zeros((nz, ny, nx), dtype=np.float32)
    for cx, cy, cz in centres_mm:
        array += 100.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_mm ** 2))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(origin))
    return image


@pytest.fixture(scope="module")
def registered():
    """A small anisotropic fixed / moving pair and its registration with a randomly initialised tiny network."""
    size, spacing = (40, 50, 45), (1.0, 0.8, 1.6)  # x, y, z voxels; mm
    centres = [(10.0, 20.0, 50.0), (15.0, 30.0, 70.0), (5.0, 25.0, 80.0)]
    fixed = _blobs(size, spacing, centres)
    moving = _blobs(size, spacing, [(cx + 3.0, cy - 2.0, cz + 4.0) for cx, cy, cz in centres])
    spec = ModelSpec.from_dict(TINY_SPEC)
    result = ICONRegistrationLib.register(fixed, moving, spec, fixed_modality="mri", moving_modality="mri",
                                          random_weights=True, device="cpu")
    return fixed, moving, result


def _with_jacobian(result, fold_block: bool):
    """A copy of ``result`` whose Jacobian is 1 everywhere, or 1 with a central block of −1 (folds)."""
    jacobian = sitk.GetArrayFromImage(result.jacobian)
    values = np.ones_like(jacobian)
    if fold_block:
        centre = [n // 2 for n in values.shape]
        values[tuple(slice(c - 6, c + 6) for c in centre)] = -1.0
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(result.jacobian)
    metrics = dataclasses.replace(result.metrics, folds=int((values <= 0).sum()))
    return dataclasses.replace(result, jacobian=image, metrics=metrics)


def _read_png(path: Path) -> np.ndarray:
    """RGB(A) pixels in [0, 1], shape [rows, columns, channels]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is optional
        import matplotlib.image
        return np.asarray(matplotlib.image.imread(str(path)), dtype=np.float32)
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _red_pixels(pixels: np.ndarray) -> int:
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((red > 0.8) & (green < 0.2) & (blue < 0.2)).sum())


def test_report_is_a_png_of_reasonable_size(registered, tmp_path):
    fixed, moving, result = registered
    target = tmp_path / "report.png"
    returned = write_report(target, fixed, moving, result)
    assert isinstance(returned, Path) and returned == target
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    pixels = _read_png(target)
    rows, columns = pixels.shape[:2]
    assert 800 <= columns <= 4000, pixels.shape
    assert 300 <= rows <= 4000, pixels.shape
    assert pixels[..., :3].std() > 0.05  # not a blank page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


def test_folds_are_drawn_in_red(registered, tmp_path):
    fixed, moving, result = registered
    clean = write_report(tmp_path / "clean.png", fixed, moving, _with_jacobian(result, fold_block=False), title="no folds")
    folded = write_report(tmp_path / "folded.png", fixed, moving, _with_jacobian(result, fold_block=True),
                          title="folds")
    clean_red, folded_red = _red_pixels(_read_png(clean)), _red_pixels(_read_png(folded))
    # A 12-voxel block of the network grid (~8 mm at these spacings) in each of the three central slices.
    assert folded_red > clean_red + 300, (clean_red, folded_red)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.png", "folded.png"]


def test_overwrites_atomically_and_leaves_no_temporary_files(registered, tmp_path):
    fixed, moving, result = registered
    target = tmp_path / "sub" / "report.png"
    write_report(target, fixed, moving, result, title="first")
    first = target.read_bytes()
    write_report(str(target), fixed, moving, result, title="second, a different title")
    assert target.read_bytes() != first
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.png"]


def test_failed_render_leaves_target_and_folder_untouched(registered, tmp_path, monkeypatch):
    fixed, moving, result = registered
    target = tmp_path / "report.png"
    target.write_bytes(b"previous")
    from matplotlib.backends import backend_agg

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(backend_agg.FigureCanvasAgg, "print_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(target, fixed, moving, result)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


def test_default_title_and_oblique_flipped_fixed_image(registered, tmp_path):
    """A fixed image with flipped / permuted axes still renders (orientation handling must not crash)."""
    fixed, moving, result = registered
    flipped = sitk.PermuteAxes(sitk.Flip(fixed, [False, True, True]), [1, 0, 2])
    target = write_report(tmp_path / "flipped.png", flipped, moving, result)
    assert target.read_bytes()[:8] == PNG_SIGNATURE


def test_importing_the_module_does_not_import_matplotlib():
    package_root = Path(ICONRegistrationLib.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    code = "import sys, ICONRegistrationLib.io.report; print('matplotlib' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"
