"""Weight cache, offline install, download, sha256 verification and safe loading (no network needed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from ICONRegistrationLib.errors import Cancelled, UserError
from ICONRegistrationLib.models import ModelSpec, build_network
from ICONRegistrationLib.models.weights import (cache_dir, cached_weights_path, download_weights, install_weights,
                                                load_model, read_state_dict, resolve_weights, sha256_of,
                                                weights_state)

TINY = {"name": "tiny", "unet": {"num_layers": 5, "channels": [[2, 8, 8, 16, 16, 16], [8, 8, 16, 16, 16]]},
        "input_shape": [66, 66, 66], "similarity": {"name": "lncc", "sigma": 5}, "lambda": 1.5,
        "preprocessing": {"mri_percentile": 99}, "weights": {"file": "tiny.pt", "sha256": None}}


class NotATensor:
    """An arbitrary Python object: a weights_only load must refuse to unpickle it."""

    def __init__(self, value=3):
        self.value = value


class CreatesAFolder:
    """Unpickling this would run os.mkdir(path): the checkpoint must be refused before that happens."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _spec(**weights) -> ModelSpec:
    data = {**TINY, "weights": {**TINY["weights"], **weights}}
    return ModelSpec.from_dict(data)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ICONREG_CACHE", str(folder))
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny network's random state dict saved with torch.save (non-zero everywhere), its path and sha256."""
    torch.manual_seed(0)
    net = build_network(_spec())
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v + 5) for k, v in net.state_dict().items()}
    path = tmp_path / "source" / "tiny.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path, state, hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_dir_honours_environment(cache):
    assert cache_dir() == cache
    assert cached_weights_path(_spec()) == cache / "models" / "tiny" / "tiny.pt"


def test_install_weights_copies_and_verifies_without_sidecars(cache, checkpoint):
    source, _, digest = checkpoint
    spec = _spec()
    assert weights_state(spec) == "not downloaded"
    target = install_weights(spec, source)
    assert target == cache / "models" / "tiny" / "tiny.pt"
    assert target.read_bytes() == source.read_bytes()
    assert source.is_file()  # a copy, the source stays
    assert _files(cache) == ["models/tiny/tiny.pt"]  # no *.part left
    assert not list(cache.rglob("*.part"))
    assert sha256_of(target) == digest
    assert weights_state(spec) == "downloaded"
    # with the right sha256 in the spec it installs as well
    assert install_weights(_spec(sha256=digest.upper()), source) == target


def test_install_weights_with_wrong_sha256_leaves_nothing(cache, checkpoint):
    source, _, digest = checkpoint
    wrong = "0" * 64
    with pytest.raises(UserError) as error:
        install_weights(_spec(sha256=wrong), source)
    message = str(error.value)
    assert digest in message and wrong in message and "tiny" in message
    assert not cache.exists() or _files(cache) == []
    assert not cached_weights_path(_spec()).exists()



@pytest.mark.parametrize("field, changes", [
    ("weights", {"weights": {"file": "tiny.pt", "sha-256": "0" * 64}}),
    ("weights", {"weights": {"file": "tiny.pt", "SHA256": "0" * 64}}),
    ("options", {"architecture": "sitreg", "options": {"max_gradiant": 0.5}}),
    ("options", {"architecture": "constricon", "options": {"integration_step": 3}}),
    ("options", {"options": {"inversion_tolerance": 0.01}}),  # a SITReg option in a GradICON spec
    ("similarity", {"similarity": {"name": "squared_lncc", "sigmma": 2}}),
    ("preprocessing", {"preprocessing": {"ct_windw": [-1000, 0]}}),
    ("last_steps", {"last_steps": False}),
])
def test_spec_keys_a_model_would_ignore_are_refused(cache, checkpoint, field, changes):
    """A misspelt or misplaced key used to be accepted and ignored: a misspelt hash skipped verification (the
    wrong weights installed), a misspelt option or σ silently took its default."""
    source, _, _ = checkpoint
    with pytest.raises(UserError, match=f"'{field}'") as error:
        install_weights(ModelSpec.from_dict({**TINY, **changes}), source)
    assert "ignored" in str(error.value)
    assert not cached_weights_path(_spec()).exists()
    # the recognised keys still work, metadata the package does not read is kept as notes
    spec = ModelSpec.from_dict({**TINY, "licence": "CC0", "use": "tests", "anatomy": "blobs",
                                "similarity": {"name": "mind_ssc", "radius": 1, "dilation": 2},
                                "preprocessing": {"ct_window": [-1000, 0], "scale_max_to": 0.9, "require_mask": True},
                                "weights": {"file": "tiny.pt", "url": "file:///x", "sha256": None, "bundled": False}})
    assert spec.extra == {"licence": "CC0", "use": "tests", "anatomy": "blobs"}
    assert ModelSpec.from_dict({**TINY, "similarity": {"name": "Squared-LNCC", "sigma": 2}}).similarity == {
        "name": "squared_lncc", "sigma": 2}  # one spelling for the code that compares names
    for architecture, options in (("gradicon", {"final_steps": 2, "penalty": "icon"}),
                                  ("sitreg", {"max_gradient": 0.5, "inversion_tolerance": 1e-3}),
                                  ("constricon", {"affine_steps": 1, "svf_steps": 1, "affine_channels": [2, 8],
                                                  "integration_steps": 5, "svf_downsample": [0]})):
        assert ModelSpec.from_dict({**TINY, "architecture": architecture, "options": options}).options == options

