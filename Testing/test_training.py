"""Training (loss goes down, exact resume, stage 1 → 2, export) and evaluation (Dice and HD95 by hand)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image
from ICONRegistrationLib.cli import main
from ICONRegistrationLib.models import ModelSpec, build_network, load_model
from ICONRegistrationLib.datasets import list_volumes, split_validation
from ICONRegistrationLib.training.data import PreparedSet, prepare
from ICONRegistrationLib.training.trainer import (TrainingConfig, export_weights, initialise, make_optimizer,
                                                  stage_spec, train)
from ICONRegistrationLib.core.coordinates import voxel_scale
from ICONRegistrationLib.errors import UserError

SMALL = {"name": "small", "unet": {"num_layers": 3, "channels": [[2, 8, 8, 8], [8, 8, 8]]}, "levels": 2,
         "last_step": True, "input_shape": [20, 24, 20], "similarity": {"name": "lncc", "sigma": 2},
         "lambda": 1.5, "preprocessing": {"mri_percentile": 99},
         "weights": {"file": "small.pt", "sha256": None}}


def small_spec() -> ModelSpec:
    return ModelSpec.from_dict(SMALL)


def synthetic_set(count: int = 4, seed: int = 0) -> PreparedSet:
    """Blob volumes moved by a few voxels, with two labels (thresholds of the blobs)."""
    images, labels = [], []
    for k in range(count):
        volume = blob_volume((20, 24, 20), centre=(10 + (k % 3) - 1, 12 + (k % 2) * 2 - 1, 10), seed=seed)
        volume = (volume - volume.min()) / (volume.max() - volume.min())
        images.append(torch.as_tensor(volume, dtype=torch.float16)[None, None])
        labels.append(torch.as_tensor((volume > 0.3).astype(np.uint8) + (volume > 0.6).astype(np.uint8))[None, None])
    return PreparedSet(torch.cat(images), torch.cat(labels), [f"v{k}" for k in range(count)], (20, 24, 20))


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    config = TrainingConfig(steps=40, batch_size=2, learning_rate=2e-3, affine_strength=0.0, flip_axes=(),
                            validate_every=40, checkpoint_every=40, seed=1)
    summary = train(small_spec(), synthetic_set(), tmp_path, config, validation_set=synthetic_set(3, seed=1),
                    device="cpu")
    with (tmp_path / "train_log.csv").open() as handle:
        similarity = [float(r["similarity"]) for r in csv.DictReader(handle)]
    assert len(similarity) == 40
    first, last = np.mean(similarity[:8]), np.mean(similarity[-8:])
    assert last < first - 0.02, (first, last)  # LNCC loss (1 − LNCC) drops
    assert summary["validation"]["val_folds_percent"] < 1.0
    assert 0.0 <= summary["validation"]["val_dice"] <= 1.0
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "curves.png").is_file()


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_penalty_fraction_outside_zero_one_is_a_user_error(tmp_path, fraction):
    from ICONRegistrationLib.errors import UserError
    with pytest.raises(UserError, match="penalty fraction"):
        train(small_spec(), synthetic_set(), tmp_path, TrainingConfig(steps=1, penalty_fraction=fraction),
              device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": float("nan")}, "--learning-rate"), ({"learning_rate": -1e-4}, "--learning-rate"),
    ({"validate_every": 0}, "--validate-every"), ({"checkpoint_every": 0}, "--checkpoint-every"),
    ({"flip_axes": (5,)}, "--flip-axes"), ({"flip_axes": (2, 2)}, "--flip-axes"), ({"lmbda": -1.0}, "--lambda"),
    ({"affine_strength": -0.1}, "--affine"), ({"elastic_voxels": float("nan")}, "--elastic"),
    ({"intensity_gamma": -0.3}, "--gamma"), ({"bias_field": -0.1}, "--bias-field")])
def test_nonsense_rates_intervals_and_strengths_are_user_errors_before_any_step(tmp_path, change, message):
    """They used to stop with a traceback (NaN or negative rate, interval 0, flip axis 5) or train something else
    without a word (a flip axis twice, a negative λ or augmentation strength: no augmentation)."""
    from ICONRegistrationLib.errors import UserError
    with pytest.raises(UserError, match=message):
        train(small_spec(), synthetic_set(), tmp_path, TrainingConfig(steps=1, batch_size=2, **change), device="cpu")
    assert not (tmp_path / "train_log.csv").exists()


def test_resume_takes_the_same_next_steps_as_an_uninterrupted_run(tmp_path):
    config = TrainingConfig(steps=6, batch_size=2, learning_rate=1e-3, checkpoint_every=3, validate_every=100,
                            seed=3)
    data = synthetic_set()
    train(small_spec(), data, tmp_path / "straight", config, device="cpu")
    train(small_spec(), data, tmp_path / "resumed", TrainingConfig(**{**config.__dict__, "steps": 3}), device="cpu")
    with (tmp_path / "resumed" / "train_log.csv").open("a") as handle:  # a step logged after the checkpoint,
        handle.write("4,9.0,9.0,9.0,1.0\n")                              # by a run killed before the next one
    train(small_spec(), data, tmp_path / "resumed", config, device="cpu")  # picks up checkpoint at step 3

    def losses(folder):
        with (tmp_path / folder / "train_log.csv").open() as handle:
            return [r["loss"] for r in csv.DictReader(handle)]

    assert losses("straight") == losses("resumed")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_more_final_steps_start_from_a_trained_network_and_register_exactly_like_it(tmp_path):
    """``options.final_steps`` adds full-resolution steps; initialised from the smaller network's weights, the
    new steps are the identity, so Φ_AB is unchanged (to float rounding) until they are trained."""
    from conftest import random_state
    from ICONRegistrationLib.core.coordinates import identity_map
    from ICONRegistrationLib.errors import UserError
    spec = small_spec()
    state = random_state(spec, seed=3, output_scale=0.05)
    bigger = ModelSpec.from_dict(dict(SMALL, name="small-fs3", options={"final_steps": 3}))
    net, big = build_network(spec), build_network(bigger)
    net.load_state_dict(state)
    torch.save(state, tmp_path / "w.pt")
    assert initialise(big, tmp_path / "w.pt") == "the inner network (the outer 2 steps start at the identity)"
    assert len([k for k in big.state_dict() if k.endswith("lastConv.weight")]) == \
        len([k for k in state if k.endswith("lastConv.weight")]) + 2
    torch.manual_seed(0)
    A, B = torch.rand(2, 1, 1, *spec.input_shape)
    grid = identity_map(spec.input_shape)
    with torch.no_grad():
        expected, got = net(A, B)(grid), big(A, B)(grid)
    assert (expected - grid).abs().max() > 1e-3  # the source network moves the images
    assert torch.allclose(got, expected, atol=1e-6)
    assert "final_steps" not in stage_spec(bigger, 1).options  # stage 1 trains the pyramid alone
    with pytest.raises(UserError, match="final_steps"):
        ModelSpec.from_dict(dict(SMALL, name="bad", last_step=False, options={"final_steps": 2}))
    with pytest.raises(UserError, match="final_steps"):
        ModelSpec.from_dict(dict(SMALL, name="bad", options={"final_steps": 0}))


def test_stage_one_weights_start_stage_two_and_export_loads_strictly(tmp_path):
    spec = small_spec()
    config = TrainingConfig(steps=2, stage=1, batch_size=2, checkpoint_every=2, validate_every=100)
    train(spec, synthetic_set(), tmp_path / "stage1", config, device="cpu")
    stage1 = torch.load(tmp_path / "stage1" / "checkpoint.pt", weights_only=True)
    assert stage1["spec"]["last_step"] is False
    net = build_network(stage_spec(spec, 2))
    assert initialise(net, tmp_path / "stage1" / "checkpoint.pt").startswith("the inner network")
    assert torch.equal(net.netPhi.state_dict()[next(iter(stage1["model"]))], next(iter(stage1["model"].values())))
    # stage 2 from stage 1, exported as float16 and loaded as a model
    config2 = TrainingConfig(steps=2, stage=2, batch_size=2, checkpoint_every=2, validate_every=100)
    train(spec, synthetic_set(), tmp_path / "stage2", config2, init=tmp_path / "stage1" / "checkpoint.pt",
          device="cpu")
    spec.to_file(tmp_path / "small.json")
    exported = export_weights(tmp_path / "stage2" / "checkpoint.pt", tmp_path / "small.pt")
    state = torch.load(exported, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = load_model(tmp_path / "small.json", device="cpu")
    assert loaded.weights_sha256 and loaded.spec.name == "small"


def test_freeze_inner_trains_only_the_final_step_and_keeps_the_inner_statistics(tmp_path):
    """Stage 2 with ``freeze_inner``: the stage-1 network's weights and batch-norm running statistics come out
    bit for bit as they went in, the final step learns (its zero-initialised last convolution moves), a resume
    must keep the setting, and a network without steps refuses it."""
    spec = small_spec()
    stage1 = TrainingConfig(steps=3, stage=1, batch_size=2, checkpoint_every=3, validate_every=100, seed=2)
    train(spec, synthetic_set(), tmp_path / "stage1", stage1, device="cpu")
    inner_before = torch.load(tmp_path / "stage1" / "checkpoint.pt", weights_only=True)["model"]
    config = TrainingConfig(steps=4, stage=2, batch_size=2, learning_rate=1e-3, checkpoint_every=2,
                            validate_every=2, freeze_inner=True, seed=3)
    train(spec, synthetic_set(), tmp_path / "stage2", config, init=tmp_path / "stage1" / "checkpoint.pt",
          validation_set=synthetic_set(3, seed=1), device="cpu")
    after = torch.load(tmp_path / "stage2" / "checkpoint.pt", weights_only=True)["model"]
    for name, value in inner_before.items():  # weights, running means/variances and batch counters
        assert torch.equal(after[f"netPhi.{name}"], value), name
    assert float(after["netPsi.net.lastConv.weight"].abs().max()) > 0  # the new step moved away from the identity
    assert any(float(value.abs().max()) > 0 for name, value in after.items()
               if name.startswith("netPsi.") and name.endswith("running_mean"))  # its statistics update (from 0)
    with pytest.raises(UserError, match="--freeze-inner"):  # resuming without the setting
        train(spec, synthetic_set(), tmp_path / "stage2", dataclasses.replace(config, steps=6, freeze_inner=False),
              device="cpu")
    with pytest.raises(UserError, match="needs --init"):  # a frozen random network is never what is meant
        train(spec, synthetic_set(), tmp_path / "fresh", config, device="cpu")
    with pytest.raises(UserError, match="network built in steps"):
        train(ModelSpec.from_dict({**SMALL, "levels": 1, "last_step": False}), synthetic_set(), tmp_path / "one",
              dataclasses.replace(config, stage=1), device="cpu")


def test_symmetric_label_loss_is_taken_on_the_symmetric_maps_and_validated_on_them(tmp_path, monkeypatch):
    """``symmetric_label_loss``: the label loss sees the maps after :func:`symmetrize_maps` (cheap unrolled
    inversions), validation reports the symmetric prediction's Dice, and without a label loss it is refused."""
    from ICONRegistrationLib.core import inversion
    from ICONRegistrationLib.training import trainer

    seen = []

    def recording(maps, **kwargs):
        seen.append(kwargs)
        return inversion.symmetrize_maps(maps, **kwargs)

    monkeypatch.setattr(trainer, "symmetrize_maps", recording)
    config = TrainingConfig(steps=3, stage=2, batch_size=2, learning_rate=1e-3, checkpoint_every=3,
                            validate_every=3, label_loss="dice", label_weight=1.0, symmetric_label_loss=True, seed=4)
    train(small_spec(), synthetic_set(), tmp_path / "run", config, validation_set=synthetic_set(3, seed=1),
          device="cpu")
    training_calls = [kwargs for kwargs in seen if kwargs.get("unrolled_steps") is not None]
    assert len(training_calls) == 3 and training_calls[0]["unrolled_steps"] == trainer.SYMMETRIC_TRAINING_STEPS
    assert len(seen) - len(training_calls) == 2  # validation: accurate inversions, one per pair of 3 volumes
    with (tmp_path / "run" / "validation_log.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert 0.0 < float(row["val_dice_symmetric"]) <= 1.0
    with pytest.raises(UserError, match="--symmetric-label-loss"):
        train(small_spec(), synthetic_set(), tmp_path / "no-labels",
              dataclasses.replace(config, label_loss=None), device="cpu")
    with pytest.raises(UserError, match="trained with --symmetric-label-loss"):  # the objective cannot change
        train(small_spec(), synthetic_set(), tmp_path / "run", dataclasses.replace(config, steps=5,
                                                                                    symmetric_label_loss=False),
              device="cpu")


def test_dataset_listing_split_and_nearest_label_resampling(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k in range(5):
        volume = blob_volume((14, 18, 16), seed=k)
        sitk.WriteImage(make_image(volume, spacing=(1.0, 1.2, 0.9)), str(tmp_path / "images" / f"case{k}.nii.gz"))
        labels = np.zeros((14, 18, 16), np.uint8)
        labels[3:9, 4:12, 5:11] = 7
        labels[9:12, 2:6, 2:6] = 3
        sitk.WriteImage(make_image(labels, spacing=(1.0, 1.2, 0.9)), str(tmp_path / "labels" / f"case{k}.nii.gz"))
    entries = list_volumes(tmp_path)
    assert [e.image.name for e in entries] == [f"case{k}.nii.gz" for k in range(5)]
    train_entries, validation_entries = split_validation(entries, 0.2)
    assert len(train_entries) == 4 and validation_entries[0].image.name == "case4.nii.gz"
    prepared = prepare(entries, small_spec())
    assert prepared.images.shape == (5, 1, 20, 24, 20) and prepared.images.dtype == torch.float16
    assert set(torch.unique(prepared.labels).tolist()) == {0, 3, 7}  # no interpolated label values
    prepared.save(tmp_path / "prepared.npz")
    again = PreparedSet.load(tmp_path / "prepared.npz")
    assert torch.equal(again.images, prepared.images) and again.names == prepared.names
    with (tmp_path / "list.csv").open("w") as handle:
        handle.write("image,label\nimages/case0.nii.gz,labels/case0.nii.gz\nimages/case1.nii.gz,\n")
    csv_entries = list_volumes(tmp_path / "list.csv")
    assert csv_entries[0].label.name == "case0.nii.gz" and csv_entries[1].label is None


def test_cli_train_writes_checkpoint_logs_and_float16_export(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for k in range(5):
        sitk.WriteImage(make_image(blob_volume((16, 20, 16), seed=k)), str(data / "images" / f"c{k}.nii.gz"))
    small_spec().to_file(tmp_path / "small.json")
    code = main(["train", "--spec", str(tmp_path / "small.json"), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--val-fraction", "0.4",
                 "--validate-every", "2", "--export", str(tmp_path / "small.pt"), "--device", "cpu"])
    assert code == 0
    assert (tmp_path / "run" / "validation_log.csv").is_file()
    assert load_model(tmp_path / "small.json", device="cpu").weights_path.name == "small.pt"


# ----- evaluation ---------------------------------------------------------------------------------------
def _cube_pair(folder, shift: int):
    """Fixed cube [8:18]³ (label 1) and the moving one shifted by ``shift`` voxels along x; 1 mm voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    fixed_labels = np.zeros((26, 26, 26), np.uint8)
    fixed_labels[8:18, 8:18, 8:18] = 1
    moving_labels = np.roll(fixed_labels, shift, axis=2)
    paths = {}
    for name, labels in (("fixed", fixed_labels), ("moving", moving_labels)):
        image = labels.astype(np.float32) * 100 + blob_volume((26, 26, 26), seed=5) * 0.01
        sitk.WriteImage(make_image(image), str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(make_image(labels), str(folder / f"{name}_label.nii.gz"))
        paths[name] = f"{name}.nii.gz"
        paths[f"{name}_label"] = f"{name}_label.nii.gz"
    return paths


def test_evaluate_gives_the_dice_and_hd95_computed_by_hand(tmp_path):
    rows = [_cube_pair(tmp_path / "a", 2), _cube_pair(tmp_path / "b", 4)]
    with (tmp_path / "pairs.csv").open("w") as handle:
        handle.write("fixed,moving,fixed_label,moving_label\n")
        for folder, paths in zip("ab", rows):
            handle.write(",".join(f"{folder}/{paths[k]}" for k in ("fixed", "moving", "fixed_label",
                                                                   "moving_label")) + "\n")
    spec = small_spec()
    spec.to_file(tmp_path / "small.json")
    torch.save(build_network(spec).state_dict(), tmp_path / "small.pt")  # zero last layers: identity network
    code = main(["evaluate", "--data", str(tmp_path / "pairs.csv"), "--model", str(tmp_path / "small.json"),
                 "--baselines", "identity", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    identity = [r for r in report["pairs"] if r["method"] == "identity"]
    # cubes of 10³ voxels overlapping over 10·10·(10 − shift): Dice = 2·100·(10 − s) / 2000
    assert identity[0]["dice_mean"] == pytest.approx(0.8)
    assert identity[1]["dice_mean"] == pytest.approx(0.6)
    # faces perpendicular to the shift are `shift` mm from the other cube's boundary: HD95 = shift
    assert identity[0]["hd95_mm"] == pytest.approx(2.0)
    assert identity[1]["hd95_mm"] == pytest.approx(4.0)
    assert report["summary"]["identity"]["dice_mean"][0] == pytest.approx(0.7)
    assert report["summary"]["identity"]["dice_mean"][1] == pytest.approx(0.1)
    # the untrained network predicts the identity, so it scores the same, with no folds
    model_rows = [r for r in report["pairs"] if r["method"] == "model"]
    assert [r["dice_mean"] for r in model_rows] == pytest.approx([0.8, 0.6], abs=1e-6)
    assert all(r["jacobian_nonpositive_percent"] == 0 for r in model_rows)
    # every registration says how busy the machine was while it was timed (a share of its CPU, or unknown)
    assert all(r["other_load_share"] is None or 0 <= r["other_load_share"] <= 1 for r in report["pairs"])
    assert report["busy_rows"] == [f"{r['pair']} {r['method']}" for r in report["pairs"]
                                   if (r["other_load_share"] or 0) > 0.05]
    assert "| identity | 2 | 0.700 ± 0.100 |" in (tmp_path / "out" / "evaluation.md").read_text()
    assert all(r["flips"] == [] for r in model_rows) and identity[0]["flips"] is None
    # the identity network's two directions agree everywhere, also inside the labels; baselines have no IC map
    assert all(0 <= r["ic_error_in_labels_mm"] < 1e-3 for r in model_rows)
    assert all(r["ic_error_in_labels_mm"] is None for r in identity)  # NaN is written as null, as for ic_error_mean_mm
    # averaged over all eight flips, the identity network is still the identity (each flip is mapped back)
    code = main(["evaluate", "--data", str(tmp_path / "pairs.csv"), "--model", str(tmp_path / "small.json"),
                 "--baselines", "", "--flips", "0,1,2", "--out", str(tmp_path / "flipped"), "--device", "cpu"])
    assert code == 0
    flipped = json.loads((tmp_path / "flipped" / "evaluation.json").read_text())["pairs"]
    assert [r["dice_mean"] for r in flipped] == pytest.approx([0.8, 0.6], abs=1e-6)
    assert all(r["flips"] == [0, 1, 2] for r in flipped)
    assert "averaged over flips of network axes [0, 1, 2]" in (tmp_path / "flipped" / "evaluation.md").read_text()
    # symmetric: the identity network's directions are already inverse, so nothing changes; rows record it
    assert main(["evaluate", "--data", str(tmp_path / "pairs.csv"), "--model", str(tmp_path / "small.json"),
                 "--baselines", "identity", "--symmetric", "--out", str(tmp_path / "symmetric"),
                 "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "symmetric" / "evaluation.json").read_text())["pairs"]
    assert [r["dice_mean"] for r in rows if r["method"] == "model"] == pytest.approx([0.8, 0.6], abs=1e-6)
    assert [r["symmetric"] for r in rows] == [True, None, True, None]
    # the identity network refined once: the identity again; rows record the refinements
    assert main(["evaluate", "--data", str(tmp_path / "pairs.csv"), "--model", str(tmp_path / "small.json"),
                 "--baselines", "identity", "--refinements", "1", "--out", str(tmp_path / "refined"),
                 "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "refined" / "evaluation.json").read_text())["pairs"]
    assert [r["dice_mean"] for r in rows if r["method"] == "model"] == pytest.approx([0.8, 0.6], abs=1e-6)
    assert [r["refinements"] for r in rows] == [1, None, 1, None]
    assert "; refinements 1" in (tmp_path / "refined" / "evaluation.md").read_text()
    assert "; symmetric predictions" in (tmp_path / "symmetric" / "evaluation.md").read_text()


def test_mean_inside_labels_resamples_the_label_onto_the_values_grid():
    """The IC map lives on the network grid (here 2 mm, shifted), the label on the image's 1 mm grid: the mean is
    over the map's voxels whose centres fall inside the label, found in physical space."""
    from ICONRegistrationLib.evaluation.evaluate import mean_inside_labels

    values = sitk.GetImageFromArray(np.broadcast_to(np.arange(10, dtype=np.float32), (6, 8, 10)).copy())
    values.SetSpacing((2.0, 2.0, 2.0))
    values.SetOrigin((1.0, 0.0, 0.0))  # voxel i (along x) is centred at x = 1 + 2i mm and holds the value i
    label = np.zeros((12, 16, 20), np.uint8)
    label[:, :, 5:10] = 2  # x = 5 … 9 mm (1 mm voxels at x = 0 … 19): map voxels centred at 5, 7, 9 mm, i = 2, 3, 4
    assert mean_inside_labels(values, sitk.GetImageFromArray(label)) == pytest.approx(3.0)
    assert math.isnan(mean_inside_labels(values, sitk.GetImageFromArray(np.zeros_like(label))))


def test_demons_baseline_leaves_identical_images_alone_and_starts_from_the_box_alignment():
    """Identical images: no displacement at all (sitk.Shrink's half-voxel mislabelling of its samples made demons
    find a 0.57 mm shift). Two copies of one volume on boxes 30 mm apart, the second scaled by 1.2: the networks'
    box-to-box start maps one onto the other exactly, so demons (which starts there) has nothing left to do."""
    from ICONRegistrationLib.evaluation.baselines import box_alignment, demons

    volume = blob_volume((24, 28, 20), seed=5)
    image = make_image(volume, spacing=(1.0, 1.2, 0.9))
    field = sitk.TransformToDisplacementField(demons(image, image), sitk.sitkVectorFloat64, image.GetSize(),
                                              image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    assert float(np.abs(sitk.GetArrayFromImage(field)).max()) < 1e-6
    moved = make_image(volume, spacing=(1.2, 1.44, 1.08), origin=(30.0, -10.0, 5.0))
    start = box_alignment(image, moved)
    for index in [(0, 0, 0), (19, 27, 23), (5, 9, 11)]:  # voxel centres map to voxel centres
        mapped = start.TransformPoint(image.TransformIndexToPhysicalPoint(index))
        assert moved.TransformPhysicalPointToContinuousIndex(mapped) == pytest.approx(index, abs=1e-9)
    transform = demons(image, moved)
    warped = sitk.Resample(moved, image, transform, sitk.sitkLinear, 0.0)
    inner = (slice(2, -2),) * 3
    assert np.abs(sitk.GetArrayFromImage(warped) - volume)[inner].max() < 1e-3 * np.abs(volume).max()


def test_demons_baseline_recovers_a_shift():
    from ICONRegistrationLib.evaluation.baselines import demons
    from ICONRegistrationLib.evaluation.metrics import dice_per_label

    fixed_volume = blob_volume((32, 36, 32), seed=2)
    fixed = make_image(fixed_volume)
    moving = make_image(np.roll(fixed_volume, 2, axis=2))
    labels = make_image((fixed_volume > np.percentile(fixed_volume, 80)).astype(np.uint8))
    moving_labels = make_image(np.roll(sitk.GetArrayFromImage(labels), 2, axis=2))
    transform = demons(fixed, moving)
    warped = sitk.Resample(moving_labels, labels, transform, sitk.sitkNearestNeighbor, 0)
    before = dice_per_label(moving_labels, labels, [1])[1]
    after = dice_per_label(warped, labels, [1])[1]
    assert after > before + 0.1, (before, after)


# --- label-aware training (optional supervision) -------------------------------------------------------------

def test_label_fractions_are_one_hot_and_block_fractions():
    from ICONRegistrationLib.core.losses import label_fractions
    labels = torch.zeros(1, 1, 4, 4, 4)
    labels[0, 0, :2, :2, :2] = 7
    labels[0, 0, 0, 0, 0] = 3
    labels[0, 0, 2:, 2:, 2:] = 99  # not in the values: background
    one_hot = label_fractions(labels, torch.tensor([3, 7]))
    assert one_hot.shape == (1, 2, 4, 4, 4)
    assert torch.equal(one_hot[0, 0], (labels[0, 0] == 3).float())
    assert torch.equal(one_hot[0, 1], (labels[0, 0] == 7).float())
    blocks = label_fractions(labels, torch.tensor([3, 7]), factor=2)
    assert blocks.shape == (1, 2, 2, 2, 2)
    assert blocks[0, 0, 0, 0, 0] == pytest.approx(1 / 8) and blocks[0, 1, 0, 0, 0] == pytest.approx(7 / 8)
    assert float(blocks[0, :, 1, 1, 1].sum()) == 0.0  # label 99 and 0 are background
    with pytest.raises(ValueError, match="divide"):
        label_fractions(torch.zeros(1, 1, 5, 4, 4), torch.tensor([1]), factor=2)


def test_soft_dice_loss_is_zero_for_a_match_one_for_disjoint_and_skips_absent_labels():
    from ICONRegistrationLib.core.losses import soft_dice_loss
    a = torch.zeros(1, 3, 6, 6, 6)
    a[0, 0, :3] = 1
    a[0, 1, 3:] = 1  # channel 2 is empty in both maps: skipped, not a perfect match
    assert float(soft_dice_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(a, a.flip(2))) == pytest.approx(1.0, abs=1e-6)
    half = a.clone()
    half[0, 0, 1:3] = 0  # channel 0 overlap 1/3 of a's: Dice 2·(1/3)/(1 + 1/3) = 0.5
    assert float(soft_dice_loss(half, a)) == pytest.approx(1 - (0.5 + 1.0) / 2, abs=1e-6)


def test_label_loss_on_blocks_is_lowest_at_the_true_shift():
    """Labels of B are those of A moved by 4 voxels along axis 0: over maps Φ = Id + t, the loss (on 2-voxel
    blocks) is smallest at t = 4 voxels, in both directions, and coarse_coordinates keeps the identity."""
    from ICONRegistrationLib.core.coordinates import identity_map, voxel_scale
    from ICONRegistrationLib.training.trainer import coarse_coordinates, label_loss
    shape = (32, 24, 24)
    identity = identity_map(shape)
    assert torch.allclose(coarse_coordinates(identity, 2), identity_map((16, 12, 12)), atol=1e-6)
    labels_A = torch.zeros(1, 1, *shape)
    labels_A[0, 0, 8:16, 6:18, 6:18] = 1
    labels_A[0, 0, 16:22, 6:18, 6:18] = 2
    labels_B = labels_A.roll(-4, dims=2)  # B(x) = A(x + 4): Φ_AB(x) = x + 4, Φ_BA(x) = x − 4
    step = 1 / voxel_scale(shape)[0, 0, 0, 0, 0]
    losses = {}
    for shift in range(0, 9):
        maps = identity.repeat(2, 1, 1, 1, 1)
        maps[0, 0] += shift * step
        maps[1, 0] -= shift * step
        losses[shift] = float(label_loss(maps, labels_A, labels_B, torch.tensor([1, 2]), factor=2))
    assert min(losses, key=losses.get) == 4, losses
    assert losses[4] < 0.05 and losses[0] > 0.3, losses


def test_augment_moves_labels_with_their_images_and_draws_the_same_numbers():
    from ICONRegistrationLib.training.trainer import augment
    data = synthetic_set()
    A, B = data.images[:2].float(), data.images[2:].float()
    labels = (data.labels[:2].float(), data.labels[2:].float())
    flips_only = TrainingConfig(flip_axes=(0, 1, 2), affine_strength=0.0)
    out_A, out_B, (lab_A, lab_B) = augment(A, B, flips_only, torch.Generator().manual_seed(5), labels)
    # labels are thresholds of the images: they still are after the same flips
    assert torch.equal(lab_A, (out_A > 0.3).float() + (out_A > 0.6).float())
    assert torch.equal(lab_B, (out_B > 0.3).float() + (out_B > 0.6).float())
    config = TrainingConfig(flip_axes=(0, 1, 2), affine_strength=0.05)
    with_labels = augment(A, B, config, torch.Generator().manual_seed(7), labels)
    without = augment(A, B, config, torch.Generator().manual_seed(7))
    assert torch.equal(with_labels[0], without[0]) and torch.equal(with_labels[1], without[1])
    assert without[2] is None
    # nearest-neighbour labels agree with the thresholds of the bilinearly warped image almost everywhere
    agreement = (with_labels[2][0] == (with_labels[0] > 0.3).float() + (with_labels[0] > 0.6).float()).float()
    assert float(agreement.mean()) > 0.95


def test_label_loss_training_lowers_the_label_loss_and_logs_it(tmp_path):
    config = TrainingConfig(steps=30, batch_size=2, learning_rate=2e-3, affine_strength=0.0, flip_axes=(),
                            validate_every=30, checkpoint_every=30, seed=1, label_loss="dice", label_weight=1.0)
    train(small_spec(), synthetic_set(), tmp_path, config, device="cpu")
    with (tmp_path / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    label = [float(r["label_loss"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    total = [float(r["similarity"]) + 1.5 * float(r["penalty"]) + float(r["label_loss"]) for r in rows]
    assert np.allclose(loss, total, atol=1e-5)  # the logged loss includes the label term with weight 1
    assert np.mean(label[-6:]) < np.mean(label[:6]) - 0.02, label


@pytest.mark.parametrize("change, message", [
    ({"label_loss": "focal"}, "Unknown label loss"),
    ({"label_weight": 0.0}, "label weight"),
    ({"label_weight": float("nan")}, "label weight"),
    ({"label_downsample": 3}, "divide the grid"),
])
def test_label_loss_settings_are_checked(tmp_path, change, message):
    from ICONRegistrationLib.errors import UserError
    config = TrainingConfig(**{"steps": 1, "batch_size": 2, "label_loss": "dice", **change})
    with pytest.raises(UserError, match=message):
        train(small_spec(), synthetic_set(), tmp_path, config, device="cpu")


def test_label_loss_without_labels_is_a_user_error(tmp_path):
    from ICONRegistrationLib.errors import UserError
    data = synthetic_set()
    unlabelled = PreparedSet(data.images, None, data.names, data.shape)
    with pytest.raises(UserError, match="label maps"):
        train(small_spec(), unlabelled, tmp_path, TrainingConfig(steps=1, label_loss="dice"), device="cpu")


def test_gpu_training_script_runs_end_to_end_on_a_cpu_with_two_steps(tmp_path):
    """scripts/train_gpu.sh, with DEVICE=cpu and 2 steps on prepared synthetic volumes on the hippocampus grid:
    float16 weights that load strictly into the zoo model, a validation table, curves, and a resume."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from ICONRegistrationLib.models.zoo import zoo_spec
    root = Path(__file__).resolve().parents[1]
    shape = (36, 48, 36)
    images, labels = [], []
    for k in range(3):
        volume = blob_volume(shape, centre=(18 + k - 1, 24, 18), seed=k)
        volume = (volume - volume.min()) / (volume.max() - volume.min())
        images.append(torch.as_tensor(volume, dtype=torch.float16)[None, None])
        labels.append(torch.as_tensor((volume > 0.4).astype(np.uint8))[None, None])
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    PreparedSet(torch.cat(images), torch.cat(labels), ["a", "b", "c"], shape).save(prepared / "train_prepared.npz")
    PreparedSet(torch.cat(images[:2]), torch.cat(labels[:2]), ["a", "b"], shape).save(
        prepared / "validation_prepared.npz")
    out = tmp_path / "run"
    env = {**os.environ, "PREPARED": str(prepared), "DEVICE": "cpu", "STEPS": "2", "PYTHON": sys.executable,
           "TRAIN_ARGS": "--icon-weight 0.5  --symmetric-label-loss"}
    command = ["bash", str(root / "scripts" / "train_gpu.sh"), "gradicon-hippocampus", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = torch.load(out / "gradicon-hippocampus.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    net = build_network(zoo_spec("gradicon-hippocampus"))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
    table = (out / "validation.md").read_text().splitlines()
    assert table[0].startswith("| step | validation Dice") and table[-1].startswith("| 2 |")
    assert (out / "curves.png").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 2
    best = torch.load(out / "gradicon-hippocampus-best.pt", weights_only=True)  # the best validation's network
    assert set(best) == set(weights) and all(v.dtype == torch.float16 for v in best.values() if v.is_floating_point())
    assert not (out / "gradicon-hippocampus-averaged.pt").exists()  # no snapshot every 250 steps in 2 steps
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["config"]  # TRAIN_ARGS reached the run (and won)
    assert saved["icon_weight"] == 0.5 and saved["symmetric_label_loss"]
    # the rest is the shipped model's last recipe (Resources/Models/gradicon-hippocampus.md)
    assert (saved["label_loss"], saved["label_weight"], saved["elastic_voxels"], saved["intensity_gamma"],
            saved["self_pair_fraction"], saved["fold_weight"], saved["icon_label_weight"],
            saved["anatomy_mix"]) == ("dice", 80.0, 2.0, 0.3, 0.0, 2000.0, 2.0, 0.5)
    # running again continues from the checkpoint (no --init), up to the new total; with a snapshot every step,
    # the last two are averaged and the mean is validated on the validation pairs
    done = subprocess.run(command, env={**env, "STEPS": "4", "KEEP_EVERY": "1", "AVERAGE": "2",
                                        "LR_SCHEDULE": "cosine", "LEARNING_RATE": "1e-4"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    with (out / "train_log.csv").open() as handle:  # the resumed steps follow the cosine over the 4 steps
        assert [float(r["learning_rate"]) for r in csv.DictReader(handle)][2:] == pytest.approx([5e-5, 1.464e-5],
                                                                                                rel=1e-3)
    averaged = json.loads((out / "averaged.json").read_text())
    assert [Path(p).name for p in averaged["sources"]] == ["step_000003.pt", "step_000004.pt"]
    assert 0.0 <= averaged["validation"]["val_dice"] <= 1.0 and averaged["validation"]["val_folds_percent"] < 1
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in
                         torch.load(out / "gradicon-hippocampus-averaged.pt", weights_only=True).items()})
    with (out / "train_log.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4]
    # a fresh run (--restart) starts from INIT, not from random weights (at rate 1e-9 its convolutions stay INIT's
    # to float16 precision; a rate of 0 is refused)
    done = subprocess.run(command, env={**env, "STEPS": "1", "LEARNING_RATE": "1e-9", "TRAIN_ARGS": "--restart"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    shipped = torch.load(root / "ICONRegistration" / "ICONRegistrationLib" / "models" / "bundled" /
                         "gradicon-hippocampus.pt", weights_only=True)
    restarted = torch.load(out / "gradicon-hippocampus.pt", weights_only=True)
    convolutions = [k for k, v in shipped.items() if v.dim() > 1]
    assert convolutions and all(torch.allclose(restarted[k].float(), shipped[k].float(), rtol=0, atol=1e-6)
                                for k in convolutions)


def test_time_limit_stops_with_a_checkpoint_and_a_validation_row(tmp_path):
    config = TrainingConfig(steps=100, batch_size=2, validate_every=100, checkpoint_every=100, time_limit=0.0)
    summary = train(small_spec(), synthetic_set(), tmp_path, config, validation_set=synthetic_set(3, seed=1),
                    device="cpu")
    assert summary["steps"] == 1 and summary["validation"]["step"] == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    assert (tmp_path / "validation.md").read_text().splitlines()[-1].startswith("| 1 |")


@pytest.mark.parametrize("batch", ["0", "two", "2.5"])
def test_cli_train_rejects_a_bad_batch_size(tmp_path, batch):
    data = synthetic_set()
    data.save(tmp_path / "train.npz")
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    assert main(["train", "--spec", str(tmp_path / "small.json"), "--data", str(tmp_path / "train.npz"),
                 "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", batch]) == 3


def test_cli_train_passes_freeze_inner_and_symmetric_label_loss(tmp_path, capsys):
    data = synthetic_set()
    data.save(tmp_path / "train.npz")
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    common = ["train", "--spec", str(tmp_path / "small.json"), "--data", str(tmp_path / "train.npz"), "--steps", "1",
              "--batch-size", "2"]
    assert main(common + ["--out", str(tmp_path / "a"), "--freeze-inner"]) == 3  # no --init: refused
    assert "needs --init" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "b"), "--symmetric-label-loss"]) == 3  # no label loss: refused
    assert "--symmetric-label-loss" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "c"), "--stage", "1"]) == 0
    assert main(common + ["--out", str(tmp_path / "d"), "--freeze-inner", "--init",
                          str(tmp_path / "c" / "checkpoint.pt"), "--label-loss", "dice", "--symmetric-label-loss"]) == 0
    saved = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)
    assert saved["config"]["freeze_inner"] and saved["config"]["symmetric_label_loss"]
    stage_1 = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(saved["model"][f"netPhi.{name}"], value) for name, value in stage_1.items())


def test_weight_decay_shrinks_only_the_convolution_weights_by_the_decoupled_factor():
    """AdamW: with a zero gradient the Adam update is 0 and each kernel is multiplied by 1 − rate × decay exactly;
    biases and batch-norm parameters stay; without decay the optimiser is plain Adam in one group."""
    net = build_network(small_spec())
    parameters = list(net.parameters())
    before = [p.detach().clone() for p in parameters]
    optimizer = make_optimizer(parameters, TrainingConfig(learning_rate=1e-2, weight_decay=0.5))
    for p in parameters:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kernels = 0
    for p, old in zip(parameters, before):
        if p.ndim > 1:
            kernels += 1
            torch.testing.assert_close(p.detach(), old * (1 - 1e-2 * 0.5), rtol=0, atol=1e-7)
        else:
            assert torch.equal(p.detach(), old)
    assert kernels >= 4 and sum(p.ndim > 1 for p in parameters) == kernels
    plain = make_optimizer(parameters, TrainingConfig(learning_rate=1e-2))
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_training_adam_is_fused_and_takes_pytorchs_default_steps_also_from_an_unfused_checkpoint(weight_decay):
    """The training optimiser is PyTorch's fused Adam on a CPU: the same parameters as the default (foreach) Adam
    after several steps, and a checkpoint of the default Adam (earlier versions) resumes fused with the same
    steps (PyTorch's own load_state_dict would switch the optimiser back to the default implementation)."""
    from ICONRegistrationLib.core.optimizers import load_optimizer_state

    config = TrainingConfig(learning_rate=1e-2, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(3)
    start = [torch.randn(4, 3, 3, generator=generator), torch.randn(4, generator=generator)]
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(6)]

    def run(steps, optimizer_of, state=None):
        parameters = [torch.nn.Parameter(p.clone()) for p in (state["parameters"] if state else start)]
        optimizer = optimizer_of(parameters)
        if state:
            load_optimizer_state(optimizer, state["optimizer"])
        for gradient in steps:
            for p, g in zip(parameters, gradient):
                p.grad = g.clone()
            optimizer.step()
        return parameters, optimizer

    def plain(parameters):  # PyTorch's default implementation, as make_optimizer built it before
        if not weight_decay:
            return torch.optim.Adam(parameters, lr=config.learning_rate)
        return torch.optim.Adam([{"params": parameters[:1], "weight_decay": weight_decay},
                                 {"params": parameters[1:], "weight_decay": 0.0}], lr=config.learning_rate,
                                decoupled_weight_decay=True)

    fused, optimizer = run(gradients, lambda parameters: make_optimizer(parameters, config))
    assert all(group["fused"] for group in optimizer.param_groups)
    reference, _ = run(gradients, plain)
    for ours, theirs in zip(fused, reference):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)
    halfway, unfused = run(gradients[:3], plain)  # an earlier version's checkpoint after 3 steps
    state = {"parameters": [p.detach() for p in halfway], "optimizer": unfused.state_dict()}
    resumed, optimizer = run(gradients[3:], lambda parameters: make_optimizer(parameters, config), state)
    assert all(group["fused"] for group in optimizer.param_groups)
    for ours, theirs in zip(resumed, reference):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)


def test_weight_decay_is_checked_reaches_the_checkpoint_and_a_resume_must_keep_it(tmp_path, capsys):
    data = synthetic_set()
    data.save(tmp_path / "train.npz")
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    common = ["train", "--spec", str(tmp_path / "small.json"), "--data", str(tmp_path / "train.npz"), "--steps", "1",
              "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert main(common + ["--weight-decay", "-1"]) == 3 and "--weight-decay" in capsys.readouterr().err
    assert main(common + ["--weight-decay", "0.1"]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["config"]["weight_decay"] == 0.1
    assert [group["weight_decay"] for group in saved["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert main(common[:6] + ["2"] + common[7:]) == 3  # two steps, resumed without the decay: refused
    assert "--weight-decay 0.1" in capsys.readouterr().err


def test_a_fresh_run_starts_its_logs_anew_and_a_resume_keeps_the_label_loss_setting(tmp_path):
    from ICONRegistrationLib.errors import UserError
    (tmp_path / "train_log.csv").write_text("step,loss,similarity,penalty,seconds\n1,9,9,9,1\n2,9,9,9,1\n")
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=2, validate_every=100)
    train(small_spec(), synthetic_set(), tmp_path, config, device="cpu")
    with (tmp_path / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["loss"] != "9" for r in rows)
    with pytest.raises(UserError, match="label loss"):
        train(small_spec(), synthetic_set(), tmp_path, TrainingConfig(steps=3, batch_size=2, label_loss="dice"),
              device="cpu")


def test_a_resumed_run_uses_the_learning_rate_it_is_given(tmp_path):
    # Adam's state dict carries the saved learning rate: resuming with another rate used to keep the old one
    config = TrainingConfig(steps=1, batch_size=2, checkpoint_every=1, validate_every=100, learning_rate=1e-3)
    train(small_spec(), synthetic_set(), tmp_path, config, device="cpu")
    train(small_spec(), synthetic_set(), tmp_path, dataclasses.replace(config, steps=2, learning_rate=1e-5),
          device="cpu")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2
    assert [group["lr"] for group in saved["optimizer"]["param_groups"]] == [1e-5]


def test_cosine_schedule_warms_up_decays_to_zero_and_a_resumed_run_follows_the_same_rates(tmp_path):
    from ICONRegistrationLib.errors import UserError
    from ICONRegistrationLib.training.trainer import learning_rate_at
    config = TrainingConfig(steps=6, batch_size=2, checkpoint_every=3, validate_every=100, learning_rate=1e-3,
                            lr_schedule="cosine", warmup_steps=2)
    rates = [learning_rate_at(config, step) for step in range(7)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])  # linear warmup
    assert rates[2] == pytest.approx(1e-3) and rates[4] == pytest.approx(5e-4)  # half way through the decay
    assert rates[6] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in zip(rates[1:], rates[2:]))
    assert learning_rate_at(dataclasses.replace(config, lr_schedule="constant"), 5) == 1e-3
    data = synthetic_set()
    train(small_spec(), data, tmp_path / "straight", config, device="cpu")
    train(small_spec(), data, tmp_path / "resumed", dataclasses.replace(config, steps=3, lr_schedule="constant",
                                                                        warmup_steps=0), device="cpu")
    train(small_spec(), data, tmp_path / "resumed", config, device="cpu")  # the schedule follows the step

    def logged(folder):
        with (tmp_path / folder / "train_log.csv").open() as handle:
            return [float(r["learning_rate"]) for r in csv.DictReader(handle)]

    assert logged("straight") == pytest.approx(rates[:6], rel=1e-3)
    assert logged("resumed")[3:] == pytest.approx(rates[3:6], rel=1e-3)
    with pytest.raises(UserError, match="schedule"):
        train(small_spec(), data, tmp_path / "bad", dataclasses.replace(config, lr_schedule="step"), device="cpu")


def test_best_pt_keeps_the_network_of_the_best_validation_across_resumption(tmp_path, monkeypatch):
    from ICONRegistrationLib.training import trainer
    # validation Dice at steps 1, 2 | resumed: 3, 4 | a fresh run: 1 (step 2 is the best of the first run)
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.4])
    monkeypatch.setattr(trainer, "validate", lambda net, data, device, **settings: {
        "val_folds_percent": 0.0, "val_ic_error_voxels": 0.1, "val_dice": next(scripted)})
    data = synthetic_set()
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=1, validate_every=1)
    summary = train(small_spec(), data, tmp_path, config, validation_set=data, device="cpu")
    assert summary["best"] == {"step": 2, "val_dice": 0.7, "path": str(tmp_path / "best.pt")}
    at_step_2 = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    summary = train(small_spec(), data, tmp_path, dataclasses.replace(config, steps=4), validation_set=data,
                    device="cpu")  # resumed: steps 3 and 4 validate worse
    assert summary["best"]["step"] == 2
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["val_dice"] == pytest.approx(0.7)
    assert all(torch.equal(best["model"][k], at_step_2[k]) for k in at_step_2)
    assert not all(torch.equal(v, at_step_2[k]) for k, v in
                   torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"].items())
    initialise(build_network(small_spec()), tmp_path / "best.pt")  # --init reads it like a checkpoint
    # a fresh run (no resume) does not keep the old run's best
    train(small_spec(), data, tmp_path, dataclasses.replace(config, steps=1), validation_set=data, device="cpu",
          resume=False)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 1


def test_keep_every_saves_snapshots_that_average_into_a_loadable_mean(tmp_path):
    from ICONRegistrationLib.errors import UserError
    from ICONRegistrationLib.training.averaging import average_state_dicts, average_weights, snapshot_path
    config = TrainingConfig(steps=4, batch_size=2, checkpoint_every=4, validate_every=100, keep_every=2,
                            learning_rate=1e-2)
    train(small_spec(), synthetic_set(), tmp_path / "run", config, device="cpu")
    snapshots = sorted((tmp_path / "run" / "snapshots").glob("step_*.pt"))
    assert snapshots == [snapshot_path(tmp_path / "run", 2), snapshot_path(tmp_path / "run", 4)]
    at_2, at_4 = (torch.load(p, weights_only=True) for p in snapshots)
    assert (at_2["step"], at_4["step"]) == (2, 4)
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(at_4["model"][k], final[k]) for k in final)
    moved = [k for k, v in at_2["model"].items() if v.is_floating_point() and not torch.equal(v, final[k])]
    assert moved  # the two snapshots differ, so the mean below is a test of the arithmetic
    # the mean, element by element; integer buffers (batch-norm counters) take the larger value
    code = main(["average-weights", str(snapshots[0]), str(snapshots[1]), "--out", str(tmp_path / "mean.pt")])
    assert code == 0
    mean = torch.load(tmp_path / "mean.pt", weights_only=True)
    for key, value in final.items():
        if value.is_floating_point():
            assert mean[key].dtype == torch.float16
            expected = (at_2["model"][key].double() + value.double()) / 2
            assert torch.allclose(mean[key].double(), expected, rtol=1e-3, atol=1e-4), key
        else:
            assert torch.equal(mean[key], torch.maximum(at_2["model"][key], value)), key
    net = build_network(small_spec())
    initialise(net, tmp_path / "mean.pt")  # loads strictly into the architecture
    # a fresh run in the same folder drops the old run's snapshots (they must never be averaged with the new)
    train(small_spec(), synthetic_set(), tmp_path / "run", dataclasses.replace(config, steps=1), device="cpu",
          resume=False)
    assert not list((tmp_path / "run" / "snapshots").glob("step_*.pt"))
    # different networks, or a single file, are user errors
    other = {k: v for k, v in final.items() if k != next(iter(final))}
    with pytest.raises(UserError, match="not the same network"):
        average_state_dicts([final, other], ["a.pt", "b.pt"])
    with pytest.raises(UserError, match="at least two"):
        average_weights([tmp_path / "mean.pt"], tmp_path / "one.pt")
    with pytest.raises(UserError, match="keep-every"):
        train(small_spec(), synthetic_set(), tmp_path / "bad", dataclasses.replace(config, keep_every=-1),
              device="cpu")


def test_hd95_per_label_on_cropped_boxes_equals_the_whole_image():
    from ICONRegistrationLib.evaluation.metrics import hd95, hd95_per_label
    a = np.zeros((40, 50, 45), np.uint8)
    b = np.zeros_like(a)
    a[10:20, 15:30, 5:12] = 1
    a[25:35, 5:10, 30:40] = 2
    b[12:21, 14:28, 6:14] = 1
    b[24:33, 6:12, 28:41] = 2
    b[0:3, 0:4, 40:45] = 2  # a second piece at the image corner: the box reaches the border
    images = [sitk.GetImageFromArray(x) for x in (a, b)]
    for image in images:
        image.SetSpacing((0.9, 1.1, 1.3))
        image.SetOrigin((3.0, -2.0, 5.0))
    whole = {label: hd95(sitk.Cast(images[0] == label, sitk.sitkUInt8), sitk.Cast(images[1] == label, sitk.sitkUInt8))
             for label in (1, 2, 3)}
    cropped = hd95_per_label(images[0], images[1], [1, 2, 3])
    assert np.isnan(whole[3]) and np.isnan(cropped[3])
    for label in (1, 2):
        assert cropped[label] == pytest.approx(whole[label], abs=1e-5)
    # a label that the warping lost scores the fixed box's diagonal, not NaN (which the mean would skip: a method
    # that wiped out a structure got a better HD95 than one that kept it 1 voxel off)
    lost = sitk.GetImageFromArray(np.where(a == 2, 0, a).astype(np.uint8))
    lost.CopyInformation(images[0])
    diagonal = float(np.linalg.norm(np.array([45, 50, 40]) * np.array([0.9, 1.1, 1.3])))
    assert hd95_per_label(lost, images[1], [1, 2]) == pytest.approx({1: cropped[1], 2: diagonal})


def test_self_pairs_replace_that_fraction_of_pairs_and_leave_the_default_draws_unchanged():
    from ICONRegistrationLib.training.trainer import draw_pairs
    count, batch = 7, 4000
    generator = torch.Generator().manual_seed(5)
    A, B = draw_pairs(count, batch, generator)
    reference = torch.Generator().manual_seed(5)  # the draws of earlier versions, and nothing more drawn
    expected_A = torch.randint(count, (batch,), generator=reference)
    expected_B = (expected_A + torch.randint(1, count, (batch,), generator=reference)) % count
    assert torch.equal(A, expected_A) and torch.equal(B, expected_B) and not (A == B).any()
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=reference))
    A, B = draw_pairs(count, batch, torch.Generator().manual_seed(5), 1.0)
    assert torch.equal(A, B)
    A, B = draw_pairs(count, batch, torch.Generator().manual_seed(5), 0.25)
    assert float((A == B).float().mean()) == pytest.approx(0.25, abs=0.03)
    with pytest.raises(UserError, match="self-pair"):
        train(small_spec(), synthetic_set(), None, TrainingConfig(steps=1, self_pair_fraction=1.5), device="cpu")


class _Shift(torch.nn.Module):
    """A 'network' that moves every point by a constant number of voxels, whatever the images."""

    def __init__(self, voxels: tuple[float, float, float]):
        super().__init__()
        self.voxels = torch.tensor(voxels).view(1, 3, 1, 1, 1)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor):
        offset = self.voxels / voxel_scale(image_A.shape[2:])
        return lambda points: points + offset


def test_validation_reports_how_far_a_volume_registered_to_itself_moves():
    from ICONRegistrationLib.training.trainer import validate
    data = synthetic_set()
    identity = validate(build_network(small_spec()), data, torch.device("cpu"))  # zero last layers
    assert identity["val_self_displacement_voxels"] == pytest.approx(0.0, abs=1e-6)
    shifted = validate(_Shift((1.0, 2.0, 2.0)), data, torch.device("cpu"))
    assert shifted["val_self_displacement_voxels"] == pytest.approx(3.0, rel=1e-5)


def test_validation_runs_the_network_three_times_per_pair():
    """Φ_AB, Φ_BA and one pass for Φ_AA (both directions of a volume with itself are the same pass)."""
    from ICONRegistrationLib.training.trainer import validate

    class Counted(_Shift):
        calls = 0

        def forward(self, image_A, image_B):
            Counted.calls += 1
            return super().forward(image_A, image_B)

    data = synthetic_set()
    result = validate(Counted((1.0, 0.0, 0.0)), data, torch.device("cpu"), max_pairs=2)
    assert Counted.calls == 3 * 2
    assert result["val_self_displacement_voxels"] == pytest.approx(1.0, rel=1e-5)


def test_validation_reports_the_ic_error_inside_the_labels():
    """Φ_AB shifts by 2 voxels along the last axis, Φ_BA is the identity. The round trip that starts on A's grid
    (Φ_AB(Φ_BA(y))) is off by 2 voxels everywhere; the one that starts on B's grid is off by 2 voxels except
    within 2 voxels of the far end, where Φ_AB(x) leaves the grid and Φ_BA is clamped to its border. A's label lies
    on that far end, B's in the middle: each half of the error must be read inside the labels of its own start
    grid (swapped, the mean would fall below 2), and the mean over the whole grid is lower."""
    from ICONRegistrationLib.training.trainer import validate

    class OneWay(torch.nn.Module):  # moves only when the dark volume (A) is the moving image
        def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
            offset = torch.tensor([0.0, 0.0, 2.0]).view(1, 3, 1, 1, 1) / voxel_scale(moving.shape[2:])
            return (lambda points: points + offset) if float(moving.mean()) < 0.5 else (lambda points: points)

    shape = (20, 24, 20)
    images = torch.cat([torch.full((1, 1, *shape), 0.2), torch.full((1, 1, *shape), 0.7)]).half()
    labels = torch.zeros(2, 1, *shape, dtype=torch.uint8)
    labels[0, 0, 8:12, 10:14, 18:] = 1  # A: on the far end of the last axis
    labels[1, 0, 8:12, 10:14, 8:12] = 1  # B: in the middle
    data = PreparedSet(images, labels, ["A", "B"], shape)
    result = validate(OneWay(), data, torch.device("cpu"))
    assert result["val_ic_error_in_labels_voxels"] == pytest.approx(2.0, rel=1e-5)
    assert result["val_ic_error_voxels"] < 1.95
    identity = validate(build_network(small_spec()), synthetic_set(), torch.device("cpu"))  # zero last layers
    assert identity["val_ic_error_in_labels_voxels"] == pytest.approx(0.0, abs=1e-6)
    unlabelled = PreparedSet(data.images, None, data.names, data.shape)
    assert "val_ic_error_in_labels_voxels" not in validate(OneWay(), unlabelled, torch.device("cpu"))


def test_transform_error_against_a_known_transform_in_mm():
    from ICONRegistrationLib.evaluation.metrics import transform_error_mm
    reference = sitk.Image([20, 24, 18], sitk.sitkUInt8)
    reference.SetSpacing((1.5, 1.0, 2.0))
    reference.SetOrigin((-4.0, 7.0, 1.0))
    reference.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))  # an oblique-free but permuted frame
    mask = sitk.Image(reference)
    mask[5:15, 6:18, 4:14] = 1
    truth = sitk.TranslationTransform(3, (3.0, 0.0, -4.0))
    identity = sitk.Transform(3, sitk.sitkIdentity)
    assert transform_error_mm(identity, truth, reference, mask) == pytest.approx((5.0, 5.0))
    assert transform_error_mm(truth, truth, reference, mask) == pytest.approx((0.0, 0.0), abs=1e-9)
    # a 10 % scaling about the origin: the error is 0.1 × the distance from it, averaged over the masked voxels
    scaling = sitk.ScaleTransform(3, (1.1, 1.1, 1.1))
    array = sitk.GetArrayFromImage(mask)
    points = [np.array(reference.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
              for k, j, i in np.argwhere(array)]
    expected = np.mean([0.1 * np.linalg.norm(point) for point in points])
    assert transform_error_mm(scaling, identity, reference, mask)[0] == pytest.approx(expected, rel=1e-9)
    assert all(math.isnan(v) for v in transform_error_mm(identity, truth, reference, mask * 0))
    with pytest.raises(ValueError, match="grid"):
        transform_error_mm(identity, truth, reference, mask[1:, :, :])
    moved = sitk.Image(mask)
    moved.SetOrigin((0.0, 0.0, 0.0))  # same size, another place: misaligned, not silently used
    with pytest.raises(ValueError, match="grid"):
        transform_error_mm(identity, truth, reference, moved)


def test_elastic_displacements_have_the_requested_size_in_voxels_and_do_not_fold():
    from ICONRegistrationLib.core.coordinates import jacobian_determinant
    from ICONRegistrationLib.training.trainer import augment, random_elastic_displacements
    shape = (24, 32, 40)
    field = random_elastic_displacements(64, shape, 2.0, 8, torch.Generator().manual_seed(3))
    assert field.shape == (64, *shape, 3)
    sizes = torch.tensor([float(size) for size in reversed(shape)])
    voxels = field * sizes / 2  # normalised units → voxels of each axis
    std = float(voxels.std())
    # 2 voxels at the control points; trilinear weights shrink the variance by (2/3)³ on average in between
    assert 0.9 < std < 1.3, std
    assert abs(float(voxels.mean())) < 0.1
    # the warped image of the last tensor axis' voxel index moves by the field's first component, in voxels
    ramp = torch.arange(shape[2], dtype=torch.float32).expand(1, 1, *shape).repeat(2, 1, 1, 1, 1)
    config = TrainingConfig(flip_axes=(), affine_strength=0.0, elastic_voxels=2.0, elastic_spacing=8)
    warped_A, _, _ = augment(ramp[:1], ramp[1:], config, torch.Generator().manual_seed(4))
    expected = random_elastic_displacements(2, shape, 2.0, 8, torch.Generator().manual_seed(4))[0, ..., 0] \
        * shape[2] / 2
    inner = (slice(4, -4),) * 3
    assert torch.allclose(warped_A[0, 0][inner] - ramp[0, 0][inner], expected[inner], atol=1e-3)
    # 1 voxel every 8 voxels (the strength used for training is this ratio or less): smooth, no folds
    gentle = random_elastic_displacements(16, shape, 1.0, 8, torch.Generator().manual_seed(5)) * sizes / 2
    identity = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    maps = identity + gentle.flip(-1).permute(0, 4, 1, 2, 3)
    assert float((jacobian_determinant(maps, [1.0, 1.0, 1.0]) <= 0).float().mean()) == 0.0


def test_gamma_augmentation_keeps_the_order_of_intensities_and_their_range():
    from ICONRegistrationLib.training.trainer import augment
    data = synthetic_set()
    A, B = data.images[:2].float(), data.images[2:].float()
    config = TrainingConfig(flip_axes=(), affine_strength=0.0, intensity_gamma=0.7)
    out_A, out_B, _ = augment(A, B, config, torch.Generator().manual_seed(2))
    assert float(out_A.min()) >= 0 and float(out_A.max()) <= 1
    assert not torch.allclose(out_A, A.clamp(0, 1))
    for before, after in ((A, out_A), (B, out_B)):
        for i in range(before.shape[0]):
            order = torch.argsort(before[i].flatten(), stable=True)
            assert bool((after[i].flatten()[order].diff() >= -1e-6).all())  # a monotone map of each image
    # labels warped with elastic displacements still follow their images
    labels = (data.labels[:2].float(), data.labels[2:].float())
    elastic = TrainingConfig(flip_axes=(0,), affine_strength=0.05, elastic_voxels=1.5, elastic_spacing=6)
    with_labels = augment(A, B, elastic, torch.Generator().manual_seed(7), labels)
    without = augment(A, B, elastic, torch.Generator().manual_seed(7))
    assert torch.equal(with_labels[0], without[0])
    agreement = (with_labels[2][0] == (with_labels[0] > 0.3).float() + (with_labels[0] > 0.6).float()).float()
    assert float(agreement.mean()) > 0.93


def test_icon_weight_is_checked_and_a_gradicon_run_logs_its_round_trip_error(tmp_path):
    from ICONRegistrationLib.errors import UserError
    data = synthetic_set()
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=2, validate_every=100, icon_weight=0.1)
    rows = _log_of_two_steps(tmp_path / "run", data, config)
    assert len(rows) == 2 and all(0.0 <= float(r["round_trip_voxels"]) < 5.0 for r in rows)
    for weight, penalty, logged in ((0.0, None, True), (0.0, "diffusion", False)):  # every GradICON run logs it
        run = tmp_path / f"run-{penalty}"
        train(small_spec(), data, run, dataclasses.replace(config, icon_weight=weight, penalty=penalty), device="cpu")
        with (run / "train_log.csv").open() as handle:
            assert ("round_trip_voxels" in next(csv.reader(handle))) == logged
    for bad in (dataclasses.replace(config, icon_weight=-1.0), dataclasses.replace(config, penalty="diffusion")):
        with pytest.raises(UserError, match="ICON weight|icon-weight"):
            train(small_spec(), data, tmp_path / "bad", bad, device="cpu")


