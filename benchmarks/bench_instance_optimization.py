"""Per-iteration cost of instance optimisation: field mode against weight mode, on the grids of the shipped models.

For each model (default: the hippocampus model's 36×48×36 grid and the brain model's 80×96×80 grid) the same image
pair (smooth synthetic volumes on the model's grid) runs ``--iterations`` steps of each mode after one warm-up
step; the table gives seconds per iteration (the median of ``--repeats`` runs per mode, the modes alternating, each
run in a process of its own), the ratio of the medians (target: field mode ≤ 1/10 of the weight mode), the range of
the runs' own ratios and the peak resident memory of each mode in GB (10⁹ bytes; the modes' peaks do not mix).
Each process reuses freed memory as ``iconreg register`` does (``--allocator system``: glibc's defaults).

Seconds per iteration = (time of ``--iterations`` steps − time of zero steps) / iterations. The field mode's network
prediction runs once, before and outside both timed calls: timed inside each, its run-to-run spread (it costs more
than a few field iterations) went straight into that difference.

    PYTHONPATH=ICONRegistration python benchmarks/bench_instance_optimization.py [--models a,b] [--iterations 5]
        [--repeats 3] [--allocator keep|system]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ICONRegistration"))

DEFAULT_MODELS = ("gradicon-hippocampus", "gradicon-brain-lpba40")


def _pair(shape, seed: int = 0):
    """Two smooth blob volumes on ``shape``, the second a shifted, rescaled copy, as [1, 1, *shape] tensors."""
    import numpy as np
    import torch

    grid = np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    volumes = []
    for shift in (0.0, 0.04):
        volume = np.zeros(shape, np.float32)
        local = np.random.default_rng(seed)
        for k in range(8):
            centre = local.uniform(0.25, 0.75, 3) + shift
            width = local.uniform(0.08, 0.2, 3)
            volume += (1.0 / (k + 1)) * np.exp(-sum(((g - c) / w) ** 2 for g, c, w in zip(grid, centre, width)))
        volumes.append(torch.from_numpy(volume / volume.max())[None, None])
    return volumes


def run_one(model: str, mode: str, iterations: int, threads: int, random_weights: bool = False) -> dict:
    """Time one mode in this process (``random_weights``: the model's architecture without its weights, for tests)."""
    import torch

    from ICONRegistrationLib.core.losses import make_similarity
    from ICONRegistrationLib.models.weights import load_model
    from ICONRegistrationLib.pipeline.instance_optimization import optimize_fields, optimize_instance
    from ICONRegistrationLib.pipeline.registration import _predict_both_directions

    if threads != torch.get_num_threads():  # in this torch build a set_num_threads call breaks later batched
        torch.set_num_threads(threads)      # float64 LU solves of MKL (n ≥ 200) in the same process
    loaded = load_model(model, device="cpu", random_weights=random_weights)
    spec = loaded.spec
    image_A, image_B = _pair(tuple(spec.input_shape))
    similarity = make_similarity(**spec.similarity)
    maps = None
    if mode == "fields":  # the starting point, once and untimed (optimize_fields does not modify it)
        with torch.no_grad():
            maps = _predict_both_directions(loaded.net, image_A, image_B, None)

    def once(steps: int) -> float:
        start = time.perf_counter()
        if mode == "weights":
            optimize_instance(loaded.net, image_A, image_B, iterations=steps, similarity=similarity,
                              lmbda=spec.lmbda, penalty=spec.penalty)
        else:
            optimize_fields(maps, image_A, image_B, iterations=steps, similarity=similarity, lmbda=spec.lmbda)
        return time.perf_counter() - start

    once(1)  # warm-up (allocations, oneDNN primitives)
    base = once(0)  # what does not depend on the iteration count (setup, final objective)
    total = once(iterations)
    return {"model": model, "mode": mode, "grid": "×".join(map(str, spec.input_shape)),
            "seconds_per_iteration": (total - base) / iterations,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # ru_maxrss: KiB (Linux)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating (the median is reported)")
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep",
                        help="keep: reuse freed memory, as `iconreg register` does (allocator.keep_freed_memory); "
                             "system: glibc's defaults")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "model,mode": run in this process, print JSON
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.iterations < 1:
        parser.error("--repeats and --iterations must be at least 1")
    if args.one:
        if args.allocator == "keep":  # as the command line runs registrations (before torch allocates anything)
            from ICONRegistrationLib.allocator import keep_freed_memory
            keep_freed_memory()
        model, mode = args.one.split(",")
        print(json.dumps(run_one(model, mode, args.iterations, args.threads)))
        return 0
    rows = []
    for model in args.models.split(","):
        results = {"weights": [], "fields": []}
        for _ in range(args.repeats):  # the two modes alternate, so that a slow spell of the machine hits both
            for mode in ("weights", "fields"):
                output = subprocess.run([sys.executable, __file__, "--one", f"{model},{mode}", "--iterations",
                                         str(args.iterations), "--threads", str(args.threads),
                                         "--allocator", args.allocator],
                                        capture_output=True, text=True, check=True).stdout
                results[mode].append(json.loads(output.strip().splitlines()[-1]))
        seconds = {mode: statistics.median(r["seconds_per_iteration"] for r in runs) for mode, runs in results.items()}
        peak = {mode: max(r["peak_gb"] for r in runs) for mode, runs in results.items()}
        ratios = sorted(w["seconds_per_iteration"] / f["seconds_per_iteration"]
                        for w, f in zip(results["weights"], results["fields"]))
        rows.append(f"| {model} | {results['weights'][0]['grid']} | {seconds['weights']:.3f} s | "
                    f"{seconds['fields']:.3f} s | 1/{seconds['weights'] / seconds['fields']:.1f} | "
                    f"1/{ratios[0]:.1f} – 1/{ratios[-1]:.1f} | {peak['weights']:.2f} / {peak['fields']:.2f} GB |")
    print(f"Instance optimisation, {args.iterations} iterations per mode, {args.threads} threads, median of "
          f"{args.repeats} alternating runs per mode")
    print("| model | grid | weight mode per iteration | field mode per iteration | field / weight | "
          "range over runs | peak memory weights / fields |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
