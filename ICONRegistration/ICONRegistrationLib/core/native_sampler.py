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
of it, summed at the end, so threads never write to the same memory (a batch that divides evenly over the threads
is split by batch elements instead, each writing its own part of one gradient: no copies, one thread's bits). Four
consecutive points in one cell (an aligned quad: GradICON's point and its three finite-difference copies, side by
side) add their image-gradient products to each corner as one sum, and on AVX-512 a group of four such quads reads
each corner pair with one two-float load instead of gathers: in a float32 uniGradICON-width training step at
80×96×80 the penalty's samplings (4.9 M points) went from 92 to 56 ms (backward) and from 46 to 39 ms (forward)
each, the step from 4.80 to 4.60 s. Sparse points take the backward in two passes
(:data:`SEPARATE_PASSES_POINTS_PER_VOXEL`).

The same library carries array kernels, used where :func:`kernels_eligible` holds: the per-axis step of
``losses.gaussian_blur`` on a CPU (:func:`blur_axis`; LNCC's moments and instance optimisation's smoothing are such
blurs), and for the UNet's channels-last last level the per-channel sums and affine maps of its batch norm
(:func:`channel_sums`, :func:`channel_affine`) and its upsampling-and-addition (:func:`upsample_add`,
:func:`upsample_adjoint`), for ``register()``'s QA stage the Jacobian determinant of a displacement
(:func:`displacement_jacobian`) and the displacement in mm, IC error and outside mask (:func:`qa_fields`), for its
export the warped moving image (:func:`warp_image`), for training's label loss the overlaps and warped volumes of
linearly warped label maps and their gradient (:func:`warped_label_sums`, :func:`warped_label_gradient`) and its
fold penalty with its gradient (:func:`fold_sum`, :func:`fold_gradient`), for the
intensity normalisation its clamp and scale (:func:`clamp_scale`), and for ``pipeline.percentile`` the band of an
exact percentile (:func:`band_of`).

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
from typing import Optional, Sequence

import torch

_LOG = logging.getLogger(__name__)

_ENV = "ICONREG_NATIVE_SAMPLER"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

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

// One point's located cell for the backward: whether it gets a gradient at all (reaches a voxel, no NaN
// coordinate), whether all eight corners lie inside the image, its corner weights and its offset in one channel.
template <typename T>
struct Located { Axis<T> ax, ay, az; bool live, all_inside; T w[8]; int64_t offset; };

template <typename T, bool ZEROS>
static inline void locate_point(const Points<T>& pts, int64_t n, int64_t p, int64_t D, int64_t H, int64_t W,
                                Located<T>& l) {
  T g[3];
  pts.grid(n, p, g[0], g[1], g[2]);
  const bool reaches = locate<T, ZEROS>(g[0], W, l.ax) & locate<T, ZEROS>(g[1], H, l.ay) &
                       locate<T, ZEROS>(g[2], D, l.az);
  // as grid_sample's backward: a point that reaches no voxel or has a NaN coordinate gets no gradient
  l.live = reaches && !std::isnan(g[0]) && !std::isnan(g[1]) && !std::isnan(g[2]);
  if (!l.live) return;
  l.all_inside = l.ax.lo && l.ax.hi && l.ay.lo && l.ay.hi && l.az.lo && l.az.hi;
  corner_weights(l.ax, l.ay, l.az, l.w);
  l.offset = l.az.i * H * W + l.ay.i * W + l.ax.i;
}

// The point gradient of one located point (GG [N, 3, P] at n, p; zero for a point that is not live) and, with GI,
// its image-gradient scatter-adds.
template <typename T>
static inline void point_backward(const T* I, const T* GO, T* GI, T* GG, const Located<T>& l, int64_t n,
                                  int64_t p, int64_t P, int64_t C, int64_t D, int64_t H, int64_t W, int64_t sN) {
  const int64_t sC = D * H * W, sD = H * W;
  T* gg = GG ? GG + n * 3 * P + p : nullptr;
  if (!l.live) {
    if (gg) { gg[0] = gg[P] = gg[2 * P] = T(0); }
    return;
  }
  const T* q = I + n * sN + l.offset;
  const T* go = GO + n * C * P + p;
  T a[8];
  T dx = 0, dy = 0, dz = 0;
  for (int64_t c = 0; c < C; ++c, q += sC, go += P) {
    const T s = *go;
    if (GG) {
      corners(q, sD, W, l.ax, l.ay, l.az, l.all_inside, a);
      T cx, cy, cz;
      cell_derivatives(a, l.ax.f, l.ay.f, l.az.f, cx, cy, cz);
      dx += s * cx; dy += s * cy; dz += s * cz;
    }
    if (GI) {
      T* r = GI + (n * C + c) * sC + l.offset;
      const T* w = l.w;
      if (l.all_inside) {
        r[0] += s * w[0]; r[1] += s * w[1]; r[W] += s * w[2]; r[W + 1] += s * w[3];
        r[sD] += s * w[4]; r[sD + 1] += s * w[5]; r[sD + W] += s * w[6]; r[sD + W + 1] += s * w[7];
      } else {
        for (int corner = 0; corner < 8; ++corner)
          if (corner_inside(corner, l.ax, l.ay, l.az))
            r[(corner >> 2) * sD + ((corner >> 1) & 1) * W + (corner & 1)] += s * w[corner];
      }
    }
  }
  if (gg) {  // d/dc = 2 d/dg, channels (z, y, x)
    gg[0] = T(2) * (dz * l.az.mult); gg[P] = T(2) * (dy * l.ay.mult); gg[2 * P] = T(2) * (dx * l.ax.mult);
  }
}

// GI: the image gradient [N, C, D, H, W] this thread adds to; GG: the coordinates' gradient [N, 3, P] (contiguous).
// With GI, an aligned quad of points (p = 4k … 4k + 3 of one batch element) that are live, lie in one cell and have
// every corner inside the image — GradICON's finite-difference copies of a point, side by side, usually do — adds
// its four products to each corner as one sum, (s0 w0 + s1 w1) + (s2 w2 + s3 w3): a quarter of the scatter-adds,
// the same bits as the AVX-512 path, whose 128-bit lanes are these quads.
template <typename T, bool ZEROS>
static void backward_points(const T* I, const Points<T>& pts, const T* GO, T* GI, T* GG, int64_t n, int64_t p_begin,
                            int64_t p_end, int64_t P, int64_t C, int64_t D, int64_t H, int64_t W, int64_t sN) {
  const int64_t sC = D * H * W, sD = H * W;
  Located<T> l[4];
  for (int64_t p = p_begin; p < p_end;) {
    if (!GI || p % 4 != 0 || p + 4 > p_end) {
      locate_point<T, ZEROS>(pts, n, p, D, H, W, l[0]);
      point_backward(I, GO, GI, GG, l[0], n, p, P, C, D, H, W, sN);
      ++p;
      continue;
    }
    bool quad = true;
    for (int i = 0; i < 4; ++i) {
      locate_point<T, ZEROS>(pts, n, p + i, D, H, W, l[i]);
      quad = quad && l[i].live && l[i].all_inside && l[i].offset == l[0].offset;
    }
    if (!quad) {
      for (int i = 0; i < 4; ++i) point_backward(I, GO, GI, GG, l[i], n, p + i, P, C, D, H, W, sN);
      p += 4;
      continue;
    }
    for (int i = 0; i < 4; ++i) point_backward<T>(I, GO, nullptr, GG, l[i], n, p + i, P, C, D, H, W, sN);
    const T* go = GO + n * C * P + p;
    const int64_t at[8] = {0, 1, W, W + 1, sD, sD + 1, sD + W, sD + W + 1};  // the corners, as corner_weights()
    for (int64_t c = 0; c < C; ++c, go += P) {
      T* r = GI + (n * C + c) * sC + l[0].offset;
      for (int j = 0; j < 8; ++j)
        r[at[j]] += (go[0] * l[0].w[j] + go[1] * l[1].w[j]) + (go[2] * l[2].w[j] + go[3] * l[3].w[j]);
    }
    p += 4;
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
    // one copy: a single thread adds to it (this call's only chunk, or one batch element of sample_backward's
    // batch split, whose thread number counts the outer threads)
    const int64_t thread = copies == 1 ? 0 : at::get_thread_num();
    TORCH_CHECK(!GI || thread < copies, "iconreg sampler: thread ", thread, " of ", copies);
    T* mine = GI ? GI + thread * image_size : nullptr;
    while (begin < end) {
      const int64_t n = begin / P, stop = std::min(end, (n + 1) * P);
      backward_points<T, ZEROS>(I, pts, GO, mine, GG, n, begin - n * P, stop - n * P, P, C, D, H, W, sN);
      begin = stop;
    }
  });
}


// ---- AVX-512 path (float32): 16 points at a time, the same arithmetic as the scalar code lane by lane (no fused
// multiply-adds, the same order of operations), so both give the same bits. Compiled for AVX-512 through target
// attributes and chosen at run time when the CPU has it (the rest of the module stays baseline x86-64).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ICONREG_VECTOR 1
#define ICONREG_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))

static bool vector_enabled = true;  // set_vectorized() (tests compare both paths)

static bool use_vector() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return supported && vector_enabled;
}

struct AxisV { __m512i i0, i1; __m512 f, mult; __mmask16 m0, m1, reach; };

// locate() for 16 grid values: clamped voxel indices i0, i1 of the cell, whether each is inside (m0, m1), the
// fraction and d x / d g (mult); reach: the zeros padding's "reaches a voxel" (all lanes for border padding).
template <bool ZEROS>
ICONREG_AVX512 static inline void locate_v(__m512 g, int n, AxisV& a) {
  const __m512 limit = _mm512_set1_ps(static_cast<float>(n - 1));
  const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps();
  __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(g, one), half), limit);  // ((g + 1) / 2) * limit
  if (!ZEROS) {
    const __mmask16 inside = _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, limit, _CMP_LT_OQ);
    a.mult = _mm512_maskz_mov_ps(inside, _mm512_mul_ps(limit, half));
    x = _mm512_min_ps(_mm512_max_ps(zero, x), limit);  // a NaN becomes limit, as std::min(limit, std::max(x, 0))
    const __m512i i = _mm512_min_epi32(_mm512_cvttps_epi32(x), _mm512_set1_epi32(n - 2));
    a.f = _mm512_sub_ps(x, _mm512_cvtepi32_ps(i));
    a.i0 = i;
    a.i1 = _mm512_add_epi32(i, _mm512_set1_epi32(1));
    a.m0 = a.m1 = a.reach = 0xFFFF;
    return;
  }
  a.mult = _mm512_mul_ps(limit, half);
  a.reach = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-1.f), _CMP_GE_OQ) &
            _mm512_cmp_ps_mask(x, _mm512_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
  const __m512 xs = _mm512_mask_blend_ps(a.reach, _mm512_set1_ps(-2.f), x);
  __m512i i = _mm512_cvttps_epi32(xs);
  i = _mm512_mask_sub_epi32(i, _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(i), xs, _CMP_GT_OQ), i,
                            _mm512_set1_epi32(1));  // floor
  a.f = _mm512_sub_ps(xs, _mm512_cvtepi32_ps(i));
  const __m512i next = _mm512_add_epi32(i, _mm512_set1_epi32(1)), last = _mm512_set1_epi32(n - 1);
  const __m512i none = _mm512_setzero_si512();
  a.m0 = a.reach & _mm512_cmpge_epi32_mask(i, none);
  a.m1 = a.reach & _mm512_cmple_epi32_mask(next, last);
  a.i0 = _mm512_min_epi32(_mm512_max_epi32(i, none), last);
  a.i1 = _mm512_min_epi32(_mm512_max_epi32(next, none), last);
}

// The eight corners of 16 cells: offsets into one channel, whether each is inside the image, the weights.
struct CornersV { __m512i off[8]; __mmask16 in[8]; __m512 w[8]; };

ICONREG_AVX512 static inline void corners_v(const AxisV& ax, const AxisV& ay, const AxisV& az, int W, int sD,
                                             CornersV& k) {
  const __m512i vW = _mm512_set1_epi32(W), vD = _mm512_set1_epi32(sD);
  const __m512i z0 = _mm512_mullo_epi32(az.i0, vD), z1 = _mm512_mullo_epi32(az.i1, vD);
  const __m512i y0 = _mm512_mullo_epi32(ay.i0, vW), y1 = _mm512_mullo_epi32(ay.i1, vW);
  const __m512i zy[4] = {_mm512_add_epi32(z0, y0), _mm512_add_epi32(z0, y1), _mm512_add_epi32(z1, y0),
                         _mm512_add_epi32(z1, y1)};
  const __mmask16 mzy[4] = {static_cast<__mmask16>(az.m0 & ay.m0), static_cast<__mmask16>(az.m0 & ay.m1),
                            static_cast<__mmask16>(az.m1 & ay.m0), static_cast<__mmask16>(az.m1 & ay.m1)};
  for (int c = 0; c < 4; ++c) {
    k.off[2 * c] = _mm512_add_epi32(zy[c], ax.i0);
    k.off[2 * c + 1] = _mm512_add_epi32(zy[c], ax.i1);
    k.in[2 * c] = mzy[c] & ax.m0;
    k.in[2 * c + 1] = mzy[c] & ax.m1;
  }
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 fx = ax.f, fy = ay.f, fz = az.f;
  const __m512 gx = _mm512_sub_ps(one, fx), gy = _mm512_sub_ps(one, fy), gz = _mm512_sub_ps(one, fz);
  // as corner_weights(): w[0] = gz * gy * gx, …
  const __m512 zy00 = _mm512_mul_ps(gz, gy), zy01 = _mm512_mul_ps(gz, fy);
  const __m512 zy10 = _mm512_mul_ps(fz, gy), zy11 = _mm512_mul_ps(fz, fy);
  k.w[0] = _mm512_mul_ps(zy00, gx); k.w[1] = _mm512_mul_ps(zy00, fx);
  k.w[2] = _mm512_mul_ps(zy01, gx); k.w[3] = _mm512_mul_ps(zy01, fx);
  k.w[4] = _mm512_mul_ps(zy10, gx); k.w[5] = _mm512_mul_ps(zy10, fx);
  k.w[6] = _mm512_mul_ps(zy11, gx); k.w[7] = _mm512_mul_ps(zy11, fx);
}

