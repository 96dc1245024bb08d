"""A compiled trilinear sampler for the CPU: ``grid_sample``'s values and gradients for the cases the package
samples, about twice as fast.

``sample_at`` (``core/coordinates.py``) samples maps and images with ``F.grid_sample(mode="bilinear",
padding_mode="border" or "zeros", align_corners=True)``. PyTorch's 3-D CPU kernel for it is scalar code that
bounds-checks every corner; it was about a third of a training step on a CPU. This module compiles (with
``torch.utils.cpp_extension.load_inline``, into its own folder under ``$TORCH_EXTENSIONS_DIR`` or PyTorch's
default ``~/.cache/torch_extensions``, named by a hash of the source, the flags and the PyTorch and Python
versions) a kernel for exactly those cases — 3-D, trilinear, border or zeros padding, ``align_corners=True``,
float32 or float64, CPU, spatial sizes ≥ 2 — with its own backward (image and point gradients). It reads
``sample_at``'s unit-cube coordinates ``[B, 3, *T]`` directly (no grid copy) and forms ``grid_sample``'s grid value
``g = 2c − 1`` from each with the same arithmetic as ``sample_at``'s tensors (``grid_sample_grid``), then follows
``grid_sample``: the same unnormalisation ``((g + 1) / 2)(n − 1)``, the same cell for a point on a cell face, no
gradient through a clamped (border) coordinate, none at all for a NaN coordinate or (zeros) a point whose cell lies
wholly outside. Values and gradients agree to float rounding (the corner weights are formed in another order). The
forward and the backward split the points over the threads; with an image gradient each thread adds to its own copy
of it, summed at the end, so threads never write to the same memory.

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

// One axis of one point: grid value g in [-1, 1] (align_corners=True) on an axis of n >= 2 voxels, as PyTorch:
// x = ((g + 1) / 2) * (n - 1), the cell [i, i + 1] with i = floor(x), the fraction f = x - i, and d x / d g.
// Border padding: x clipped to [0, n - 1], the point gradient only where the unclipped x is strictly inside; the
// cell moves to n - 2 at the last voxel (weight f = 1 there: the same value and image gradient as PyTorch's
// out-of-bounds corner of weight 0); a NaN becomes n - 1. Zeros padding: voxels outside the image count as 0
// (lo / hi: whether the cell's two voxels are inside); a point with x outside [-1, n) (also NaN, +-inf) reaches no
// voxel (returns false).
template <typename T>
struct Axis { int64_t i; T f, mult; bool lo, hi; };

template <typename T, bool ZEROS>
static inline bool locate(T g, int64_t n, Axis<T>& a) {
  const T limit = static_cast<T>(n - 1);
  T x = ((g + 1) / 2) * limit;
  if (!ZEROS) {
    a.mult = (x > T(0) && x < limit) ? limit / 2 : T(0);
    x = std::min(limit, std::max(x, T(0)));
    a.i = std::min<int64_t>(static_cast<int64_t>(x), n - 2);
    a.f = x - static_cast<T>(a.i);
    a.lo = a.hi = true;
    return true;
  }
  a.mult = limit / 2;
  if (!(x >= T(-1) && x < static_cast<T>(n))) {
    a.i = 0; a.f = T(0); a.lo = a.hi = false;
    return false;
  }
  // floor by truncation and a correction (x >= -1 here): without SSE4.1 (baseline x86-64) std::floor is a library
  // call, and the zeros-padding forward took twice as long as the border one
  int64_t lower = static_cast<int64_t>(x);
  lower -= static_cast<T>(lower) > x;
  a.i = lower;
  a.f = x - static_cast<T>(lower);
  a.lo = a.i >= 0;
  a.hi = a.i + 1 <= n - 1;
  return true;
}

// Corner (z, y, x) of a cell has index 4z + 2y + x. Whether it lies inside the image:
template <typename T>
static inline bool corner_inside(int corner, const Axis<T>& ax, const Axis<T>& ay, const Axis<T>& az) {
  return ((corner >> 2) ? az.hi : az.lo) && (((corner >> 1) & 1) ? ay.hi : ay.lo) && ((corner & 1) ? ax.hi : ax.lo);
}

// The trilinear weights of the eight corners.
template <typename T>
static inline void corner_weights(const Axis<T>& ax, const Axis<T>& ay, const Axis<T>& az, T* w) {
  const T fx = ax.f, fy = ay.f, fz = az.f, gx = 1 - fx, gy = 1 - fy, gz = 1 - fz;
  w[0] = gz * gy * gx; w[1] = gz * gy * fx; w[2] = gz * fy * gx; w[3] = gz * fy * fx;
  w[4] = fz * gy * gx; w[5] = fz * gy * fx; w[6] = fz * fy * gx; w[7] = fz * fy * fx;
}

// The eight corner values of one channel (0 for a corner outside the image).
template <typename T>
static inline void corners(const T* q, int64_t sD, int64_t W, const Axis<T>& ax, const Axis<T>& ay,
                           const Axis<T>& az, bool all_inside, T* a) {
  if (all_inside) {
    a[0] = q[0]; a[1] = q[1]; a[2] = q[W]; a[3] = q[W + 1];
    a[4] = q[sD]; a[5] = q[sD + 1]; a[6] = q[sD + W]; a[7] = q[sD + W + 1];
    return;
  }
  for (int corner = 0; corner < 8; ++corner)
    a[corner] = corner_inside(corner, ax, ay, az) ? q[(corner >> 2) * sD + ((corner >> 1) & 1) * W + (corner & 1)] : T(0);
}

// image [N, C, D, H, W] (each batch element contiguous; the batch stride may be 0); coordinates [N, 3, P]: unit-cube
// (z, y, x), contiguous along P (any batch and channel strides). Each coordinate c becomes grid_sample's grid value
// g = 2c - 1 (c * 2 is exact, so this rounds as sample_at's tensor arithmetic does).
template <typename T>
struct Points {
  const T* base; int64_t sN, sC;
  inline void grid(int64_t n, int64_t p, T& gx, T& gy, T& gz) const {
    const T* q = base + n * sN + p;
    gz = q[0] * T(2) - T(1); gy = q[sC] * T(2) - T(1); gx = q[2 * sC] * T(2) - T(1);
  }
};

// The derivatives of the trilinear value of one channel (corner values a) along x, y, z of the cell.
template <typename T>
static inline void cell_derivatives(const T* a, T fx, T fy, T fz, T& dx, T& dy, T& dz) {
  const T gx = 1 - fx, gy = 1 - fy, gz = 1 - fz;
  dx = gz * (gy * (a[1] - a[0]) + fy * (a[3] - a[2])) + fz * (gy * (a[5] - a[4]) + fy * (a[7] - a[6]));
  dy = gz * (gx * (a[2] - a[0]) + fx * (a[3] - a[1])) + fz * (gx * (a[6] - a[4]) + fx * (a[7] - a[5]));
  dz = gy * (gx * (a[4] - a[0]) + fx * (a[5] - a[1])) + fy * (gx * (a[6] - a[2]) + fx * (a[7] - a[3]));
}

// out [N, C, P]; with DERIV also each channel's derivative with respect to the point's unit-cube coordinates
// (z, y, x), deriv [N, C, 3, P] (what the backward would give for an output gradient of 1): the backward of a
// sampling whose image needs no gradient is then one product per point.
template <typename T, bool ZEROS, bool DERIV>
static void forward_kernel(const torch::Tensor& image, const Points<T>& pts, int64_t P, torch::Tensor& out,
                           T* deriv) {
  const int64_t N = image.size(0), C = image.size(1), D = image.size(2), H = image.size(3), W = image.size(4);
  const int64_t sN = image.stride(0), sC = D * H * W, sD = H * W;
  const T* I = image.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, N * P, 4096, [&](int64_t begin, int64_t end) {
    T a[8];
    int64_t n = begin / P, p = begin - n * P;  // advanced point by point (no division per point)
    for (int64_t k = begin; k < end; ++k, ++p) {
      if (p == P) { p = 0; ++n; }
      T g[3];
      pts.grid(n, p, g[0], g[1], g[2]);
      T* o = O + n * C * P + p;
      T* d = DERIV ? deriv + n * C * 3 * P + p : nullptr;
      Axis<T> ax, ay, az;
      const bool reaches = locate<T, ZEROS>(g[0], W, ax) & locate<T, ZEROS>(g[1], H, ay) &
                           locate<T, ZEROS>(g[2], D, az);
      if (!reaches) {
        for (int64_t c = 0; c < C; ++c, o += P) *o = T(0);
        if (DERIV) for (int64_t c = 0; c < 3 * C; ++c) d[c * P] = T(0);
        continue;
      }
      // as the backward: a NaN coordinate (border padding: the value at the last voxel) has no point gradient
      const bool no_gradient = DERIV && (std::isnan(g[0]) || std::isnan(g[1]) || std::isnan(g[2]));
      const bool all_inside = ax.lo && ax.hi && ay.lo && ay.hi && az.lo && az.hi;
      T w[8];
      corner_weights(ax, ay, az, w);
      const T* q = I + n * sN + az.i * sD + ay.i * W + ax.i;  // read only at corners inside the image
      for (int64_t c = 0; c < C; ++c, q += sC, o += P) {
        corners(q, sD, W, ax, ay, az, all_inside, a);
        *o = w[0] * a[0] + w[1] * a[1] + w[2] * a[2] + w[3] * a[3] +
             w[4] * a[4] + w[5] * a[5] + w[6] * a[6] + w[7] * a[7];
        if (DERIV) {  // d/dc = 2 d/dg, channels (z, y, x)
          T dx, dy, dz;
          cell_derivatives(a, ax.f, ay.f, az.f, dx, dy, dz);
          T* dc = d + c * 3 * P;
          dc[0] = no_gradient ? T(0) : T(2) * (dz * az.mult);
          dc[P] = no_gradient ? T(0) : T(2) * (dy * ay.mult);
          dc[2 * P] = no_gradient ? T(0) : T(2) * (dx * ax.mult);
        }
      }
    }
  });
}

// GI: the image gradient [N, C, D, H, W] this thread adds to; GG: the coordinates' gradient [N, 3, P] (contiguous)
template <typename T, bool ZEROS>
static void backward_points(const T* I, const Points<T>& pts, const T* GO, T* GI, T* GG, int64_t n, int64_t p_begin,
                            int64_t p_end, int64_t P, int64_t C, int64_t D, int64_t H, int64_t W, int64_t sN) {
  const int64_t sC = D * H * W, sD = H * W;
  T a[8];
  for (int64_t p = p_begin; p < p_end; ++p) {
    T g[3];
    pts.grid(n, p, g[0], g[1], g[2]);
    T* gg = GG ? GG + n * 3 * P + p : nullptr;
    Axis<T> ax, ay, az;
    const bool reaches = locate<T, ZEROS>(g[0], W, ax) & locate<T, ZEROS>(g[1], H, ay) &
                         locate<T, ZEROS>(g[2], D, az);
    if (!reaches || std::isnan(g[0]) || std::isnan(g[1]) || std::isnan(g[2])) {
      // as grid_sample's backward: such a point reaches no voxel (no image gradient, a zero point gradient)
      if (gg) { gg[0] = gg[P] = gg[2 * P] = T(0); }
      continue;
    }
    const bool all_inside = ax.lo && ax.hi && ay.lo && ay.hi && az.lo && az.hi;
    const T fx = ax.f, fy = ay.f, fz = az.f;
    T w[8];  // once per point, for every channel's image gradient
    corner_weights(ax, ay, az, w);
    const int64_t offset = az.i * sD + ay.i * W + ax.i;
    const T* q = I + n * sN + offset;
    const T* go = GO + n * C * P + p;
    T dx = 0, dy = 0, dz = 0;
    for (int64_t c = 0; c < C; ++c, q += sC, go += P) {
      const T s = *go;
      if (GG) {
        corners(q, sD, W, ax, ay, az, all_inside, a);
        T cx, cy, cz;
        cell_derivatives(a, fx, fy, fz, cx, cy, cz);
        dx += s * cx; dy += s * cy; dz += s * cz;
      }
      if (GI) {
        T* r = GI + (n * C + c) * sC + offset;
        if (all_inside) {
          r[0] += s * w[0]; r[1] += s * w[1]; r[W] += s * w[2]; r[W + 1] += s * w[3];
          r[sD] += s * w[4]; r[sD + 1] += s * w[5]; r[sD + W] += s * w[6]; r[sD + W + 1] += s * w[7];
        } else {
          for (int corner = 0; corner < 8; ++corner)
            if (corner_inside(corner, ax, ay, az))
              r[(corner >> 2) * sD + ((corner >> 1) & 1) * W + (corner & 1)] += s * w[corner];
        }
      }
    }
    if (gg) {  // d/dc = 2 d/dg, channels (z, y, x)
      gg[0] = T(2) * (dz * az.mult); gg[P] = T(2) * (dy * ay.mult); gg[2 * P] = T(2) * (dx * ax.mult);
    }
  }
}

template <typename T, bool ZEROS>
static void backward_kernel(const torch::Tensor& image, const Points<T>& pts, int64_t P, const torch::Tensor& grad_out,
                            torch::Tensor& grad_image, torch::Tensor& grad_coords) {
  const int64_t N = image.size(0), C = image.size(1), D = image.size(2), H = image.size(3), W = image.size(4);
  const int64_t sN = image.stride(0);
  const T* I = image.data_ptr<T>();
  const T* GO = grad_out.data_ptr<T>();
  T* GI = grad_image.numel() ? grad_image.data_ptr<T>() : nullptr;
  T* GG = grad_coords.numel() ? grad_coords.data_ptr<T>() : nullptr;
  const int64_t image_size = N * C * D * H * W, copies = GI ? grad_image.size(0) : 1;
  // The points are split over the threads; with an image gradient each thread adds to its own copy of it
  // (grad_image is [threads, N, C, D, H, W], summed by the caller), so no two threads write to the same memory.
  at::parallel_for(0, N * P, 4096, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::in_parallel_region() ? at::get_thread_num() : 0;
    TORCH_CHECK(!GI || thread < copies, "iconreg sampler: thread ", thread, " of ", copies);
    T* mine = GI ? GI + thread * image_size : nullptr;
    while (begin < end) {
      const int64_t n = begin / P, stop = std::min(end, (n + 1) * P);
      backward_points<T, ZEROS>(I, pts, GO, mine, GG, n, begin - n * P, stop - n * P, P, C, D, H, W, sN);
      begin = stop;
    }
  });
}

template <typename T>
static Points<T> points_of(const torch::Tensor& coords) {
  return {coords.data_ptr<T>(), coords.stride(0), coords.stride(1)};
}

// image [N, C, D, H, W]; coords [N, 3, P] (stride 1 along P) -> [N, C, P]
torch::Tensor sample_forward(torch::Tensor image, torch::Tensor coords, bool zeros) {
  const int64_t P = coords.size(2);
  auto out = torch::empty({image.size(0), image.size(1), P}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "iconreg_sample_forward", [&] {
    const auto pts = points_of<scalar_t>(coords);
    if (zeros) forward_kernel<scalar_t, true, false>(image, pts, P, out, nullptr);
    else forward_kernel<scalar_t, false, false>(image, pts, P, out, nullptr);
  });
  return out;
}

// -> the values [N, C, P] and their derivatives with respect to the coordinates [N, C, 3, P]
std::vector<torch::Tensor> sample_forward_with_derivatives(torch::Tensor image, torch::Tensor coords, bool zeros) {
  const int64_t P = coords.size(2);
  auto out = torch::empty({image.size(0), image.size(1), P}, image.options());
  auto deriv = torch::empty({image.size(0), image.size(1), 3, P}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "iconreg_sample_forward_with_derivatives", [&] {
    const auto pts = points_of<scalar_t>(coords);
    if (zeros) forward_kernel<scalar_t, true, true>(image, pts, P, out, deriv.data_ptr<scalar_t>());
    else forward_kernel<scalar_t, false, true>(image, pts, P, out, deriv.data_ptr<scalar_t>());
  });
  return {out, deriv};
}

// -> the image gradient [N, C, D, H, W] (or empty) and the coordinates' gradient [N, 3, P] (or empty)
std::vector<torch::Tensor> sample_backward(torch::Tensor image, torch::Tensor coords, torch::Tensor grad_out,
                                           bool image_gradient, bool coords_gradient, bool zeros) {
  const int64_t P = coords.size(2), N = image.size(0);
  // as many gradient copies as at::parallel_for below uses threads (one when already inside a parallel region)
  const int64_t threads = at::in_parallel_region()
      ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N * P + 4095) / 4096));
  auto grad_image = image_gradient
      ? torch::zeros({threads, N, image.size(1), image.size(2), image.size(3), image.size(4)}, image.options())
      : torch::empty({0}, image.options());
  auto grad_coords = coords_gradient ? torch::empty({N, 3, P}, coords.options()) : torch::empty({0}, coords.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "iconreg_sample_backward", [&] {
    const auto pts = points_of<scalar_t>(coords);
    if (zeros) backward_kernel<scalar_t, true>(image, pts, P, grad_out, grad_image, grad_coords);
    else backward_kernel<scalar_t, false>(image, pts, P, grad_out, grad_image, grad_coords);
  });
  if (image_gradient) grad_image = threads == 1 ? grad_image.select(0, 0) : grad_image.sum(0);
  return {grad_image, grad_coords};
}

// The GIL is released while a kernel runs, as for PyTorch's own operators (the QA statistics sample in two Python
// threads side by side).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_forward", &sample_forward, py::call_guard<py::gil_scoped_release>());
  m.def("sample_forward_with_derivatives", &sample_forward_with_derivatives, py::call_guard<py::gil_scoped_release>());
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
_warned_values: set[str] = set()  # unknown ICONREG_NATIVE_SAMPLER values already warned about

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
    if value not in ("", "auto") and value not in _warned_values:  # sample_at reads it on every call: warn once
        _warned_values.add(value)
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


def eligible(image: torch.Tensor, coordinates: torch.Tensor, mode: str, padding: str) -> bool:
    """Whether :func:`sample` computes this ``sample_at`` call (else ``sample_at`` uses ``grid_sample``)."""
    return (mode == "bilinear" and padding in _PADDINGS and image.dim() == 5 and coordinates.dim() == 5
            and coordinates.shape[1] == 3 and image.device.type == "cpu" and coordinates.device.type == "cpu"
            and image.dtype in (torch.float32, torch.float64) and coordinates.dtype == image.dtype
            and (image.shape[0] == coordinates.shape[0] or 1 in (image.shape[0], coordinates.shape[0]))
            and min(image.shape[2:]) >= 2 and image.numel() > 0 and coordinates.numel() > 0
            and _mode() != "0" and _module_or_none() is not None)


_PADDINGS = ("border", "zeros")


#: A sampling whose image needs no gradient but whose points do, with at most this many channels, computes the
#: derivatives with respect to the points in its forward (the backward is then one product per point): for one
#: channel at 80×96×80 the forward grew by about a fifth and the backward became ~10× cheaper.
DERIVATIVES_IN_FORWARD_CHANNELS = 3


class _SampleTrilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, coordinates: torch.Tensor, zeros: bool, derivatives: bool) -> torch.Tensor:
        batch, channels = image.shape[:2]
        if not image[0].is_contiguous():  # the kernel steps through each batch element densely; any batch stride
            image = image.contiguous()
        points = coordinates.reshape(batch, 3, -1)
        if points.stride(2) != 1:
            points = points.contiguous()
        if derivatives:
            out, ctx.derivatives = _module.sample_forward_with_derivatives(image, points, zeros)
        else:
            out = _module.sample_forward(image, points, zeros)
            ctx.save_for_backward(image, points)
            ctx.derivatives = None
        ctx.shape, ctx.zeros = coordinates.shape, zeros
        return out.reshape(batch, channels, *coordinates.shape[2:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        want_image, want_points = ctx.needs_input_grad[:2]
        if ctx.derivatives is not None:  # [N, C, 3, P]: the image needs no gradient
            grad = grad_out.reshape(*ctx.derivatives.shape[:2], 1, -1)
            grad_points = (grad * ctx.derivatives).sum(dim=1) if want_points else None
            return None, grad_points.reshape(ctx.shape) if want_points else None, None, None
        image, points = ctx.saved_tensors
        grad_image, grad_points = _module.sample_backward(
            image, points, grad_out.reshape(image.shape[0], image.shape[1], -1).contiguous(), want_image,
            want_points, ctx.zeros)
        return (grad_image if want_image else None,
                grad_points.reshape(ctx.shape) if want_points else None, None, None)


def sample(image: torch.Tensor, coordinates: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``sample_at(image, coordinates, padding=padding)`` (trilinear) through the kernel, for inputs that
    :func:`eligible` accepts: ``image`` ``[N, C, D, H, W]``, ``coordinates`` ``[N, 3, *T]`` in the unit-cube map
    convention (``core/coordinates.py``), a batch of 1 on either side broadcast → ``[N, C, *T]``. The same numbers as
    ``grid_sample`` on the grid ``sample_at`` builds from ``coordinates``."""
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    batch = max(image.shape[0], coordinates.shape[0])
    image = image.expand(batch, *image.shape[1:])
    coordinates = coordinates.expand(batch, *coordinates.shape[1:])
    derivatives = (torch.is_grad_enabled() and coordinates.requires_grad and not image.requires_grad
                   and image.shape[1] <= DERIVATIVES_IN_FORWARD_CHANNELS)
    return _SampleTrilinear.apply(image, coordinates, padding == "zeros", derivatives)
