"""Shared fixtures: the package on sys.path, the shared data folder, tiny models and synthetic volumes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ICONRegistration"))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from ICONRegistrationLib.models import ModelSpec, build_network  # noqa: E402

TINY_CHANNELS = [[2, 8, 8, 16, 16, 16], [8, 8, 16, 16, 16]]


def shared_dir() -> Path:
    """``../shared`` beside the repository (``$ICONREG_SHARED`` overrides)."""
    return Path(os.environ.get("ICONREG_SHARED", REPO.parent / "shared"))


def require_shared(*parts: str) -> Path:
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set ICONREG_SHARED to the shared folder)")
    return path


def tiny_spec(name: str = "tiny", shape=(66, 66, 66), **extra) -> ModelSpec:
    """A narrow GradICON network (same composition as uniGradICON) that runs in a second on a CPU."""
    data = {"name": name, "unet": {"num_layers": 5, "channels": TINY_CHANNELS}, "input_shape": list(shape),
            "similarity": {"name": "lncc", "sigma": 5}, "lambda": 1.5,
            "preprocessing": {"ct_window": [-1000, 1000], "mri_percentile": 99},
            "weights": {"file": f"{name}.pt", "sha256": None}}
    data.update(extra)
    return ModelSpec.from_dict(data)


def random_state(spec: ModelSpec, seed: int = 0, output_scale: float = 0.0) -> dict:
    """A state dict of ``spec``'s network; ``output_scale`` > 0 randomises the zero-initialised last layers."""
    torch.manual_seed(seed)
    net = build_network(spec)
    if output_scale:
        with torch.no_grad():
            for name, parameter in net.named_parameters():
                if "lastConv" in name:
                    parameter.normal_(0.0, output_scale)
    return net.state_dict()


def blob_volume(shape=(40, 50, 45), centre=None, seed: int = 0) -> np.ndarray:
    """A smooth synthetic 'anatomy': a few Gaussian blobs of different sizes, values in about [0, 1000]."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    volume = np.zeros(shape, np.float32)
    centre = np.array(centre if centre is not None else [n / 2 for n in shape], np.float32)
    for k in range(6):
        offset = centre + rng.uniform(-0.25, 0.25, 3) * np.array(shape)
        width = rng.uniform(0.08, 0.2, 3) * np.array(shape)
        volume += (1000 / (k + 1)) * np.exp(-sum(((g - o) / w) ** 2 for g, o, w in zip(grid, offset, width)))
    return volume


def make_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, float).flatten()))
    return image


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


@pytest.fixture
def tiny_model_files(tmp_path):
    """A tiny spec JSON with its (random, slightly non-identity) weights file beside it."""
    spec = tiny_spec()
    torch.save(random_state(spec, output_scale=1e-3), tmp_path / "tiny.pt")
    spec.to_file(tmp_path / "tiny.json")
    return tmp_path / "tiny.json", tmp_path / "tiny.pt"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's weight cache from tests."""
    monkeypatch.setenv("ICONREG_CACHE", str(tmp_path_factory.mktemp("cache")))


def without_compiler(monkeypatch) -> None:
    """The compiled sampler as on a machine with no C++ compiler, no ninja and no cached build, asked to build
    (``ICONREG_NATIVE_SAMPLER=1``); monkeypatch undoes it after the test."""
    from ICONRegistrationLib.core import native_sampler
    monkeypatch.setattr(native_sampler, "_module", None)
    monkeypatch.setattr(native_sampler, "_failure", None)
    monkeypatch.setattr(native_sampler, "_looked_in_cache", True)
    monkeypatch.setattr(native_sampler.shutil, "which", lambda tool: None)
    monkeypatch.setattr(native_sampler, "_find_ninja", lambda: False)
    monkeypatch.setenv("ICONREG_NATIVE_SAMPLER", "1")