// cell_derivatives() for 16 cells
ICONREG_AVX512 static inline void derivatives_v(const __m512* a, __m512 fx, __m512 fy, __m512 fz, __m512& dx,
                                                 __m512& dy, __m512& dz) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 gx = _mm512_sub_ps(one, fx), gy = _mm512_sub_ps(one, fy), gz = _mm512_sub_ps(one, fz);
#define ICONREG_D(p, q) _mm512_sub_ps(p, q)
#define ICONREG_M(p, q) _mm512_mul_ps(p, q)
#define ICONREG_A(p, q) _mm512_add_ps(p, q)
  dx = ICONREG_A(ICONREG_M(gz, ICONREG_A(ICONREG_M(gy, ICONREG_D(a[1], a[0])), ICONREG_M(fy, ICONREG_D(a[3], a[2])))),
                 ICONREG_M(fz, ICONREG_A(ICONREG_M(gy, ICONREG_D(a[5], a[4])), ICONREG_M(fy, ICONREG_D(a[7], a[6])))));
  dy = ICONREG_A(ICONREG_M(gz, ICONREG_A(ICONREG_M(gx, ICONREG_D(a[2], a[0])), ICONREG_M(fx, ICONREG_D(a[3], a[1])))),
                 ICONREG_M(fz, ICONREG_A(ICONREG_M(gx, ICONREG_D(a[6], a[4])), ICONREG_M(fx, ICONREG_D(a[7], a[5])))));
  dz = ICONREG_A(ICONREG_M(gy, ICONREG_A(ICONREG_M(gx, ICONREG_D(a[4], a[0])), ICONREG_M(fx, ICONREG_D(a[5], a[1])))),
                 ICONREG_M(fy, ICONREG_A(ICONREG_M(gx, ICONREG_D(a[6], a[2])), ICONREG_M(fx, ICONREG_D(a[7], a[3])))));
#undef ICONREG_D
#undef ICONREG_M
#undef ICONREG_A
}

// The 16 (or fewer: mask) points from p of batch element n: grid values g = 2c - 1, as Points::grid.
ICONREG_AVX512 static inline void grid_v(const Points<float>& pts, int64_t n, int64_t p, __mmask16 mask, __m512& gx,
                                          __m512& gy, __m512& gz) {
  const float* q = pts.base + n * pts.sN + p;
  const __m512 two = _mm512_set1_ps(2.f), one = _mm512_set1_ps(1.f);
  gz = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, q), two), one);
  gy = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, q + pts.sC), two), one);
  gx = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, q + 2 * pts.sC), two), one);
}

// Group k of 16 points (batch element k / groups, points from 16 (k % groups); mask: the points that exist): their
// grid values and their cells along the three axes.
template <bool ZEROS>
ICONREG_AVX512 static inline void locate_group(const Points<float>& pts, int64_t k, int64_t groups, int64_t P, int D,
                                                int H, int W, int64_t& n, int64_t& p, __mmask16& mask, __m512* g,
                                                AxisV& ax, AxisV& ay, AxisV& az) {
  n = k / groups;
  p = (k - n * groups) * 16;
  mask = P - p >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (P - p)) - 1);
  grid_v(pts, n, p, mask, g[0], g[1], g[2]);
  locate_v<ZEROS>(g[0], W, ax);
  locate_v<ZEROS>(g[1], H, ay);
  locate_v<ZEROS>(g[2], D, az);
}

// Aligned quads of lanes (4q … 4q + 3: one 128-bit lane) whose points are live, lie in one cell and have every
// corner inside the image: the first lane of each such quad. Such a quad's corner values are the same for its four
// points (GradICON's finite-difference copies of a point, side by side, usually form one).
ICONREG_AVX512 static inline __mmask16 quad_leaders(const CornersV& cv, __mmask16 live) {
  unsigned whole = live;
  for (int j = 0; j < 8; ++j) whole &= cv.in[j];
  whole &= _mm512_cmpeq_epi32_mask(cv.off[0], _mm512_shuffle_epi32(cv.off[0], _MM_PERM_AAAA));
  __mmask16 leaders = 0;
  for (int quad = 0; quad < 4; ++quad)
    if (((whole >> (4 * quad)) & 0xF) == 0xF) leaders |= static_cast<__mmask16>(1u << (4 * quad));
  return leaders;
}

//: every lane of a group of 16 in a quad of one cell (quad_leaders() == ALL_QUADS)
static constexpr __mmask16 ALL_QUADS = 0x1111;

// The eight corner values of 16 points in four one-cell quads from one channel (image q; corner 0 of quad k at
// offset first[4 k]): each corner pair (x0, x1) of each quad is one two-float load, broadcast over the quad's lanes —
// 16 loads where eight gathers read 128 values (the gathers are the forward's largest cost).
ICONREG_AVX512 static inline void quad_corners(const float* q, const int32_t* first, int W, int sD, __m512* a) {
  const int rows[4] = {0, W, sD, sD + W};  // corners (2r, 2r + 1): the x pair of row r
  for (int r = 0; r < 4; ++r) {
    __m512 v = _mm512_castps128_ps512(_mm_maskz_loadu_ps(0x3, q + first[0] + rows[r]));
    v = _mm512_insertf32x4(v, _mm_maskz_loadu_ps(0x3, q + first[4] + rows[r]), 1);
    v = _mm512_insertf32x4(v, _mm_maskz_loadu_ps(0x3, q + first[8] + rows[r]), 2);
    v = _mm512_insertf32x4(v, _mm_maskz_loadu_ps(0x3, q + first[12] + rows[r]), 3);
    a[2 * r] = _mm512_permute_ps(v, 0x00);
    a[2 * r + 1] = _mm512_permute_ps(v, 0x55);
  }
}

// Groups begin … end of 16 points (group k: batch element k / groups, points from 16 (k % groups)). A function of its
// own: a lambda would not inherit the target attribute.
template <bool ZEROS, bool DERIV>
ICONREG_AVX512 static void forward_groups(const float* I, const Points<float>& pts, float* O, float* deriv, int64_t C,
                                          int D, int H, int W, int64_t sN, int64_t P, int64_t begin, int64_t end) {
  const int sD = H * W;
  const int64_t sC = static_cast<int64_t>(D) * sD, groups = (P + 15) / 16;
  {
    for (int64_t k = begin; k < end; ++k) {
      int64_t n, p;
      __mmask16 mask;
      __m512 g[3];
      AxisV ax, ay, az;
      locate_group<ZEROS>(pts, k, groups, P, D, H, W, n, p, mask, g, ax, ay, az);
      const __mmask16 reach = ax.reach & ay.reach & az.reach;
      __mmask16 gradient = reach;
      if (DERIV)  // as the backward: no point gradient at a NaN coordinate
        gradient &= _mm512_cmp_ps_mask(g[0], g[0], _CMP_ORD_Q) & _mm512_cmp_ps_mask(g[1], g[1], _CMP_ORD_Q) &
                    _mm512_cmp_ps_mask(g[2], g[2], _CMP_ORD_Q);
      CornersV cv;
      corners_v(ax, ay, az, W, sD, cv);
      alignas(64) int32_t first[16];
      const bool quads = quad_leaders(cv, reach & mask) == ALL_QUADS;
      if (quads) _mm512_store_si512(first, cv.off[0]);
      const float* q = I + n * sN;
      float* o = O + n * C * P + p;
      for (int64_t c = 0; c < C; ++c, q += sC, o += P) {
        __m512 a[8];
        if (quads)
          quad_corners(q, first, W, sD, a);
        else
          for (int j = 0; j < 8; ++j)
            a[j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), cv.in[j] & reach, cv.off[j], q, 4);
        __m512 v = _mm512_mul_ps(cv.w[0], a[0]);
        for (int j = 1; j < 8; ++j) v = _mm512_add_ps(v, _mm512_mul_ps(cv.w[j], a[j]));
        _mm512_mask_storeu_ps(o, mask, _mm512_maskz_mov_ps(reach, v));
        if (DERIV) {
          __m512 dx, dy, dz;
          derivatives_v(a, ax.f, ay.f, az.f, dx, dy, dz);
          const __m512 two = _mm512_set1_ps(2.f);
          float* dc = deriv + (n * C + c) * 3 * P + p;
          _mm512_mask_storeu_ps(dc, mask, _mm512_maskz_mul_ps(gradient, two, _mm512_mul_ps(dz, az.mult)));
          _mm512_mask_storeu_ps(dc + P, mask, _mm512_maskz_mul_ps(gradient, two, _mm512_mul_ps(dy, ay.mult)));
          _mm512_mask_storeu_ps(dc + 2 * P, mask, _mm512_maskz_mul_ps(gradient, two, _mm512_mul_ps(dx, ax.mult)));
        }
      }
    }
  }
}

template <bool ZEROS, bool DERIV>
static void forward_vector(const torch::Tensor& image, const Points<float>& pts, int64_t P, torch::Tensor& out,
                           float* deriv) {
  const int64_t N = image.size(0), C = image.size(1), groups = (P + 15) / 16;
  const float* I = image.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int D = image.size(2), H = image.size(3), W = image.size(4);
  const int64_t sN = image.stride(0);
  at::parallel_for(0, N * groups, 256, [&](int64_t begin, int64_t end) {
    forward_groups<ZEROS, DERIV>(I, pts, O, deriv, C, D, H, W, sN, P, begin, end);
  });
}

// Groups begin … end of 16 points; mine: this thread's image-gradient copy (or null), GG: the point gradient.
template <bool ZEROS>
ICONREG_AVX512 static void backward_groups(const float* I, const Points<float>& pts, const float* GO, float* mine,
                                           float* GG, int64_t C, int D, int H, int W, int64_t sN, int64_t P,
                                           int64_t begin, int64_t end) {
  const int sD = H * W;
  const int64_t sC = static_cast<int64_t>(D) * sD, groups = (P + 15) / 16;
  {
    alignas(64) int32_t offsets[8][16];
    alignas(64) float products[8][16];
    for (int64_t k = begin; k < end; ++k) {
      int64_t n, p;
      __mmask16 mask;
      __m512 g[3];
      AxisV ax, ay, az;
      locate_group<ZEROS>(pts, k, groups, P, D, H, W, n, p, mask, g, ax, ay, az);
      // as grid_sample's backward: a point that reaches no voxel or has a NaN coordinate gets no gradient
      const __mmask16 live = mask & ax.reach & ay.reach & az.reach & _mm512_cmp_ps_mask(g[0], g[0], _CMP_ORD_Q) &
                             _mm512_cmp_ps_mask(g[1], g[1], _CMP_ORD_Q) & _mm512_cmp_ps_mask(g[2], g[2], _CMP_ORD_Q);
      CornersV cv;
      corners_v(ax, ay, az, W, sD, cv);
      const float* q = I + n * sN;
      const float* go = GO + n * C * P + p;
      __m512 dx = _mm512_setzero_ps(), dy = _mm512_setzero_ps(), dz = _mm512_setzero_ps();
      // the first lanes of the quads whose products are summed before one scatter-add (see backward_points)
      const __mmask16 quads = quad_leaders(cv, live);
      if (mine)
        for (int j = 0; j < 8; ++j) _mm512_store_si512(offsets[j], cv.off[j]);
      else if (quads == ALL_QUADS)
        _mm512_store_si512(offsets[0], cv.off[0]);
      // every channel's corner gathers first, then every channel's scatter-adds (the same additions in the same
      // order as interleaved, and 1-6 % faster: 55.6 -> 54.0 ms for GradICON's 4.9 M penalty points in a 3-channel
      // 2x80x96x80 field, two threads)
      for (int64_t c = 0; GG && c < C; ++c, q += sC, go += P) {
        const __m512 s = _mm512_maskz_loadu_ps(mask, go);
        __m512 a[8];
        if (quads == ALL_QUADS)
          quad_corners(q, offsets[0], W, sD, a);
        else
          for (int j = 0; j < 8; ++j)
            a[j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), cv.in[j] & live, cv.off[j], q, 4);
        __m512 cx, cy, cz;
        derivatives_v(a, ax.f, ay.f, az.f, cx, cy, cz);
        dx = _mm512_add_ps(dx, _mm512_mul_ps(s, cx));
        dy = _mm512_add_ps(dy, _mm512_mul_ps(s, cy));
        dz = _mm512_add_ps(dz, _mm512_mul_ps(s, cz));
      }
      // scatter-add: a merged quad once (its four lanes' products summed), other lanes one by one
      go = GO + n * C * P + p;
      for (int64_t c = 0; mine && c < C; ++c, go += P) {
        const __m512 s = _mm512_maskz_loadu_ps(mask, go);
        for (int j = 0; j < 8; ++j) {
          const __m512 v = _mm512_mul_ps(s, cv.w[j]);
          const __m512 pairs = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  // (p0 + p1), (p2 + p3)
          const __m512 quad_sums = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0x4E));  // at each quad's lanes
          _mm512_store_ps(products[j], _mm512_mask_blend_ps(quads, v, quad_sums));
        }
        float* r = mine + (n * C + c) * sC;
        for (int lane = 0; lane < 16; ++lane) {
          if (!((live >> lane) & 1)) continue;
          if ((quads >> lane) & 1) {
            for (int j = 0; j < 8; ++j) r[offsets[j][lane]] += products[j][lane];
            lane += 3;
            continue;
          }
          for (int j = 0; j < 8; ++j)
            if ((cv.in[j] >> lane) & 1) r[offsets[j][lane]] += products[j][lane];
        }
      }
      if (GG) {
        const __m512 two = _mm512_set1_ps(2.f);
        float* gg = GG + n * 3 * P + p;
        _mm512_mask_storeu_ps(gg, mask, _mm512_maskz_mul_ps(live, two, _mm512_mul_ps(dz, az.mult)));
        _mm512_mask_storeu_ps(gg + P, mask, _mm512_maskz_mul_ps(live, two, _mm512_mul_ps(dy, ay.mult)));
        _mm512_mask_storeu_ps(gg + 2 * P, mask, _mm512_maskz_mul_ps(live, two, _mm512_mul_ps(dx, ax.mult)));
      }
    }
  }
}

