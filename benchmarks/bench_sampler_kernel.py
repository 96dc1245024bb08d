"""How much a plain compiled trilinear sampler would gain over PyTorch's CPU ``grid_sample`` (a feasibility check).

    python benchmarks/bench_sampler_kernel.py [--sizes 80,96,80] [--channels 1 3] [--repeats 5]

`grid_sample` forward + backward is about a third of a training step on a CPU (see "bench_train_step.py" in
benchmarks/README.md), and PyTorch's 3-D CPU kernel is scalar code that checks every corner. This script compiles
(``torch.utils.cpp_extension.load_inline``, ``-O3 -march=native``; it needs a C++ compiler and ninja, and says so
when they are missing) a ~60-line kernel for the project's one sampling case — trilinear, border padding,
``align_corners=True``, float32, points in voxel coordinates — forward and backward (gradients for the image and
for the points), checks it against ``grid_sample`` on the same inputs and prints a table: best-of-``--repeats``
seconds on one thread for both, and the ratio. Points are near-identity (a voxel grid plus Gaussian noise of 0.8
voxel), as the maps of a training step are. The backward kernel scatters into the image gradient without atomics,
so it runs on one thread; the comparison is one thread on both sides.

Nothing in the package uses this kernel: it measures what a compiled fast path would buy before anyone builds one
(with its build-time compiler, fallback and equivalence tests).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import torch
import torch.nn.functional as F

SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>

// img [C, D, H, W] float32 contiguous; pts [3, N] voxel coordinates (z, y, x); border padding.
struct Corner {
  int64_t offset; float fz, fy, fx, mz, my, mx;
};

static inline Corner corner(const float* P, int64_t N, int64_t n, int64_t D, int64_t H, int64_t W) {
  const float zr = P[n], yr = P[N + n], xr = P[2 * N + n];
  const float z = std::min(std::max(zr, 0.f), float(D - 1));
  const float y = std::min(std::max(yr, 0.f), float(H - 1));
  const float x = std::min(std::max(xr, 0.f), float(W - 1));
  const int64_t z0 = std::min<int64_t>((int64_t)z, D - 2), y0 = std::min<int64_t>((int64_t)y, H - 2),
                x0 = std::min<int64_t>((int64_t)x, W - 2);
  // a clamped coordinate has no gradient (border padding)
  return {z0 * H * W + y0 * W + x0, z - z0, y - y0, x - x0,
          (zr > 0.f && zr < float(D - 1)) ? 1.f : 0.f, (yr > 0.f && yr < float(H - 1)) ? 1.f : 0.f,
          (xr > 0.f && xr < float(W - 1)) ? 1.f : 0.f};
}

torch::Tensor sample_forward(torch::Tensor img, torch::Tensor pts) {
  const int64_t C = img.size(0), D = img.size(1), H = img.size(2), W = img.size(3), N = pts.size(1);
  auto out = torch::empty({C, N}, img.options());
  const float* I = img.data_ptr<float>();
  const float* P = pts.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t sD = H * W, sC = D * H * W;
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Corner k = corner(P, N, n, D, H, W);
      const float gz = 1 - k.fz, gy = 1 - k.fy, gx = 1 - k.fx;
      for (int64_t c = 0; c < C; ++c) {
        const float* q = I + c * sC + k.offset;
        O[c * N + n] = gz * (gy * (gx * q[0] + k.fx * q[1]) + k.fy * (gx * q[W] + k.fx * q[W + 1])) +
                       k.fz * (gy * (gx * q[sD] + k.fx * q[sD + 1]) + k.fy * (gx * q[sD + W] + k.fx * q[sD + W + 1]));
      }
    }
  });
  return out;
}

std::vector<torch::Tensor> sample_backward(torch::Tensor img, torch::Tensor pts, torch::Tensor grad_out,
                                           bool image_gradient) {
  const int64_t C = img.size(0), D = img.size(1), H = img.size(2), W = img.size(3), N = pts.size(1);
  auto grad_pts = torch::empty({3, N}, pts.options());
  auto grad_img = image_gradient ? torch::zeros_like(img) : torch::empty({0}, img.options());
  const float* I = img.data_ptr<float>();
  const float* P = pts.data_ptr<float>();
  const float* G = grad_out.data_ptr<float>();
  float* GP = grad_pts.data_ptr<float>();
  float* GI = image_gradient ? grad_img.data_ptr<float>() : nullptr;
  const int64_t sD = H * W, sC = D * H * W;
  for (int64_t n = 0; n < N; ++n) {
    const Corner k = corner(P, N, n, D, H, W);
    const float gz = 1 - k.fz, gy = 1 - k.fy, gx = 1 - k.fx;
    float dz = 0, dy = 0, dx = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float* q = I + c * sC + k.offset;
      const float g = G[c * N + n];
      const float a000 = q[0], a001 = q[1], a010 = q[W], a011 = q[W + 1];
      const float a100 = q[sD], a101 = q[sD + 1], a110 = q[sD + W], a111 = q[sD + W + 1];
      dx += g * (gz * (gy * (a001 - a000) + k.fy * (a011 - a010)) + k.fz * (gy * (a101 - a100) + k.fy * (a111 - a110)));
      dy += g * (gz * (gx * (a010 - a000) + k.fx * (a011 - a001)) + k.fz * (gx * (a110 - a100) + k.fx * (a111 - a101)));
      dz += g * (gy * (gx * (a100 - a000) + k.fx * (a101 - a001)) + k.fy * (gx * (a110 - a010) + k.fx * (a111 - a011)));
      if (GI) {
        float* r = GI + c * sC + k.offset;
        r[0] += g * gz * gy * gx;        r[1] += g * gz * gy * k.fx;
        r[W] += g * gz * k.fy * gx;      r[W + 1] += g * gz * k.fy * k.fx;
        r[sD] += g * k.fz * gy * gx;     r[sD + 1] += g * k.fz * gy * k.fx;
        r[sD + W] += g * k.fz * k.fy * gx; r[sD + W + 1] += g * k.fz * k.fy * k.fx;
      }
    }
    GP[n] = dz * k.mz; GP[N + n] = dy * k.my; GP[2 * N + n] = dx * k.mx;
  }
  return {grad_img, grad_pts};
}
"""


