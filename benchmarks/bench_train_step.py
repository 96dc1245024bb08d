#!/usr/bin/env python
"""Time one GradICON training step (forward both directions, LNCC, GradICON penalty, backward, Adam update).

For each grid size the model's spec is used with ``input_shape`` replaced, random weights and a random batch of
smooth volumes; the step is exactly the one ``iconreg train`` takes (``symmetric_objective`` + Adam). One warm-up
step, then the best and median of ``--repeats`` steps. A reference measured in the same run gives the ratio:
the similarity alone (LNCC of the two warped batches, forward + backward), which shows what the network and the
penalty add.

    python benchmarks/bench_train_step.py --model gradicon-hippocampus --sizes 36x48x36 72x96x72 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ICONRegistration"))

import torch  # noqa: E402

from ICONRegistrationLib.core.losses import make_similarity  # noqa: E402
from ICONRegistrationLib.core.objective import symmetric_objective  # noqa: E402
from ICONRegistrationLib.device import choose_device, device_description  # noqa: E402
from ICONRegistrationLib.models.build import build_network  # noqa: E402
from ICONRegistrationLib.models.zoo import resolve_spec  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(function, repeats: int, device: torch.device) -> list[float]:
    function()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gradicon-hippocampus", help="zoo name or spec JSON")
    parser.add_argument("--sizes", nargs="+", default=["36x48x36", "72x96x72"], help="DxHxW grid sizes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    spec = resolve_spec(args.model)
    similarity = make_similarity(**spec.similarity)
    print(f"model {spec.name}, batch {args.batch_size} (both directions: {2 * args.batch_size} registrations per "
          f"step), {device_description(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| grid | train step best | median | similarity only (reference) | ratio | peak GPU memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        shape = [int(v) for v in size.lower().split("x")]
        torch.manual_seed(0)
        sized = spec.__class__.from_dict({**spec.to_dict(), "input_shape": shape})
        net = build_network(sized).to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=5e-5)
        blur = torch.nn.AvgPool3d(5, stride=1, padding=2)
        images_A = blur(torch.rand(args.batch_size, 1, *shape, device=device))
        images_B = blur(torch.rand(args.batch_size, 1, *shape, device=device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            terms = symmetric_objective(net, images_A, images_B, similarity=similarity, lmbda=sized.lmbda)
            terms.loss.backward()
            optimizer.step()

        warped = images_A.clone().requires_grad_(True)

        def similarity_only():
            value = similarity(warped, images_B) + similarity(images_B, warped)
            value.backward()

        steps = time_steps(step, args.repeats, device)
        reference = time_steps(similarity_only, args.repeats, device)
        memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB" if device.type == "cuda" else "—")
        print(f"| {'×'.join(map(str, shape))} | {min(steps):.3f} s | {statistics.median(steps):.3f} s | "
              f"{min(reference):.3f} s | {min(steps) / min(reference):.1f} | {memory} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