template <bool ZEROS>
static void backward_vector(const torch::Tensor& image, const Points<float>& pts, int64_t P,
                            const torch::Tensor& grad_out, torch::Tensor& grad_image, torch::Tensor& grad_coords) {
  const int64_t N = image.size(0), C = image.size(1), groups = (P + 15) / 16;
  const int D = image.size(2), H = image.size(3), W = image.size(4);
  const int64_t sN = image.stride(0), image_size = N * C * D * H * W;
  const float* I = image.data_ptr<float>();
  const float* GO = grad_out.data_ptr<float>();
  float* GI = grad_image.numel() ? grad_image.data_ptr<float>() : nullptr;
  float* GG = grad_coords.numel() ? grad_coords.data_ptr<float>() : nullptr;
  const int64_t copies = GI ? grad_image.size(0) : 1;
  // as the scalar backward: each thread adds to its own image-gradient copy
  at::parallel_for(0, N * groups, 256, [&](int64_t begin, int64_t end) {
    const int64_t thread = copies == 1 ? 0 : at::get_thread_num();  // as backward_kernel
    TORCH_CHECK(!GI || thread < copies, "iconreg sampler: thread ", thread, " of ", copies);
    backward_groups<ZEROS>(I, pts, GO, GI ? GI + thread * image_size : nullptr, GG, C, D, H, W, sN, P, begin, end);
  });
}

// Whether the float32 AVX-512 kernels apply: a CPU with AVX-512, and int32 offsets within one batch element.
static bool vector_applies(const torch::Tensor& image) {
  return use_vector() && image.scalar_type() == at::kFloat &&
         image.size(2) * image.size(3) * image.size(4) < (int64_t(1) << 31) - 1;
}
#else
static bool vector_applies(const torch::Tensor&) { return false; }
#endif

bool set_vectorized(bool on) {
#ifdef ICONREG_VECTOR
  const bool before = vector_enabled;
  vector_enabled = on;
  return before;
#else
  (void)on;
  return false;
#endif
}

bool vectorized() {
#ifdef ICONREG_VECTOR
  return use_vector();
#else
  return false;
#endif
}

template <typename T>
static Points<T> points_of(const torch::Tensor& coords) {
  return {coords.data_ptr<T>(), coords.stride(0), coords.stride(1)};
}

// image [N, C, D, H, W]; coords [N, 3, P] (stride 1 along P) -> [N, C, P]
torch::Tensor sample_forward(torch::Tensor image, torch::Tensor coords, bool zeros) {
  const int64_t P = coords.size(2);
  auto out = torch::empty({image.size(0), image.size(1), P}, image.options());
#ifdef ICONREG_VECTOR
  if (vector_applies(image)) {
    const auto pts = points_of<float>(coords);
    if (zeros) forward_vector<true, false>(image, pts, P, out, nullptr);
    else forward_vector<false, false>(image, pts, P, out, nullptr);
    return out;
  }
#endif
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
#ifdef ICONREG_VECTOR
  if (vector_applies(image)) {
    const auto pts = points_of<float>(coords);
    if (zeros) forward_vector<true, true>(image, pts, P, out, deriv.data_ptr<float>());
    else forward_vector<false, true>(image, pts, P, out, deriv.data_ptr<float>());
    return {out, deriv};
  }
#endif
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
  const bool vector = vector_applies(image);
  // as many gradient copies as at::parallel_for below uses threads (one when already inside a parallel region):
  // the scalar kernel splits N * P points in chunks of at least 4096, the vector one N * ceil(P / 16) groups of
  // 16 points in chunks of at least 256 groups
  const int64_t work = vector ? N * ((P + 15) / 16) : N * P, grain = vector ? 256 : 4096;
  const int64_t threads = at::in_parallel_region()
      ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (work + grain - 1) / grain));
  // Batch elements split evenly over the threads (batch 2 on two threads: both directions of a training step):
  // each thread takes whole batch elements, which write to their own part of the image gradient, so one zeroed
  // gradient serves all and nothing is summed. Each element's additions are the same, in the same order.
  const bool batch_split = image_gradient && threads > 1 && N % threads == 0;
  const int64_t copies = batch_split ? 1 : threads;
  auto grad_image = image_gradient
      ? torch::zeros({copies, N, image.size(1), image.size(2), image.size(3), image.size(4)}, image.options())
      : torch::empty({0}, image.options());
  auto grad_coords = coords_gradient ? torch::empty({N, 3, P}, coords.options()) : torch::empty({0}, coords.options());
  // the kernel for these batch elements (gi: their image-gradient copies [copies, n, …] or empty)
  auto run = [&](const torch::Tensor& img, const torch::Tensor& pts_t, const torch::Tensor& go, torch::Tensor& gi,
                 torch::Tensor& gc) {
#ifdef ICONREG_VECTOR
    if (vector) {
      const auto pts = points_of<float>(pts_t);
      if (zeros) backward_vector<true>(img, pts, P, go, gi, gc);
      else backward_vector<false>(img, pts, P, go, gi, gc);
      return;
    }
#endif
    AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "iconreg_sample_backward", [&] {
      const auto pts = points_of<scalar_t>(pts_t);
      if (zeros) backward_kernel<scalar_t, true>(img, pts, P, go, gi, gc);
      else backward_kernel<scalar_t, false>(img, pts, P, go, gi, gc);
    });
  };
  if (batch_split) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        auto gi = grad_image.narrow(1, n, 1);  // [1 copy, 1, C, D, H, W]
        auto gc = grad_coords.numel() ? grad_coords.narrow(0, n, 1) : grad_coords;
        run(image.narrow(0, n, 1), coords.narrow(0, n, 1), grad_out.narrow(0, n, 1), gi, gc);
      }
    });
  } else {
    run(image, coords, grad_out, grad_image, grad_coords);
  }
  if (image_gradient) grad_image = copies == 1 ? grad_image.select(0, 0) : grad_image.sum(0);
  return {grad_image, grad_coords};
}

// ---- A 1-D convolution along the middle axis of [outer, n, inner] (the separable Gaussian blur's per-axis step,
// zero padding): out[o, i, t] = sum_k taps[k] * in[o, i - offset + k, t] over the k that stay inside, in the order of
// k. The inner loop is a multiply-add over a contiguous run, compiled for AVX-512 / AVX2 / baseline and chosen at
// load time (no fused multiply-adds: -ffp-contract=off, as everywhere in this library).
#define ICONREG_BLUR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
ICONREG_BLUR_CLONES static void axpy_run(float* dst, const float* src, float w, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] += w * src[i];
}
ICONREG_BLUR_CLONES static void axpy_run(double* dst, const double* src, double w, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] += w * src[i];
}

template <typename T>
static void blur_lines(const T* in, T* out, const T* taps, int64_t outer, int64_t n, int64_t inner, int64_t length,
                       int64_t offset) {
  if (inner == 1) {  // the last axis: each line shifted by every tap, a contiguous run per tap
    at::parallel_for(0, outer, 16, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const T* src = in + o * n;
        T* dst = out + o * n;
        std::fill(dst, dst + n, T(0));
        for (int64_t k = 0; k < length; ++k) {
          const int64_t shift = k - offset;
          const int64_t lo = std::max<int64_t>(0, -shift), hi = std::min<int64_t>(n, n - shift);
          if (lo < hi) axpy_run(dst + lo, src + lo + shift, taps[k], hi - lo);
        }
      }
    });
    return;
  }
  at::parallel_for(0, outer * n, 1, [&](int64_t begin, int64_t end) {  // one output plane (row of inner) at a time
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row / n, i = row % n;
      T* dst = out + row * inner;
      const T* base = in + o * n * inner;
      std::fill(dst, dst + inner, T(0));
      for (int64_t k = 0; k < length; ++k) {
        const int64_t j = i - offset + k;
        if (j >= 0 && j < n) axpy_run(dst, base + j * inner, taps[k], inner);
      }
    }
  });
}

// input [outer, n, inner] contiguous float32 or float64, taps [length] of the same dtype -> [outer, n, inner]
torch::Tensor blur_axis(torch::Tensor input, torch::Tensor taps, int64_t offset) {
  auto out = torch::empty_like(input);
  const int64_t outer = input.size(0), n = input.size(1), inner = input.size(2), length = taps.numel();
  if (input.scalar_type() == at::kFloat) {
    blur_lines<float>(input.data_ptr<float>(), out.data_ptr<float>(), taps.data_ptr<float>(), outer, n, inner,
                      length, offset);
  } else {
    blur_lines<double>(input.data_ptr<double>(), out.data_ptr<double>(), taps.data_ptr<double>(), outer, n, inner,
                       length, offset);
  }
  return out;
}

// ---- Per-channel sums and per-channel affine maps of channels-last activations, seen as [rows, C] row-major (the
// channels of one voxel adjacent): the batch norm of the UNet's channels-last last level (networks.py). The sums are
// accumulated in double, per block of rows and then over the blocks in a fixed order, so they do not depend on the
// thread count: out[0, c] = sum_r a[r, c], out[1, c] = sum_r a[r, c] * a[r, c] (b empty) or a[r, c] * b[r, c].
static constexpr int64_t ICONREG_ROW_BLOCK = 2048;

template <typename T>
ICONREG_BLUR_CLONES static void block_channel_sums(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows,
                                                   int64_t C, double* s0, double* s1) {
  for (int64_t c = 0; c < C; ++c) { s0[c] = 0; s1[c] = 0; }
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * lda;
    if (b) {
      const T* br = b + r * ldb;
      for (int64_t c = 0; c < C; ++c) { const double x = ar[c]; s0[c] += x; s1[c] += x * static_cast<double>(br[c]); }
    } else {
      for (int64_t c = 0; c < C; ++c) { const double x = ar[c]; s0[c] += x; s1[c] += x * x; }
    }
  }
}

template <typename T>
static void channel_sums_of(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t R, int64_t C, double* out) {
  const int64_t blocks = (R + ICONREG_ROW_BLOCK - 1) / ICONREG_ROW_BLOCK;
  std::vector<double> partial(blocks * 2 * C);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * ICONREG_ROW_BLOCK, n = std::min(ICONREG_ROW_BLOCK, R - r0);
      block_channel_sums<T>(a + r0 * lda, lda, b ? b + r0 * ldb : nullptr, ldb, n, C, &partial[k * 2 * C],
                            &partial[k * 2 * C + C]);
    }
  });
  std::fill(out, out + 2 * C, 0.0);
  for (int64_t k = 0; k < blocks; ++k)
    for (int64_t j = 0; j < 2 * C; ++j) out[j] += partial[k * 2 * C + j];
}

// a, b: [R, C] float32 or float64 rows (each row's C values adjacent; rows a.stride(0) apart, which may exceed C: a
// channel slice of a channels-last tensor; b may be empty) -> [2, C] float64
torch::Tensor channel_sums(torch::Tensor a, torch::Tensor b) {
  const int64_t R = a.size(0), C = a.size(1);
  auto out = torch::empty({2, C}, a.options().dtype(torch::kFloat64));
  const bool second = b.numel() > 0;
  const int64_t ldb = second ? b.stride(0) : 0;
  if (a.scalar_type() == at::kFloat) {
    channel_sums_of<float>(a.data_ptr<float>(), a.stride(0), second ? b.data_ptr<float>() : nullptr, ldb, R, C,
                           out.data_ptr<double>());
  } else {
    channel_sums_of<double>(a.data_ptr<double>(), a.stride(0), second ? b.data_ptr<double>() : nullptr, ldb, R, C,
                            out.data_ptr<double>());
  }
  return out;
}

