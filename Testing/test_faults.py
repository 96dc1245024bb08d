"""Bad inputs, faults and interruptions: never a silently wrong result, never a half-written folder.

Every row goes through the command line (exit code, one line on stderr, no traceback) and checks that the inputs
are unchanged and that the output folder is either untouched or complete.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image, random_state, tiny_spec
from ICONRegistrationLib import UserError, register
from ICONRegistrationLib.cli import main
from ICONRegistrationLib.io import read_displacement_field
from ICONRegistrationLib.io.atomic import RESULT_SET_FILES
from ICONRegistrationLib.models import weights as weights_module
from ICONRegistrationLib.models.weights import download_weights

ROOT = Path(__file__).resolve().parents[1]


def _pair(folder: Path) -> tuple[Path, Path]:
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    sitk.WriteImage(make_image(blob_volume((20, 22, 24))), str(fixed))
    sitk.WriteImage(make_image(blob_volume((20, 22, 24), centre=(11, 11, 12), seed=1)), str(moving))
    return fixed, moving


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def _one_line_user_error(code: int, err: str) -> None:
    assert code == 3, err
    assert err.startswith("iconreg: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def _no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".new-" in p.name or ".old-" in p.name or p.suffix == ".part"]


@pytest.fixture
def setup(tmp_path, tiny_model_files):
    spec_file, weights = tiny_model_files
    fixed, moving = _pair(tmp_path)
    out = tmp_path / "result"
    args = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(spec_file),
            "--weights", str(weights), "--out", str(out)]
    return {"tmp": tmp_path, "spec": spec_file, "weights": weights, "fixed": fixed, "moving": moving, "out": out,
            "args": args}


def _previous_result(setup, capsys) -> dict[str, bytes]:
    """A complete earlier result in the output folder (with its report)."""
    assert main(setup["args"]) == 0
    capsys.readouterr()
    return _snapshot(setup["out"])


# ----- silently wrong results -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_image_is_a_user_error_and_leaves_the_previous_result(setup, capsys, fraction, suffix):
    before = _previous_result(setup, capsys)
    image = make_image(blob_volume((20, 22, 24), seed=3))
    whole = setup["tmp"] / f"whole{suffix}"
    sitk.WriteImage(image, str(whole), useCompression=suffix.endswith(".gz"))
    cut = setup["tmp"] / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[:int(len(data) * fraction)])
    args = list(setup["args"])
    args[args.index("--moving") + 1] = str(cut)
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "cut short" in err and "cut" in err
    assert _snapshot(setup["out"]) == before
    assert cut.read_bytes() == data[:int(len(data) * fraction)]


def test_a_complete_gzip_of_a_truncated_nifti_is_refused_too(setup, capsys):
    whole = setup["tmp"] / "whole.nii"
    sitk.WriteImage(make_image(blob_volume((20, 22, 24))), str(whole))
    cut = setup["tmp"] / "regzipped.nii.gz"
    cut.write_bytes(gzip.compress(whole.read_bytes()[:5000]))
    args = list(setup["args"])
    args[args.index("--fixed") + 1] = str(cut)
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "once decompressed" in err and not setup["out"].exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
@pytest.mark.parametrize("dtype, bad", [(np.float32, np.nan), (np.float64, -np.inf), (np.float32, np.inf)])
def test_a_nan_or_infinite_voxel_is_refused_in_every_format(setup, capsys, suffix, dtype, bad):
    """ITK's NIfTI reader turns NaN and ±inf into 0 without a word (NRRD keeps them): the one reader refuses both
    alike, and counts every bad voxel, wherever chunk boundaries fall."""
    volume = blob_volume((20, 22, 24), seed=3).astype(dtype)
    volume[3, 4, 5] = volume[-1, -1, -1] = volume[0, 0, 0] = bad
    path = setup["tmp"] / f"bad{suffix}"
    image = sitk.GetImageFromArray(volume)
    sitk.WriteImage(image, str(path), useCompression=suffix.endswith(".gz"))
    args = list(setup["args"])
    args[args.index("--moving") + 1] = str(path)
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "3 NaN or infinite voxels" in err and not setup["out"].exists()


def test_the_nifti_non_finite_count_does_not_depend_on_the_chunk_size(tmp_path, monkeypatch):
    from ICONRegistrationLib.io import images
    volume = np.arange(7 * 9 * 11, dtype=np.float64).reshape(7, 9, 11)
    volume.flat[[0, 1, 100, 692]] = [np.nan, np.inf, -np.inf, np.nan]
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path), useCompression=True)
    for chunk in (3, 5, 8, 333, 1 << 22):  # a voxel split across chunks, and the header's tail in the first read
        monkeypatch.setattr(images, "_CHUNK", chunk)
        with pytest.raises(UserError, match="contains 4 NaN"):
            images.check_nifti(path, "moving")
    volume.flat[[0, 1, 100, 692]] = 0
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path), useCompression=True)
    images.check_nifti(path, "moving")  # finite: accepted


def _write_dicom_series(image: sitk.Image, folder: Path, uid: str, prefix: str) -> None:
    """Write ``image`` as a DICOM series. GDCM's writer switches the whole process to the C locale (ASCII as
    Python's default text encoding), so the locale is restored afterwards for the tests that follow."""
    import locale
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(image, folder, uid, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(image: sitk.Image, folder: Path, uid: str, prefix: str) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in (("0020|000e", uid), ("0020|000d", "1.2.3"), ("0008|0060", "MR"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0008|0018", f"{uid}.{k + 1}")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_)


def test_text_outputs_are_utf8_whatever_the_locale(tmp_path):
    """Model cards, tables and JSON hold '≤', '×', 'Δ'…: with an ASCII locale (as after GDCM writes DICOM, or
    LANG=C on older systems; cp1252 on Windows) every text file the package writes and reads is still UTF-8."""
    import locale
    from ICONRegistrationLib.models import ModelSpec
    from ICONRegistrationLib.models.zoo import zoo_spec
    from ICONRegistrationLib.training.trainer import write_validation_table
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_ALL, "C")
        assert locale.getpreferredencoding(False).upper().replace("-", "") in ("ANSI_X3.41968", "ASCII")
        (tmp_path / "validation_log.csv").write_text("step,val_dice,val_folds_percent\n10,0.5,0.0\n",
                                                     encoding="utf-8")
        write_validation_table(tmp_path)
        assert "≤" in (tmp_path / "validation.md").read_text(encoding="utf-8")
        spec = zoo_spec("gradicon-hippocampus")  # the zoo's descriptions hold '×'
        assert "×" in spec.extra["use"]
        spec.to_file(tmp_path / "spec.json")
        assert ModelSpec.from_file(tmp_path / "spec.json").extra["use"] == spec.extra["use"]
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_a_dicom_folder_with_two_series_is_refused_and_one_series_is_read(tmp_path):
    """ITK reads the series whose identifier sorts first: a localizer (…100 < …99) would be registered instead of
    the volume, with normal-looking QA numbers."""
    from ICONRegistrationLib.io import read_image
    folder = tmp_path / "dicom"
    folder.mkdir()
    volume = make_image(blob_volume((20, 22, 12), seed=3))
    _write_dicom_series(volume, folder, "1.2.3.4.99", "volume")
    assert read_image(folder).GetSize() == volume.GetSize()  # one series: read as before
    _write_dicom_series(make_image(blob_volume((4, 10, 10), seed=4)), folder, "1.2.3.4.100", "localizer")
    with pytest.raises(UserError, match=r"holds 2 DICOM series: 1\.2\.3\.4\.100 \(4 files\); 1\.2\.3\.4\.99"):
        read_image(folder, "moving")


def test_nan_weights_stop_at_the_network_stage(setup, capsys):
    state = torch.load(setup["weights"], weights_only=True)
    args = list(setup["args"])
    # NaN weights are refused as they are read
    nan = setup["tmp"] / "nan.pt"
    torch.save({k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in state.items()}, nan)
    args[args.index("--weights") + 1] = str(nan)
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "NaN or infinite values" in err and "nan.pt" in err
    assert not setup["out"].exists()
    # finite weights whose sums overflow float32 make the network's output non-finite: the network stage says so
    state = {k: (torch.full_like(v, 1e30) if v.is_floating_point() else v) for k, v in state.items()}
    bad = setup["tmp"] / "huge.pt"
    torch.save(state, bad)
    args[args.index("--weights") + 1] = str(bad)
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "The network produced" in err and "weights" in err
    assert not setup["out"].exists()
    # the same through the API, with instance optimisation: the stage named is the optimisation
    fixed, moving = sitk.ReadImage(str(setup["fixed"])), sitk.ReadImage(str(setup["moving"]))
    with pytest.raises(UserError, match="instance optimisation"):
        register(fixed, moving, str(setup["spec"]), weights=bad, fixed_modality="mri", moving_modality="mri",
                 io_iterations=2)


def test_extreme_intensities_register_like_the_same_image_rescaled(setup, capsys):
    """Voxels of ±3e38 (whose range overflows float32) used to give a 100 % NaN transform with exit 0: they are
    normalised in float64, so the result equals that of the same image at ordinary intensities."""
    shape = (20, 22, 24)
    ordinary = blob_volume(shape, centre=(11, 11, 12), seed=1).astype(np.float32)
    low, high = float(ordinary.min()), float(ordinary.max())
    extreme = ((ordinary.astype(np.float64) - low) / (high - low) * 6e38 - 3e38).astype(np.float32)
    results = {}
    for name, volume in (("ordinary", ordinary), ("extreme", extreme)):
        path = setup["tmp"] / f"{name}.mha"
        sitk.WriteImage(make_image(volume), str(path))
        args = list(setup["args"])
        args[args.index("--moving") + 1] = str(path)
        args[args.index("--out") + 1] = str(setup["tmp"] / name)
        assert main(args + ["--no-report"]) == 0, capsys.readouterr().err
        field = sitk.GetArrayFromImage(read_displacement_field(setup["tmp"] / name / "transform.h5"))
        assert np.isfinite(field).all()
        results[name] = field
    capsys.readouterr()
    assert np.abs(results["extreme"] - results["ordinary"]).max() < 1e-3


@pytest.mark.parametrize("command", ["jacobian", "invert"])
def test_jacobian_and_invert_refuse_a_nan_field(setup, capsys, command):
    field = np.zeros((10, 11, 12, 3))
    field[3, 4, 5, 1] = np.nan
    image = sitk.GetImageFromArray(field, isVector=True)
    path = setup["tmp"] / "nan_field.nrrd"
    sitk.WriteImage(image, str(path))
    out = setup["tmp"] / ("jac.nii.gz" if command == "jacobian" else "inv.h5")
    args = [command, "--transform", str(path), "--out", str(out)]
    if command == "invert":
        args += ["--reference", str(setup["fixed"])]
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "NaN" in err and not out.exists()


def _spec_with(setup, **changes) -> Path:
    data = json.loads(Path(setup["spec"]).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = setup["tmp"] / "changed.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"input_shape": None}, "input_shape"),
    ({"preprocessing": None}, "preprocessing"),
    ({"lambda": None}, "lambda"),
    ({"similarity": None}, "similarity"),
    ({"input_shape": [66.7, 66, 66]}, "input_shape"),
    ({"input_shape": [66, 66]}, "input_shape"),
    ({"input_shape": ["66", 66, 66]}, "input_shape"),
    ({"lambda": "1.5"}, "lambda"),
    ({"lambda": -1}, "lambda"),
    ({"levels": 2.5}, "levels"),
    ({"last_step": "yes"}, "last_step"),
    ({"similarity": {"name": "mutual_information"}}, "similarity"),
    ({"similarity": {"name": "lncc", "sigma": 0}}, "similarity.sigma"),
    ({"preprocessing": {"mri_percentile": 150}}, "preprocessing.mri_percentile"),
    ({"preprocessing": {"ct_window": [1000, -1000]}}, "preprocessing.ct_window"),
    ({"weights": {"file": "tiny.pt", "sha256": "abc"}}, "weights.sha256"),
    ({"unet": {"num_layers": 5, "channels": [[2, 8], [8]]}}, "unet.channels"),
    ({"unet": None}, "unet"),
    ({"name": "../../outside"}, "name"),
    ({"weights": {"file": "/etc/passwd"}}, "weights.file"),
    ({"options": {"svf_steps": "x"}}, "options.svf_steps"),
    ({"options": {"penalty": "l2"}}, "options.penalty"),
    # a key a model does not read is refused, not ignored (its default would be used without a word)
    ({"weights": {"file": "tiny.pt", "sha265": "0" * 64}}, "weights"),  # the hash would never be checked
    ({"options": {"final_step": 2}}, "options"),
    ({"options": {"max_gradient": 0.5}}, "options"),  # a SITReg option in a GradICON spec
    ({"similarity": {"name": "lncc", "sigmma": 2}}, "similarity"),
    ({"similarity": {"name": "ssd", "sigma": 2}}, "similarity"),
    ({"preprocessing": {"ct_windw": [-1000, 0], "mri_percentile": 99}}, "preprocessing"),
    ({"test_time_flip": [2]}, "test_time_flip"),
])
def test_spec_fields_are_validated_by_type_and_range(setup, capsys, changes, field):
    args = list(setup["args"])
    args[args.index("--model") + 1] = str(_spec_with(setup, **changes))
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert f"'{field}'" in err, err
    assert not setup["out"].exists()


# ----- weights: hashes, installs, downloads --------------------------------------------------------------------

def test_recorded_hash_is_the_hash_of_the_bytes_loaded_even_with_the_mtime_kept(setup, capsys):
    weights = Path(setup["weights"])
    assert main(setup["args"]) == 0
    capsys.readouterr()
    first = json.loads((setup["out"] / "metrics.json").read_text())["weights_sha256"]
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()
    stat = weights.stat()
    torch.save(random_state(tiny_spec(), seed=9, output_scale=1e-3), weights)  # changed in place, same size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(setup["args"]) == 0  # the same process: its model cache must notice the new bytes too
    capsys.readouterr()
    second = json.loads((setup["out"] / "metrics.json").read_text())["weights_sha256"]
    assert second == hashlib.sha256(weights.read_bytes()).hexdigest() != first
    # nothing is ever written beside the user's weights file
    assert sorted(p.name for p in weights.parent.iterdir() if p.name.startswith("tiny")) == ["tiny.json",
                                                                                              "tiny.pt"]


class _Server:
    """A local HTTP server on 127.0.0.1 serving one behaviour."""

    def __init__(self, behaviour: str, payload: bytes):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if behaviour == "hang":
                    outer.release.wait(10)
                    return
                if behaviour == "html":
                    body = b"<!doctype html><html><body>Sign in</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[:len(payload) // 2] if behaviour == "short" else payload)

        self.release = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tiny.pt"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _spec_for_download(url: str, sha256=None):
    spec = tiny_spec()
    spec.weights = {"file": "tiny.pt", "url": url, "sha256": sha256}
    return spec


@pytest.mark.parametrize("behaviour, message", [
    ("refused", "Could not download"), ("hang", "Could not download"), ("short", "cut short"),
    ("html", "web page"), ("wrong hash", "sha256"), ("other model", "does not match the model's architecture"),
])
def test_downloads_from_a_local_server_refuse_bad_transfers_and_leave_nothing(tmp_path, monkeypatch, behaviour,
                                                                                 message):
    cache = Path(os.environ["ICONREG_CACHE"])
    state = random_state(tiny_spec())
    good = tmp_path / "good.pt"
    torch.save(state, good)
    payload = good.read_bytes()
    if behaviour == "other model":
        other = tmp_path / "other.pt"
        torch.save({"w": torch.ones(3)}, other)
        payload = other.read_bytes()
    server = _Server("ok" if behaviour in ("wrong hash", "other model") else behaviour, payload)
    monkeypatch.setattr(weights_module, "DOWNLOAD_TIMEOUT_S", 1.0)
    url = server.url
    if behaviour == "refused":
        server.close()
    sha = "0" * 64 if behaviour == "wrong hash" else None
    try:
        with pytest.raises(UserError, match=message):
            download_weights(_spec_for_download(url, sha))
    finally:
        if behaviour != "refused":
            server.close()
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    # and a good transfer from the same kind of server installs and verifies
    server = _Server("ok", good.read_bytes())
    try:
        target = download_weights(_spec_for_download(server.url, hashlib.sha256(good.read_bytes()).hexdigest()))
    finally:
        server.close()
    assert target.read_bytes() == good.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["tiny.pt"]


def test_cached_weights_get_the_users_umask(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(random_state(tiny_spec()), good)
    from ICONRegistrationLib.models.weights import install_weights
    previous = os.umask(0o022)
    try:
        target = install_weights(tiny_spec(), good)
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644


# ----- the results folder is one unit ---------------------------------------------------------------------------

def test_output_folder_is_replaced_as_a_whole_and_gets_the_umask(setup, capsys):
    before = _previous_result(setup, capsys)
    assert "report.png" in before
    previous = os.umask(0o022)
    try:
        assert main(setup["args"] + ["--no-report", "--io-iterations", "1"]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    after = _snapshot(setup["out"])
    assert "report.png" not in after  # no stale report from the earlier run with other options
    assert set(after) == {"transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz",
                          "metrics.json"}
    assert json.loads(after["metrics.json"])["io_iterations"] == 1
    assert all((setup["out"] / name).stat().st_mode & 0o777 == 0o644 for name in after)
    assert setup["out"].stat().st_mode & 0o777 == 0o755
    _no_staging_left(setup["tmp"])


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_leaves_the_previous_result_untouched(setup, capsys, monkeypatch, failure):
    before = _previous_result(setup, capsys)
    from ICONRegistrationLib.io import results

    real = results.write_image
    calls = []

    def failing(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # after the first image was written into the new set
            raise OSError(failure, os.strerror(failure), str(path))
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(results, "write_image", failing)
    code = main(setup["args"] + ["--io-iterations", "1"])
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert ("disk is full" in err) == (failure == errno.ENOSPC)
    assert _snapshot(setup["out"]) == before
    _no_staging_left(setup["tmp"])


@pytest.mark.parametrize("bad_out, message", [
    ("", "empty"), ("existing-file", "existing file"), ("foreign-folder", "not registration results"),
    ("file-parent", "is a file"),
])
def test_bad_out_fails_at_once_before_any_work(setup, capsys, monkeypatch, bad_out, message):
    (setup["tmp"] / "existing-file").write_text("keep me")
    (setup["tmp"] / "foreign-folder").mkdir()
    (setup["tmp"] / "foreign-folder" / "notes.txt").write_text("mine")
    out = {"": "", "file-parent": str(setup["tmp"] / "existing-file" / "result")}.get(bad_out,
                                                                                    str(setup["tmp"] / bad_out))
    import ICONRegistrationLib.pipeline.registration as registration

    monkeypatch.setattr(registration, "load_model", lambda *a, **k: pytest.fail("computation started"))
    args = list(setup["args"])
    args[args.index("--out") + 1] = out
    code = main(args)
    _one_line_user_error(code, capsys.readouterr().err)
    assert (setup["tmp"] / "existing-file").read_text() == "keep me"
    assert (setup["tmp"] / "foreign-folder" / "notes.txt").read_text() == "mine"


def test_a_results_folder_of_the_other_kind_or_the_current_folder_is_refused_before_any_work(setup, capsys,
                                                                                          monkeypatch):
    """`register --out` an evaluation folder deleted evaluation.json/.md (hours of work) and `evaluate --out` a
    registration folder its transforms: any results name was accepted. `--out .` failed only after the whole
    registration, with "Device or resource busy"."""
    import ICONRegistrationLib.pipeline.registration as registration

    monkeypatch.setattr(registration, "load_model", lambda *a, **k: pytest.fail("computation started"))
    evaluation = setup["tmp"] / "evaluation"
    evaluation.mkdir()
    (evaluation / "evaluation.json").write_text("{}")
    (evaluation / "evaluation.md").write_text("| table |")
    args = list(setup["args"])
    args[args.index("--out") + 1] = str(evaluation)
    code = main(args)
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "not registration results (evaluation.json, evaluation.md)" in err
    assert _snapshot(evaluation) == {"evaluation.json": b"{}", "evaluation.md": b"| table |"}
    registered = setup["tmp"] / "registered"
    registered.mkdir()
    (registered / "transform.h5").write_text("mine")
    code = main(["evaluate", "--data", str(setup["tmp"] / "pairs.csv"), "--out", str(registered)])
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "not evaluation results (transform.h5)" in err
    empty = setup["tmp"] / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for out in (".", str(empty), "..", "/"):
        args[args.index("--out") + 1] = out
        code = main(args)
        err = capsys.readouterr().err
        _one_line_user_error(code, err)
        assert "current folder" in err, err
    assert list(empty.iterdir()) == []
    _no_staging_left(setup["tmp"])


def test_a_symlinked_out_folder_stays_a_link_to_the_new_results(tmp_path):
    """A link `result -> /big/disk/result` was replaced by a real folder beside it, the new set went there and
    the folder the link pointed to kept the old set (and the link was left behind as a hidden .result.new-…)."""
    from ICONRegistrationLib.io import atomic

    target = tmp_path / "disk" / "result"
    target.mkdir(parents=True)
    (target / "metrics.json").write_text("old")
    link = tmp_path / "result"
    link.symlink_to(target)
    with atomic.result_folder(link) as staging:
        (staging / "metrics.json").write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _snapshot(target) == {"metrics.json": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "result"]
    _no_staging_left(target.parent)


def test_unwritable_out_folder_fails_at_once(setup, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop root from writing")
    locked = setup["tmp"] / "locked"
    locked.mkdir(mode=0o500)
    args = list(setup["args"])
    args[args.index("--out") + 1] = str(locked / "result")
    _one_line_user_error(main(args), capsys.readouterr().err)


@pytest.mark.parametrize("command", ["warp", "jacobian", "invert"])
def test_file_outputs_are_checked_first(setup, capsys, command):
    assert main(setup["args"]) == 0
    capsys.readouterr()
    transform = str(setup["out"] / "transform.h5")
    folder = setup["tmp"] / "a-folder"
    folder.mkdir()
    args = {"warp": ["warp", "--image", str(setup["moving"]), "--transform", transform,
                     "--reference", str(setup["fixed"])],
            "jacobian": ["jacobian", "--transform", transform],
            "invert": ["invert", "--transform", transform, "--reference", str(setup["moving"])]}[command]
    for out in ("", str(folder)):
        _one_line_user_error(main(args + ["--out", out]), capsys.readouterr().err)


# ----- interruptions (a real process, real signals) -----------------------------------------------------------

_DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ICONRegistrationLib.pipeline.registration as registration
    from ICONRegistrationLib.io import results
    from ICONRegistrationLib.cli import main

    stage, marker = sys.argv[1], Path(sys.argv[2])
    if stage == "network":
        real = registration._predict_both_directions
        def slow(*args, **kwargs):
            marker.write_text("in the network stage")
            time.sleep(60)
            return real(*args, **kwargs)
        registration._predict_both_directions = slow
    else:
        real = results.write_image
        def slow(image, path, *args, **kwargs):
            written = real(image, path, *args, **kwargs)
            marker.write_text("writing")
            time.sleep(60)
            return written
        results.write_image = slow
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("stage", ["network", "write"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_leave_the_previous_result_and_no_temporary_files(setup, capsys, stage, signum):
    before = _previous_result(setup, capsys)
    driver = setup["tmp"] / "driver.py"
    driver.write_text(_DRIVER)
    marker = setup["tmp"] / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ICONRegistration") + os.pathsep + str(ROOT / "Testing")}
    process = subprocess.Popen([sys.executable, str(driver), stage, str(marker), *setup["args"],
                                "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1][-2000:]
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _snapshot(setup["out"]) == before
    _no_staging_left(setup["tmp"])


def test_full_disk_through_a_small_tmpfs(setup, capsys):
    mount = setup["tmp"] / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        args = list(setup["args"])
        args[args.index("--out") + 1] = str(mount / "result")
        code = main(args)
        err = capsys.readouterr().err
        _one_line_user_error(code, err)
        assert "disk is full" in err
        assert sorted(p.name for p in mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_result_set_names_cover_what_register_and_demo_write():
    from ICONRegistrationLib.io.results import RESULT_FILES
    assert set(RESULT_FILES) | {"report.png", "demo.json", "evaluation.json", "evaluation.md"} == \
        set(RESULT_SET_FILES)


# ----- one contract for errors: more rows ----------------------------------------------------------------------

def test_more_user_mistakes_exit_3_in_one_line(setup, capsys):
    tmp = setup["tmp"]
    flat_field = tmp / "field2d.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12, 2)), isVector=True), str(flat_field))
    unknown = tmp / "transform.xyz"
    unknown.write_text("not a transform")
    csv_file = tmp / "pairs.csv"
    csv_file.write_text("fixed,moving,fixed_label,moving_label\n"
                        f"{setup['fixed'].name},{setup['moving'].name},missing_label.nii.gz,{setup['moving'].name}\n")
    single = tmp / "single"
    (single / "images").mkdir(parents=True)
    sitk.WriteImage(make_image(blob_volume((20, 22, 24))), str(single / "images" / "a.nii.gz"))
    corrupt_h5 = tmp / "corrupt.h5"
    corrupt_h5.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4000))
    corrupt_gz = tmp / "corrupt.nii.gz"
    data = bytearray(setup["moving"].read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = os.urandom(64)  # damaged in the middle, full length
    corrupt_gz.write_bytes(bytes(data))
    image = ["--image", str(setup["moving"]), "--reference", str(setup["fixed"])]
    rows = [
        (["jacobian", "--transform", str(corrupt_h5)], "damaged or not a transform"),
        (["warp", "--image", str(corrupt_gz), "--reference", str(setup["fixed"]), "--transform", str(corrupt_h5),
          "--out", str(tmp / "w.nii.gz")], "damaged or cut short"),
        (["warp", *image, "--transform", str(flat_field), "--out", str(tmp / "w.nii.gz")], "3-D image of 3-vectors"),
        (["warp", *image, "--transform", str(unknown), "--out", str(tmp / "w.nii.gz")], "transform"),
        (["warp", *image, "--transform", str(flat_field), "--out", str(tmp / "w.xyz")], "unknown file type"),
        (["warp", *image, "--transform", str(flat_field), "--out", str(tmp / "w.mhd")], "unknown file type"),
        (["invert", "--transform", str(flat_field), "--reference", str(setup["fixed"]), "--out",
          str(tmp / "inverse.png")], "unknown file type"),
        (["evaluate", "--data", str(csv_file), "--model", str(setup["spec"]), "--out", str(tmp / "ev")],
         "line 2"),
        (["train", "--spec", str(setup["spec"]), "--data", str(single), "--out", str(tmp / "run"), "--steps", "1",
          "--val-fraction", "0"], "at least two"),
        (["train", "--spec", str(setup["spec"]), "--data", str(single), "--out", str(tmp / "run"), "--steps", "1",
          "--export", str(tmp)], "is a folder"),
    ]
    for args, message in rows:
        code = main(args)
        err = capsys.readouterr().err
        _one_line_user_error(code, err)
        assert message in err, (args[0], err)
    assert not (tmp / "w.nii.gz").exists() and not (tmp / "ev").exists()


def test_a_label_typed_image_through_the_api_is_a_user_error_not_an_abort(setup):
    image = sitk.ReadImage(str(setup["fixed"]))
    labels = sitk.Cast(sitk.Cast(image > 0.5, sitk.sitkUInt8), sitk.sitkLabelUInt8)
    with pytest.raises(UserError, match="label map"):
        register(image, labels, str(setup["spec"]), weights=setup["weights"], fixed_modality="mri",
                 moving_modality="mri")
    with pytest.raises(UserError, match="label map"):
        register(image, image, str(setup["spec"]), weights=setup["weights"], fixed_modality="mri",
                 moving_modality="mri", fixed_mask=labels)


def test_out_of_memory_outside_the_network_stage_is_a_user_error(setup, capsys, monkeypatch):
    import ICONRegistrationLib.pipeline.registration as registration

    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(registration, "_warp_moving", exhausted)
    code = main(setup["args"])
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert "out of memory" in err and not setup["out"].exists()


def test_an_unusable_cache_is_a_user_error_and_nothing_goes_into_the_package(setup, capsys, monkeypatch, tmp_path):
    from ICONRegistrationLib.models.weights import bundled_weights_path, load_model
    from ICONRegistrationLib.models.zoo import BUNDLED_DIR, zoo_spec

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("ICONREG_CACHE", str(blocker))
    code = main(["models", "install", "gradicon-hippocampus", "--from",
                 str(bundled_weights_path(zoo_spec("gradicon-hippocampus")))])
    err = capsys.readouterr().err
    _one_line_user_error(code, err)
    assert blocker.read_text() == "a file where the cache should be"
    package = sorted(p.name for p in BUNDLED_DIR.iterdir())
    load_model("gradicon-hippocampus", device="cpu")
    assert sorted(p.name for p in BUNDLED_DIR.iterdir()) == package  # no side files beside shipped weights


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_result_folder_without_an_atomic_exchange_puts_the_old_set_back(tmp_path, monkeypatch, interruption):
    """Where renameat2(RENAME_EXCHANGE) is missing (macOS, some file systems) the swap takes two renames; an
    interruption between them puts the old set back and removes only the new one."""
    from ICONRegistrationLib.io import atomic

    out = tmp_path / "result"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real = os.replace

    def failing(source, target):
        if ".new-" in str(source):
            raise interruption()
        return real(source, target)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises((KeyboardInterrupt, UserError)):
        with atomic.result_folder(out) as staging:
            (staging / "metrics.json").write_text("new")
            (staging / "transform.h5").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert _snapshot(out) == {"metrics.json": b"old"}
    _no_staging_left(tmp_path)
    with atomic.result_folder(out) as staging:  # and without interruption the two renames swap the sets
        (staging / "metrics.json").write_text("new")
    assert _snapshot(out) == {"metrics.json": b"new"}
    _no_staging_left(tmp_path)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_require_finite_finds_every_non_finite_value_and_accepts_sums_that_overflow(kind):
    from ICONRegistrationLib.errors import UserError
    from ICONRegistrationLib.pipeline.images import require_finite
    make = (lambda a: torch.tensor(a, dtype=torch.float32)) if kind == "torch" else \
        (lambda a: np.asarray(a, dtype=np.float32))
    require_finite(make([[1.0, -2.0], [3.0, 4.0]]), "test stage", "nothing")
    require_finite(make([3e38, 3e38, -1.0]), "test stage", "nothing")  # finite values whose sum overflows
    require_finite(make([]), "test stage", "nothing")
    for bad in ([1.0, float("nan"), 2.0], [float("inf"), 1.0], [float("inf"), float("-inf")], [3e38, 3e38, float("nan")]):
        with pytest.raises(UserError, match=r"test stage produced (1|2) NaN or infinite values out of"):
            require_finite(make(bad), "test stage", "nothing")
