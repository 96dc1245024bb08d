"""The models the project ships: weights verified by sha256, better than identity on held-out data, and the
offline demo on the bundled sample pair."""

from __future__ import annotations

import json

import numpy as np
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
    assert not list(path.parent.glob("*.sha256")), "no remembered hashes beside the shipped weights"


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


def _card_table(text: str, first_header: str) -> list[list[str]]:
    """Rows (cells stripped of ** and `) of the first Markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(f"| {first_header} "):
            rows = []
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip().strip("*`").strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table starting with '{first_header}'")


@pytest.mark.parametrize("name", SHIPPED)
def test_zoo_validation_numbers_are_the_model_cards_and_the_best_shipped(name):
    """The numbers `iconreg models list` shows come from the card's validation table, and the shipped weights are
    the best version in the card's ledger (never a worse model over a better one)."""
    from pathlib import Path

    spec = zoo_spec(name)
    validation = spec.extra["validation"]
    card = (Path(__file__).resolve().parents[1] / "Resources" / "Models" / f"{name}.md").read_text()
    rows = {row[0]: row for row in _card_table(card, "method")}
    own = rows[name]
    assert int(own[1]) == validation["registrations"]
    assert float(own[2].split("±")[0]) == pytest.approx(validation["dice"], abs=5e-4)
    assert float(own[3].split("±")[0]) == pytest.approx(validation["hd95_mm"], abs=5e-3)
    assert float(own[4].split("±")[0]) == pytest.approx(validation["folds_percent"], abs=5e-5)
    assert float(own[5].split("±")[0]) == pytest.approx(validation["ic_error_mm"], abs=5e-3)
    for baseline, dice in validation["baselines"].items():
        assert float(rows[baseline][2].split("±")[0]) == pytest.approx(dice, abs=5e-4)
    assert "\n## Shipped versions\n" in card, "the card has no 'Shipped versions' ledger"
    ledger = _card_table(card.split("\n## Shipped versions\n", 1)[1], "shipped")  # the ledger, not a row named so
    assert spec.weights["sha256"].startswith(ledger[-1][1].rstrip("…"))
    shipped_dice = [float(row[3]) for row in ledger]
    assert shipped_dice[-1] == pytest.approx(validation["dice"], abs=5e-4)
    assert shipped_dice[-1] >= max(shipped_dice) - 1e-9, "a worse model replaced a better one"


def test_brain_model_beats_identity_on_held_out_lpba40_subjects():
    """gradicon-brain-lpba40 on a validation pair it never saw (S39 ↔ S40, both directions): mean Dice over the 56
    labels well above identity, no folds."""
    folder = require_shared("data", "lpba40")
    loaded = load_model("gradicon-brain-lpba40", device="cpu")
    names = ("S39.nii.gz", "S40.nii.gz")
    images = {n: sitk.ReadImage(str(folder / "images" / n)) for n in names}
    labels = {n: sitk.ReadImage(str(folder / "labels" / n)) for n in names}
    for moving, fixed in (names, names[::-1]):
        result = register(images[fixed], images[moving], loaded, fixed_modality="mri", moving_modality="mri")
        values = sorted(set(int(v) for v in np.unique(sitk.GetArrayFromImage(labels[fixed]))) - {0})
        scores = {}
        for label, transform in (("identity", sitk.Transform()), ("model", result.forward_transform())):
            warped = sitk.Resample(labels[moving], labels[fixed], transform, sitk.sitkNearestNeighbor, 0.0)
            scores[label] = mean_std(dice_per_label(warped, labels[fixed], values).values())[0]
        assert scores["model"] >= scores["identity"] + 0.08, scores
        assert result.metrics.folds_percent < 0.01