// out[r, c] = (a[r, c] - m[c]) * s[c] + b[r, c] * t[c] + u[c] (the middle term only where b is not empty), in that
// order: the batch norm's output (a the input, m its mean) and its input gradient (b the output gradient)
template <typename T>
ICONREG_BLUR_CLONES static void affine_rows(const T* a, int64_t lda, const T* m, const T* s, const T* b, int64_t ldb,
                                            const T* t, const T* u, T* out, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * lda;
    T* o = out + r * C;
    if (b) {
      const T* br = b + r * ldb;
      for (int64_t c = 0; c < C; ++c) o[c] = (ar[c] - m[c]) * s[c] + br[c] * t[c] + u[c];
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = (ar[c] - m[c]) * s[c] + u[c];
    }
  }
}

// G groups of R / G consecutive rows, group g with the vectors' g-th C values
template <typename T>
static void channel_affine_of(torch::Tensor a, torch::Tensor m, torch::Tensor s, torch::Tensor b, torch::Tensor t,
                              torch::Tensor u, torch::Tensor out, int64_t G) {
  const int64_t R = a.size(0), C = a.size(1), lda = a.stride(0), per_group = R / G;
  const T* pa = a.data_ptr<T>();
  const T* pm = m.data_ptr<T>();
  const T* pb = b.numel() > 0 ? b.data_ptr<T>() : nullptr;
  const int64_t ldb = pb ? b.stride(0) : 0;
  const T* ps = s.data_ptr<T>();
  const T* pt = pb ? t.data_ptr<T>() : nullptr;
  const T* pu = u.data_ptr<T>();
  T* po = out.data_ptr<T>();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t v = g * C;
    at::parallel_for(g * per_group, (g + 1) * per_group, ICONREG_ROW_BLOCK, [&](int64_t begin, int64_t end) {
      affine_rows<T>(pa + begin * lda, lda, pm + v, ps + v, pb ? pb + begin * ldb : nullptr, ldb, pt ? pt + v : nullptr,
                     pu + v, po + begin * C, end - begin, C);
    });
  }
}

// a, b: [R, C] rows as for channel_sums (b may be empty), m, s, t, u: [G * C] (G groups of R / G consecutive rows,
// G dividing R), all of a's dtype -> [R, C] contiguous
torch::Tensor channel_affine(torch::Tensor a, torch::Tensor m, torch::Tensor s, torch::Tensor b, torch::Tensor t,
                             torch::Tensor u) {
  const int64_t C = a.size(1), G = C > 0 ? m.numel() / C : 1;
  TORCH_CHECK(G >= 1 && G * C == m.numel() && a.size(0) % G == 0 && s.numel() == m.numel() && u.numel() == m.numel()
              && (b.numel() == 0 || t.numel() == m.numel()), "channel_affine: vectors of G * C values, G dividing R");
  auto out = torch::empty({a.size(0), a.size(1)}, a.options());
  if (a.scalar_type() == at::kFloat) channel_affine_of<float>(a, m, s, b, t, u, out, G);
  else channel_affine_of<double>(a, m, s, b, t, u, out, G);
  return out;
}

// ---- The soft Dice of linearly warped label maps without one-hot maps (losses.soft_dice_loss_of_warped_labels):
// moving [B, M] int64 channel numbers (0 = background) on the grid n[0..2] (M = n0 n1 n2), fixed [B, P] int64 the
// channel numbers at the P points, c [B, 3, P] (float or double) the points in the unit cube of moving's grid. Each
// point's eight trilinear corner weights go to the channel of their corner (background outside the grid): the warped
// volume of channel k sums every weight that lands on k, the overlap of channel k the weights of corners whose channel
// is the point's own fixed channel k. Positions, floors and fractions are formed in c's type as the tensor path forms
// them; the sums are accumulated in double, per block of points and then over the blocks in order.
static constexpr int64_t ICONREG_LABEL_BLOCK = 4096;

// One point's eight corners: corner k (bits: axis 0 most significant, the order of itertools.product) has channel
// channel[k] in moving (0 outside the grid) and trilinear weight weight[k] = (w0 * w1) * w2, each factor f or 1 - f
// of its axis as the tensor path multiplies them; factor[a][s] is axis a's factor for corner bit s.
template <typename T>
struct LabelCorners {
  int64_t channel[8];
  T weight[8];
  T factor[3][2];
};

template <typename T>
static inline void label_corners(const T* c, int64_t P, int64_t p, const int64_t* n, const int64_t* moving,
                                 LabelCorners<T>& q) {
  int64_t at[3][2];
  bool inside[3][2];
  for (int a = 0; a < 3; ++a) {
    const T position = c[a * P + p] * static_cast<T>(n[a] - 1);
    // floor(position) by truncation within [-2, n + 1] (no libm call); beyond it, and for NaN, every corner along
    // this axis is outside the grid (background, whose sums the loss never reads) and the fraction is 0 (NaN for NaN)
    int64_t l;
    T fraction;
    if (position >= static_cast<T>(-2) && position <= static_cast<T>(n[a] + 1)) {
      l = static_cast<int64_t>(position);
      if (static_cast<T>(l) > position) --l;
      fraction = position - static_cast<T>(l);
    } else {
      l = position > static_cast<T>(0) ? n[a] + 1 : -2;
      fraction = position - position;
    }
    q.factor[a][0] = static_cast<T>(1) - fraction;
    q.factor[a][1] = fraction;
    for (int s = 0; s < 2; ++s) {
      at[a][s] = l + s;
      inside[a][s] = l + s >= 0 && l + s < n[a];
    }
  }
  for (int k = 0; k < 8; ++k) {
    const int s0 = (k >> 2) & 1, s1 = (k >> 1) & 1, s2 = k & 1;
    q.channel[k] = inside[0][s0] && inside[1][s1] && inside[2][s2]
                       ? moving[(at[0][s0] * n[1] + at[1][s1]) * n[2] + at[2][s2]] : 0;
    q.weight[k] = (q.factor[0][s0] * q.factor[1][s1]) * q.factor[2][s2];
  }
}

template <typename T>
static void warped_label_sums_of(const int64_t* moving, const int64_t* fixed, const T* c, int64_t B, int64_t P,
                                 const int64_t* n, int64_t bins, double* overlap, double* volume) {
  const int64_t M = n[0] * n[1] * n[2], blocks = (P + ICONREG_LABEL_BLOCK - 1) / ICONREG_LABEL_BLOCK;
  std::vector<double> partial(B * blocks * 2 * bins, 0.0);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    LabelCorners<T> q;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = (task % blocks) * ICONREG_LABEL_BLOCK;
      const int64_t p1 = std::min(P, p0 + ICONREG_LABEL_BLOCK);
      double* ov = &partial[task * 2 * bins];
      double* vol = ov + bins;
      for (int64_t p = p0; p < p1; ++p) {
        label_corners<T>(c + b * 3 * P, P, p, n, moving + b * M, q);
        const int64_t own = fixed[b * P + p];
        double here = 0.0;
        for (int k = 0; k < 8; ++k) {
          const double w = static_cast<double>(q.weight[k]);
          vol[q.channel[k]] += w;
          here += q.channel[k] == own ? w : 0.0;
        }
        ov[own] += here;
      }
    }
  });
  std::fill(overlap, overlap + B * bins, 0.0);
  std::fill(volume, volume + B * bins, 0.0);
  for (int64_t task = 0; task < B * blocks; ++task) {
    const int64_t b = task / blocks;
    for (int64_t k = 0; k < bins; ++k) {
      overlap[b * bins + k] += partial[task * 2 * bins + k];
      volume[b * bins + k] += partial[task * 2 * bins + bins + k];
    }
  }
}

// -> (overlap [B, bins], warped volume [B, bins]), float64
std::vector<torch::Tensor> warped_label_sums(torch::Tensor moving, torch::Tensor fixed, torch::Tensor c,
                                             std::vector<int64_t> sizes, int64_t bins) {
  const int64_t B = c.size(0), P = c.size(2);
  TORCH_CHECK(sizes.size() == 3 && c.dim() == 3 && c.size(1) == 3 && moving.size(0) == B && fixed.size(0) == B
              && fixed.size(1) == P && moving.size(1) == sizes[0] * sizes[1] * sizes[2],
              "warped_label_sums: moving [B, M], fixed [B, P], coordinates [B, 3, P]");
  auto options = c.options().dtype(torch::kFloat64);
  auto overlap = torch::empty({B, bins}, options), volume = torch::empty({B, bins}, options);
  if (c.scalar_type() == at::kFloat)
    warped_label_sums_of<float>(moving.data_ptr<int64_t>(), fixed.data_ptr<int64_t>(), c.data_ptr<float>(), B, P,
                                sizes.data(), bins, overlap.data_ptr<double>(), volume.data_ptr<double>());
  else
    warped_label_sums_of<double>(moving.data_ptr<int64_t>(), fixed.data_ptr<int64_t>(), c.data_ptr<double>(), B, P,
                                 sizes.data(), bins, overlap.data_ptr<double>(), volume.data_ptr<double>());
  return {overlap, volume};
}

// the gradient of a function of warped_label_sums' sums with respect to c, given its gradients g_overlap and g_volume
// [B, bins] (double): each corner weight's derivative along an axis is the product of the other axes' factors, signed
template <typename T>
static void warped_label_gradient_of(const int64_t* moving, const int64_t* fixed, const T* c, int64_t B, int64_t P,
                                     const int64_t* n, int64_t bins, const double* g_overlap, const double* g_volume,
                                     T* grad) {
  const int64_t M = n[0] * n[1] * n[2];
  at::parallel_for(0, B * P, ICONREG_LABEL_BLOCK, [&](int64_t begin, int64_t end) {
    LabelCorners<T> q;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / P, p = i % P;
      label_corners<T>(c + b * 3 * P, P, p, n, moving + b * M, q);
      const int64_t own = fixed[b * P + p];
      const double* go = g_overlap + b * bins;
      const double* gv = g_volume + b * bins;
      double f[3][2];
      for (int a = 0; a < 3; ++a)
        for (int s = 0; s < 2; ++s) f[a][s] = static_cast<double>(q.factor[a][s]);
      double d0 = 0.0, d1 = 0.0, d2 = 0.0;
      for (int k = 0; k < 8; ++k) {
        const int s0 = (k >> 2) & 1, s1 = (k >> 1) & 1, s2 = k & 1;
        const double g = gv[q.channel[k]] + (q.channel[k] == own ? go[own] : 0.0);
        // d weight / d fraction_a: the other two factors, + for the upper corner along a, - for the lower
        d0 += (s0 ? g : -g) * f[1][s1] * f[2][s2];
        d1 += (s1 ? g : -g) * f[0][s0] * f[2][s2];
        d2 += (s2 ? g : -g) * f[0][s0] * f[1][s1];
      }
      grad[(b * 3 + 0) * P + p] = static_cast<T>(d0 * static_cast<double>(n[0] - 1));
      grad[(b * 3 + 1) * P + p] = static_cast<T>(d1 * static_cast<double>(n[1] - 1));
      grad[(b * 3 + 2) * P + p] = static_cast<T>(d2 * static_cast<double>(n[2] - 1));
    }
  });
}

torch::Tensor warped_label_gradient(torch::Tensor moving, torch::Tensor fixed, torch::Tensor c,
                                    std::vector<int64_t> sizes, torch::Tensor g_overlap, torch::Tensor g_volume) {
  const int64_t B = c.size(0), P = c.size(2), bins = g_overlap.size(1);
  auto grad = torch::empty_like(c);
  if (c.scalar_type() == at::kFloat)
    warped_label_gradient_of<float>(moving.data_ptr<int64_t>(), fixed.data_ptr<int64_t>(), c.data_ptr<float>(), B, P,
                                    sizes.data(), bins, g_overlap.data_ptr<double>(), g_volume.data_ptr<double>(),
                                    grad.data_ptr<float>());
  else
    warped_label_gradient_of<double>(moving.data_ptr<int64_t>(), fixed.data_ptr<int64_t>(), c.data_ptr<double>(), B,
                                     P, sizes.data(), bins, g_overlap.data_ptr<double>(), g_volume.data_ptr<double>(),
                                     grad.data_ptr<double>());
  return grad;
}

// ---- The fold penalty of training (losses.fold_penalty): mean over voxels of relu(margin - det J / scale) for maps
// p [B, 3, n0, n1, n2] (float or double, contiguous), J[r][c] the derivative of p_r along axis c per index step
// (central inside, one-sided at the faces, as coordinates._finite_difference), det J = a . (b x c) of its columns
// a, b, c (coordinates._determinant_of_columns' order), scale the unit cube's det(diag(1 / (n - 1))).
// the derivative per index step of the values at u (stride apart along an axis of n; u at index i): central inside,
// one-sided at the ends, 0 on an axis of one voxel (coordinates._finite_difference)
template <typename T>
static inline T axis_difference(const T* u, int64_t i, int64_t n, int64_t stride) {
  if (n < 2) return static_cast<T>(0);
  if (i == 0) return u[stride] - u[0];
  if (i == n - 1) return u[0] - u[-stride];
  return (u[stride] - u[-stride]) * static_cast<T>(0.5);
}

// J of voxel (z, y, x) of sample b: col[c][r] = J[r][c]
template <typename T>
static inline void fold_jacobian(const T* p, int64_t V, const int64_t* n, int64_t z, int64_t y, int64_t x,
                                 T col[3][3]) {
  const int64_t v = (z * n[1] + y) * n[2] + x;
  for (int r = 0; r < 3; ++r) {
    const T* at = p + r * V + v;
    col[0][r] = axis_difference(at, z, n[0], n[1] * n[2]);
    col[1][r] = axis_difference(at, y, n[1], n[2]);
    col[2][r] = axis_difference(at, x, n[2], 1);
  }
}

