"""Transform files round-trip through SimpleITK; `iconreg` commands, exit codes and user errors."""

from __future__ import annotations

import gzip
import os
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image, random_state, rotation, tiny_spec
from ICONRegistrationLib import Cancelled, UserError, register
from ICONRegistrationLib.cli import main
from ICONRegistrationLib.io import read_displacement_field, write_displacement_field
from ICONRegistrationLib.models import load_model
from ICONRegistrationLib.pipeline import Grid


def _field() -> sitk.Image:
    rng = np.random.default_rng(0)
    field = sitk.GetImageFromArray(rng.normal(0, 2, (9, 10, 11, 3)), isVector=True)
    field.SetSpacing((1.5, 0.7, 2.0))
    field.SetOrigin((-3.0, 4.0, 10.0))
    field.SetDirection(tuple((rotation(2, 30) @ rotation(1, -12)).flatten()))
    return field


@pytest.mark.parametrize("name", ["t.h5", "t.tfm", "t.nii.gz", "t.nii", "t.nrrd", "t.mha"])
def test_every_written_format_round_trips_through_simpleitk(tmp_path, name):
    field = _field()
    path = write_displacement_field(field, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing temporary left behind
    back = read_displacement_field(path)
    tolerance = 1e-12 if name.endswith((".h5", ".tfm")) else 1e-5  # image formats store float32
    assert back.GetSize() == field.GetSize()
    assert np.allclose(back.GetOrigin(), field.GetOrigin(), atol=1e-5)
    assert np.allclose(back.GetSpacing(), field.GetSpacing(), atol=1e-6)
    assert np.allclose(back.GetDirection(), field.GetDirection(), atol=1e-6)
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(field)).max() < tolerance * 10
    # The transform applies identically whichever file it came from.
    transform = sitk.DisplacementFieldTransform(sitk.Image(back))
    reference = sitk.DisplacementFieldTransform(sitk.Image(field))
    point = field.TransformContinuousIndexToPhysicalPoint((4.3, 5.1, 3.7))
    assert np.allclose(transform.TransformPoint(point), reference.TransformPoint(point), atol=1e-4)


def test_nifti_field_has_dispvect_intent_and_ras_vectors(tmp_path):
    field = _field()
    path = write_displacement_field(field, tmp_path / "t.nii.gz")
    header = gzip.open(path).read(348)
    assert struct.unpack("<h", header[68:70])[0] == 1006  # NIFTI_INTENT_DISPVECT
    assert struct.unpack("<8h", header[40:56])[:6] == (5, 11, 10, 9, 1, 3)


@pytest.mark.parametrize("name", ["t.h5", "t.mha"])
def test_warp_refuses_a_transform_with_nan_in_every_format(tmp_path, name, capsys):
    """A field with a block of NaN, as an .h5 transform file, was applied by `iconreg warp` and `warp()` with
    exit 0, filling that block with 0; every format, in-memory fields and composites are now refused."""
    from ICONRegistrationLib.pipeline import warp
    field = _field()
    values = sitk.GetArrayFromImage(field)
    values[2:4, 3:5, 4:6] = np.nan
    broken = sitk.GetImageFromArray(values, isVector=True)
    broken.CopyInformation(field)
    path = tmp_path / name
    if name == "t.mha":  # the package's own writer refuses NaN fields, so write the file as another tool would
        sitk.WriteImage(broken, str(path))
    else:
        sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Cast(broken, sitk.sitkVectorFloat64)), str(path))
    image = make_image(blob_volume((9, 10, 11)), spacing=(1.5, 0.7, 2.0))
    with pytest.raises(UserError, match="24 NaN"):
        warp(image, path, image)
    with pytest.raises(UserError, match="NaN"):
        warp(image, broken, image)
    composite = sitk.CompositeTransform([sitk.TranslationTransform(3, (1.0, 0.0, 0.0)),
                                         sitk.DisplacementFieldTransform(sitk.Cast(broken, sitk.sitkVectorFloat64))])
    with pytest.raises(UserError, match="NaN"):
        warp(image, composite, image)
    with pytest.raises(UserError, match="NaN"):
        warp(image, sitk.TranslationTransform(3, (float("nan"), 0.0, 0.0)), image)
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    assert main(["warp", "--image", str(tmp_path / "image.nrrd"), "--transform", str(path),
                 "--reference", str(tmp_path / "image.nrrd"), "--out", str(tmp_path / "out.nrrd")]) == 3
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "out.nrrd").exists()