def test_install_weights_of_missing_file(cache, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        install_weights(_spec(), tmp_path / "nowhere.pt")


def test_load_model_loads_the_same_tensors_and_reports_sha256(cache, checkpoint):
    source, state, digest = checkpoint
    spec = _spec(sha256=digest)
    install_weights(spec, source)
    loaded = load_model(spec, device="cpu", download=False)
    assert loaded.weights_sha256 == digest
    assert loaded.weights_path == cached_weights_path(spec)
    assert loaded.device == torch.device("cpu")
    assert not loaded.net.training
    loaded_state = loaded.net.state_dict()
    assert list(loaded_state) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    # an explicit weights file bypasses the cache
    explicit = load_model(_spec(), weights=source, device="cpu")
    assert explicit.weights_path == source and explicit.weights_sha256 == digest


def test_checkpoint_with_python_object_is_refused(cache, checkpoint, tmp_path):
    _, state, _ = checkpoint
    unsafe = tmp_path / "unsafe.pt"
    torch.save({**state, "extra": NotATensor()}, unsafe)
    with pytest.raises(UserError, match="Could not read weights file"):
        read_state_dict(unsafe)
    with pytest.raises(UserError):
        load_model(_spec(), weights=unsafe, device="cpu")

    marker = tmp_path / "code_ran"
    malicious = tmp_path / "malicious.pt"
    torch.save({"weight": torch.zeros(2), "payload": CreatesAFolder(marker)}, malicious)
    with pytest.raises(UserError):
        read_state_dict(malicious)
    assert not marker.exists()  # the pickle's code never ran


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match="state dict"):
        read_state_dict(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="Could not read"):
        read_state_dict(garbage)


def test_resolve_weights_without_download_says_how_to_install(cache):
    spec = _spec(url="https://example.invalid/tiny.pt")
    with pytest.raises(UserError) as error:
        resolve_weights(spec, download=False)
    message = str(error.value)
    assert "iconreg models install tiny" in message
    assert "https://example.invalid/tiny.pt" in message
    assert not cache.exists() or _files(cache) == []
    with pytest.raises(UserError, match="iconreg models install"):
        load_model(spec, device="cpu", download=False)


def test_download_weights_from_file_url(cache, checkpoint):
    source, state, digest = checkpoint
    spec = _spec(url=source.as_uri(), sha256=digest)
    calls = []
    target = download_weights(spec, progress=lambda stage, fraction: calls.append((stage, fraction)))
    assert target == cache / "models" / "tiny" / "tiny.pt"
    assert target.read_bytes() == source.read_bytes()
    assert _files(cache) == ["models/tiny/tiny.pt"]
    assert calls and calls[-1] == ("downloading tiny", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in calls)
    # and it is then found without downloading again
    assert resolve_weights(spec, download=False) == target
    loaded = load_model(spec, device="cpu", download=False)
    assert torch.equal(loaded.net.state_dict()["netPsi.net.lastConv.bias"], state["netPsi.net.lastConv.bias"])