template <typename T>
static inline T fold_determinant(const T col[3][3]) {
  const T* a = col[0];
  const T* b = col[1];
  const T* c = col[2];
  T det = a[0] * (b[1] * c[2] - b[2] * c[1]);
  det = det - a[1] * (b[0] * c[2] - b[2] * c[0]);
  return det + a[2] * (b[0] * c[1] - b[1] * c[0]);
}

// -> the sum over voxels of relu(margin - det / scale), accumulated in double per row of voxels, then in order
template <typename T>
static double fold_sum_of(const T* p, int64_t B, const int64_t* n, double margin, double scale) {
  const int64_t V = n[0] * n[1] * n[2], rows = B * n[0] * n[1];
  std::vector<double> partial(rows, 0.0);
  const T m = static_cast<T>(margin), sc = static_cast<T>(scale);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    T col[3][3];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (n[0] * n[1]), z = (row / n[1]) % n[0], y = row % n[1];
      double sum = 0.0;
      for (int64_t x = 0; x < n[2]; ++x) {
        fold_jacobian<T>(p + b * 3 * V, V, n, z, y, x, col);
        const T value = m - fold_determinant<T>(col) / sc;
        if (!(value <= static_cast<T>(0))) sum += static_cast<double>(value);  // NaN maps give NaN, as relu does
      }
      partial[row] = sum;
    }
  });
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) total += partial[row];
  return total;
}

// the gradient of weight * sum_v relu(margin - det_v / scale) with respect to p: per voxel where the relu is active,
// d/dJ[r][c] = -weight / scale * cofactor (d det / d a = b x c, d det / d b = c x a, d det / d c = a x b), then the
// adjoint of the finite differences gathered from each voxel's neighbours along each axis
template <typename T>
static void fold_gradient_of(const T* p, int64_t B, const int64_t* n, double margin, double scale, double weight,
                             T* grad) {
  const int64_t V = n[0] * n[1] * n[2], rows = B * n[0] * n[1];
  std::vector<T> cof(static_cast<size_t>(B * 9 * V));  // [B, 9 (c, r), V]
  const T m = static_cast<T>(margin), sc = static_cast<T>(scale), k = static_cast<T>(-weight / scale);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    T col[3][3];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (n[0] * n[1]), z = (row / n[1]) % n[0], y = row % n[1];
      T* out = cof.data() + b * 9 * V;
      for (int64_t x = 0; x < n[2]; ++x) {
        const int64_t v = (z * n[1] + y) * n[2] + x;
        fold_jacobian<T>(p + b * 3 * V, V, n, z, y, x, col);
        const bool active = m - fold_determinant<T>(col) / sc > static_cast<T>(0);
        for (int c = 0; c < 3; ++c) {
          const T* u = col[(c + 1) % 3];
          const T* w = col[(c + 2) % 3];
          for (int r = 0; r < 3; ++r) {
            const T cofactor = u[(r + 1) % 3] * w[(r + 2) % 3] - u[(r + 2) % 3] * w[(r + 1) % 3];
            out[(c * 3 + r) * V + v] = active ? k * cofactor : static_cast<T>(0);
          }
        }
      }
    }
  });
  // d D(u) / d p[i] along an axis of n points: D(0) = p1 - p0, D(n-1) = p[n-1] - p[n-2], else (p[u+1] - p[u-1]) / 2
  auto adjoint = [](const T* w, int64_t i, int64_t n, int64_t step) -> T {
    T g = static_cast<T>(0);
    if (i >= 1) g += (i - 1 == 0 ? static_cast<T>(1) : static_cast<T>(0.5)) * w[-step];
    if (i == 0) g -= w[0];
    if (i == n - 1) g += w[0];
    if (i <= n - 2) g -= (i + 1 == n - 1 ? static_cast<T>(1) : static_cast<T>(0.5)) * w[step];
    return g;
  };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (n[0] * n[1]), z = (row / n[1]) % n[0], y = row % n[1];
      const T* w = cof.data() + b * 9 * V;
      for (int64_t x = 0; x < n[2]; ++x) {
        const int64_t v = (z * n[1] + y) * n[2] + x;
        for (int r = 0; r < 3; ++r) {
          T g = adjoint(w + (0 * 3 + r) * V + v, z, n[0], n[1] * n[2]);
          g += adjoint(w + (1 * 3 + r) * V + v, y, n[1], n[2]);
          g += adjoint(w + (2 * 3 + r) * V + v, x, n[2], 1);
          grad[(b * 3 + r) * V + v] = g;
        }
      }
    }
  });
}

double fold_sum(torch::Tensor p, double margin, double scale) {
  TORCH_CHECK(p.dim() == 5 && p.size(1) == 3 && p.size(2) >= 2 && p.size(3) >= 2 && p.size(4) >= 2,
              "fold_sum: maps [B, 3, D, H, W] with 2+ voxels per axis");
  const int64_t n[3] = {p.size(2), p.size(3), p.size(4)};
  if (p.scalar_type() == at::kFloat) return fold_sum_of<float>(p.data_ptr<float>(), p.size(0), n, margin, scale);
  return fold_sum_of<double>(p.data_ptr<double>(), p.size(0), n, margin, scale);
}

torch::Tensor fold_gradient(torch::Tensor p, double margin, double scale, double weight) {
  const int64_t n[3] = {p.size(2), p.size(3), p.size(4)};
  auto grad = torch::empty_like(p);
  if (p.scalar_type() == at::kFloat)
    fold_gradient_of<float>(p.data_ptr<float>(), p.size(0), n, margin, scale, weight, grad.data_ptr<float>());
  else
    fold_gradient_of<double>(p.data_ptr<double>(), p.size(0), n, margin, scale, weight, grad.data_ptr<double>());
  return grad;
}

// ---- The last step of a convolution to a few channels computed plane by plane (networks._few_channel_forward):
// partial [N, D, H, W, P] contiguous (a channels-last convolution output; float32 or bfloat16) holds, for each kernel
// plane a < K along D, the O output channels a * O + o of that plane's 2-D convolution, and when `low` also the
// planes of a second weight at K * O + a * O + o. out[n, o, d, h, w] (float32, the default memory order) is
//   v(p) + sum over a != p, in order, of v(a) at depth d + a - p (inside the volume), then + bias[o],
// with v(a) = float(main) + float(low) and p = K / 2: the same float32 operations in the same order as the tensor
// path, so the same bits.
template <typename T>
static void plane_sum_of(const T* partial, const float* bias, float* out, int64_t N, int64_t D, int64_t H, int64_t W,
                         int64_t P, int64_t O, int64_t K, bool low) {
  const int64_t plane = H * W, p = K / 2;
  at::parallel_for(0, N * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / D, d = task % D;
      float* o_base = out + (n * O * D + d) * plane;  // channel o's plane at o_base + o * D * plane
      for (int64_t step = 0; step < K; ++step) {
        const int64_t a = step == 0 ? p : (step <= p ? step - 1 : step);  // the centre first, then the others
        const int64_t dd = d + a - p;
        if (dd < 0 || dd >= D) continue;
        const T* src = partial + (n * D + dd) * plane * P;
        for (int64_t o = 0; o < O; ++o) {
          float* dst = o_base + o * D * plane;
          const T* s_main = src + a * O + o;
          if (low) {
            const T* s_low = s_main + K * O;
            if (step == 0) for (int64_t v = 0; v < plane; ++v) dst[v] = static_cast<float>(s_main[v * P]) + static_cast<float>(s_low[v * P]);
            else for (int64_t v = 0; v < plane; ++v) dst[v] += static_cast<float>(s_main[v * P]) + static_cast<float>(s_low[v * P]);
          } else {
            if (step == 0) for (int64_t v = 0; v < plane; ++v) dst[v] = static_cast<float>(s_main[v * P]);
            else for (int64_t v = 0; v < plane; ++v) dst[v] += static_cast<float>(s_main[v * P]);
          }
        }
      }
      if (bias)
        for (int64_t o = 0; o < O; ++o) {
          float* dst = o_base + o * D * plane;
          for (int64_t v = 0; v < plane; ++v) dst[v] += bias[o];
        }
    }
  });
}

// partial [N, D, H, W, P] contiguous float32 or bfloat16, bias [O] float32 or empty -> [N, O, D, H, W] float32
torch::Tensor plane_sum(torch::Tensor partial, int64_t O, int64_t K, bool low, torch::Tensor bias) {
  const int64_t N = partial.size(0), D = partial.size(1), H = partial.size(2), W = partial.size(3),
                P = partial.size(4);
  TORCH_CHECK(P == (low ? 2 : 1) * K * O, "plane_sum: ", P, " channels for ", K, " planes of ", O, " outputs");
  auto out = torch::empty({N, O, D, H, W}, partial.options().dtype(torch::kFloat32));
  const float* pb = bias.numel() > 0 ? bias.data_ptr<float>() : nullptr;
  if (partial.scalar_type() == at::kFloat)
    plane_sum_of<float>(partial.data_ptr<float>(), pb, out.data_ptr<float>(), N, D, H, W, P, O, K, low);
  else
    plane_sum_of<at::BFloat16>(partial.data_ptr<at::BFloat16>(), pb, out.data_ptr<float>(), N, D, H, W, P, O, K, low);
  return out;
}

// ---- Linear upsampling by 2 (align_corners=False, PyTorch's trilinear at scale 2) of a channels-last float32 tensor
// seen as [N, D, H, W, C], plus an optional addend of the output's shape (float32 or bfloat16), and its adjoint. Along
// each axis fine 2i is 3/4 x[i] + 1/4 x[i - 1] and fine 2i + 1 is 3/4 x[i] + 1/4 x[i + 1], the neighbour clamped to
// the axis (the UNet's last level: y + upsample(coarse) before its batch norm, networks.py).
struct Taps { int64_t near, far; };
static inline Taps upsample_taps(int64_t fine, int64_t n) {
  const int64_t i = fine / 2;
  return {i, (fine % 2 == 0) ? std::max<int64_t>(i - 1, 0) : std::min<int64_t>(i + 1, n - 1)};
}

ICONREG_BLUR_CLONES static void mix_run(float* dst, const float* a, const float* b, float wa, float wb, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = wa * a[i] + wb * b[i];
}

template <typename A>
ICONREG_BLUR_CLONES static void expand_row(const float* row, const A* add, float* out, int64_t W, int64_t C) {
  for (int64_t x = 0; x < W; ++x) {
    const float* here = row + x * C;
    const float* before = row + std::max<int64_t>(x - 1, 0) * C;
    const float* after = row + std::min<int64_t>(x + 1, W - 1) * C;
    float* even = out + 2 * x * C;
    float* odd = even + C;
    if (add) {
      const A* add_even = add + 2 * x * C;
      const A* add_odd = add_even + C;
      for (int64_t c = 0; c < C; ++c) {
        even[c] = static_cast<float>(add_even[c]) + (0.75f * here[c] + 0.25f * before[c]);
        odd[c] = static_cast<float>(add_odd[c]) + (0.75f * here[c] + 0.25f * after[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        even[c] = 0.75f * here[c] + 0.25f * before[c];
        odd[c] = 0.75f * here[c] + 0.25f * after[c];
      }
    }
  }
}

template <typename A>
static void upsample_add_of(const float* coarse, const A* add, float* out, int64_t N, int64_t D, int64_t H, int64_t W,
                            int64_t C) {
  const int64_t row = W * C, plane = H * row, fine_row = 2 * row, fine_plane = 2 * H * fine_row;
  at::parallel_for(0, N * 2 * D, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zplane(plane), yrow(row);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (2 * D), fz = task % (2 * D);
      const Taps tz = upsample_taps(fz, D);
      const float* volume = coarse + n * D * plane;
      mix_run(zplane.data(), volume + tz.near * plane, volume + tz.far * plane, 0.75f, 0.25f, plane);
      for (int64_t fy = 0; fy < 2 * H; ++fy) {
        const Taps ty = upsample_taps(fy, H);
        mix_run(yrow.data(), zplane.data() + ty.near * row, zplane.data() + ty.far * row, 0.75f, 0.25f, row);
        const int64_t offset = (n * 2 * D + fz) * fine_plane + fy * fine_row;
        expand_row<A>(yrow.data(), add ? add + offset : nullptr, out + offset, W, C);
      }
    }
  });
}

// coarse [N, D, H, W, C] contiguous float32, add [N, 2D, 2H, 2W, C] contiguous float32 or bfloat16 or empty -> float32
torch::Tensor upsample_add(torch::Tensor coarse, torch::Tensor add) {
  const int64_t N = coarse.size(0), D = coarse.size(1), H = coarse.size(2), W = coarse.size(3), C = coarse.size(4);
  auto out = torch::empty({N, 2 * D, 2 * H, 2 * W, C}, coarse.options());
  const float* pc = coarse.data_ptr<float>();
  float* po = out.data_ptr<float>();
  if (add.numel() == 0) upsample_add_of<float>(pc, nullptr, po, N, D, H, W, C);
  else if (add.scalar_type() == at::kFloat) upsample_add_of<float>(pc, add.data_ptr<float>(), po, N, D, H, W, C);
  else upsample_add_of<at::BFloat16>(pc, add.data_ptr<at::BFloat16>(), po, N, D, H, W, C);
  return out;
}