def test_icon_label_weight_is_checked_and_changes_training_only_through_the_icon_term(tmp_path):
    """--icon-label-weight needs --icon-weight and label maps (no label loss). The network starts at the identity,
    whose round trip is exact, so the first step's loss is the uniform run's; then the runs part."""
    data = synthetic_set()
    config = TrainingConfig(steps=3, batch_size=2, checkpoint_every=3, validate_every=100, icon_weight=0.5,
                            learning_rate=1e-2, seed=2)
    losses = {}
    for kappa in (0.0, 5.0):
        run = tmp_path / f"kappa-{kappa}"
        train(small_spec(), data, run, dataclasses.replace(config, icon_label_weight=kappa), device="cpu")
        with (run / "train_log.csv").open() as handle:
            losses[kappa] = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert losses[5.0][0] == pytest.approx(losses[0.0][0], rel=1e-6)
    assert losses[5.0][1:] != pytest.approx(losses[0.0][1:], rel=1e-6)
    for bad in (dataclasses.replace(config, icon_label_weight=-1.0),
                dataclasses.replace(config, icon_weight=0.0, icon_label_weight=1.0)):
        with pytest.raises(UserError, match="icon-label-weight"):
            train(small_spec(), data, tmp_path / "bad", bad, device="cpu")
    with pytest.raises(UserError, match="label maps"):
        train(small_spec(), PreparedSet(data.images, None, data.names, data.shape), tmp_path / "nolabels",
              dataclasses.replace(config, icon_label_weight=1.0), device="cpu")


