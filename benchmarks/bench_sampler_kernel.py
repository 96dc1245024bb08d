"""The project's compiled trilinear sampler against PyTorch's CPU ``grid_sample``, per sampling.

    python benchmarks/bench_sampler_kernel.py [--sizes 80,96,80] [--channels 1 3] [--threads 1 2] [--repeats 5]

`grid_sample` forward + backward was about a third of a training step on a CPU (see "bench_train_step.py" in
benchmarks/README.md). ``ICONRegistrationLib/core/native_sampler.py`` compiles a kernel for the case the package
samples most — trilinear, border padding, ``align_corners=True``, 3-D, CPU — and ``sample_at`` uses it where it
applies. This script builds it (``native_sampler.enable``: it needs a C++ compiler and ninja, and says so when
they are missing), checks it against ``grid_sample`` on the same inputs and prints a table: best-of-``--repeats``
seconds of both for forward, backward with image and point gradients, and backward with point gradients only, at
each thread count, and the ratio. Points are near-identity (a voxel grid plus Gaussian noise of 0.8 voxel), as the
maps of a training step are. Both sides get the same batch-1 call (``grid_sample`` runs a batch element per
thread; ``sample_at`` cuts large batch-1 samplings into one piece per thread for both, which this table leaves
out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ICONRegistration"))

from ICONRegistrationLib.core.coordinates import grid_sample_grid  # noqa: E402


def build():
    """The package's sampler module after :func:`native_sampler.enable`, or None with the reason it is
    unavailable."""
    os.environ.setdefault("ICONREG_NATIVE_SAMPLER", "1")
    from ICONRegistrationLib.core import native_sampler

    state = native_sampler.enable()
    return (native_sampler if state.available else None), state.reason


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(module, shape: tuple[int, int, int], channels: int, repeats: int, seed: int = 0,
            threads: int = 1) -> dict:
    """One table row: differences against ``grid_sample`` and best-of-``repeats`` times on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(module, shape, channels, repeats, seed, threads)
    finally:
        torch.set_num_threads(before)


def _measure(module, shape, channels, repeats, seed, threads) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, channels, *shape, generator=generator)
    voxels = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    voxels = voxels + 0.8 * torch.randn(voxels.shape, generator=generator)
    # voxel (z, y, x) → the unit-cube map convention [1, 3, *shape] that sample_at takes
    coordinates = (voxels / torch.tensor([s - 1 for s in shape]).view(3, 1, 1, 1))[None].contiguous()
    grad_out = torch.randn(1, channels, *shape, generator=generator)

    def torch_sample(img, points):  # what sample_at runs without the kernel (one grid_sample call)
        return F.grid_sample(img, grid_sample_grid(points), mode="bilinear", padding_mode="border",
                             align_corners=True)

    def kernel_sample(img, points):
        return module.sample(img, points, "border")

    def graph(sample, image_gradient: bool):
        img = image.clone().requires_grad_(image_gradient)
        leaf = coordinates.clone().requires_grad_(True)
        return img, leaf, sample(img, leaf)

    results = {}
    for name, sample in (("torch", torch_sample), ("kernel", kernel_sample)):
        img, leaf, out = graph(sample, True)
        out.backward(grad_out)
        results[name] = (out.detach(), img.grad, leaf.grad)
    (ref, ref_img, ref_pts), (ours, our_img, our_pts) = results["torch"], results["kernel"]
    row = {"shape": shape, "channels": channels, "threads": threads,
           "forward_max_abs_diff": float((ours - ref).abs().max()),
           "grad_image_rel_diff": float((our_img - ref_img).norm() / ref_img.norm()),
           "grad_points_rel_diff": float((our_pts - ref_pts).norm() / ref_pts.norm()),
           "grad_points_median_abs_diff": float((our_pts - ref_pts).abs().median())}
    for name, sample in (("torch", torch_sample), ("kernel", kernel_sample)):
        row[f"{name}_forward_s"] = _best(lambda: sample(image, coordinates), repeats)
        for image_gradient in (True, False):
            key = "image_and_points" if image_gradient else "points_only"
            graphs = [graph(sample, image_gradient) for _ in range(repeats)]
            row[f"{name}_backward_{key}_s"] = _best(lambda: graphs.pop()[2].backward(grad_out), repeats)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| grid | channels | threads | pass | torch `grid_sample` (s) | compiled kernel (s) | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        grid = "×".join(map(str, r["shape"]))
        for label, key in (("forward", "forward"), ("backward, image + points", "backward_image_and_points"),
                           ("backward, points only", "backward_points_only")):
            t, k = r[f"torch_{key}_s"], r[f"kernel_{key}_s"]
            lines.append(f"| {grid} | {r['channels']} | {r.get('threads', 1)} | {label} | {t:.4f} | {k:.4f} | "
                         f"{t / k:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["80,96,80"], help="grids as D,H,W")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    module, reason = build()
    if module is None:
        print(f"No compiled kernel to compare: {reason}. The package samples with grid_sample here.")
        return 0
    rows = [measure(module, tuple(int(v) for v in size.split(",")), channels, args.repeats, threads=threads)
            for size in args.sizes for channels in args.channels for threads in args.threads]
    print(f"torch {torch.__version__}; points near the identity (grid + N(0, 0.8 voxel)); batch 1")
    print(table(rows))
    for r in rows:
        if r["threads"] != rows[0]["threads"]:
            continue
        print(f"{'×'.join(map(str, r['shape']))}, {r['channels']} channel(s): forward max |diff| "
              f"{r['forward_max_abs_diff']:.1e}, image gradient rel. diff {r['grad_image_rel_diff']:.1e}, "
              f"point gradient rel. diff {r['grad_points_rel_diff']:.1e} (median |diff| "
              f"{r['grad_points_median_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
