"""Model weights: per-user cache, download, offline install, sha256 verification, safe strict loading.

Weights never go to the current directory, the install folder or beside a user's weights file: they live in the
per-user cache (``$ICONREG_CACHE`` when set). Files are written under a temporary name, checked (sha256 when known,
keys and shapes always) and renamed when complete. A hash is never remembered: the sha256 reported for a
registration is computed from the very bytes that were loaded.
Checkpoints are read with ``torch.load(weights_only=True)``, so a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import io
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from ..errors import UserError
from ..progress import ProgressCallback, report
from .spec import ModelSpec
from .zoo import resolve_spec

if TYPE_CHECKING:  # torch is imported when weights are read, so listing models and caches stays light
    import torch

_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 30.0  # seconds without data before a download is abandoned


def cache_dir() -> Path:
    """The per-user weight cache: ``$ICONREG_CACHE``, else the platform's user cache folder."""
    override = os.environ.get("ICONREG_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "ICONRegistration" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ICONRegistration"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iconregistration"


def _file_name(spec: ModelSpec) -> str:
    return spec.weights.get("file") or f"{spec.name}.pt"


def cached_weights_path(spec: ModelSpec) -> Path:
    """Where the cache keeps (or would keep) the weights of ``spec``."""
    return cache_dir() / "models" / spec.name / _file_name(spec)


def bundled_weights_path(spec: ModelSpec) -> Optional[Path]:
    """Weights shipped beside the spec file (models the project ships), if present."""
    folder = spec.extra.get("spec_dir")
    if folder:
        candidate = Path(folder) / _file_name(spec)
        if candidate.is_file():
            return candidate
    return None


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, computed now (never remembered: a remembered hash can belong to other bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(spec: ModelSpec, path: Path, actual: str) -> str:
    expected = spec.sha256
    if expected and actual.lower() != expected.lower():
        raise UserError(f"The weights file '{path}' for model '{spec.name}' has sha256 {actual}, "
                        f"but the model expects {expected}: the file is corrupt or is another model's. "
                        f"Delete it and download or install it again.")
    return actual


def read_weights(spec: ModelSpec, path: Path, origin: Optional[str] = None) -> tuple[dict, str]:
    """The state dict of the weights file ``path`` and the sha256 of exactly the bytes it was read from (one read;
    checked against the spec's hash when it has one). ``origin`` names the file in messages (default: ``path``)."""
    origin = origin or str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"Could not read weights file '{origin}': {error.strerror or error}.") from None
    digest = _check_hash(spec, Path(origin), hashlib.sha256(data).hexdigest())
    return read_state_dict(io.BytesIO(data), name=origin), digest


def check_weights_fit(spec: ModelSpec, path: Path, origin: Optional[str] = None) -> str:
    """Verify that ``path`` holds weights of ``spec``'s network: sha256 (when the spec has one), then keys and
    shapes against the network built from the spec. Returns the sha256 of the bytes checked."""
    from .build import build_network

    state, digest = read_weights(spec, path, origin)
    load_state_dict_strict(build_network(spec), state,
                           source=f"weights file '{origin or path.name}' (for model '{spec.name}')")
    return digest


def _offline_hint(spec: ModelSpec) -> str:
    url = spec.weights.get("url")
    where = f" from {url}" if url else ""
    return (f"Download the file{where} on a machine with internet access, then run "
            f"'iconreg models install {spec.name} --from FILE' (or pass --weights FILE).")


@contextlib.contextmanager
def _staged_weights(spec: ModelSpec, origin: str) -> Iterator[Path]:
    """Yield a temporary file beside the cached weights path of ``spec``; once the caller has filled it, check that
    it holds this model's weights (sha256 when known, keys and shapes always) and rename it into place
    (:func:`~ICONRegistrationLib.io.atomic.atomic_path`: nothing is left behind on any exit — errors, Ctrl-C, and
    SIGTERM, which the command line turns into an exception)."""
    from ..io.atomic import atomic_path

    target = cached_weights_path(spec)
    with atomic_path(target) as temporary:
        yield temporary
        check_weights_fit(spec, temporary, origin)


def install_weights(model: "str | ModelSpec", source: str | Path) -> Path:
    """Copy a weights file into the cache for ``model`` (offline install) after checking that it holds this model's
    weights: sha256 when the zoo knows it, and always the keys and shapes of the model's network."""
    spec = resolve_spec(model)
    source = Path(source)
    if not source.is_file():
        raise UserError(f"Weights file '{source}' does not exist.")
    with _staged_weights(spec, str(source)) as temporary:
        shutil.copyfile(source, temporary)
    return cached_weights_path(spec)


def download_weights(model: "str | ModelSpec", progress: Optional[ProgressCallback] = None) -> Path:
    """Download the weights of ``model`` into the cache (temporary file, checked, renamed when complete).

    A transfer that ends before ``Content-Length`` bytes, an HTML page (an error or login page served instead of
    the file) or a file that is not this model's weights is refused and leaves nothing behind.
    """
    spec = resolve_spec(model)
    url = spec.weights.get("url")
    if not url:
        raise UserError(f"Model '{spec.name}' has no download URL. {_offline_hint(spec)}")
    with _staged_weights(spec, url) as temporary, open(temporary, "wb") as out:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (URL from the spec)
                if "html" in (response.headers.get("Content-Type") or "").lower():
                    raise UserError(f"The download of '{spec.name}' from {url} returned a web page, not a weights "
                                    f"file (a moved file or a login page?). {_offline_hint(spec)}")
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    report(progress, f"downloading {spec.name}", done / total if total else 0.0)
                if not total:  # no Content-Length: the stage ends at the end of the stream
                    report(progress, f"downloading {spec.name}", 1.0)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
            # refused, unreachable, dropped mid-way, not speaking HTTP, a chunked transfer cut short
            raise UserError(f"Could not download the weights of '{spec.name}' ({error}). "
                            f"{_offline_hint(spec)}") from None
        if total and done != total:
            raise UserError(f"The download of '{spec.name}' was cut short: {done} of {total} bytes arrived. "
                            "Try again; nothing was installed.")
        out.flush()
    return cached_weights_path(spec)


def weights_state(spec: ModelSpec) -> str:
    """``"bundled"``, ``"downloaded"`` or ``"not downloaded"`` (for listings)."""
    if bundled_weights_path(spec) is not None:
        return "bundled"
    return "downloaded" if cached_weights_path(spec).is_file() else "not downloaded"


def resolve_weights(spec: ModelSpec, weights: str | Path | None = None, *, download: bool = True,
                    progress: Optional[ProgressCallback] = None) -> Path:
    """The weights file to use: ``weights`` if given, else bundled, else cached, else downloaded."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"Weights file '{path}' does not exist.")
        return path
    for candidate in (bundled_weights_path(spec), cached_weights_path(spec)):
        if candidate is not None and candidate.is_file():
            return candidate
    if not download:
        raise UserError(f"The weights of model '{spec.name}' are not installed. {_offline_hint(spec)}")
    return download_weights(spec, progress)


def write_state_dict(state: dict[str, "torch.Tensor"], out: str | Path, half: bool = True) -> Path:
    """Write ``state`` to ``out`` atomically as a plain state dict, floating-point tensors as float16 by default
    (the shipped format, which :func:`read_state_dict` reads back as float32).

    Raises :class:`UserError` for a tensor that is not finite, or (``half``) whose values exceed float16's range
    (65504), which the conversion would silently turn into infinities.
    """
    import torch

    from ..io.atomic import atomic_path

    largest = float(torch.finfo(torch.float16).max)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"The weights hold non-finite values ({key}); they were not written to '{out}'.")
        if half and value.numel() and float(value.abs().max()) > largest:
            raise UserError(f"{key} holds {float(value.abs().max()):.4g}, beyond float16's range ({largest:g}); "
                            f"the float16 weights '{out}' were not written (write them as float32: half=False).")
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    out = Path(out)
    with atomic_path(out) as temporary:
        torch.save(state, str(temporary))
    return out


def read_state_dict(path: "str | Path | io.BytesIO", name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint (a path, or bytes already read, named ``name`` in messages), safely
    (``weights_only=True``), as float32 on the CPU.

    Accepts a plain state dict (official ``.trch`` files), a dict with a ``"state_dict"`` or ``"model"``
    entry (training checkpoints), and strips a ``regis_net.`` prefix (a whole GradICON wrapper's dict).
    Refuses a tensor with a NaN or infinite value (:class:`UserError`): an infinite BatchNorm variance, for one,
    which a float16 conversion makes of a variance above 65504, zeroes its channel while the output stays finite.
    """
    import torch

    source = path if isinstance(path, io.BytesIO) else str(path)
    name = name or str(path)
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable / unsafe files
        raise UserError(f"Could not read weights file '{name}' (damaged, cut short or not a PyTorch "
                        f"checkpoint): {error}".split("\n")[0]) from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"Weights file '{name}' does not hold a state dict of tensors.")
    if data and all(k.startswith("regis_net.") for k in data):
        data = {k[len("regis_net."):]: v for k, v in data.items()}
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in data.items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise UserError(f"Weights file '{name}' holds NaN or infinite values in {len(broken)} tensor(s) (first: "
                        f"{broken[0]}): the weights are damaged (a diverged training run, or a float16 conversion "
                        "of values beyond its range); use another copy.")
    return state