def test_icon_label_weight_reads_the_labels_of_the_image_where_the_round_trip_starts(tmp_path, monkeypatch):
    """The ICON term's round trip Φ_AB(Φ_BA(x)) starts on A's grid, so the point weights are 1 + κ inside the
    labels of A (the batch's first image, after augmentation), not of B."""
    import ICONRegistrationLib.training.trainer as trainer
    seen = {"labels": [], "weights": []}
    augment, objective = trainer.augment, trainer.symmetric_objective

    def recording_augment(*args, **kwargs):
        out = augment(*args, **kwargs)
        seen["labels"].append(tuple(label.clone() for label in out[2]))
        return out

    def recording_objective(*args, **kwargs):
        seen["weights"].append(kwargs["icon_point_weights"].clone())
        return objective(*args, **kwargs)

    monkeypatch.setattr(trainer, "augment", recording_augment)
    monkeypatch.setattr(trainer, "symmetric_objective", recording_objective)
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=2, validate_every=100, icon_weight=0.5,
                            icon_label_weight=3.0, seed=4)
    train(small_spec(), synthetic_set(), tmp_path, config, device="cpu")
    assert len(seen["weights"]) == 2
    for (labels_A, labels_B), weights in zip(seen["labels"], seen["weights"]):
        assert not torch.equal(labels_A != 0, labels_B != 0)  # the check below can tell A from B
        assert torch.equal(weights, 1.0 + 3.0 * (labels_A != 0).float())