def test_download_is_atomic(cache, checkpoint):
    """A download that fails verification or is cancelled leaves no file, and never clobbers a good one."""
    source, _, digest = checkpoint
    with pytest.raises(UserError, match="sha256"):
        download_weights(_spec(url=source.as_uri(), sha256="f" * 64))
    assert _files(cache) == []

    with pytest.raises(Cancelled):
        download_weights(_spec(url=source.as_uri(), sha256=digest), progress=lambda stage, fraction: False)
    assert _files(cache) == []

    good = download_weights(_spec(url=source.as_uri(), sha256=digest))
    before = good.read_bytes()
    other = source.with_name("other.pt")
    torch.save({"w": torch.ones(3)}, other)
    with pytest.raises(UserError):
        download_weights(_spec(url=other.as_uri(), sha256=digest))
    assert good.read_bytes() == before
    assert _files(cache) == ["models/tiny/tiny.pt"]


def test_interrupted_download_leaves_no_file(cache, checkpoint, monkeypatch):
    """The connection drops after the first megabyte: nothing (not even a *.part file) stays in the cache."""
    source, _, digest = checkpoint

    class Dropping:
        headers = {"Content-Length": str(10 << 20)}

        def __init__(self):
            self.calls = 0

        def read(self, size):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("connection reset by peer")
            return b"x" * size

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Dropping())
    # a connection dropped mid-stream is a user error with the offline-install hint, like a refused one
    with pytest.raises(UserError, match="iconreg models install"):
        download_weights(_spec(url="https://example.invalid/tiny.pt", sha256=digest))
    assert _files(cache) == []


def test_download_without_content_length_reports_its_end(cache, checkpoint, monkeypatch):
    """A server that sends no Content-Length (a chunked transfer): the stage stayed at 0 % to the end."""
    source, _, digest = checkpoint

    class Chunked:
        headers: dict = {}

        def __init__(self):
            self.stream = open(source, "rb")

        def read(self, size):
            return self.stream.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()
            return False

    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Chunked())
    calls = []
    download_weights(_spec(url="https://example.invalid/tiny.pt", sha256=digest),
                     progress=lambda stage, fraction: calls.append(fraction))
    assert calls[-1] == 1.0 and calls.count(1.0) == 1 and calls == sorted(calls)


def test_download_without_url_or_unreachable_url(cache, tmp_path):
    with pytest.raises(UserError, match="no download URL"):
        download_weights(_spec())
    with pytest.raises(UserError, match="Could not download"):
        download_weights(_spec(url=(tmp_path / "missing.pt").as_uri()))
    assert _files(cache) == []


def test_fp16_checkpoint_loads_as_float32(cache, checkpoint, tmp_path):
    _, state, _ = checkpoint
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    path = tmp_path / "tiny_fp16.pt"
    torch.save(half, path)
    read = read_state_dict(path)
    for key, value in read.items():
        if state[key].is_floating_point():
            assert value.dtype == torch.float32, key
            assert torch.equal(value, half[key].float()), key
        else:
            assert value.dtype == torch.int64 and torch.equal(value, state[key])
    loaded = load_model(_spec(), weights=path, device="cpu")
    weight = loaded.net.state_dict()["netPsi.net.downConvs.0.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, half["netPsi.net.downConvs.0.weight"].float())
    # fp16 rounding is visible, so the test really exercised the conversion
    assert float((weight - state["netPsi.net.downConvs.0.weight"]).abs().max()) > 0


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_weights_with_non_finite_values_are_refused(cache, checkpoint, tmp_path, value):
    """An infinite BatchNorm variance (float16's rendering of a variance above 65504) used to load without a word:
    its channel is zeroed and the network's output stays finite, so nothing downstream noticed."""
    _, state, _ = checkpoint
    key = "netPsi.net.batchNorms.0.running_var"
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    state[key] = state[key].clone()
    state[key][0] = value
    path = tmp_path / "tiny_broken.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=f"NaN or infinite values in 1 tensor.*{key}"):
        load_model(_spec(), weights=path, device="cpu")
    with pytest.raises(UserError, match="NaN or infinite"):
        install_weights(_spec(), path)
    assert not cached_weights_path(_spec()).exists()