def load_state_dict_strict(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``net`` requiring identical keys and shapes; the error lists the first differences."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} (first: {'; '.join(items[:3])})")
        narrower = not missing and not unexpected and all(
            state[k].dim() == v.dim() and all(a <= b for a, b in zip(state[k].shape, v.shape))
            for k, v in expected.items())
        hint = (" These weights are narrower than the spec's network in every differing layer: to start a wider "
                "GradICON network from them, write its initial weights with 'iconreg convert-weights --from "
                "THEIR_SPEC --weights FILE --to THIS_SPEC --out W.pt'." if narrower else "")
        raise UserError(f"The {source} does not match the model's architecture: {', '.join(parts)}. "
                        "Check that the spec (unet channels, levels, last_step) belongs to these weights." + hint)
    net.load_state_dict(state, strict=True)


@dataclasses.dataclass
class LoadedModel:
    """A network ready to run: its spec, torch module (eval mode, on ``device``) and weight provenance."""

    spec: ModelSpec
    net: torch.nn.Module
    device: torch.device
    weights_path: Optional[Path]
    weights_sha256: Optional[str]


_LOADED: dict[tuple, LoadedModel] = {}


def load_model(model: "str | Path | ModelSpec", weights: str | Path | None = None, *, device: str = "auto",
               download: bool = True, progress: Optional[ProgressCallback] = None,
               random_weights: bool = False) -> LoadedModel:
    """Build the network of ``model`` and load its verified weights (cached across calls).

    ``random_weights=True`` skips loading (benchmarks and tests of the architecture only).
    """
    from ..device import choose_device
    from .build import build_network

    spec = resolve_spec(model)
    torch_device = choose_device(device)
    if random_weights:
        net = build_network(spec).to(torch_device)
        return LoadedModel(spec, net, torch_device, None, None)
    path = resolve_weights(spec, weights, download=download, progress=progress)
    stat = path.stat()
    # the file's identity: inode and change time too (ctime cannot be set back, unlike a copied mtime)
    key = (repr(sorted(spec.to_dict().items(), key=lambda kv: kv[0])), str(path.resolve()), stat.st_size,
           stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns, str(torch_device))
    if key in _LOADED:
        return _LOADED[key]
    state, sha256 = read_weights(spec, path)  # the hash of exactly the bytes loaded
    net = build_network(spec)
    load_state_dict_strict(net, state, source=f"weights file '{path.name}'")
    loaded = LoadedModel(spec, net.to(torch_device).eval(), torch_device, path, sha256)
    _LOADED.clear()  # keep one network in memory: uniGradICON-sized models weigh 280 MB
    _LOADED[key] = loaded
    return loaded
