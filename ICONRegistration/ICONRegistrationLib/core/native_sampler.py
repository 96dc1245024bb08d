"""A compiled trilinear sampler for the CPU: ``grid_sample``'s values and gradients for the one case the
training step runs most, about twice as fast.

``sample_at`` (``core/coordinates.py``) samples maps and images with ``F.grid_sample(mode="bilinear",
padding_mode="border", align_corners=True)``. PyTorch's 3-D CPU kernel for it is scalar code that bounds-checks
every corner; it was about a third of a training step on a CPU. This module compiles (with
``torch.utils.cpp_extension.load_inline``, into its own folder under ``$TORCH_EXTENSIONS_DIR`` or PyTorch's
default ``~/.cache/torch_extensions``, named by a hash of the source, the flags and the PyTorch and Python
versions) a kernel for exactly that case — 3-D, trilinear, border padding, ``align_corners=True``, float32 or
float64, CPU, spatial sizes ≥ 2 — with its own backward (image and point gradients). It follows ``grid_sample``'s
arithmetic: the same unnormalisation ``((g + 1) / 2)(n − 1)`` of the same grid values, the same cell for a point on
a cell face, no gradient for a clamped coordinate, none at all for a NaN coordinate, the point gradient in the
grid's normalised units. Values and gradients agree to float rounding (the corner weights are formed in another
order); the image gradient goes to one buffer per batch element, as ``grid_sample``'s does, so threads never write
to the same memory.

Switching: the environment variable ``ICONREG_NATIVE_SAMPLER`` is ``auto`` (the default: load the build when one is
in the cache — imported directly, no compiler — and build only where :func:`enable` asks: ``scripts/setup.sh``,
``iconreg train`` and the training benchmark; an interactive registration never waits for a compiler), ``1`` (build
on first use everywhere) or ``0`` (never; ``grid_sample`` only). Without a C++ compiler (``$CXX`` or ``c++``) and
ninja, or when the build fails, everything falls back to ``grid_sample`` with one warning (:func:`status` says
why). Double backward and forward-mode differentiation are not supported (nothing in the package uses them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

_LOG = logging.getLogger(__name__)

_ENV = "ICONREG_NATIVE_SAMPLER"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

// One axis of one point: grid value g in [-1, 1] (align_corners=True) on an axis of n >= 2 voxels, border
// padding. As PyTorch: x = ((g + 1) / 2) * (n - 1), clipped to [0, n - 1]; the point gradient passes only where
// the unclipped x is strictly inside (then d x / d g = (n - 1) / 2). The cell is [i, i + 1] with i = floor(x),
// moved to n - 2 at the last voxel (weight f = 1 there: the same value and image gradient as PyTorch's
// out-of-bounds corner of weight 0).
template <typename T>
static inline void locate(T g, int64_t n, int64_t& i, T& f, T& mult) {
  const T limit = static_cast<T>(n - 1);
  T x = ((g + 1) / 2) * limit;
  mult = (x > T(0) && x < limit) ? limit / 2 : T(0);
  x = std::min(limit, std::max(x, T(0)));  // a NaN becomes n - 1: never an index outside the image
  i = std::min<int64_t>(static_cast<int64_t>(x), n - 2);
  f = x - static_cast<T>(i);
}

// image [N, C, D, H, W] (each batch element contiguous; the batch stride may be 0), grid [N, P, 3] (x, y, z)
template <typename T>
static void forward_kernel(const torch::Tensor& image, const torch::Tensor& grid, torch::Tensor& out) {
  const int64_t N = image.size(0), C = image.size(1), D = image.size(2), H = image.size(3), W = image.size(4);
  const int64_t P = grid.size(1), sN = image.stride(0), sC = D * H * W, sD = H * W;
  const T* I = image.data_ptr<T>();
  const T* G = grid.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, N * P, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / P, p = k - n * P;
      const T* g = G + 3 * k;
      int64_t x0, y0, z0;
      T fx, fy, fz, mx, my, mz;
      locate(g[0], W, x0, fx, mx);
      locate(g[1], H, y0, fy, my);
      locate(g[2], D, z0, fz, mz);
      const T gx = 1 - fx, gy = 1 - fy, gz = 1 - fz;
      const T w000 = gz * gy * gx, w001 = gz * gy * fx, w010 = gz * fy * gx, w011 = gz * fy * fx;
      const T w100 = fz * gy * gx, w101 = fz * gy * fx, w110 = fz * fy * gx, w111 = fz * fy * fx;
      const T* q = I + n * sN + z0 * sD + y0 * W + x0;
      T* o = O + n * C * P + p;
      for (int64_t c = 0; c < C; ++c, q += sC, o += P) {
        *o = w000 * q[0] + w001 * q[1] + w010 * q[W] + w011 * q[W + 1] +
             w100 * q[sD] + w101 * q[sD + 1] + w110 * q[sD + W] + w111 * q[sD + W + 1];
      }
    }
  });
}

template <typename T>
static void backward_points(const T* I, const T* G, const T* GO, T* GI, T* GG, int64_t n, int64_t p_begin,
                            int64_t p_end, int64_t P, int64_t C, int64_t D, int64_t H, int64_t W, int64_t sN) {
  const int64_t sC = D * H * W, sD = H * W;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t k = n * P + p;
    const T* g = G + 3 * k;
    if (std::isnan(g[0]) || std::isnan(g[1]) || std::isnan(g[2])) {
      // as grid_sample's backward: a NaN coordinate reaches no voxel (no image gradient, a zero point gradient)
      if (GG) { T* gg = GG + 3 * k; gg[0] = gg[1] = gg[2] = T(0); }
      continue;
    }
    int64_t x0, y0, z0;
    T fx, fy, fz, mx, my, mz;
    locate(g[0], W, x0, fx, mx);
    locate(g[1], H, y0, fy, my);
    locate(g[2], D, z0, fz, mz);
    const T gx = 1 - fx, gy = 1 - fy, gz = 1 - fz;
    const int64_t offset = z0 * sD + y0 * W + x0;
    const T* q = I + n * sN + offset;
    const T* go = GO + n * C * P + p;
    T dx = 0, dy = 0, dz = 0;
    for (int64_t c = 0; c < C; ++c, q += sC, go += P) {
      const T s = *go;
      const T a000 = q[0], a001 = q[1], a010 = q[W], a011 = q[W + 1];
      const T a100 = q[sD], a101 = q[sD + 1], a110 = q[sD + W], a111 = q[sD + W + 1];
      if (GG) {
        dx += s * (gz * (gy * (a001 - a000) + fy * (a011 - a010)) + fz * (gy * (a101 - a100) + fy * (a111 - a110)));
        dy += s * (gz * (gx * (a010 - a000) + fx * (a011 - a001)) + fz * (gx * (a110 - a100) + fx * (a111 - a101)));
        dz += s * (gy * (gx * (a100 - a000) + fx * (a101 - a001)) + fy * (gx * (a110 - a010) + fx * (a111 - a011)));
      }
      if (GI) {
        T* r = GI + (n * C + c) * sC + offset;
        r[0] += s * gz * gy * gx;        r[1] += s * gz * gy * fx;
        r[W] += s * gz * fy * gx;        r[W + 1] += s * gz * fy * fx;
        r[sD] += s * fz * gy * gx;       r[sD + 1] += s * fz * gy * fx;
        r[sD + W] += s * fz * fy * gx;   r[sD + W + 1] += s * fz * fy * fx;
      }
    }
    if (GG) {
      T* gg = GG + 3 * k;
      gg[0] = dx * mx; gg[1] = dy * my; gg[2] = dz * mz;
    }
  }
}

template <typename T>
static void backward_kernel(const torch::Tensor& image, const torch::Tensor& grid, const torch::Tensor& grad_out,
                            torch::Tensor& grad_image, torch::Tensor& grad_grid) {
  const int64_t N = image.size(0), C = image.size(1), D = image.size(2), H = image.size(3), W = image.size(4);
  const int64_t P = grid.size(1), sN = image.stride(0);
  const T* I = image.data_ptr<T>();
  const T* G = grid.data_ptr<T>();
  const T* GO = grad_out.data_ptr<T>();
  T* GI = grad_image.numel() ? grad_image.data_ptr<T>() : nullptr;
  T* GG = grad_grid.numel() ? grad_grid.data_ptr<T>() : nullptr;
  if (GI) {  // each batch element scatters into its own image gradient: one thread per batch element
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) backward_points<T>(I, G, GO, GI, GG, n, 0, P, P, C, D, H, W, sN);
    });
  } else {
    at::parallel_for(0, N * P, 4096, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t n = begin / P, stop = std::min(end, (n + 1) * P);
        backward_points<T>(I, G, GO, GI, GG, n, begin - n * P, stop - n * P, P, C, D, H, W, sN);
        begin = stop;
      }
    });
  }
}

torch::Tensor sample_forward(torch::Tensor image, torch::Tensor grid) {
  auto out = torch::empty({image.size(0), image.size(1), grid.size(1)}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "iconreg_sample_forward",
                             [&] { forward_kernel<scalar_t>(image, grid, out); });
  return out;
}

std::vector<torch::Tensor> sample_backward(torch::Tensor image, torch::Tensor grid, torch::Tensor grad_out,
                                           bool image_gradient, bool grid_gradient) {
  auto grad_image = image_gradient
      ? torch::zeros({image.size(0), image.size(1), image.size(2), image.size(3), image.size(4)}, image.options())
      : torch::empty({0}, image.options());
  auto grad_grid = grid_gradient ? torch::empty_like(grid) : torch::empty({0}, grid.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "iconreg_sample_backward",
                             [&] { backward_kernel<scalar_t>(image, grid, grad_out, grad_image, grad_grid); });
  return {grad_image, grad_grid};
}

// The GIL is released while a kernel runs, as for PyTorch's own operators (the QA statistics sample in two Python
// threads side by side).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_forward", &sample_forward, py::call_guard<py::gil_scoped_release>());
  m.def("sample_backward", &sample_backward, py::call_guard<py::gil_scoped_release>());
}
"""


