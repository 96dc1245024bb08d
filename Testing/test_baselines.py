"""The classical baselines of ``iconreg evaluate``: ANTs SyN and elastix give the transform their own resampling
uses (fixed → moving points, on the fixed grid), and they register a synthetic pair.

ANTs and elastix come with the ``baselines`` extra, which the test setup installs; elsewhere these tests skip.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import blob_volume, make_image, rotation
from ICONRegistrationLib.errors import UserError
from ICONRegistrationLib.evaluation import baselines
from ICONRegistrationLib.evaluation.metrics import dice_per_label

OBLIQUE = dict(spacing=(1.2, 1.0, 0.9), origin=(5.0, -3.0, 2.0), direction=rotation(2, 90) @ rotation(0, 10))


def _pair():
    """A synthetic 'anatomy' of two tissue classes with blurred edges, and the same volume under a known affine map,
    on an oblique grid; labels: the inner class of each. (elastix's mutual information does not register the bare
    Gaussian blobs of ``blob_volume``, which have no edges; it does register images with tissue boundaries.)"""
    blobs = blob_volume((36, 40, 34), seed=3)
    classes = 500.0 * (blobs > np.percentile(blobs, 70)) + 500.0 * (blobs > np.percentile(blobs, 90))
    fixed = sitk.SmoothingRecursiveGaussian(make_image(classes.astype(np.float32), **OBLIQUE), 1.0)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
    affine = sitk.AffineTransform([1.06, 0.04, 0.0, 0.0, 0.96, 0.0, 0.03, 0.0, 1.02], (3.0, -2.0, 1.5), centre)
    moving = sitk.Resample(fixed, fixed, affine, sitk.sitkLinear, 0.0)
    fixed_labels = sitk.Cast(fixed > 750.0, sitk.sitkUInt8)
    moving_labels = sitk.Cast(moving > 750.0, sitk.sitkUInt8)
    return fixed, moving, fixed_labels, moving_labels


def _dice_after(transform, fixed_labels, moving_labels) -> float:
    warped = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0)
    return dice_per_label(warped, fixed_labels, [1])[1]


def test_ants_transform_resamples_exactly_as_ants_apply_transforms():
    ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install -e '.[baselines]')")
    fixed, moving, _, _ = _pair()
    fixed_ants, moving_ants = baselines._to_ants(fixed, ants), baselines._to_ants(moving, ants)
    with tempfile.TemporaryDirectory() as folder:
        result = ants.registration(fixed_ants, moving_ants, type_of_transform="SyN", random_seed=1,
                                   outprefix=os.path.join(folder, "t_"), verbose=False)
        assert len(result["fwdtransforms"]) == 2  # a warp and an affine: their order matters
        theirs = ants.apply_transforms(fixed_ants, moving_ants, result["fwdtransforms"]).numpy().transpose(2, 1, 0)
        transform = baselines._field_on_fixed_grid(baselines.ants_transform(result["fwdtransforms"]), fixed)
    ours = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    scale = float(np.abs(theirs).max())
    assert np.abs(ours - theirs).max() < 1e-3 * scale  # composed in the order listed: up to 60 % of the range off


def test_elastix_transform_resamples_exactly_as_transformix(tmp_path, monkeypatch):
    itk = pytest.importorskip("itk", reason="itk-elastix is not installed (pip install -e '.[baselines]')")
    monkeypatch.chdir(tmp_path)  # transformix writes into the working folder unless told otherwise
    fixed, moving, _, _ = _pair()
    moving_itk = baselines.to_itk_image(moving, itk)
    _, result = itk.elastix_registration_method(baselines.to_itk_image(fixed, itk), moving_itk,
                                                parameter_object=baselines.elastix_parameters(itk, 2, 10.0, 32),
                                                log_to_console=False)
    transform = baselines.elastix_transform(result, moving_itk, itk)
    for index in range(result.GetNumberOfParameterMaps()):  # transformix's own resampling, linear like ours
        result.SetParameter(index, "ResampleInterpolator", "FinalLinearInterpolator")
        result.SetParameter(index, "DefaultPixelValue", "0")
    assert list(tmp_path.iterdir()) == []  # nothing left in the working folder
    theirs = itk.array_from_image(itk.transformix_filter(moving_itk, result, output_directory=str(tmp_path)))
    ours = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    assert np.abs(ours - theirs).max() < 1e-4 * float(np.abs(theirs).max())


@pytest.mark.parametrize("name, module, options", [("ants-syn", "ants", {}),
                                                   ("elastix", "itk", {"resolutions": 2, "iterations": 64})])
def test_classical_baselines_register_an_affine_pair_without_folds(name, module, options, tmp_path, monkeypatch):
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[baselines]')")
    monkeypatch.chdir(tmp_path)
    fixed, moving, fixed_labels, moving_labels = _pair()
    transform = baselines.BASELINES[name](fixed, moving, **options)
    assert isinstance(transform, sitk.DisplacementFieldTransform)
    field = transform.GetDisplacementField()
    assert field.GetSize() == fixed.GetSize() and np.allclose(field.GetDirection(), fixed.GetDirection())
    before = _dice_after(sitk.Transform(3, sitk.sitkIdentity), fixed_labels, moving_labels)
    after = _dice_after(transform, fixed_labels, moving_labels)
    assert before < 0.75 and after > 0.85, (before, after)
    from ICONRegistrationLib.pipeline.qa import field_jacobian
    assert (sitk.GetArrayFromImage(field_jacobian(field)) > 0).all()
    assert list(tmp_path.iterdir()) == []  # no files left behind in the working folder


@pytest.mark.parametrize("direction", [(1, 1, 1), (-1, -1, 1)])
def test_baseline_folds_follow_the_field_grids_direction(direction):
    """A field u(x) = A x in physical (LPS) mm on a grid with the hippocampus crops' direction diag(−1, −1, 1):
    a stretch along x (det J = 2.5) has no folds and a reflection along x (det J = −0.5) folds everywhere. ITK's
    DisplacementFieldJacobianDeterminant ignores the direction and reported 90 % and 0 %."""
    from ICONRegistrationLib.evaluation.evaluate import _jacobian_folds_percent
    grid = sitk.Image([12, 12, 12], sitk.sitkUInt8)
    grid.SetDirection(tuple(np.diag(np.array(direction, float)).ravel()))
    grid.SetSpacing((1.0, 1.5, 2.0))
    for stretch, folds in ((1.5, 0.0), (-1.5, 100.0)):
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(tuple(np.diag([1.0 + stretch, 1.0, 1.0]).ravel()))
        field = sitk.TransformToDisplacementField(affine, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(),
                                                  grid.GetSpacing(), grid.GetDirection())
        assert _jacobian_folds_percent(sitk.DisplacementFieldTransform(field)) == pytest.approx(folds)
    assert _jacobian_folds_percent(sitk.Transform(3, sitk.sitkIdentity)) == 0.0
    with pytest.raises(TypeError):
        _jacobian_folds_percent(sitk.AffineTransform(3))


def test_a_missing_baseline_package_is_a_user_error_with_the_install_command_before_any_registration(monkeypatch):
    from ICONRegistrationLib.evaluation.evaluate import evaluate
    real_import = baselines.importlib.import_module

    def no_ants(name, *args):
        if name == "ants":
            raise ImportError("No module named 'ants'")
        return real_import(name, *args)

    monkeypatch.setattr(baselines.importlib, "import_module", no_ants)
    fixed, moving, _, _ = _pair()
    with pytest.raises(UserError, match=r"antspyx.*pip install -e '\.\[baselines\]'"):
        baselines.ants_syn(fixed, moving)
    # evaluate checks before it loads a model (this one does not exist) or registers anything
    with pytest.raises(UserError, match="antspyx"):
        evaluate([], "no-such-model", baselines=("identity", "ants-syn"))


def test_evaluate_runs_ants_syn_beside_the_model_and_reports_it(tmp_path):
    pytest.importorskip("ants", reason="antspyx is not installed (pip install -e '.[baselines]')")
    import json

    import torch

    from ICONRegistrationLib.cli import main
    from ICONRegistrationLib.models import build_network
    from test_training import _cube_pair, small_spec

    paths = _cube_pair(tmp_path, 3)  # cubes of 10 voxels, the moving one shifted by 3 voxels
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_label,moving_label\n" + ",".join(
        paths[k] for k in ("fixed", "moving", "fixed_label", "moving_label")) + "\n")
    spec = small_spec()
    spec.to_file(tmp_path / "small.json")
    torch.save(build_network(spec).state_dict(), tmp_path / "small.pt")
    code = main(["evaluate", "--data", str(tmp_path / "pairs.csv"), "--model", str(tmp_path / "small.json"),
                 "--baselines", "identity,ants-syn", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    dice = {row["method"]: row["dice_mean"] for row in report["pairs"]}
    assert dice["identity"] == pytest.approx(0.7)  # 2·100·(10 − 3) / 2000
    # ANTs on 2 threads is not bit-reproducible: 40 runs on this pair gave 0.906–1.0 (median 0.998)
    assert dice["ants-syn"] > 0.8
    assert "| ants-syn | 1 |" in (tmp_path / "out" / "evaluation.md").read_text()