def test_resuming_a_run_whose_log_has_fewer_columns_extends_the_header_and_resumes_again(tmp_path):
    """A log written by an older version (no learning_rate or round_trip_voxels columns): the resumed rows used to be
    appended under the old header, and the next resumption failed reading them back."""
    data = synthetic_set()
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=1, validate_every=100)
    train(small_spec(), data, tmp_path, config, device="cpu")
    log = tmp_path / "train_log.csv"
    with log.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    old = ["step", "loss", "similarity", "penalty", "seconds"]
    with log.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    train(small_spec(), data, tmp_path, dataclasses.replace(config, steps=3), device="cpu")
    train(small_spec(), data, tmp_path, dataclasses.replace(config, steps=4), device="cpu")  # reads the log back
    with log.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames[:5] == old and {"learning_rate", "round_trip_voxels"} <= set(reader.fieldnames)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and None not in rows[-1]
    assert rows[0]["learning_rate"] == "" and float(rows[-1]["learning_rate"]) == config.learning_rate


def test_prepared_data_on_another_grid_than_the_spec_is_a_user_error(tmp_path):
    """A prepared set made for another grid used to train (and validate) the network at a resolution it is never
    used at, without a word."""
    data = synthetic_set()
    other = PreparedSet(data.images[:, :, 2:18].contiguous(), data.labels[:, :, 2:18].contiguous(), data.names,
                        (16, 24, 20))
    config = TrainingConfig(steps=1, batch_size=2, checkpoint_every=1, validate_every=1)
    with pytest.raises(UserError, match="training data are on a 16×24×20 grid.*20×24×20"):
        train(small_spec(), other, tmp_path, config, device="cpu")
    with pytest.raises(UserError, match="validation data are on a 16×24×20 grid"):
        train(small_spec(), data, tmp_path, config, validation_set=other, device="cpu")
    assert not (tmp_path / "checkpoint.pt").exists()
    # average-weights --val: checked before the mean is written
    other.save(tmp_path / "other.npz")
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    state = build_network(small_spec()).state_dict()
    for name in ("a.pt", "b.pt"):
        torch.save(state, tmp_path / name)
    assert main(["average-weights", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "m.pt"),
                 "--spec", str(tmp_path / "small.json"), "--val", str(tmp_path / "other.npz"),
                 "--device", "cpu"]) == 3
    assert not (tmp_path / "m.pt").exists()