@dataclass
class NativeSamplerStatus:
    """Whether the compiled sampler is in use, and why not when it is not."""

    mode: str  # the ICONREG_NATIVE_SAMPLER setting: "auto", "1" or "0"
    available: bool
    reason: str

    def to_dict(self) -> dict:
        return {"mode": self.mode, "available": self.available, "reason": self.reason}


_lock = threading.Lock()
_module = None
_failure: Optional[str] = None
_requested = False
_looked_in_cache = False  # a cached build is looked for once per process

#: compiler flags of the build (part of the cache key)
_FLAGS = ("-O3", "-fopenmp")
#: a build lock older than this is left over from a killed build and is removed (a build takes about 30 s)
_STALE_LOCK_SECONDS = 600


def _mode() -> str:
    value = os.environ.get(_ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "0"
    if value in ("1", "on", "true", "yes"):
        return "1"
    if value not in ("", "auto"):
        _LOG.warning("%s=%r is not 0, 1 or auto; using auto", _ENV, value)
    return "auto"


def _name() -> str:
    """The extension's module name, keyed by everything that makes a build incompatible: the source, the flags,
    the PyTorch and Python versions and the machine (one cache folder can serve several environments)."""
    key = "\n".join([_SOURCE, " ".join(_FLAGS), torch.__version__, sys.version, platform.machine()])
    return f"iconreg_native_sampler_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build_directory() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else PyTorch's default extension folder, then the module's own folder."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / _name()


def _library_path() -> Path:
    return _build_directory() / f"{_name()}{'.pyd' if os.name == 'nt' else '.so'}"


def _load_cached():
    """The built library imported directly (no compiler, no build lock), or None when there is none or it does
    not load."""
    path = _library_path()
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(_name(), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # a damaged or foreign build: treated as absent (enable() builds it again)
        _LOG.info("cached compiled sampler %s did not load (%s)", path, error)
        return None
    return module


def _find_ninja() -> bool:
    """Whether ``ninja`` (which PyTorch's extension builder runs) is on the PATH; the ``ninja`` wheel that
    ``pip install ninja`` (the ``native`` extra) puts beside this interpreter is added to the PATH when it is not."""
    if shutil.which("ninja"):
        return True
    beside = Path(sys.executable).parent
    if (beside / "ninja").exists() or (beside / "ninja.exe").exists():
        os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


def _build():
    """Compile the kernel into its own folder and load it; remember why when that is impossible."""
    global _module, _failure
    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool, found in ((compiler, shutil.which(compiler) is not None), ("ninja", _find_ninja()))
               if not found]
    if missing:
        _failure = f"{' and '.join(missing)} not found"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            directory = _build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            lock = directory / "lock"
            # PyTorch waits on this lock without a time limit: one left by a killed build would hang every run
            if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
                lock.unlink(missing_ok=True)
            _module = load_inline(_name(), cpp_sources=_SOURCE, extra_cflags=list(_FLAGS),
                                  build_directory=str(directory), verbose=False)
        except Exception as error:  # any build or load failure: fall back to grid_sample, say why once
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            _failure = f"the kernel did not build ({type(error).__name__}{': ' + first_line if first_line else ''})"
    if _failure:
        _LOG.warning("compiled sampler unavailable, sampling with grid_sample: %s", _failure)


def enable() -> NativeSamplerStatus:
    """Build the kernel now, or load its cached build (unless ``ICONREG_NATIVE_SAMPLER=0``), so that every later
    eligible sampling uses it.

    Long jobs call this once at their start (training: the compile, about 30 s the first time on a machine, is
    then paid before the first step, and is cached for every later run); ``scripts/setup.sh`` calls it once."""
    global _requested
    _requested = True
    _module_or_none()
    return status()


def _module_or_none():
    global _module, _looked_in_cache
    if _module is not None or _failure is not None:
        return _module
    mode = _mode()
    if mode == "0":
        return None
    with _lock:
        if _module is None and not _looked_in_cache:
            _looked_in_cache = True
            _module = _load_cached()
        if _module is None and _failure is None and (mode == "1" or _requested):
            _build()
    return _module


def status() -> NativeSamplerStatus:
    """The setting, whether the kernel is loaded, and the reason when it is not."""
    mode = _mode()
    if _module is not None and mode != "0":
        return NativeSamplerStatus(mode, True, "")
    if mode == "0":
        reason = f"{_ENV}=0"
    elif _failure:
        reason = _failure
    else:
        reason = "not built yet (scripts/setup.sh and iconreg train build it; or ICONREG_NATIVE_SAMPLER=1)"
    return NativeSamplerStatus(mode, False, reason)


def eligible(image: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> bool:
    """Whether :func:`grid_sample_border` computes this ``grid_sample`` call (else use ``grid_sample``)."""
    return (mode == "bilinear" and padding == "border" and image.dim() == 5 and grid.dim() == 5
            and image.device.type == "cpu" and grid.device.type == "cpu"
            and image.dtype in (torch.float32, torch.float64) and grid.dtype == image.dtype
            and image.shape[0] == grid.shape[0] and grid.shape[-1] == 3 and min(image.shape[2:]) >= 2
            and image.numel() > 0 and grid.numel() > 0
            and _mode() != "0" and _module_or_none() is not None)


class _GridSampleBorder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        batch, channels = image.shape[:2]
        if not image[0].is_contiguous():  # the kernel steps through each batch element densely; any batch stride
            image = image.contiguous()
        points = grid.reshape(batch, -1, 3).contiguous()
        out = _module.sample_forward(image, points)
        ctx.save_for_backward(image, points)
        ctx.grid_shape = grid.shape
        return out.reshape(batch, channels, *grid.shape[1:4])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        image, points = ctx.saved_tensors
        want_image, want_grid = ctx.needs_input_grad
        grad_image, grad_grid = _module.sample_backward(
            image, points, grad_out.reshape(image.shape[0], image.shape[1], -1).contiguous(), want_image,
            want_grid)
        return (grad_image if want_image else None,
                grad_grid.reshape(ctx.grid_shape) if want_grid else None)


def grid_sample_border(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)`` for 3-D CPU
    tensors that :func:`eligible` accepts: ``image`` ``[N, C, D, H, W]``, ``grid`` ``[N, D', H', W', 3]`` (x, y, z in
    [−1, 1]) → ``[N, C, D', H', W']``."""
    return _GridSampleBorder.apply(image, grid)