def test_warp_rounds_integer_images_and_warns_for_label_maps_under_interpolation(tmp_path, capsys):
    """Linear warping of an integer image truncated (9.9 → 9, a −0.5 bias); it now rounds within the type's range.
    A label-like integer image under linear interpolation gets a warning (interpolation invents labels); the
    same warp with 'nearest' keeps the labels and warns nothing; a 3-D transform on a 2-D image is a user error."""
    import warnings
    from ICONRegistrationLib.pipeline import warp
    ramp = np.tile(np.arange(48, dtype=np.float64) * 5.0, (4, 5, 1))  # 0, 5, …, 235 along x: 48 values
    image = sitk.Cast(sitk.GetImageFromArray(ramp), sitk.sitkUInt8)
    shift = sitk.TranslationTransform(3, (0.19, 0.0, 0.0))  # output(x) = input(x + 0.19): 5 i + 0.95
    out = sitk.GetArrayFromImage(warp(image, shift, image))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, :-1], ramp[:, :, :-1] + 1)  # truncation gave 5 i
    labels = sitk.Cast(sitk.GetImageFromArray((ramp >= 100).astype(np.uint8) * 10), sitk.sitkUInt8)
    with pytest.warns(UserWarning, match="nearest"):
        warp(labels, shift, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = sitk.GetArrayFromImage(warp(labels, shift, labels, interpolator="nearest"))
        warp(image, shift, image)  # 48 distinct values: not label-like, no warning
    assert set(np.unique(kept)) <= {0, 10}
    float_labels = sitk.Cast(labels, sitk.sitkFloat32)  # a label map saved as float: warned about too
    with pytest.warns(UserWarning, match="whole-number voxels"):
        warp(float_labels, shift, float_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warp(sitk.Cast(labels, sitk.sitkFloat32) * 0.5 + 0.25, shift, labels)  # fractional values: an image
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    sitk.WriteTransform(shift, str(tmp_path / "shift.tfm"))
    assert main(["warp", "--image", str(tmp_path / "labels.nrrd"), "--transform", str(tmp_path / "shift.tfm"),
                 "--reference", str(tmp_path / "labels.nrrd"), "--out", str(tmp_path / "out.nrrd")]) == 0
    assert "use 'nearest'" in capsys.readouterr().err
    flat = sitk.GetImageFromArray(np.zeros((8, 9), np.float32))
    with pytest.raises(UserError, match="2-D"):
        warp(flat, sitk.TranslationTransform(3), flat)


def test_nifti_outputs_refuse_a_sheared_grid_before_any_work(tmp_path, tiny_model_files, capsys):
    """NIfTI keeps only a rotation: a fixed image with a sheared direction gave warped/jacobian/ic_error .nii.gz
    files whose voxels lay up to 7.6 mm from where they belong. The NIfTI writers refuse such grids, and `iconreg
    register` says so before registering; .nrrd keeps the shear and stays allowed."""
    from ICONRegistrationLib.io import write_image
    from ICONRegistrationLib.io.transforms import write_displacement_field
    sheared = make_image(blob_volume((10, 11, 12)))
    sheared.SetDirection((1.0, 0.3, 0.0, 0.0, 0.953939, 0.0, 0.0, 0.0, 1.0))
    for write, name in ((write_image, "image.nii.gz"), (write_displacement_field, "field.nii")):
        data = sheared if write is write_image else sitk.Compose([sheared * 0.0] * 3)
        with pytest.raises(UserError, match="not orthogonal"):
            write(data, tmp_path / name)
        assert not (tmp_path / name).exists()
    write_image(sheared, tmp_path / "fixed.nrrd")
    assert np.allclose(sitk.ReadImage(str(tmp_path / "fixed.nrrd")).GetDirection(), sheared.GetDirection())
    write_image(make_image(blob_volume((10, 11, 12))), tmp_path / "moving.nrrd")
    assert main(["register", "--fixed", str(tmp_path / "fixed.nrrd"), "--moving", str(tmp_path / "moving.nrrd"),
                 "--model", str(tiny_model_files[0]), "--out", str(tmp_path / "out")]) == 3
    assert "not orthogonal" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _write_pair(folder, model_files=None):
    fixed = make_image(blob_volume((36, 40, 38), seed=1), spacing=(1.2, 1.0, 1.1), origin=(3.0, -2.0, 1.0))
    moving = make_image(blob_volume((34, 42, 36), centre=(18, 22, 19), seed=1), spacing=(1.1, 1.0, 1.2))
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    return folder / "fixed.nii.gz", folder / "moving.nii.gz"


def test_cli_register_writes_every_output_and_the_transform_reproduces_warped(tmp_path, tiny_model_files, capsys):
    spec_file, weights = tiny_model_files
    fixed_path, moving_path = _write_pair(tmp_path)
    out = tmp_path / "out"
    code = main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(spec_file),
                 "--weights", str(weights), "--device", "cpu", "--inverse-qa", "--out", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz",
                            "metrics.json", "report.png"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and metrics["device"] == "cpu"
    assert metrics["flips"] == []  # the tiny model lists no test-time flips
    assert metrics["inverse"]["folds"] >= 0 and metrics["inverse"]["jacobian_min"] > 0
    assert len(metrics["weights_sha256"]) == 64
    for key in ("folds", "folds_percent", "jacobian_min", "ic_error_mean_mm", "ic_error_p95_mm", "ic_error_max_mm"):
        assert key in metrics
    summary = capsys.readouterr().out
    assert "folds" in summary and "(fixed mri, moving mri)" in summary  # a wrong 'auto' guess shows at once
    fixed, moving = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(moving_path))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    again = sitk.Resample(moving, fixed, sitk.ReadTransform(str(out / "transform.h5")), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    inner = (slice(2, -2),) * 3
    intensity_range = float(np.ptp(sitk.GetArrayFromImage(moving)))
    assert np.abs(warped - sitk.GetArrayFromImage(again))[inner].max() <= 1e-3 * intensity_range
    # iconreg warp gives the same image; nearest keeps label values
    code = main(["warp", "--image", str(moving_path), "--transform", str(out / "transform.h5"), "--reference",
                 str(fixed_path), "--out", str(tmp_path / "w.nii.gz")])
    assert code == 0
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz"))) - warped)[inner].max() \
        <= 1e-3 * intensity_range
    capsys.readouterr()
    # iconreg jacobian reports the same fold count as metrics.json
    code = main(["jacobian", "--transform", str(out / "transform.h5"), "--out", str(tmp_path / "j.nii.gz")])
    assert code == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["folds"] == metrics["folds"]
    assert abs(report["jacobian_min"] - metrics["jacobian_min"]) < 1e-3


def test_cli_register_prints_the_engines_warnings_once_as_iconreg_warnings(tmp_path, tiny_model_files, capsys):
    """What register warns about (here: an IC error far above the model's validation record) reaches the terminal
    as 'iconreg: warning: …' after the summary, once, not as a Python warning with a source line."""
    spec_file, weights = tiny_model_files
    data = json.loads(spec_file.read_text())
    data["validation"] = {"ic_error_mm": 1e-6, "folds_percent": 0.0}
    spec_file.write_text(json.dumps(data))
    fixed_path, moving_path = _write_pair(tmp_path)
    code = main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(spec_file),
                 "--weights", str(weights), "--device", "cpu", "--no-report", "--out", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ic_error_mean_mm"] > 3e-6
    lines = [line for line in err.splitlines() if "inverse-consistency error" in line]
    assert len(lines) == 1 and lines[0].startswith("iconreg: warning: The inverse-consistency error (mean ")
    assert "what tiny shows on its validation data (1e-06 mm)" in lines[0]
    assert "UserWarning" not in err
    assert metrics["warnings"] == [lines[0].removeprefix("iconreg: warning: ")]  # metrics.json keeps it


def test_register_without_matplotlib_writes_everything_but_the_report(tmp_path, tiny_model_files, capsys,
                                                                      monkeypatch):
    """matplotlib is an optional extra ('report'): without it `iconreg register` and `iconreg demo` registered, then
    stopped with a ModuleNotFoundError traceback and wrote nothing. Now they say so first and skip report.png."""
    import sys
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an install without the extra: the import fails
    spec_file, weights = tiny_model_files
    fixed_path, moving_path = _write_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(spec_file),
                 "--weights", str(weights), "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed, so no report.png is written" in captured.err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz",
                            "metrics.json"])
    assert (f"wrote transform.h5, inverse.h5, warped.nii.gz, jacobian.nii.gz, ic_error.nii.gz, metrics.json to "
            f"{out}\n") in captured.out