// the fine indices that reach coarse index i and their summed weights (at most 4; both taps of a border voxel merge)
static int64_t adjoint_taps(int64_t i, int64_t n, int64_t* fine, float* weight) {
  int64_t count = 0;
  for (int64_t f = std::max<int64_t>(2 * i - 1, 0); f <= std::min<int64_t>(2 * i + 2, 2 * n - 1); ++f) {
    const Taps t = upsample_taps(f, n);
    const float w = (t.near == i ? 0.75f : 0.0f) + (t.far == i ? 0.25f : 0.0f);
    if (w != 0.0f) { fine[count] = f; weight[count] = w; ++count; }
  }
  return count;
}

// grad [N, 2D, 2H, 2W, C] contiguous float32 -> [N, D, H, W, C]: the adjoint of upsample_add's upsampling
torch::Tensor upsample_adjoint(torch::Tensor grad) {
  const int64_t N = grad.size(0), D = grad.size(1) / 2, H = grad.size(2) / 2, W = grad.size(3) / 2, C = grad.size(4);
  auto out = torch::empty({N, D, H, W, C}, grad.options());
  const float* pg = grad.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t fine_row = 2 * W * C, fine_plane = 2 * H * fine_row, row = W * C;
  at::parallel_for(0, N * D, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zplane(fine_plane), yrow(fine_row);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / D, z = task % D;
      int64_t fz[4], fy[4];
      float wz[4], wy[4];
      const int64_t kz = adjoint_taps(z, D, fz, wz);
      std::fill(zplane.begin(), zplane.end(), 0.0f);
      for (int64_t k = 0; k < kz; ++k)
        axpy_run(zplane.data(), pg + (n * 2 * D + fz[k]) * fine_plane, wz[k], fine_plane);
      for (int64_t y = 0; y < H; ++y) {
        const int64_t ky = adjoint_taps(y, H, fy, wy);
        std::fill(yrow.begin(), yrow.end(), 0.0f);
        for (int64_t k = 0; k < ky; ++k) axpy_run(yrow.data(), zplane.data() + fy[k] * fine_row, wy[k], fine_row);
        float* dst = po + ((n * D + z) * H + y) * row;
        for (int64_t x = 0; x < W; ++x) {
          int64_t fx[4];
          float wx[4];
          const int64_t kx = adjoint_taps(x, W, fx, wx);
          float* d = dst + x * C;
          std::fill(d, d + C, 0.0f);
          for (int64_t k = 0; k < kx; ++k) axpy_run(d, yrow.data() + fx[k] * C, wx[k], C);
        }
      }
    }
  });
  return out;
}

// ---- Jacobian determinant of x -> x + u(x) from a displacement u [B, 3, D, H, W] (float32, contiguous), in one
// pass: per voxel the derivative along each tensor axis k (central inside, one-sided at the ends, 0 on an axis of one
// voxel), column s of I + (du / dindex) G^-1 as sum_k d_k * inv[k][s] (+1 on the diagonal), then a . (b x c) with
// the operations of coordinates._determinant_of_columns (coordinates.displacement_jacobian_determinant's numbers to
// float rounding).
// The n numbers of a small parameter tensor (a matrix, an offset; any float dtype) as float32, in order.
static void floats_of(const torch::Tensor& values, float* out, int n) {
  const auto wide = values.to(torch::kFloat64).contiguous();
  TORCH_CHECK(wide.numel() == n, "iconreg kernels: expected ", n, " parameters, got ", wide.numel());
  const double* p = wide.data_ptr<double>();
  for (int k = 0; k < n; ++k) out[k] = static_cast<float>(p[k]);
}

torch::Tensor displacement_jacobian(torch::Tensor u, torch::Tensor inverse) {
  const int64_t B = u.size(0), D = u.size(2), H = u.size(3), W = u.size(4), V = D * H * W;
  auto out = torch::empty({B, 1, D, H, W}, u.options());
  const float* pu = u.data_ptr<float>();
  float* po = out.data_ptr<float>();
  float m[3][3];
  floats_of(inverse, &m[0][0], 9);
  at::parallel_for(0, B * D * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (D * H), z = (row / H) % D, y = row % H;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t v = (z * H + y) * W + x;
        float col[3][3];  // col[s][r]
        for (int r = 0; r < 3; ++r) {
          const float* c = pu + (b * 3 + r) * V + v;
          const float d0 = axis_difference(c, z, D, H * W), d1 = axis_difference(c, y, H, W);
          const float d2 = axis_difference(c, x, W, 1);
          for (int s = 0; s < 3; ++s) {
            float value = d0 * m[0][s];
            value = value + d1 * m[1][s];
            value = value + d2 * m[2][s];
            col[s][r] = (r == s) ? value + 1.0f : value;
          }
        }
        const float* a = col[0];
        const float* bb = col[1];
        const float* c = col[2];
        float det = a[0] * (bb[1] * c[2] - bb[2] * c[1]);
        det = det - a[1] * (bb[0] * c[2] - bb[2] * c[0]);
        det = det + a[2] * (bb[0] * c[1] - bb[1] * c[0]);
        po[b * V + v] = det;
      }
    }
  });
  return out;
}

// ---- register()'s QA fields in one pass over the network grid (pipeline/registration.py, _sample_fields with the
// field grid equal to the network grid): for the identity point w = (z / (D - 1), y / (H - 1), x / (W - 1)) and the
// displacement u (unit cube of the own grid -> the other's), mapped = w + u, the displacement in mm
// U_other mapped + t - U_own w, and with the reverse displacement v (on the other grid) the IC error
// |U_own (u + v(mapped))| (trilinear, border padding: coordinates clamped to the grid, a NaN coordinate to its last
// voxel as the sampler does) and whether mapped leaves the unit cube. float32 [3, D, H, W] in, float32 out.
// The trilinear cell of unit-cube coordinates (cz, cy, cx) on a D x H x W grid with border padding: the offset of
// its first corner, the steps to the second corner along each axis (0 on a one-voxel axis), and the fractions.
struct BorderCell { int64_t base, dz, dy, dx; float fz, fy, fx; };

static inline void border_axis(float c, int64_t n, int64_t& i, int64_t& step, float& f) {
  const float limit = static_cast<float>(n - 1);
  float x = c * limit;
  x = (x == x) ? std::min(std::max(x, 0.0f), limit) : limit;  // a NaN coordinate: the last voxel
  i = std::min<int64_t>(static_cast<int64_t>(x), std::max<int64_t>(n - 2, 0));
  step = n > 1 ? 1 : 0;
  f = x - static_cast<float>(i);
}

static inline BorderCell border_cell(int64_t D, int64_t H, int64_t W, float cz, float cy, float cx) {
  int64_t iz, iy, ix, sz, sy, sx;
  BorderCell cell;
  border_axis(cz, D, iz, sz, cell.fz);
  border_axis(cy, H, iy, sy, cell.fy);
  border_axis(cx, W, ix, sx, cell.fx);
  cell.base = (iz * H + iy) * W + ix;
  cell.dz = sz * H * W;
  cell.dy = sy * W;
  cell.dx = sx;
  return cell;
}

// the three channels of a channels-interleaved [D, H, W, 3] field at the cell (offsets in voxels), added to r
static inline void border_sample3(const float* p, const BorderCell& c, float* r) {
  const float* q = p + 3 * c.base;
  const int64_t dx = 3 * c.dx, dy = 3 * c.dy, dz = 3 * c.dz;
  const float gx = 1.0f - c.fx, gy = 1.0f - c.fy, gz = 1.0f - c.fz;
  for (int i = 0; i < 3; ++i) {
    const float c000 = q[i], c001 = q[dx + i], c010 = q[dy + i], c011 = q[dy + dx + i];
    const float c100 = q[dz + i], c101 = q[dz + dx + i], c110 = q[dz + dy + i], c111 = q[dz + dy + dx + i];
    r[i] += gz * (gy * (gx * c000 + c.fx * c001) + c.fy * (gx * c010 + c.fx * c011)) +
            c.fz * (gy * (gx * c100 + c.fx * c101) + c.fy * (gx * c110 + c.fx * c111));
  }
}

// u [3, D, H, W]; v [3, D2, H2, W2] or empty; matrices [9] row-major U_other, U_own, offset [3] -> {mm [3, D, H, W],
// ic [D, H, W], outside [D, H, W] (bool)} (the last two empty without v)
std::vector<torch::Tensor> qa_fields(torch::Tensor u, torch::Tensor v, torch::Tensor other_matrix,
                                     torch::Tensor offset, torch::Tensor own_matrix) {
  const int64_t D = u.size(1), H = u.size(2), W = u.size(3), V = D * H * W;
  const bool with_ic = v.numel() > 0;
  auto mm = torch::empty_like(u);
  auto ic = with_ic ? torch::empty({D, H, W}, u.options()) : torch::empty({0}, u.options());
  auto outside = with_ic ? torch::empty({D, H, W}, u.options().dtype(torch::kBool)) : torch::empty({0}, u.options());
  float Uo[9], Un[9], t[3];
  floats_of(other_matrix, Uo, 9);
  floats_of(own_matrix, Un, 9);
  floats_of(offset, t, 3);
  const float* pu = u.data_ptr<float>();
  // the reverse field with its channels interleaved: the eight corners' three values share cache lines
  const auto interleaved = with_ic ? v.permute({1, 2, 3, 0}).contiguous() : v;
  const float* pv = with_ic ? interleaved.data_ptr<float>() : nullptr;
  const int64_t D2 = with_ic ? v.size(1) : 0, H2 = with_ic ? v.size(2) : 0, W2 = with_ic ? v.size(3) : 0;
  float* pm = mm.data_ptr<float>();
  float* pic = with_ic ? ic.data_ptr<float>() : nullptr;
  bool* pout = with_ic ? outside.data_ptr<bool>() : nullptr;
  const float sz = D > 1 ? 1.0f / static_cast<float>(D - 1) : 0.0f;
  const float sy = H > 1 ? 1.0f / static_cast<float>(H - 1) : 0.0f;
  const float sx = W > 1 ? 1.0f / static_cast<float>(W - 1) : 0.0f;
  at::parallel_for(0, D * H, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t z = row / H, y = row % H;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t k = row * W + x;
        const float w[3] = {static_cast<float>(z) * sz, static_cast<float>(y) * sy, static_cast<float>(x) * sx};
        const float d[3] = {pu[k], pu[V + k], pu[2 * V + k]};
        const float m[3] = {w[0] + d[0], w[1] + d[1], w[2] + d[2]};
        for (int i = 0; i < 3; ++i)
          pm[i * V + k] = (t[i] + Uo[3 * i] * m[0] + Uo[3 * i + 1] * m[1] + Uo[3 * i + 2] * m[2]) -
                          (Un[3 * i] * w[0] + Un[3 * i + 1] * w[1] + Un[3 * i + 2] * w[2]);
        if (!with_ic) continue;
        const BorderCell cell = border_cell(D2, H2, W2, m[0], m[1], m[2]);
        float r[3] = {d[0], d[1], d[2]};
        border_sample3(pv, cell, r);
        float length = 0.0f;
        for (int i = 0; i < 3; ++i) {
          const float e = Un[3 * i] * r[0] + Un[3 * i + 1] * r[1] + Un[3 * i + 2] * r[2];
          length += e * e;
        }
        pic[k] = std::sqrt(length);
        pout[k] = (m[0] < 0.0f) || (m[0] > 1.0f) || (m[1] < 0.0f) || (m[1] > 1.0f) || (m[2] < 0.0f) || (m[2] > 1.0f);
      }
    }
  });
  return {mm, ic, outside};
}

// ---- register()'s warped image, one row of the fixed image at a time (pipeline/registration.py, _warp_moving): at
// fixed voxel (z, y, x) the network-grid point w = A (z, y, x) + a (unit cube of the network grid over the fixed
// image), the displacement u(w) by the box-aligned resize of the network-grid field u [3, S0, S1, S2] (per-axis tables
// of the lower and upper source index and the upper weight; the rows along z and y blended once per fixed row), the
// moving image's unit-cube point m = M (w + u) + t, and the moving image [Dm, Hm, Wm] there (trilinear, border
// padding, as sample_at) if |m - 1/2| <= h along every axis (ITK's rule: within half a voxel of the outer voxel
// centres), else 0. All float32, written into out [D, H, W].
void warp_image(torch::Tensor out, torch::Tensor moving, torch::Tensor field, std::vector<torch::Tensor> lower,
                std::vector<torch::Tensor> upper, std::vector<torch::Tensor> weight, torch::Tensor where_matrix,
                torch::Tensor where_offset, torch::Tensor to_moving_matrix, torch::Tensor to_moving_offset,
                torch::Tensor half_width) {
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.scalar_type() == at::kFloat, "warp_image: out [D, H, W]");
  TORCH_CHECK(moving.dim() == 3 && moving.is_contiguous() && moving.scalar_type() == at::kFloat &&
              moving.size(0) >= 2 && moving.size(1) >= 2 && moving.size(2) >= 2,
              "warp_image: moving [Dm, Hm, Wm], float32, every axis at least 2 voxels");
  TORCH_CHECK(field.dim() == 4 && field.size(0) == 3 && field.is_contiguous() && field.scalar_type() == at::kFloat,
              "warp_image: field [3, S0, S1, S2]");
  TORCH_CHECK(lower.size() == 3 && upper.size() == 3 && weight.size() == 3, "warp_image: three tables");
  for (int axis = 0; axis < 3; ++axis)
    TORCH_CHECK(lower[axis].numel() == out.size(axis) && upper[axis].numel() == out.size(axis) &&
                weight[axis].numel() == out.size(axis), "warp_image: a table's length is not its axis'");
  const int64_t D = out.size(0), H = out.size(1), W = out.size(2);
  const int64_t Dm = moving.size(0), Hm = moving.size(1), Wm = moving.size(2);
  const int64_t S1 = field.size(2), S2 = field.size(3), V = field.size(1) * S1 * S2;
  float A[9], a[3], M[9], t[3], h[3];
  floats_of(where_matrix, A, 9);
  floats_of(where_offset, a, 3);
  floats_of(to_moving_matrix, M, 9);
  floats_of(to_moving_offset, t, 3);
  floats_of(half_width, h, 3);
  const int64_t* lz = lower[0].data_ptr<int64_t>();
  const int64_t* uz = upper[0].data_ptr<int64_t>();
  const int64_t* ly = lower[1].data_ptr<int64_t>();
  const int64_t* uy = upper[1].data_ptr<int64_t>();
  const int64_t* lx = lower[2].data_ptr<int64_t>();
  const int64_t* ux = upper[2].data_ptr<int64_t>();
  const float* wz = weight[0].data_ptr<float>();
  const float* wy = weight[1].data_ptr<float>();
  const float* wx = weight[2].data_ptr<float>();
  const float* pf = field.data_ptr<float>();
  const float* pm = moving.data_ptr<float>();
  float* po = out.data_ptr<float>();