def test_a_resumed_run_must_get_the_same_training_and_validation_volumes(tmp_path):
    """Resuming on another data set (or another split) used to continue silently: the pairs drawn from other
    volumes, and best.pt chosen on other validation volumes than the Dice it is compared with."""
    config = TrainingConfig(steps=1, batch_size=2, checkpoint_every=1, validate_every=100)
    data, validation = synthetic_set(), synthetic_set(3, seed=1)
    train(small_spec(), data, tmp_path, config, validation_set=validation, device="cpu")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["data"]["train"] == {"names": ["v0", "v1", "v2", "v3"], "shape": [20, 24, 20]}
    more = dataclasses.replace(config, steps=2)
    other = synthetic_set(5)
    with pytest.raises(UserError, match="trained on other volumes .*--data"):
        train(small_spec(), other, tmp_path, more, validation_set=validation, device="cpu")
    renamed = dataclasses.replace(validation, names=["w0", "w1", "w2"])
    with pytest.raises(UserError, match="validated on other volumes .*--val"):
        train(small_spec(), data, tmp_path, more, validation_set=renamed, device="cpu")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1  # untouched
    assert train(small_spec(), data, tmp_path, more, device="cpu")["steps"] == 2  # no validation now: nothing to compare
    del saved["data"]  # a checkpoint from before the check resumes as before
    torch.save(saved, tmp_path / "checkpoint.pt")
    assert train(small_spec(), other, tmp_path, more, device="cpu")["steps"] == 2