def test_cli_models_list_info_install(tmp_path, tiny_model_files, capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("unigradicon", "multigradicon", "gradicon-lung", "gradicon-brain", "gradicon-knee"):
        assert name in listing
    assert "not downloaded" in listing
    # the shipped models say which flips they average over (the hippocampus model all eight, the brain model one);
    # official models list none
    hippocampus = listing[listing.index("gradicon-hippocampus"):].split("validation:")[0]
    assert "averaged over flips of network axes 0, 1, 2" in hippocampus
    brain = listing[listing.index("gradicon-brain-lpba40"):].split("validation:")[0]
    assert "averaged over flips of network axes 2" in brain
    assert listing[listing.index("gradicon-knee"):].split("\n")[1].strip().startswith("gradicon-")
    assert main(["models", "info", "gradicon-brain"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [130, 155, 130]
    # Offline install of another model's file (sha256 unknown for this zoo entry) is refused: keys and shapes are
    # checked against the spec before anything is installed, and the cache is left as it was.
    _, weights = tiny_model_files
    assert main(["models", "install", "unigradicon", "--from", str(weights)]) == 3
    error = capsys.readouterr().err
    assert "does not match the model's architecture" in error and "wrong shape" in error and str(weights) in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    cache = Path(os.environ["ICONREG_CACHE"])
    assert not any(p.is_file() for p in cache.rglob("*")), sorted(cache.rglob("*"))
    with pytest.raises(UserError, match="not installed"):
        load_model("unigradicon", device="cpu", download=False)


@pytest.mark.parametrize("bad", ["2d", "4d", "vector", "constant", "nan", "flat", "huge"])
def test_bad_inputs_raise_user_errors_through_api_and_cli(tmp_path, tiny_model_files, capsys, bad):
    spec_file, weights = tiny_model_files
    good = make_image(blob_volume((20, 22, 24)))
    image = {
        "2d": lambda: sitk.GetImageFromArray(np.random.rand(20, 20).astype(np.float32)),
        "4d": lambda: sitk.JoinSeries([good, good]),
        "vector": lambda: sitk.Compose([good, good, good]),
        "constant": lambda: make_image(np.full((10, 12, 14), 7.0, np.float32)),
        "nan": lambda: make_image(np.where(np.arange(20 * 22 * 24).reshape(20, 22, 24) == 5, np.nan,
                                           blob_volume((20, 22, 24))).astype(np.float32)),
        "flat": lambda: make_image(np.random.rand(1, 20, 20).astype(np.float32)),
        "huge": lambda: sitk.GetImageFromArray(blob_volume((20, 22, 24)).astype(np.float64) * 1e300),
    }[bad]()
    with pytest.raises(UserError) as error:
        register(good, image, str(spec_file), weights=weights, fixed_modality="mri", moving_modality="mri")
    assert "moving" in str(error.value)
    assert ("float32 range" in str(error.value)) == (bad == "huge")  # not called NaN or infinite
    # .mha keeps NaN voxels (ITK's NIfTI reader turns them into 0), NRRD keeps 4-D and vector images
    path = tmp_path / {"4d": "bad.nrrd", "vector": "bad.nrrd", "nan": "bad.mha",
                       "huge": "bad.mha"}.get(bad, "bad.nii.gz")
    sitk.WriteImage(image, str(path))
    sitk.WriteImage(good, str(tmp_path / "good.nii.gz"))
    out = tmp_path / "out"
    code = main(["register", "--fixed", str(tmp_path / "good.nii.gz"), "--moving", str(path), "--model",
                 str(spec_file), "--weights", str(weights), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 3
    assert captured.err.startswith("iconreg: error:") and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_other_user_errors_exit_3_and_usage_errors_exit_2(tmp_path, tiny_model_files, capsys):
    spec_file, weights = tiny_model_files
    fixed_path, moving_path = _write_pair(tmp_path)
    common = ["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--out", str(tmp_path / "o")]
    assert main(common + ["--model", "no-such-model"]) == 3
    assert "Unknown model" in capsys.readouterr().err
    assert main(common + ["--model", "gradicon-knee"]) == 3  # weights cannot be downloaded in the test cache
    assert "iconreg models install" in capsys.readouterr().err
    assert main(common + ["--model", str(spec_file), "--weights", str(tmp_path / "missing.pt")]) == 3
    assert main(common + ["--model", str(spec_file), "--weights", str(weights), "--io-iterations", "-1"]) == 3
    if not torch.cuda.is_available():
        assert main(common + ["--model", str(spec_file), "--weights", str(weights), "--device", "cuda"]) == 3
        assert "GPU" in capsys.readouterr().err
    assert main(["register", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving", str(moving_path),
                 "--model", str(spec_file), "--out", str(tmp_path / "o")]) == 3
    with pytest.raises(SystemExit) as usage:
        main(["register", "--fixed", str(fixed_path)])
    assert usage.value.code == 2
    for flips in ("3", "0,0", "x"):
        with pytest.raises(SystemExit) as usage:
            main(common + ["--model", str(spec_file), "--flips", flips])
        assert usage.value.code == 2
    assert main(common + ["--model", str(spec_file), "--weights", str(weights), "--flips", "2", "--io-iterations",
                          "1", "--io-mode", "weights"]) == 3
    assert "flips" in capsys.readouterr().err
    # the weights mode has no similarity grid of its own: --io-grid fixed is refused, not silently dropped
    assert main(common + ["--model", str(spec_file), "--weights", str(weights), "--io-grid", "fixed",
                          "--io-iterations", "1", "--io-mode", "weights"]) == 3
    assert "io_grid 'fixed'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_instance_optimisation_options_without_iterations_are_reported_not_dropped(tmp_path, tiny_model_files,
                                                                                  capsys):
    spec_file, weights = tiny_model_files
    fixed_path, moving_path = _write_pair(tmp_path)
    common = ["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(spec_file),
              "--weights", str(weights), "--no-report"]
    assert main(common + ["--out", str(tmp_path / "a"), "--io-similarity", "ssd", "--io-grid", "fixed"]) == 0
    err = capsys.readouterr().err
    assert "--io-similarity, --io-grid have no effect without --io-iterations" in err
    assert main(common + ["--out", str(tmp_path / "b"), "--io-similarity", "ssd", "--io-iterations", "1"]) == 0
    assert main(common + ["--out", str(tmp_path / "c")]) == 0
    assert "no effect" not in capsys.readouterr().err


def test_nonsense_counts_and_options_that_would_be_ignored_are_refused_before_any_work(tmp_path, capsys):
    """Options that used to give a silently different run: ``evaluate --max-pairs -1`` dropped the last pair,
    ``--last-fraction`` outside [0, 1] picked another split (1.5: half of the volumes) and, like ``--pairing`` and
    ``--one-direction``, was ignored for a CSV; ``train --steps -5`` or ``--learning-rate 0`` trained nothing and
    exited 0 (``--steps 0 --save-prepared`` only prepares the data, on purpose); ``io_learning_rate=0`` meant the
    default; ``models list NAME`` and ``--from`` outside ``install``
    were ignored."""
    from ICONRegistrationLib.datasets import split_validation
    from ICONRegistrationLib.evaluation.evaluate import read_pairs

    image = make_image(blob_volume((12, 12, 12)))
    paths = []
    for name in ("a", "b", "la", "lb"):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        paths.append(f"{name}.nii.gz")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("fixed,moving,fixed_label,moving_label\n" + ",".join(paths) + "\n", encoding="utf-8")
    assert len(read_pairs(csv_file)) == 1
    for options in ({"last_fraction": 0.2}, {"pairing": "all"}, {"both_directions": False}):
        with pytest.raises(UserError, match="lists its pairs itself"):
            read_pairs(csv_file, **options)
    for fraction in (-0.2, 1.5, float("nan")):
        with pytest.raises(UserError, match="from 0 to 1"):
            split_validation(list(range(10)), fraction)
    assert [len(part) for part in split_validation(list(range(10)), 1.0)] == [0, 10]
    usage = [["evaluate", "--data", str(csv_file), "--out", str(tmp_path / "ev"), "--max-pairs", "-1"],
             *(["train", "--spec", "gradicon-hippocampus", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                option, value] for option, value in (("--steps", "-5"), ("--learning-rate", "0"),
                                                     ("--learning-rate", "nan"), ("--validate-every", "0"),
                                                     ("--checkpoint-every", "-1"), ("--flip-axes", "2,2"),
                                                     ("--flip-axes", "x")))]
    for args in usage:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2, args
    assert main(["evaluate", "--data", str(csv_file), "--out", str(tmp_path / "ev"), "--last-fraction", "0.2"]) == 3
    assert "--last-fraction chooses pairs of a dataset folder" in capsys.readouterr().err
    assert main(["models", "list", "gradicon-hippocampus"]) == 3
    assert main(["models", "info", "gradicon-hippocampus", "--from", str(csv_file)]) == 3
    assert "--from FILE installs weights" in capsys.readouterr().err
    # fractions out of range and a run that would train nothing are refused before the data are prepared and
    # before the run folder is made
    for option, value in (("--penalty-fraction", "1.5"), ("--self-pairs", "1.5"), ("--val-fraction", "1.5"),
                          ("--steps", "0")):
        assert main(["train", "--spec", "gradicon-hippocampus", "--data", str(tmp_path), "--out",
                     str(tmp_path / "run"), option, value]) == 3, option
        assert "preparing" not in capsys.readouterr().err
    assert not (tmp_path / "ev").exists() and not (tmp_path / "run").exists()
    for rate in (0.0, -0.1, float("nan"), True):
        with pytest.raises(UserError, match="io_learning_rate"):
            register(image, image, "gradicon-hippocampus", fixed_modality="mri", moving_modality="mri",
                     io_iterations=1, io_learning_rate=rate)


def test_cancel_through_progress_callback(tmp_path, tiny_model_files):
    spec_file, weights = tiny_model_files
    fixed = make_image(blob_volume((30, 30, 30), seed=1))
    moving = make_image(blob_volume((30, 30, 30), seed=2))
    before = sitk.GetArrayFromImage(moving).copy()
    stages = []

    def cancel_at_network(stage, fraction):
        stages.append(stage)
        return stage != "network"

    with pytest.raises(Cancelled):
        register(fixed, moving, str(spec_file), weights=weights, fixed_modality="mri", moving_modality="mri",
                 progress=cancel_at_network)
    assert stages[-1] == "network"
    assert np.array_equal(sitk.GetArrayFromImage(moving), before)


@pytest.mark.parametrize("options", [{"flips": [0]}, {"refinements": 1}, {"io_iterations": 2},
                                     {"flips": [0], "io_iterations": 2}])
def test_each_progress_stage_runs_once_monotonically_to_one(tiny_model_files, options):
    """The network stage reported 1.0 twice with flips or refinements, and with instance optimisation it came back
    after it ("network 100 %" once optimisation had finished), as if the network ran again."""
    spec_file, weights = tiny_model_files
    loaded = load_model(str(spec_file), weights, device="cpu")
    fixed = make_image(blob_volume((30, 30, 30), seed=1))
    moving = make_image(blob_volume((30, 30, 30), seed=2))
    calls = []
    register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri",
             progress=lambda stage, fraction: calls.append((stage, fraction)), **options)
    order = [stage for index, (stage, _) in enumerate(calls) if index == 0 or calls[index - 1][0] != stage]
    assert len(order) == len(set(order)), order
    expected = ["preprocessing", "network"] + (["instance optimisation"] if "io_iterations" in options else [])
    assert order == expected + ["quality maps", "export"]
    for stage in order:
        fractions = [fraction for name, fraction in calls if name == stage]
        assert fractions == sorted(fractions) and fractions.count(1.0) == 1 and fractions[-1] == 1.0, (stage, calls)


@pytest.mark.parametrize("mode,iterations,learning_rate", [("weights", 4, 1e-3), ("fields", 20, None)])
def test_instance_optimisation_lowers_the_objective_and_restores_the_cached_model(tiny_model_files, mode,
                                                                                  iterations, learning_rate):
    spec_file, weights = tiny_model_files
    fixed = make_image(blob_volume((34, 34, 34), seed=3), spacing=(1.1, 1.1, 1.1))
    moving = make_image(blob_volume((34, 34, 34), centre=(19, 15, 18), seed=3), spacing=(1.1, 1.1, 1.1))
    loaded = load_model(str(spec_file), weights, device="cpu")
    before = {k: v.clone() for k, v in loaded.net.state_dict().items()}
    plain = register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri")
    fractions = []
    optimised = register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri",
                         io_iterations=iterations, io_mode=mode, io_learning_rate=learning_rate,
                         progress=lambda stage, f: fractions.append(f) if stage == "instance optimisation" else None)
    history = optimised.metrics.io_objective
    assert optimised.metrics.io_mode == mode
    assert len(history) == iterations + 1 and fractions[-1] == 1.0  # before each step and after the last
    assert history[-1] < history[0] - 0.01
    after = loaded.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not loaded.net.training
    # the optimised registration matches the fixed image better than the network alone, by the LNCC it optimises
    from ICONRegistrationLib.core.losses import LNCC
    fixed_voxels = torch.as_tensor(sitk.GetArrayFromImage(fixed))[None, None]

    def dissimilarity(result):
        warped = torch.as_tensor(sitk.GetArrayFromImage(result.warped))[None, None]
        return float(LNCC(sigma=5)(warped / 1000, fixed_voxels / 1000))
    assert dissimilarity(optimised) < dissimilarity(plain)
    # the same registration again gives the plain result: nothing leaked from the optimisation
    again = register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri")
    assert np.array_equal(sitk.GetArrayFromImage(again.warped), sitk.GetArrayFromImage(plain.warped))


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_piped_into_a_reader_that_stopped_is_not_an_error(unbuffered):
    """Regression: `iconreg models list | head -1` printed a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: every write fails with EPIPE
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        environment["PYTHONUNBUFFERED"] = unbuffered
    code = "import sys; from ICONRegistrationLib.cli import main; sys.exit(main(['models', 'list']))"
    try:
        writer = subprocess.run([sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=REPO / "ICONRegistration", env=environment)
    finally:
        os.close(write_end)
    assert "Traceback" not in writer.stderr and "Exception ignored" not in writer.stderr
    assert writer.returncode == 0


def test_instance_optimisation_on_the_fixed_image_grid(tiny_model_files):
    """``io_grid="fixed"``: the field mode compares the images on a grid as fine as the fixed image (at most twice
    the network grid per axis); the fields stay on the network grid, and the result matches the fixed image
    better than the network alone."""
    from ICONRegistrationLib.core.losses import LNCC
    from ICONRegistrationLib.pipeline.registration import similarity_grid_shape

    spec_file, weights = tiny_model_files
    fixed = make_image(blob_volume((100, 96, 150), seed=3))  # tiny network grid: 66³
    moving = make_image(blob_volume((100, 96, 150), centre=(54, 44, 77), seed=3))
    network_grid = Grid.over_image(fixed, [66, 66, 66])
    assert similarity_grid_shape(fixed, network_grid) == (100, 96, 132)  # the image's voxels, at most 2 × 66
    small = make_image(blob_volume((40, 70, 50), seed=3))
    assert similarity_grid_shape(small, Grid.over_image(small, [66, 66, 66])) == (66, 70, 66)  # never coarser
    loaded = load_model(str(spec_file), weights, device="cpu")
    plain = register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri")
    result = register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri", io_iterations=10,
                      io_grid="fixed")
    assert result.metrics.io_similarity_shape == [100, 96, 132]
    assert result.metrics.network_shape == [66, 66, 66]
    assert result.metrics.folds_percent == 0
    fixed_voxels = torch.as_tensor(sitk.GetArrayFromImage(fixed))[None, None] / 1000

    def dissimilarity(registration):
        warped = torch.as_tensor(sitk.GetArrayFromImage(registration.warped))[None, None] / 1000
        return float(LNCC(sigma=2)(warped, fixed_voxels))
    assert dissimilarity(result) < dissimilarity(plain) - 0.005
    with pytest.raises(UserError, match="io_grid"):
        register(fixed, moving, loaded, fixed_modality="mri", moving_modality="mri", io_iterations=1,
                 io_grid="image")


def test_progress_in_a_log_file_shows_every_tenth_and_every_minute(monkeypatch):
    import io

    from ICONRegistrationLib import cli

    clock = iter(range(0, 10_000, 5))  # each call 5 s later
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()  # not a terminal: plain lines
    bar = cli.ProgressBar(stream)
    for k in range(1, 21):  # an evaluation of 20 registrations, 5 s each
        bar("evaluation", k / 20)
    bar("training", 0.0)
    for k in range(1, 4):  # three slow steps of 3000, 5 s each: nothing new to say for a minute
        bar("training", k / 3000)
    for k in range(4, 20):
        bar("training", k / 3000)
    bar.close()
    lines = stream.getvalue().splitlines()
    evaluation = [line for line in lines if line.startswith("evaluation")]
    assert evaluation == [f"evaluation: {p}%" for p in (5, 15, 25, 35, 45, 55, 65, 75, 85, 95, 100)]
    training = [line for line in lines if line.startswith("training")]
    assert training[0] == "training: 0%" and len(training) == 2  # and one line after 60 s of steps


def test_register_symmetric_is_recorded_in_the_metrics(tmp_path, tiny_model_files):
    spec_file, weights = tiny_model_files
    fixed_path, moving_path = _write_pair(tmp_path)
    assert main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(spec_file),
                 "--weights", str(weights), "--no-report", "--symmetric", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["symmetric"] is True


def test_register_refinements_option(tmp_path, tiny_model_files, capsys):
    spec_file, weights = tiny_model_files
    fixed_path, moving_path = _write_pair(tmp_path)
    common = ["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(spec_file),
              "--weights", str(weights), "--no-report"]
    assert main(common + ["--refinements", "1", "--symmetric", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["refinements"] == 1
    # the summary says how the transform was made
    assert "(fixed mri, moving mri), one prediction, 1 refinement, symmetric: folds" in capsys.readouterr().out
    assert main(common + ["--refinements", "model", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["refinements"] == 0
    for wrong in ("-1", "4", "two"):
        with pytest.raises(SystemExit):
            main(common + ["--refinements", wrong, "--out", str(tmp_path / "w")])
        assert "--refinements" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