def build():
    """The compiled module, or None with the reason when no compiler/ninja is available."""
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        return None, f"{' and '.join(missing)} not found"
    from torch.utils.cpp_extension import load_inline

    try:
        module = load_inline("iconreg_bench_sampler", cpp_sources=SOURCE,
                             functions=["sample_forward", "sample_backward"],
                             extra_cflags=["-O3", "-march=native"], verbose=False)
    except Exception as error:  # a compiler that cannot build the extension: report, do not fail the benchmark
        return None, f"the kernel did not build ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return module, ""


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(module, shape: tuple[int, int, int], channels: int, repeats: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(channels, *shape, generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    points = (grid.reshape(3, -1) + 0.8 * torch.randn(3, grid[0].numel(), generator=generator)).contiguous()
    grad_out = torch.randn(channels, points.shape[1], generator=generator)

    # voxel (z, y, x) → grid_sample's [1, *shape, 3] (x, y, z) in [-1, 1] (align_corners=True), and back for
    # its gradient
    scale = torch.tensor([2.0 / (s - 1) for s in shape])
    normalised = (points.T * scale - 1).flip(-1).reshape(1, *shape, 3).contiguous()

    def reference(image_gradient: bool):
        # the sampling grid is a leaf, so the timed backward is grid_sample's own
        img = image.clone().requires_grad_(image_gradient)
        leaf = normalised.clone().requires_grad_(True)
        out = F.grid_sample(img[None], leaf, align_corners=True, padding_mode="border").reshape(channels, -1)
        return img, leaf, out

    img, leaf, out = reference(True)
    out.backward(grad_out)
    grad_reference = (leaf.grad.reshape(-1, 3).flip(-1) * scale).T
    ours = module.sample_forward(image, points)
    grad_img, grad_pts = module.sample_backward(image, points, grad_out, True)
    row = {"shape": shape, "channels": channels,
           "forward_max_abs_diff": float((ours - out.detach()).abs().max()),
           "grad_image_rel_diff": float((grad_img - img.grad).norm() / img.grad.norm()),
           "grad_points_rel_diff": float((grad_pts - grad_reference).norm() / grad_reference.norm()),
           "grad_points_median_abs_diff": float((grad_pts - grad_reference).abs().median())}
    row["torch_forward_s"] = _best(lambda: F.grid_sample(image[None], normalised, align_corners=True,
                                                         padding_mode="border"), repeats)
    row["kernel_forward_s"] = _best(lambda: module.sample_forward(image, points), repeats)
    for image_gradient in (True, False):
        key = "image_and_points" if image_gradient else "points_only"
        graphs = [reference(image_gradient) for _ in range(repeats)]
        row[f"torch_backward_{key}_s"] = _best(lambda: graphs.pop()[2].backward(grad_out), repeats)
        row[f"kernel_backward_{key}_s"] = _best(
            lambda: module.sample_backward(image, points, grad_out, image_gradient), repeats)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| grid | channels | pass | torch `grid_sample` (s) | compiled kernel (s) | ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        grid = "×".join(map(str, r["shape"]))
        for label, key in (("forward", "forward"), ("backward, image + points", "backward_image_and_points"),
                           ("backward, points only", "backward_points_only")):
            t, k = r[f"torch_{key}_s"], r[f"kernel_{key}_s"]
            lines.append(f"| {grid} | {r['channels']} | {label} | {t:.4f} | {k:.4f} | {t / k:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["80,96,80"], help="grids as D,H,W")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    module, reason = build()
    if module is None:
        print(f"No compiled kernel to compare: {reason}. PyTorch's grid_sample is what the package uses.")
        return 0
    torch.set_num_threads(1)
    rows = [measure(module, tuple(int(v) for v in size.split(",")), channels, args.repeats)
            for size in args.sizes for channels in args.channels]
    print(f"torch {torch.__version__}, one thread; points near the identity (grid + N(0, 0.8 voxel))")
    print(table(rows))
    for r in rows:
        print(f"{'×'.join(map(str, r['shape']))}, {r['channels']} channel(s): forward max |diff| "
              f"{r['forward_max_abs_diff']:.1e}, image gradient rel. diff {r['grad_image_rel_diff']:.1e}, "
              f"point gradient rel. diff {r['grad_points_rel_diff']:.1e} (median |diff| "
              f"{r['grad_points_median_abs_diff']:.1e}: the difference sits at points on cell faces, where the two "
              "ways of computing the coordinate round into neighbouring cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