def test_a_fresh_run_deletes_the_previous_runs_checkpoint_after_reading_its_init(tmp_path):
    """A fresh run (--restart) stopped before its first checkpoint used to leave the previous run's checkpoint,
    which the next command then resumed, under the new run's emptied logs; --init may still name that checkpoint."""
    data = synthetic_set()
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=2, validate_every=100, seed=1)
    train(small_spec(), data, tmp_path, config, device="cpu")
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    fresh = dataclasses.replace(config, steps=0)  # a fresh run that stops before its first checkpoint
    train(small_spec(), data, tmp_path, fresh, init=tmp_path / "checkpoint.pt", resume=False, device="cpu")
    assert not (tmp_path / "checkpoint.pt").exists()
    train(small_spec(), data, tmp_path, fresh, resume=False, device="cpu")
    summary = train(small_spec(), data, tmp_path, dataclasses.replace(config, steps=1), device="cpu")
    assert summary["steps"] == 1  # started at step 0, not at the old run's step 2
    train(small_spec(), data, tmp_path / "b", config, device="cpu")
    restarted = dataclasses.replace(config, steps=1, checkpoint_every=1, learning_rate=0.0)
    train(small_spec(), data, tmp_path / "b", restarted, init=tmp_path / "b" / "checkpoint.pt", resume=False,
          device="cpu")  # the new run starts from the old checkpoint's weights, read before it is replaced
    after = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert after["step"] == 1
    weights = [k for k in before if k.endswith("weight") and before[k].dim() > 1]  # convolutions (rate 0: kept)
    assert all(torch.equal(after["model"][k], before[k]) for k in weights)  # same seed and data: same old weights