#ifdef ICONREG_VECTOR
  const bool vector = use_vector() && Dm * Hm * Wm < (int64_t(1) << 31) - 1;
#endif
  at::parallel_for(0, D * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> blended(S2), displacement(3 * W), coordinates(3 * W);
    float* cz = coordinates.data();
    float* cy = cz + W;
    float* cx = cy + W;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t z = row / H, y = row % H;
      const float fz = wz[z], gz = 1.0f - fz, fy = wy[y], gy = 1.0f - fy;
      const float c00 = gz * gy, c01 = gz * fy, c10 = fz * gy, c11 = fz * fy;
      for (int i = 0; i < 3; ++i) {
        const float* r00 = pf + i * V + (lz[z] * S1 + ly[y]) * S2;
        const float* r01 = pf + i * V + (lz[z] * S1 + uy[y]) * S2;
        const float* r10 = pf + i * V + (uz[z] * S1 + ly[y]) * S2;
        const float* r11 = pf + i * V + (uz[z] * S1 + uy[y]) * S2;
        float* b = blended.data();
        for (int64_t k = 0; k < S2; ++k) b[k] = c00 * r00[k] + c01 * r01[k] + c10 * r10[k] + c11 * r11[k];
        float* d = displacement.data() + i * W;
        for (int64_t x = 0; x < W; ++x) d[x] = (1.0f - wx[x]) * b[lx[x]] + wx[x] * b[ux[x]];
      }
      float base[3];
      for (int i = 0; i < 3; ++i)
        base[i] = (a[i] + A[3 * i] * static_cast<float>(z)) + A[3 * i + 1] * static_cast<float>(y);
      const float* dz = displacement.data();
      const float* dy = dz + W;
      const float* dx = dy + W;
      for (int64_t x = 0; x < W; ++x) {
        const float ix = static_cast<float>(x);
        const float p0 = (base[0] + A[2] * ix) + dz[x], p1 = (base[1] + A[5] * ix) + dy[x];
        const float p2 = (base[2] + A[8] * ix) + dx[x];
        cz[x] = t[0] + (M[0] * p0 + M[1] * p1 + M[2] * p2);
        cy[x] = t[1] + (M[3] * p0 + M[4] * p1 + M[5] * p2);
        cx[x] = t[2] + (M[6] * p0 + M[7] * p1 + M[8] * p2);
      }
      float* o = po + row * W;
#ifdef ICONREG_VECTOR
      if (vector) {
        const Points<float> points{coordinates.data(), 0, W};
        forward_groups<false, false>(pm, points, o, nullptr, 1, static_cast<int>(Dm), static_cast<int>(Hm),
                                     static_cast<int>(Wm), 0, W, 0, (W + 15) / 16);
      } else
#endif
      {
        for (int64_t x = 0; x < W; ++x) {
          Axis<float> ax, ay, az;
          locate<float, false>(cx[x] * 2.0f - 1.0f, Wm, ax);
          locate<float, false>(cy[x] * 2.0f - 1.0f, Hm, ay);
          locate<float, false>(cz[x] * 2.0f - 1.0f, Dm, az);
          float w[8], c[8];
          corner_weights(ax, ay, az, w);
          corners(pm + (az.i * Hm + ay.i) * Wm + ax.i, Hm * Wm, Wm, ax, ay, az, true, c);
          float value = w[0] * c[0];
          for (int j = 1; j < 8; ++j) value = value + w[j] * c[j];
          o[x] = value;
        }
      }
      for (int64_t x = 0; x < W; ++x)
        if (!(std::abs(cz[x] - 0.5f) <= h[0] && std::abs(cy[x] - 0.5f) <= h[1] && std::abs(cx[x] - 0.5f) <= h[2]))
          o[x] = 0.0f;
    }
  });
}

// ---- the band of an exact percentile (pipeline/percentile.py, _band_values): for a 1-D array, how many values lie
// below low, in [low, high] and above high (a NaN in none of them), and the values in [low, high] in their order.
// Two passes over fixed chunks (the same result for any thread count): the counts per chunk, then each chunk's band
// values copied to its offset.
template <typename T>
static std::vector<torch::Tensor> band_of_t(const torch::Tensor& values, double low_bound, double high_bound) {
  const int64_t n = values.numel(), chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
  const T low = static_cast<T>(low_bound), high = static_cast<T>(high_bound);
  const T* pv = values.data_ptr<T>();
  std::vector<int64_t> below(chunks), inside(chunks), above(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t b = 0, i = 0, a = 0;
      for (int64_t k = c * chunk, stop = std::min(n, (c + 1) * chunk); k < stop; ++k) {
        const T v = pv[k];
        b += v < low;
        a += v > high;
        i += (v >= low) & (v <= high);
      }
      below[c] = b; inside[c] = i; above[c] = a;
    }
  });
  std::vector<int64_t> offset(chunks + 1, 0);
  int64_t total_below = 0, total_above = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    offset[c + 1] = offset[c] + inside[c];
    total_below += below[c];
    total_above += above[c];
  }
  auto band = torch::empty({offset[chunks]}, values.options());
  T* pb = band.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T* out = pb + offset[c];
      for (int64_t k = c * chunk, stop = std::min(n, (c + 1) * chunk); k < stop; ++k) {
        const T v = pv[k];
        if (v >= low && v <= high) *out++ = v;
      }
    }
  });
  auto counts = torch::tensor({total_below, offset[chunks], total_above}, torch::kInt64);
  return {counts, band};
}

std::vector<torch::Tensor> band_of(torch::Tensor values, double low, double high) {
  if (values.scalar_type() == at::kDouble) return band_of_t<double>(values, low, high);
  return band_of_t<float>(values, low, high);
}

// ---- intensity normalisation (pipeline/preprocessing.py): (clamp(x, low, high) - low) / (high - low) for float32 x,
// the clamp in float32 against the bounds rounded to float32 (as torch.clamp of a float32 tensor), the rest in
// float64, rounded to float32 once: the tensor expression's bits. A NaN stays NaN.
torch::Tensor clamp_scale(torch::Tensor values, double low, double high) {
  auto out = torch::empty_like(values);
  const float lo = static_cast<float>(low), hi = static_cast<float>(high);
  const double range = high - low;
  const float* pv = values.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, values.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float c = pv[k];
      c = c < lo ? lo : c;  // torch.clamp's order: the lower bound, then the upper one (a NaN stays NaN)
      c = c > hi ? hi : c;
      po[k] = static_cast<float>((static_cast<double>(c) - low) / range);
    }
  });
  return out;
}

// The GIL is released while a kernel runs, as for PyTorch's own operators.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("blur_axis", &blur_axis, py::call_guard<py::gil_scoped_release>());
  m.def("channel_sums", &channel_sums, py::call_guard<py::gil_scoped_release>());
  m.def("channel_affine", &channel_affine, py::call_guard<py::gil_scoped_release>());
  m.def("plane_sum", &plane_sum, py::call_guard<py::gil_scoped_release>());
  m.def("upsample_add", &upsample_add, py::call_guard<py::gil_scoped_release>());
  m.def("upsample_adjoint", &upsample_adjoint, py::call_guard<py::gil_scoped_release>());
  m.def("displacement_jacobian", &displacement_jacobian, py::call_guard<py::gil_scoped_release>());
  m.def("warped_label_sums", &warped_label_sums, py::call_guard<py::gil_scoped_release>());
  m.def("fold_sum", &fold_sum, py::call_guard<py::gil_scoped_release>());
  m.def("fold_gradient", &fold_gradient, py::call_guard<py::gil_scoped_release>());
  m.def("warped_label_gradient", &warped_label_gradient, py::call_guard<py::gil_scoped_release>());
  m.def("qa_fields", &qa_fields, py::call_guard<py::gil_scoped_release>());
  m.def("warp_image", &warp_image, py::call_guard<py::gil_scoped_release>());
  m.def("clamp_scale", &clamp_scale, py::call_guard<py::gil_scoped_release>());
  m.def("band_of", &band_of, py::call_guard<py::gil_scoped_release>());
  m.def("sample_forward", &sample_forward, py::call_guard<py::gil_scoped_release>());
  m.def("sample_forward_with_derivatives", &sample_forward_with_derivatives, py::call_guard<py::gil_scoped_release>());
  m.def("set_vectorized", &set_vectorized);
  m.def("vectorized", &vectorized);
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
_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")  # no fused multiply-adds: the AVX-512 lanes keep the scalar bits
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


def kernels_eligible(tensor: torch.Tensor) -> bool:
    """Whether the library's array kernels (:func:`blur_axis`, :func:`channel_sums`, :func:`channel_affine`,
    :func:`upsample_add`, :func:`upsample_adjoint`, :func:`displacement_jacobian`, :func:`qa_fields`,
    :func:`warp_image`, :func:`warped_label_sums`, :func:`warped_label_gradient`, :func:`fold_sum`,
    :func:`fold_gradient`, :func:`clamp_scale`, :func:`band_of`) can take this tensor: CPU, float32 or float64, not
    empty, the library loaded (each kernel's own dtype limits are in its docstring)."""
    return (tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64) and tensor.numel() > 0
            and _mode() != "0" and _module_or_none() is not None)


def blur_axis(rows: torch.Tensor, taps: torch.Tensor, offset: int) -> torch.Tensor:
    """``out[o, i, t] = Σ_k taps[k] · rows[o, i − offset + k, t]`` over the ``k`` that stay inside the axis (zero
    padding), for ``rows`` ``[outer, n, inner]`` (made contiguous) and ``taps`` of its dtype: one axis of a
    separable blur, 1.7–2.9× faster than the banded matrix products on two threads at 80×96×80 for σ 2–3 (1.1× at
    σ 5). Call it where :func:`kernels_eligible` holds."""
    return _module.blur_axis(rows.contiguous(), taps.to(rows.dtype).contiguous(), int(offset))


def _row_major(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[R, C]`` itself when each row's values are adjacent (a channel slice of a channels-last tensor's
    voxels qualifies: rows further apart than ``C``), else a contiguous copy."""
    if rows.stride(1) == 1 and rows.stride(0) >= rows.shape[1]:
        return rows
    return rows.contiguous()


def channel_sums(rows: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-channel sums of ``rows`` ``[R, C]`` (float32 or float64, row-major: a channels-last tensor's voxels, or a
    slice of its channels; not copied when each row's values are adjacent), accumulated in float64 in a fixed order
    whatever the thread count: ``[2, C]`` float64, row 0 ``Σ_r rows[r, c]`` and row 1 ``Σ_r rows[r, c]²``, or
    ``Σ_r rows[r, c] · other[r, c]`` when ``other`` (same shape and dtype) is given. Call it where
    :func:`kernels_eligible` holds for ``rows``."""
    empty = rows.new_empty(0)
    return _module.channel_sums(_row_major(rows), empty if other is None else _row_major(other))