def test_each_shipped_model_warns_on_the_other_ones_images_and_not_on_its_own():
    """A model given images unlike its training data is told apart from its own domain by its validation record:
    the hippocampus model on two whole brains disagrees with itself (IC error several times its validation one), the
    brain model on two hippocampus crops folds; on held-out pairs of their own data neither warns."""
    from ICONRegistrationLib.errors import collect_user_warnings

    brains, crops = require_shared("data", "lpba40"), require_shared("data", "hippocampus")
    brain = [sitk.ReadImage(str(brains / "images" / n)) for n in ("S39.nii.gz", "S40.nii.gz")]
    crop = [sitk.ReadImage(str(crops / "images" / f"hippocampus_{n}.nii.gz")) for n in (268, 269)]
    for model, images, expected in (("gradicon-hippocampus", brain, "inverse-consistency error"),
                                    ("gradicon-brain-lpba40", crop, "of the field folds"),
                                    ("gradicon-hippocampus", crop, None), ("gradicon-brain-lpba40", brain, None)):
        result, said = collect_user_warnings(lambda: register(images[0], images[1], model, fixed_modality="mri",
                                                              moving_modality="mri", device="cpu"))
        validation = zoo_spec(model).extra["validation"]
        if expected is None:
            assert said == [], (model, said)
            assert result.metrics.ic_error_mean_mm < 1.5 * validation["ic_error_mm"]
        else:
            assert any(expected in message and model in message for message in said), (model, said)


def test_brain_sample_pair_matches_its_ground_truth():
    """The synthetic brain pair's known transform maps the moving tissue labels exactly onto the fixed ones (it
    is how the fixed image was made), and it is a real deformation of a few millimetres."""
    from ICONRegistrationLib.demo import sample_pair
    from ICONRegistrationLib.evaluation.metrics import transform_error_mm
    sample = sample_pair("brain")
    assert sample["model"] == "gradicon-brain-lpba40"
    fixed_label = sitk.ReadImage(str(sample["fixed_label"]))
    moving_label = sitk.ReadImage(str(sample["moving_label"]))
    truth = sitk.ReadTransform(str(sample["ground_truth_transform"]))
    warped = sitk.Resample(moving_label, fixed_label, truth, sitk.sitkNearestNeighbor, 0)
    assert min(dice_per_label(warped, fixed_label, [1, 2]).values()) > 0.999
    before, _ = transform_error_mm(sitk.Transform(3, sitk.sitkIdentity), truth, fixed_label, fixed_label)
    assert 2.0 < before < 6.0


def test_demo_with_the_brain_model_runs_on_the_synthetic_brain_pair(tmp_path, capsys):
    assert main(["demo", "--model", "gradicon-brain-lpba40", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Distance to the known transform" in printed
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["model"] == "gradicon-brain-lpba40"
    assert summary["dice_after"] > summary["dice_before"] + 0.05
    assert summary["error_to_truth_mm"] < 0.8 * summary["error_to_truth_before_mm"]
    assert summary["folds_percent"] < 0.01


def test_demo_says_why_when_no_sample_pair_shows_the_models_anatomy(tmp_path, monkeypatch, capsys):
    from ICONRegistrationLib.demo import sample_data_dir
    only_hippocampus = tmp_path / "samples"
    only_hippocampus.mkdir()
    for path in sample_data_dir().iterdir():
        if path.is_file():
            (only_hippocampus / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("ICONREG_SAMPLE_DATA", str(only_hippocampus))
    assert main(["demo", "--model", "gradicon-brain-lpba40", "--out", str(tmp_path / "demo")]) == 3
    err = capsys.readouterr().err
    assert "no brain pair" in err and "ICONREG_SAMPLE_DATA" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_demo_reports_the_distance_to_a_known_transform_without_labels(tmp_path, monkeypatch, capsys):
    """A sample pair with a ground-truth transform but no label maps: the distance is taken inside the fixed
    image's foreground, and no Dice is reported."""
    from ICONRegistrationLib.demo import sample_data_dir, sample_pair
    folder = tmp_path / "samples"
    (folder / "brain").mkdir(parents=True)
    for path in sample_data_dir().iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    brain = sample_pair("brain")
    description = json.loads((sample_data_dir() / "brain" / "sample.json").read_text())
    for key in ("fixed_label", "moving_label"):
        description.pop(key)
    for key in ("fixed", "moving", "ground_truth_transform"):
        (folder / "brain" / brain[key].name).write_bytes(brain[key].read_bytes())
    (folder / "brain" / "sample.json").write_text(json.dumps(description))
    monkeypatch.setenv("ICONREG_SAMPLE_DATA", str(folder))
    assert main(["demo", "--model", "gradicon-brain-lpba40", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    assert "where the fixed image is above 0" in capsys.readouterr().out
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert "dice_after" not in summary
    assert summary["error_to_truth_mm"] < 0.8 * summary["error_to_truth_before_mm"]