def test_validation_dice_scores_the_labels_both_images_have():
    """A label one image lacks used to count as Dice 0 in both directions (0.5 here for a perfect match); iconreg
    evaluate scores the labels present in both images."""
    from ICONRegistrationLib.core.coordinates import identity_map
    from ICONRegistrationLib.training.trainer import _pair_dices
    shape = (8, 8, 8)
    maps = identity_map(shape).repeat(2, 1, 1, 1, 1)
    labels_A = torch.zeros(1, 1, *shape)
    labels_A[0, 0, 2:6, 2:6, 2:6] = 1
    labels_A[0, 0, 6:8, 2:6, 2:6] = 2  # only in A
    labels_B = torch.zeros(1, 1, *shape)
    labels_B[0, 0, 2:6, 2:6, 2:6] = 1
    assert _pair_dices(maps, labels_A, labels_B) == [1.0, 1.0]
    labels_B[0, 0, 2:4] = 0  # half of label 1 gone: Dice 2·32/(64 + 32) in each direction
    assert _pair_dices(maps, labels_A, labels_B) == pytest.approx([2 / 3, 2 / 3])
    assert _pair_dices(maps, labels_A, torch.zeros_like(labels_B)) == []


def test_float16_export_refuses_values_beyond_its_range_and_non_finite_weights(tmp_path):
    """float16 turned a value beyond 65504 (a batch norm's running variance, say) into inf without a word."""
    from ICONRegistrationLib.models.weights import read_state_dict, write_state_dict
    from ICONRegistrationLib.training.averaging import average_weights
    state = {"norm.running_var": torch.tensor([7e4, 1.0]), "norm.num_batches_tracked": torch.tensor(3)}
    with pytest.raises(UserError, match="running_var holds 7e\\+04, beyond float16"):
        write_state_dict(state, tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()
    write_state_dict(state, tmp_path / "w32.pt", half=False)  # float32 keeps it
    assert read_state_dict(tmp_path / "w32.pt")["norm.running_var"][0] == 7e4
    torch.save({"model": state}, tmp_path / "a.pt")
    torch.save({"model": state}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="beyond float16"):
        average_weights([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "mean.pt")
    with pytest.raises(UserError, match="non-finite"):
        write_state_dict({"w": torch.tensor([float("nan")])}, tmp_path / "nan.pt", half=False)
    write_state_dict({"w": torch.tensor([65504.0, 1e-3])}, tmp_path / "edge.pt")  # the largest float16 is fine
    assert read_state_dict(tmp_path / "edge.pt")["w"][0] == 65504.0


def test_mixed_precision_on_a_cpu_without_native_bfloat16_is_refused_before_the_data_are_read(tmp_path, monkeypatch,
                                                                                               capsys):
    from ICONRegistrationLib import device as device_module
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: {"avx512f", "avx2"})
    small_spec().to_file(tmp_path / "small.json")
    code = main(["train", "--spec", str(tmp_path / "small.json"), "--data", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--mixed-precision", "--device", "cpu"])
    assert code != 0
    assert "native bfloat16" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mixed_precision_training_rounds_the_unets_validates_in_float32_and_follows_the_float32_run(tmp_path,
                                                                                                    monkeypatch):
    """The same seeded run in float32 and with --mixed-precision: the UNets really run in bfloat16 during
    the steps (the losses differ a little), never during validation, and the two runs' losses stay close."""
    from ICONRegistrationLib import device as device_module
    from ICONRegistrationLib.core import networks
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: {"avx512_bf16"})
    precisions = []
    forward = networks.UNet2.forward

    def recording(self, image_A, image_B):
        precisions.append((self.training, self.low_precision))
        return forward(self, image_A, image_B)

    monkeypatch.setattr(networks.UNet2, "forward", recording)
    losses = {}
    for mixed in (False, True):
        config = TrainingConfig(steps=6, batch_size=2, learning_rate=2e-3, affine_strength=0.0, flip_axes=(),
                                validate_every=3, checkpoint_every=3, seed=1, mixed_precision=mixed)
        precisions.clear()
        train(small_spec(), synthetic_set(), tmp_path / str(mixed), config, validation_set=synthetic_set(3, seed=1),
              device="cpu")
        with (tmp_path / str(mixed) / "train_log.csv").open() as handle:
            losses[mixed] = np.array([float(r["loss"]) for r in csv.DictReader(handle)])
        in_training = {precision for training, precision in precisions if training}
        in_validation = {precision for training, precision in precisions if not training}
        assert in_training == {torch.bfloat16 if mixed else None}
        assert in_validation == {None}
    assert not np.array_equal(losses[True], losses[False])
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-3)  # the first step: the same network
    assert losses[True].mean() == pytest.approx(losses[False].mean(), rel=0.03)  # single steps drift apart by up to 6 %


def test_bias_field_augmentation_multiplies_each_image_by_a_smooth_field_of_the_given_size():
    from ICONRegistrationLib.training.trainer import augment
    shape = (40, 48, 40)
    A = torch.full((2, 1, *shape), 0.4)
    B = torch.full((2, 1, *shape), 0.5)
    labels = (torch.ones(2, 1, *shape), torch.ones(2, 1, *shape))
    config = TrainingConfig(flip_axes=(), affine_strength=0.0, bias_field=0.2, elastic_spacing=16)
    out_A, out_B, out_labels = augment(A, B, config, torch.Generator().manual_seed(3), labels)
    log_fields = torch.cat([(out_A / A).log(), (out_B / B).log()])  # no clipping at these intensities
    assert float(out_A.max()) <= 1 and float(out_A.min()) >= 0
    # Gaussian at the control points, std 0.2; trilinear in between lowers it: between 0.1 and 0.2 overall
    assert 0.1 < float(log_fields.std()) < 0.2, float(log_fields.std())
    # independent per image, and smooth: neighbouring voxels differ by far less than the field's spread
    assert float((log_fields[0] - log_fields[1]).abs().mean()) > 0.05
    assert float(log_fields.diff(dim=-1).abs().max()) < 0.1
    assert torch.equal(out_labels[0], labels[0])  # labels are not intensities
    # bright voxels are clipped to [0, 1] as the preprocessing clips
    bright, _, _ = augment(torch.ones(1, 1, *shape), torch.ones(1, 1, *shape), config, torch.Generator().manual_seed(3))
    assert float(bright.max()) == 1.0
    plain = TrainingConfig(flip_axes=(), affine_strength=0.0)
    assert torch.equal(augment(A, B, plain, torch.Generator().manual_seed(3))[0], A)
    # the field is drawn after the flips and warps: adding it leaves the geometric augmentation (labels) unchanged
    data = synthetic_set()
    geometric = dict(flip_axes=(0,), affine_strength=0.05, elastic_voxels=1.0, elastic_spacing=8)
    pair = (data.images[:2].float(), data.images[2:].float())
    label_pair = (data.labels[:2].float(), data.labels[2:].float())
    without = augment(*pair, TrainingConfig(**geometric), torch.Generator().manual_seed(4), label_pair)
    with_field = augment(*pair, TrainingConfig(**geometric, bias_field=0.2), torch.Generator().manual_seed(4),
                         label_pair)
    assert torch.equal(without[2][0], with_field[2][0]) and torch.equal(without[2][1], with_field[2][1])
    assert not torch.equal(without[0], with_field[0])


def test_native_bfloat16_is_read_from_x86_and_arm_cpu_flags_and_the_gpus_compute_capability(monkeypatch):
    import io
    from types import SimpleNamespace
    from ICONRegistrationLib import device as device_module
    cpu = torch.device("cpu")
    for text, native in (("flags\t\t: fpu avx512f avx512_bf16 avx2\n", True),
                         ("flags\t\t: fpu avx512f avx512bw avx2\n", False),  # AVX-512 alone: emulated
                         ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm (e.g. Graviton3)
                         ("Features\t: fp asimd\n", False)):
        monkeypatch.setattr(device_module, "open", lambda *a, text=text, **k: io.StringIO(text), raising=False)
        assert device_module.has_native_bfloat16(cpu) is native, text
    for major, native in ((7, False), (8, True), (9, True)):  # Volta/Turing emulate bfloat16
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, major=major: SimpleNamespace(major=major))
        assert device_module.has_native_bfloat16(torch.device("cuda")) is native
    assert not device_module.has_native_bfloat16(torch.device("mps"))


