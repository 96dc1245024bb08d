"""Checkpoint compatibility and numerical parity with icon_registration (reference data in ../shared/reference).

The shared folder is ``<repo>/../shared`` (``Path(__file__).resolve().parents[2] / "shared"``) unless the
environment variable ``ICONREG_SHARED`` names another one. Tests that need a reference file skip when it is absent.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from ICONRegistrationLib.core.coordinates import identity_map, sample_at
from ICONRegistrationLib.core.losses import LNCC
from ICONRegistrationLib.errors import UserError
from ICONRegistrationLib.models import ModelSpec, build_network, zoo_spec
from ICONRegistrationLib.models.weights import load_state_dict_strict, read_state_dict

MANIFEST_NAME = "unigradicon_state_dict_manifest.json"
PARITY_NAME = "parity_seed0.pt"
UNIGRADICON_PARAMETERS = 70_680_916  # README of the reference data


def _reference_dir() -> Path:
    shared = os.environ.get("ICONREG_SHARED")
    base = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared"
    return base / "reference"


def _reference_file(name: str) -> Path:
    path = _reference_dir() / name
    if not path.is_file():
        pytest.skip(f"reference file {path} is absent (set ICONREG_SHARED to the folder that holds "
                    f"reference/{name})")
    return path


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(_reference_file(MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def unigradicon_net():
    return build_network(zoo_spec("unigradicon"))


@pytest.fixture(scope="module")
def random_state(manifest) -> dict:
    """Random tensors with the manifest's keys and shapes (shared; tests copy the dict before changing it)."""
    return _random_state(manifest)


def _random_state(manifest: dict) -> dict:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in manifest.items():
        if key.endswith("num_batches_tracked"):
            assert shape == []
            state[key] = torch.tensor(7, dtype=torch.int64)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    return state


# ------------------------------------------------------------------------------------ (a) checkpoint layout


def test_manifest_keys_equal_network_keys(manifest, unigradicon_net):
    state = unigradicon_net.state_dict()
    assert len(manifest) == 188
    assert list(state) == list(manifest)  # same keys, same order
    assert {k: list(v.shape) for k, v in state.items()} == manifest
    # the four UNets sit at the prefixes the README names
    for prefix in ("netPhi.netPhi.net.netPhi.net.net.", "netPhi.netPhi.net.netPsi.net.", "netPhi.netPsi.net.",
                   "netPsi.net."):
        assert sum(k.startswith(prefix) for k in manifest) == 47


def test_parameter_count(manifest, unigradicon_net):
    """70,680,916 is the number of trainable parameters (nn.Module.parameters): the state dict additionally
    holds BatchNorm running means / variances (3,968 floats) and 20 num_batches_tracked counters."""
    parameters = sum(p.numel() for p in unigradicon_net.parameters())
    assert parameters == UNIGRADICON_PARAMETERS
    manifest_parameters = sum(math.prod(s) for k, s in manifest.items()
                              if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert manifest_parameters == UNIGRADICON_PARAMETERS
    assert sum(math.prod(s) for s in manifest.values()) == 70_684_904  # every state-dict entry, counters included
    assert sum(k.endswith("num_batches_tracked") for k in manifest) == 20


def test_random_manifest_state_loads_strict(random_state, unigradicon_net):
    state = random_state
    unigradicon_net.load_state_dict(state, strict=True)
    loaded = unigradicon_net.state_dict()
    key = "netPsi.net.lastConv.weight"
    assert torch.equal(loaded[key], state[key])
    assert loaded["netPsi.net.batchNorms.4.num_batches_tracked"].dtype == torch.int64


def test_manifest_state_via_read_state_dict(manifest, random_state, unigradicon_net, tmp_path):
    state = random_state
    path = tmp_path / "Step_2_final.trch"
    torch.save(state, path)
    read = read_state_dict(path)
    assert list(read) == list(manifest)
    load_state_dict_strict(unigradicon_net, read)
    key = "netPhi.netPhi.net.netPhi.net.net.downConvs.0.weight"
    assert torch.equal(unigradicon_net.state_dict()[key], state[key])
    # a whole-wrapper checkpoint (regis_net. prefix, inside "state_dict") reads to the same keys
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"regis_net.{k}": v for k, v in state.items()}}, wrapped)
    assert list(read_state_dict(wrapped)) == list(manifest)


