"""The models the project ships: weights verified by sha256, better than identity on held-out data, and the
offline demo on the bundled sample pair."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from conftest import require_shared
from ICONRegistrationLib.cli import main
from ICONRegistrationLib.evaluation.metrics import dice_per_label, mean_std
from ICONRegistrationLib.models import load_model
from ICONRegistrationLib.models.weights import bundled_weights_path, sha256_of
from ICONRegistrationLib.models.zoo import model_names, zoo_spec
from ICONRegistrationLib.pipeline import register

SHIPPED = [name for name in model_names() if zoo_spec(name).weights.get("bundled")]


def test_the_project_ships_at_least_one_model():
    assert "gradicon-hippocampus" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_small_verified_and_load_strictly(name):
    spec = zoo_spec(name)
    path = bundled_weights_path(spec)
    assert path is not None, f"{name}: bundled weights file missing beside the zoo"
    assert path.stat().st_size <= 16 * 1024 * 1024
    assert spec.weights["sha256"] == sha256_of(path)
    loaded = load_model(name, device="cpu")
    assert loaded.weights_sha256 == spec.weights["sha256"]


HIPPOCAMPUS_MARGIN = 0.15  # mean Dice must beat the identity baseline by at least this much


def test_hippocampus_model_beats_identity_on_held_out_pairs():
    folder = require_shared("data", "hippocampus")
    from ICONRegistrationLib.datasets import list_volumes, split_validation

    validation = split_validation(list_volumes(folder), 0.2)[1]
    pairs = list(zip(validation[:6], validation[1:7]))  # 6 held-out pairs (i, i+1)
    loaded = load_model("gradicon-hippocampus", device="cpu")
    identity, registered = [], []
    for moving, fixed in pairs:
        fixed_image, moving_image = sitk.ReadImage(str(fixed.image)), sitk.ReadImage(str(moving.image))
        fixed_label, moving_label = sitk.ReadImage(str(fixed.label)), sitk.ReadImage(str(moving.label))
        result = register(fixed_image, moving_image, loaded, fixed_modality="mri", moving_modality="mri")
        for transform, scores in ((sitk.Transform(), identity), (result.forward_transform(), registered)):
            warped = sitk.Resample(moving_label, fixed_label, transform, sitk.sitkNearestNeighbor, 0.0)
            scores.append(mean_std(dice_per_label(warped, fixed_label, [1, 2]).values())[0])
        assert result.metrics.folds_percent < 0.1
    assert mean_std(registered)[0] >= mean_std(identity)[0] + HIPPOCAMPUS_MARGIN, (identity, registered)


def test_demo_runs_offline_on_the_bundled_pair(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and "Folded voxels" in printed
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["model"] == "gradicon-hippocampus"
    assert summary["dice_after"] > summary["dice_before"] + 0.1
    assert summary["folds_percent"] < 0.1
    for name in ("transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz",
                 "metrics.json", "report.png", "demo.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    # the written transform reproduces the reported Dice
    from ICONRegistrationLib.demo import sample_pair
    sample = sample_pair()
    fixed_label, moving_label = sitk.ReadImage(str(sample["fixed_label"])), sitk.ReadImage(str(sample["moving_label"]))
    warped = sitk.Resample(moving_label, fixed_label, sitk.ReadTransform(str(tmp_path / "demo" / "transform.h5")),
                           sitk.sitkNearestNeighbor, 0.0)
    dice = mean_std(dice_per_label(warped, fixed_label, [1, 2]).values())[0]
    assert dice == pytest.approx(summary["dice_after"], abs=0.01)