def test_preparing_data_alone_with_mixed_precision_is_not_refused_on_any_cpu(tmp_path, monkeypatch):
    from ICONRegistrationLib import device as device_module
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: set())
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for k in range(4):
        sitk.WriteImage(make_image(blob_volume((16, 20, 16), seed=k)), str(data / "images" / f"c{k}.nii.gz"))
    small_spec().to_file(tmp_path / "small.json")
    code = main(["train", "--spec", str(tmp_path / "small.json"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "0", "--save-prepared", "--val-fraction", "0.5", "--mixed-precision", "--device", "cpu"])
    assert code == 0 and (tmp_path / "run" / "train_prepared.npz").is_file()


def test_fold_penalty_measures_folded_voxels_and_its_gradient_unfolds_them():
    """relu(0.1 − det J) per voxel, det J as jacobian_determinant reports it: 0 for the identity and any map keeping
    ≥ 0.1 of each voxel's volume, 0.1 − det A for an affine map x ↦ A x (on any grid), and gradient steps on a
    folded map remove every folded voxel that jacobian_determinant counts."""
    from ICONRegistrationLib.core.coordinates import identity_map, jacobian_determinant
    from ICONRegistrationLib.core.losses import fold_penalty
    grid = identity_map((6, 7, 9), dtype=torch.float64)
    assert float(fold_penalty(grid)) == 0.0
    for matrix in ([[1.0, 0.2, 0.0], [0.0, -0.5, 0.0], [0.1, 0.0, 1.0]], [[0.3, 0.0, 0.0], [0.0, 0.5, 0.0],
                                                                         [0.0, 0.0, 0.5]]):
        A = torch.tensor(matrix, dtype=torch.float64)
        mapped = torch.einsum("rc,bc...->br...", A, grid)
        assert float(fold_penalty(mapped)) == pytest.approx(max(0.0, 0.1 - float(torch.det(A))), abs=1e-12)
    generator = torch.Generator().manual_seed(0)
    bump = torch.zeros(1, 3, 6, 7, 9, dtype=torch.float64)
    bump[0, 2, 2:4, 3:5, 4] = 0.3  # a sharp step along the last axis: cells fold
    folded = (grid + bump + 0.002 * torch.randn(grid.shape, generator=generator, dtype=torch.float64))
    determinant = jacobian_determinant(folded)
    assert int((determinant <= 0).sum()) > 0
    assert float(fold_penalty(folded)) == pytest.approx(float(torch.relu(0.1 - determinant).mean()), abs=1e-12)
    maps = folded.clone().requires_grad_(True)
    assert torch.equal(jacobian_determinant(maps).detach(), determinant)  # the differentiable path: the same numbers
    optimizer = torch.optim.SGD([maps], lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        fold_penalty(maps).backward()
        optimizer.step()
    assert float(fold_penalty(maps)) < 0.01 * float(fold_penalty(folded))
    assert int((jacobian_determinant(maps.detach()) <= 0).sum()) == 0
    with pytest.raises(ValueError):
        fold_penalty(grid[:, :2, :, :, 0])


def test_fold_weight_is_checked_and_logged(tmp_path):
    from ICONRegistrationLib.errors import UserError
    data = synthetic_set()
    config = TrainingConfig(steps=2, batch_size=2, checkpoint_every=2, validate_every=100, fold_weight=5.0)
    rows = _log_of_two_steps(tmp_path / "run", data, config)
    assert len(rows) == 2 and all(float(r["fold_penalty"]) >= 0.0 for r in rows)
    with pytest.raises(UserError, match="fold-weight"):
        train(small_spec(), data, tmp_path / "bad", dataclasses.replace(config, fold_weight=-1.0), device="cpu")
    assert "--fold-weight" in subprocess_help()


def subprocess_help() -> str:
    """``iconreg train --help`` as text (the option is on the command line)."""
    import contextlib
    import io
    from ICONRegistrationLib import cli
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    return buffer.getvalue()


def _log_of_two_steps(run, data, config) -> list:
    """Train ``small_spec()`` with ``config`` into ``run``; the rows of its ``train_log.csv``."""
    train(small_spec(), data, run, config, device="cpu")
    with (run / "train_log.csv").open() as handle:
        return list(csv.DictReader(handle))


class _ShiftNetwork(torch.nn.Module):
    """A stand-in registration network whose map is the identity plus a constant shift (unit coordinates)."""

    def __init__(self, shift):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1))

    def forward(self, image_A, image_B):
        assert image_A.shape == image_B.shape and not torch.is_grad_enabled()
        return lambda points: points + self.shift


def test_anatomy_mixing_moves_each_chosen_image_and_its_labels_by_the_drawn_fraction_of_the_map():
    """On a ramp along axis 0 the warped image rises by α × the shift, the same α everywhere inside; labels (a step
    along the ramp) move by the nearest whole voxel of α × the shift; unchosen images are untouched; the draws are
    3 n numbers whatever is chosen, and none with probability 0."""
    from ICONRegistrationLib.training.trainer import mix_anatomy
    shape, count = (20, 12, 10), 16
    ramp = torch.arange(shape[0], dtype=torch.float32).view(1, 1, -1, 1, 1).expand(count, 1, *shape) / (shape[0] - 1)
    labels = (ramp * (shape[0] - 1) >= 9).float() + (ramp * (shape[0] - 1) >= 14).float()
    pool = torch.rand(5, 1, *shape)
    shift_voxels = 3.0
    network = _ShiftNetwork([shift_voxels / (shape[0] - 1), 0.0, 0.0])
    generator = torch.Generator().manual_seed(11)
    moved, moved_labels = mix_anatomy(ramp.clone(), labels.clone(), pool, network, 0.5, 0.8, generator)
    reference = torch.Generator().manual_seed(11)
    chosen = torch.rand(count, generator=reference) < 0.5
    torch.randint(0, 5, (count,), generator=reference)
    alphas = torch.rand(count, generator=reference) * 0.8
    assert torch.equal(generator.get_state(), reference.get_state())
    assert 0 < int(chosen.sum()) < count
    inside = slice(0, shape[0] - 4)  # points that stay inside the grid for shifts up to 3 voxels
    for k in range(count):
        if not chosen[k]:
            assert torch.equal(moved[k], ramp[k]) and torch.equal(moved_labels[k], labels[k])
            continue
        rise = (moved[k, 0, inside] - ramp[k, 0, inside]) * (shape[0] - 1)  # in voxels
        assert torch.allclose(rise, torch.full_like(rise, float(alphas[k]) * shift_voxels), atol=1e-4)
        source = torch.arange(shape[0] - 4, dtype=torch.float32) + float(alphas[k]) * shift_voxels
        nearest = torch.floor(source + 0.5)
        expected = (nearest >= 9).float() + (nearest >= 14).float()
        assert torch.equal(moved_labels[k, 0, inside, 0, 0], expected)
        assert torch.equal(moved_labels[k, 0, inside], expected.view(-1, 1, 1).expand(-1, *shape[1:]))
    untouched = torch.Generator().manual_seed(11)
    same, same_labels = mix_anatomy(ramp, labels, pool, network, 0.0, 0.8, untouched)
    assert same is ramp and same_labels is labels
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(11).get_state())


def _mixing_weights(path, seed: int):
    """Weights of the small spec whose last convolutions are not zero, so that its maps deform."""
    torch.manual_seed(seed)
    net = build_network(small_spec())
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if "lastConv.weight" in name:
                parameter.normal_(0, 0.05)
    torch.save(net.state_dict(), path)
    return path


def test_anatomy_mixing_changes_training_keeps_its_network_in_the_checkpoint_and_resumes_exactly(tmp_path):
    data = synthetic_set(6)
    weights = _mixing_weights(tmp_path / "mix.pt", seed=4)
    config = TrainingConfig(steps=6, batch_size=2, learning_rate=1e-3, checkpoint_every=3, validate_every=100,
                            seed=3, label_loss="dice", label_weight=1.0, anatomy_mix=1.0,
                            anatomy_mix_weights=str(weights))
    train(small_spec(), data, tmp_path / "straight", config, device="cpu")
    train(small_spec(), data, tmp_path / "plain", TrainingConfig(**{**config.__dict__, "anatomy_mix": 0.0}),
          device="cpu")
    train(small_spec(), data, tmp_path / "resumed", TrainingConfig(**{**config.__dict__, "steps": 3}), device="cpu")
    _mixing_weights(weights, seed=5)  # the file changes: the resumed run still mixes with the network it started with
    train(small_spec(), data, tmp_path / "resumed", config, device="cpu")

    def losses(folder):
        with (tmp_path / folder / "train_log.csv").open() as handle:
            return [r["loss"] for r in csv.DictReader(handle)]

    assert losses("straight") == losses("resumed")
    assert losses("straight") != losses("plain")
    saved = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    first = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["anatomy_mix_model"]
    assert saved["config"]["anatomy_mix"] == 1.0
    assert all(torch.equal(saved["anatomy_mix_model"][k], first[k]) for k in first)
    assert "anatomy_mix_model" not in torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    with pytest.raises(UserError, match="--anatomy-mix 1, not 0.5"):
        train(small_spec(), data, tmp_path / "resumed", TrainingConfig(**{**config.__dict__, "steps": 8,
                                                                          "anatomy_mix": 0.5}), device="cpu")
    with pytest.raises(UserError, match="--anatomy-mix-weights, or --init"):
        train(small_spec(), data, tmp_path / "fresh", TrainingConfig(**{**config.__dict__,
                                                                        "anatomy_mix_weights": None}), device="cpu")


@pytest.mark.parametrize("change, message", [({"anatomy_mix": 1.5}, "--anatomy-mix"),
                                             ({"anatomy_mix": -0.1}, "--anatomy-mix"),
                                             ({"anatomy_mix_max": 0.0}, "--anatomy-mix-max"),
                                             ({"anatomy_mix_max": float("nan")}, "--anatomy-mix-max")])
def test_anatomy_mixing_settings_are_checked_before_any_step(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        train(small_spec(), synthetic_set(), tmp_path, TrainingConfig(steps=1, batch_size=2, **change), device="cpu")


def test_cli_train_passes_anatomy_mixing_with_init_as_the_default_network(tmp_path):
    data = synthetic_set()
    data.save(tmp_path / "train.npz")
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    weights = _mixing_weights(tmp_path / "mix.pt", seed=4)
    assert main(["train", "--spec", str(tmp_path / "small.json"), "--data", str(tmp_path / "train.npz"), "--steps",
                 "1", "--batch-size", "2", "--out", str(tmp_path / "run"), "--anatomy-mix", "0.5",
                 "--anatomy-mix-max", "0.7", "--init", str(weights)]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (saved["config"]["anatomy_mix"], saved["config"]["anatomy_mix_max"]) == (0.5, 0.7)
    assert all(torch.equal(saved["anatomy_mix_model"][k], value.float() if value.is_floating_point() else value)
               for k, value in torch.load(weights, weights_only=True).items())


def test_anatomy_mixing_keeps_a_self_pair_one_subject(tmp_path, monkeypatch):
    """Both copies of a self pair (--self-pairs) get the same mixing, so the pair still shows one subject twice
    before the independent augmentation; other pairs are mixed independently."""
    from ICONRegistrationLib.training import trainer
    seen = []
    original = trainer.augment

    def spy(images_A, images_B, config, generator, labels=None):
        seen.append((images_A.clone(), images_B.clone(), tuple(part.clone() for part in labels)))
        return original(images_A, images_B, config, generator, labels)

    monkeypatch.setattr(trainer, "augment", spy)
    data = synthetic_set(6)
    weights = _mixing_weights(tmp_path / "mix.pt", seed=4)
    config = TrainingConfig(steps=3, batch_size=4, checkpoint_every=3, validate_every=100, seed=2, label_loss="dice",
                            anatomy_mix=1.0, anatomy_mix_weights=str(weights), self_pair_fraction=1.0)
    train(small_spec(), data, tmp_path / "self", config, device="cpu")
    originals = data.images.float()
    for images_A, images_B, (labels_A, labels_B) in seen:
        assert torch.equal(images_A, images_B) and torch.equal(labels_A, labels_B)
        assert all(not any(torch.equal(image, volume) for volume in originals) for image in images_A)  # all mixed
    seen.clear()
    train(small_spec(), data, tmp_path / "pairs", TrainingConfig(**{**config.__dict__, "self_pair_fraction": 0.0}),
          device="cpu")
    assert all(not torch.equal(images_A[k], images_B[k]) for images_A, images_B, _ in seen for k in range(4))