def test_mismatched_state_is_refused_with_the_first_differences(random_state, unigradicon_net):
    state = dict(random_state)
    removed = "netPhi.netPsi.net.upConvs.2.bias"
    changed = "netPsi.net.downConvs.1.weight"
    del state[removed]
    state[changed] = torch.zeros(8, 16, 3, 3, 3)
    with pytest.raises(UserError) as error:
        load_state_dict_strict(unigradicon_net, state, source="test checkpoint")
    message = str(error.value)
    assert "test checkpoint" in message
    assert "1 missing" in message and removed in message
    assert "1 wrong shape" in message and changed in message and "(8, 16, 3, 3, 3)" in message
    assert "(32, 16, 3, 3, 3)" in message
    assert "unexpected" not in message


# ---------------------------------------------------------------------------------------------- (b) parity


@pytest.fixture(scope="module")
def parity():
    data = torch.load(_reference_file(PARITY_NAME), map_location="cpu", weights_only=True)
    shape = [int(n) for n in list(data["input_shape"])[-3:]]
    spec = ModelSpec.from_dict({"name": "parity", "unet": {"num_layers": int(data["num_layers"]),
                                                           "channels": data["channels"]},
                                "levels": 3, "last_step": True, "input_shape": shape,
                                "similarity": {"name": "lncc", "sigma": 5}, "lambda": 1.5,
                                "preprocessing": {"ct_window": [-1000, 1000], "mri_percentile": 99}})
    net = build_network(spec)
    load_state_dict_strict(net, data["state_dict"])
    net.eval()
    return data, net


@pytest.fixture(scope="module")
def outputs(parity):
    """The network's outputs for the fixture's pair, one direction at a time."""
    data, net = parity
    image_A, image_B = data["image_A"], data["image_B"]
    with torch.no_grad():
        phi_AB = net(image_A, image_B)
        phi_BA = net(image_B, image_A)
        grid = identity_map(image_A.shape[2:])
        map_AB = phi_AB(grid)
        map_BA = phi_BA(grid)
        map_AB_after_BA = phi_AB(phi_BA(grid))
    return {"grid": grid, "map_AB": map_AB, "map_BA": map_BA, "map_AB_after_BA": map_AB_after_BA}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max())


def test_parity_with_icon_registration(parity, outputs):
    data, _ = parity
    image_A, image_B = data["image_A"], data["image_B"]
    assert tuple(image_A.shape) == (1, 1, 66, 68, 72)
    grid, map_AB, map_AB_after_BA = outputs["grid"], outputs["map_AB"], outputs["map_AB_after_BA"]
    with torch.no_grad():
        warped_A = sample_at(image_A, map_AB, padding="border")
        lncc = LNCC(sigma=2)(warped_A, image_B)
    # the fixture's transform is far from the identity, so agreeing with it is not trivial
    assert _max_abs(data["map_AB"], grid) > 1e-2
    assert _max_abs(map_AB, data["map_AB"]) < 1e-5
    assert _max_abs(map_AB_after_BA, data["map_AB_after_BA"]) < 1e-5
    assert _max_abs(warped_A, data["warped_A"]) < 1e-5
    assert abs(float(lncc) - float(data["lncc_sigma2_warpedA_B"])) < 1e-5


def test_parity_both_directions_in_one_batch(parity, outputs):
    data, net = parity
    image_A, image_B = data["image_A"], data["image_B"]
    with torch.no_grad():
        phi = net(torch.cat([image_A, image_B]), torch.cat([image_B, image_A]))
        maps = phi(outputs["grid"])
    assert maps.shape == (2, 3, 66, 68, 72)
    assert _max_abs(maps[:1], data["map_AB"]) < 1e-5
    assert _max_abs(maps[:1], outputs["map_AB"]) < 1e-5
    assert _max_abs(maps[1:], outputs["map_BA"]) < 1e-5
    assert _max_abs(outputs["map_BA"], outputs["map_AB"]) > 1e-2  # the two directions really differ