def channel_affine(rows: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   other: Optional[torch.Tensor] = None, other_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(rows − shift) · scale + other · other_scale + offset`` per channel, in one pass, for ``rows`` (and
    ``other``, same shape and dtype) ``[R, C]`` (read as :func:`channel_sums` reads them) and the per-channel vectors
    ``[C]``, or ``[G, C]`` for ``G`` groups of ``R / G`` consecutive rows, each with its own row of values (the batch
    norm of ``G`` batches stacked into one; cast to ``rows``' dtype): a new contiguous ``[R, C]`` tensor. Call it where
    :func:`kernels_eligible` holds for ``rows``."""
    if (other is None) != (other_scale is None):
        raise ValueError("channel_affine needs both other and other_scale, or neither")
    vectors = [v for v in (shift, scale, offset, other_scale) if v is not None]
    if any(v.shape != shift.shape for v in vectors) or shift.dim() not in (1, 2) or shift.shape[-1] != rows.shape[1] \
            or rows.shape[0] % (shift.shape[0] if shift.dim() == 2 else 1):
        raise ValueError(f"channel_affine: vectors of shape [C] or [G, C] with G dividing the rows, for rows "
                         f"{tuple(rows.shape)} and vectors {[tuple(v.shape) for v in vectors]}")

    def vector(values: Optional[torch.Tensor]) -> torch.Tensor:
        return rows.new_empty(0) if values is None else values.to(rows.dtype).contiguous().view(-1)
    return _module.channel_affine(_row_major(rows), vector(shift), vector(scale),
                                  rows.new_empty(0) if other is None else _row_major(other), vector(other_scale),
                                  vector(offset))


def plane_sum_eligible(partial: torch.Tensor) -> bool:
    """Whether :func:`plane_sum` can take ``partial``: CPU, float32 or bfloat16, not empty, the library loaded."""
    return (partial.device.type == "cpu" and partial.dtype in (torch.float32, torch.bfloat16)
            and partial.numel() > 0 and _mode() != "0" and _module_or_none() is not None)


def plane_sum(partial: torch.Tensor, outputs: int, kernel: int, low: bool,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The last step of a convolution to ``outputs`` channels computed plane by plane (``networks._few_channel_forward``),
    in one pass: ``partial`` ``[N, D, H, W, P]`` (float32 or bfloat16; a channels-last convolution output with its
    channels moved last) holds for each of the ``kernel`` planes ``a`` along D the planes' outputs at channels
    ``a·O + o`` (and, when ``low``, a second weight's at ``kernel·O + a·O + o``, added to them). Returns float32
    ``[N, O, D, H, W]`` (default memory order): the centre plane's values plus each other plane's, shifted by its
    offset ``a − kernel // 2`` along D (zero outside), then ``bias`` (``[O]``, cast to float32). The same float32
    operations in the same order as the tensor path there, so the same values. Call it where
    :func:`plane_sum_eligible` holds."""
    empty = torch.empty(0, dtype=torch.float32)
    return _module.plane_sum(partial.contiguous(), int(outputs), int(kernel), bool(low),
                             empty if bias is None else bias.to(torch.float32).contiguous())


def upsample_add(coarse: torch.Tensor, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear upsampling by 2 along the three spatial axes (``align_corners=False``: PyTorch's ``trilinear`` at scale
    2) of ``coarse`` ``[N, D, H, W, C]`` float32 (a channels-last tensor with its channels moved last), plus
    ``addend`` ``[N, 2D, 2H, 2W, C]`` (float32 or bfloat16) when given: a new float32 ``[N, 2D, 2H, 2W, C]``. Call it
    where :func:`kernels_eligible` holds for ``coarse``."""
    return _module.upsample_add(coarse.contiguous(), coarse.new_empty(0) if addend is None else addend.contiguous())


def upsample_adjoint(grad: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`upsample_add`'s upsampling: ``[N, 2D, 2H, 2W, C]`` float32 → ``[N, D, H, W, C]``."""
    return _module.upsample_adjoint(grad.contiguous())


def warped_label_sums(moving: torch.Tensor, fixed: torch.Tensor, coordinates: torch.Tensor, sizes: Sequence[int],
                      bins: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Per sample and channel, the overlap and the warped volume of ``losses.soft_dice_loss_of_warped_labels``, in one
    pass: ``moving`` ``[B, M]`` and ``fixed`` ``[B, P]`` int64 channel numbers (``M`` = the product of ``sizes``, the
    moving grid), ``coordinates`` ``[B, 3, P]`` float32 or float64 (unit cube of the moving grid) →
    ``(overlap, volume)`` ``[B, bins]`` float64 (accumulated in float64, in a fixed order whatever the thread count).
    Call it where :func:`kernels_eligible` holds for ``coordinates``."""
    for name, labels in (("moving", moving), ("fixed", fixed)):
        low, high = torch.aminmax(labels)
        if labels.dtype != torch.int64 or int(low) < 0 or int(high) >= bins:
            raise ValueError(f"warped_label_sums: {name} channel numbers must be int64 in [0, {bins}), got "
                             f"{labels.dtype} in [{int(low)}, {int(high)}]")
    return tuple(_module.warped_label_sums(moving.contiguous(), fixed.contiguous(), coordinates.contiguous(),
                                           [int(n) for n in sizes], int(bins)))


def warped_label_gradient(moving: torch.Tensor, fixed: torch.Tensor, coordinates: torch.Tensor,
                          sizes: Sequence[int], grad_overlap: torch.Tensor, grad_volume: torch.Tensor) -> torch.Tensor:
    """The gradient ``[B, 3, P]`` (``coordinates``' dtype) with respect to ``coordinates`` of a function of
    :func:`warped_label_sums`' sums, from its gradients ``grad_overlap``, ``grad_volume`` ``[B, bins]``."""
    return _module.warped_label_gradient(moving.contiguous(), fixed.contiguous(), coordinates.contiguous(),
                                         [int(n) for n in sizes], grad_overlap.double().contiguous(),
                                         grad_volume.double().contiguous())


def fold_sum(maps: torch.Tensor, margin: float, scale: float) -> float:
    """``Σ relu(margin − det J / scale)`` over the voxels of ``maps`` ``[B, 3, D, H, W]`` (float32 or float64, 2+
    voxels per axis; det J of the index-step derivatives as ``coordinates.jacobian_determinant`` forms them, ``scale``
    its grid determinant), accumulated in float64 in a fixed order. Call it where :func:`kernels_eligible` holds."""
    return float(_module.fold_sum(maps.contiguous(), float(margin), float(scale)))


def fold_gradient(maps: torch.Tensor, margin: float, scale: float, weight: float) -> torch.Tensor:
    """The gradient ``[B, 3, D, H, W]`` (``maps``' dtype) of ``weight ·`` :func:`fold_sum` with respect to ``maps``."""
    return _module.fold_gradient(maps.contiguous(), float(margin), float(scale), float(weight))


def displacement_jacobian(displacement: torch.Tensor, inverse_grid_matrix: torch.Tensor) -> torch.Tensor:
    """``coordinates.displacement_jacobian_determinant`` in one pass: ``displacement`` ``[B, 3, D, H, W]`` float32,
    ``inverse_grid_matrix`` the 3×3 ``G⁻¹`` → ``[B, 1, D, H, W]`` float32 (the same operations per voxel, to float
    rounding; no gradient). Call it where :func:`kernels_eligible` holds for ``displacement``."""
    return _module.displacement_jacobian(displacement.contiguous(), inverse_grid_matrix.double().contiguous())


def qa_fields(displacement: torch.Tensor, back_displacement: Optional[torch.Tensor], other_matrix: torch.Tensor,
              offset: torch.Tensor, own_matrix: torch.Tensor
              ) -> "tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]":
    """``register()``'s QA fields on the network grid in one pass: for ``displacement`` ``[1, 3, *S]`` (float32, the
    own grid's unit cube → the other's) the displacement in mm ``[1, 3, *S]``, and with ``back_displacement``
    ``[1, 3, *S']`` (the reverse map's, on the other grid) the IC error in mm ``[1, *S]`` and whether the mapped
    point leaves the other unit cube ``[1, 1, *S]`` (bool); the matrices and offset as in
    ``pipeline.registration._sample_fields``. Call it where :func:`kernels_eligible` holds."""
    empty = displacement.new_empty(0)
    mm, ic, outside = _module.qa_fields(displacement[0].contiguous(),
                                        empty if back_displacement is None else back_displacement[0].contiguous(),
                                        other_matrix, offset, own_matrix)
    if back_displacement is None:
        return mm[None], None, None
    return mm[None], ic[None], outside[None, None]


def warp_image(out: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
               tables: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], where_matrix: torch.Tensor,
               where_offset: torch.Tensor, to_moving_matrix: torch.Tensor, to_moving_offset: torch.Tensor,
               half_width: torch.Tensor) -> torch.Tensor:
    """``register()``'s warped moving image in one pass over the fixed image's voxels, written into ``out``
    ``[D, H, W]`` (float32, contiguous; returned). ``moving`` ``[Dm, Hm, Wm]`` float32; ``displacement``
    ``[1, 3, *S]`` float32 on the network grid over the fixed image; ``tables`` per axis of ``out`` the box-aligned
    resize's ``(lower, upper, weight)`` (source indices into ``S`` and the upper one's weight); the fixed voxel index
    → network unit cube ``where_matrix`` / ``where_offset``, the network point → moving unit cube
    ``to_moving_matrix`` / ``to_moving_offset``, and the half widths of the moving image's inside test (as in
    ``pipeline.registration._warp_moving``). Every axis of ``moving`` needs at least two voxels. Call it where
    :func:`kernels_eligible` holds for ``moving``."""
    _module.warp_image(out, moving.contiguous(), displacement[0].contiguous(),
                       [t[0].to(torch.int64).contiguous() for t in tables],
                       [t[1].to(torch.int64).contiguous() for t in tables],
                       [t[2].to(torch.float32).contiguous() for t in tables], where_matrix.contiguous(),
                       where_offset.contiguous(), to_moving_matrix.contiguous(), to_moving_offset.contiguous(),
                       half_width.contiguous())
    return out


def band_of(values: torch.Tensor, low: float, high: float) -> tuple[int, torch.Tensor, int]:
    """For a 1-D float32 or float64 tensor (made contiguous) and bounds of its dtype: ``(how many values are below
    low, the values in [low, high] in their order, how many are above high)``; a NaN counts in none of them. Two
    compiled passes instead of five array operations (``pipeline.percentile``'s band). Call it where
    :func:`kernels_eligible` holds for ``values``."""
    counts, band = _module.band_of(values.contiguous(), float(low), float(high))
    below, _, above = (int(c) for c in counts)
    return below, band, above


def clamp_scale(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``((values.clamp(low, high).double() − low) / (high − low)).float()`` for float32 ``values`` in one pass and
    no float64 copy: the same bits (the clamp against the bounds rounded to float32, as ``torch.clamp`` does, the
    rest in float64). Call it where :func:`kernels_eligible` holds for ``values``."""
    return _module.clamp_scale(values.contiguous(), float(low), float(high))


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
#: channel, batch 2, at 80×96×80 the forward grew by 10 % (AVX-512 path; 40 % scalar) and the points-only backward
#: kernel (4–15 ms with 2 threads) became an element-wise product.
DERIVATIVES_IN_FORWARD_CHANNELS = 3


#: A backward that needs both gradients runs as two passes over the points (the point gradients, then the image
#: gradient; the same numbers) when there are at most this many points per image voxel: with points spread over the
#: volume the one pass's reads of the image and its writes to the image gradient evicted each other from the caches.
#: A 3-channel 80×96×80 field at GradICON's penalty points, 2 threads: 0.5 points per voxel (the training default's
#: and instance optimisation's subset, batch 2) 17.8 → 13.2 ms, 1 per voxel 24.9 → 18.6, 2 per voxel 37.7 → 32.0, 4 per
#: voxel (every grid point) 52.9 against 53.6 ms.
SEPARATE_PASSES_POINTS_PER_VOXEL = 2.0


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
            out, derivative = _module.sample_forward_with_derivatives(image, points, zeros)
            ctx.save_for_backward(derivative, points)
        else:
            out = _module.sample_forward(image, points, zeros)
            ctx.save_for_backward(image, points)
        ctx.derivatives, ctx.image_shape = derivatives, tuple(image.shape[2:])
        ctx.shape, ctx.zeros = coordinates.shape, zeros
        return out.reshape(batch, channels, *coordinates.shape[2:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        want_image, want_points = ctx.needs_input_grad[:2]
        if ctx.derivatives:  # derivative [N, C, 3, P] from the forward: the image needs no gradient
            derivative, points = ctx.saved_tensors
            if not want_points:
                return None, None, None, None
            grad_points = (grad_out.reshape(*derivative.shape[:2], 1, -1) * derivative).sum(dim=1)
            if not bool(torch.isfinite(grad_out).all()):  # as the backward kernel: a point that reaches no voxel,
                # or has a NaN coordinate, gets 0 whatever its output gradient (0 × NaN would be NaN)
                grad_points = grad_points.masked_fill(~_live(points, ctx.image_shape, ctx.zeros)[:, None], 0)
            return None, grad_points.reshape(ctx.shape), None, None
        image, points = ctx.saved_tensors
        grad_out = grad_out.reshape(image.shape[0], image.shape[1], -1).contiguous()
        if want_image and want_points and points.shape[2] <= SEPARATE_PASSES_POINTS_PER_VOXEL * image[0, 0].numel():
            # sparse points: the point gradients (reading the image), then the image gradient (writing it)
            grad_points = _module.sample_backward(image, points, grad_out, False, True, ctx.zeros)[1]
            grad_image = _module.sample_backward(image, points, grad_out, True, False, ctx.zeros)[0]
        else:
            grad_image, grad_points = _module.sample_backward(image, points, grad_out, want_image, want_points,
                                                              ctx.zeros)
        return (grad_image if want_image else None,
                grad_points.reshape(ctx.shape) if want_points else None, None, None)


def _live(points: torch.Tensor, shape: tuple, zeros: bool) -> torch.Tensor:
    """``[N, P]``: whether each point ``[N, 3, P]`` (unit cube, (z, y, x)) gets a point gradient from the kernel —
    no NaN coordinate and, with zeros padding, within reach of a voxel on every axis (the kernel's arithmetic)."""
    grid = points * 2 - 1
    limit = torch.tensor([n - 1 for n in shape], dtype=points.dtype, device=points.device).view(1, 3, 1)
    x = ((grid + 1) / 2) * limit
    if zeros:  # a NaN fails both comparisons
        return ((x >= -1) & (x < limit + 1)).all(dim=1)
    return ~torch.isnan(grid).any(dim=1)


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
