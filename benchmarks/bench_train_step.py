#!/usr/bin/env python
"""One GradICON training step (both directions, LNCC, penalty, backward, Adam) against icon_registration's.

For each configuration the same network (same weights) is built here and, when ``icon_registration`` is installed,
in icon_registration (``GradientICON`` for the full penalty, ``GradientICONSparse`` for the subset penalty), and
the two steps are timed in the same run on the same random smooth volumes. Before timing, the objective values
and the parameter gradients are compared on the same inputs and the same penalty sample points; beside that
difference the table gives how far float32 rounding alone moves our gradient from the same objective in float64
(on small grids near the identity the finite-difference penalty makes that about 1e-3 by itself). Each
(configuration, method) pair runs in a fresh subprocess so that its peak resident memory can be reported.

    python benchmarks/bench_train_step.py                       # the three standard rows
    python benchmarks/bench_train_step.py --configs small-65 --repeats 2 [--device cuda] [--allocator system]

Without icon_registration (``pip install icon_registration==1.1.9 --no-deps`` beside the pinned torch, plus
``itk tqdm matplotlib``) the reference columns say so and the project's own numbers are still printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ICONRegistration"))

SMALL = [[2, 16, 32, 32, 64, 64], [16, 32, 32, 32, 64]]  # the gradicon-hippocampus width
TALL = [[2, 16, 32, 64, 256, 512], [16, 32, 64, 128, 256]]  # the uniGradICON width


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    channels: list
    levels: int
    shape: tuple
    batch: int


CONFIGS = {
    "small-65": Config("small UNets, 65³, batch 1", SMALL, 2, (65, 65, 65), 1),
    "small-80x96x80": Config("small UNets, 80×96×80, batch 1", SMALL, 2, (80, 96, 80), 1),
    "tall-80x96x80": Config("uniGradICON width, 80×96×80, batch 2", TALL, 3, (80, 96, 80), 2),
}
METHODS = ("ours-full", "ref-full", "ours-subset", "ref-sparse")
#: with native bfloat16 (``device.has_native_bfloat16``) also: the subset step with bfloat16 UNets
#: (``iconreg train --mixed-precision``), against the reference's float32 GradientICONSparse step
LOW_PRECISION_METHOD = "ours-subset-bf16"


def subset_fraction(shape) -> float:
    """The penalty fraction that gives as many points as GradientICONSparse's every-second-voxel grid on ``shape``
    (⌈n/2⌉ per axis: an eighth for even sizes, 33³/65³ = 13.1 % at 65³)."""
    kept = total = 1
    for n in shape:
        kept, total = kept * ((n + 1) // 2), total * n
    return kept / total


def _peak_rss_gb() -> float:
    """Peak resident set size so far in GB (10⁹ bytes; ``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(config: Config, device):
    """The project's network and, if available, icon_registration's with the same weights."""
    import torch
    from ICONRegistrationLib.models.build import build_network
    from ICONRegistrationLib.models.spec import ModelSpec

    spec = ModelSpec(name="bench", unet={"num_layers": 5, "channels": config.channels}, levels=config.levels,
                     input_shape=list(config.shape), similarity={"name": "lncc", "sigma": 5})
    torch.manual_seed(0)
    net = build_network(spec)
    for module in net.modules():  # non-zero last layers, so that the maps are not the identity
        if hasattr(module, "lastConv"):
            torch.nn.init.normal_(module.lastConv.weight, std=0.002)
    return spec, net.to(device).train()


def _reference(config: Config, state: dict, sparse: bool, device):
    from icon_registration import losses, network_wrappers, networks

    def step():
        return network_wrappers.FunctionFromVectorField(networks.UNet2(5, config.channels, 3))

    net = step()
    for _ in range(config.levels - 1):
        net = network_wrappers.TwoStepRegistration(network_wrappers.DownsampleRegistration(net, 3), step())
    net = network_wrappers.TwoStepRegistration(net, step())
    net.load_state_dict(state)
    wrapper = (losses.GradientICONSparse if sparse else losses.GradientICON)(net, losses.LNCC(sigma=5), 1.5)
    wrapper.assign_identity_map([1, 1, *config.shape])
    return wrapper.to(device).train()


def _images(config: Config, device):
    import torch
    generator = torch.Generator().manual_seed(1)
    blur = torch.nn.AvgPool3d(5, stride=1, padding=2)
    make = lambda: blur(torch.rand(config.batch, 1, *config.shape, generator=generator))  # noqa: E731
    return make().to(device), make().to(device)


def _gradients(module) -> "torch.Tensor":
    import torch
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def check_equivalence(config: Config, device) -> dict:
    """Objective and gradient of the project's objective against icon_registration's, same inputs and points."""
    import torch
    from ICONRegistrationLib.core.coordinates import identity_map
    from ICONRegistrationLib.core.losses import LNCC
    from ICONRegistrationLib.core.objective import symmetric_objective

    spec, net = _build(config, device)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    image_A, image_B = _images(config, device)
    identity = identity_map(config.shape, device=device)
    result = {}
    from ICONRegistrationLib.core.networks import low_precision
    from ICONRegistrationLib.device import has_native_bfloat16
    cases = [(False, None), (True, None)] + ([(True, torch.bfloat16)] if has_native_bfloat16(device) else [])
    for sparse, precision in cases:
        net.load_state_dict(state)
        reference = _reference(config, state, sparse, device)
        torch.manual_seed(7)
        loss_ref = reference(image_A, image_B).all_loss
        loss_ref.backward()
        torch.manual_seed(7)  # the same normal draw as the reference's penalty points
        noise = torch.randn(identity.shape).to(device)
        samples = identity + (2 * noise if sparse else noise) / config.shape[-1]
        if sparse:  # the reference's points, in the layout of the training subset (jittered_identity): [1, 3, M, 1, 1]
            samples = samples[:, :, ::2, ::2, ::2].reshape(1, 3, -1, 1, 1)
        net.zero_grad(set_to_none=True)
        with low_precision(net, precision):
            terms = symmetric_objective(net, image_A, image_B, similarity=LNCC(5), lmbda=1.5, padding="border",
                                        penalty_samples=samples)
        terms.loss.backward()
        grad_ours, grad_ref = _gradients(net), _gradients(reference.regis_net)
        key = ("sparse" if sparse else "full") + ("-bf16" if precision is not None else "")
        ours, theirs = float(terms.loss.detach()), float(loss_ref.detach())
        result[key] = {"objective_ours": ours, "objective_ref": theirs, "objective_rel": abs(ours - theirs) / abs(theirs),
                       "gradient_rel": float((grad_ours - grad_ref).norm() / grad_ref.norm())}
        if precision is None:  # how far float32 rounding alone moves our gradient: the floor under gradient_rel
            result[key]["gradient_rel_float64"] = _float32_error(net, state, image_A, image_B, samples, grad_ours)
    return result


def _float32_error(net, state: dict, image_A, image_B, samples, gradient) -> float:
    """``|g − g64| / |g64|`` for our float32 gradient ``gradient`` and the same objective evaluated in float64 (same
    weights, images and penalty points)."""
    import copy
    from ICONRegistrationLib.core.losses import LNCC
    from ICONRegistrationLib.core.objective import symmetric_objective
    exact = copy.deepcopy(net).double()
    exact.load_state_dict(state)
    exact.zero_grad(set_to_none=True)
    symmetric_objective(exact, image_A.double(), image_B.double(), similarity=LNCC(5), lmbda=1.5, padding="border",
                        penalty_samples=samples.double()).loss.backward()
    exact_gradient = _gradients(exact)
    return float((gradient.double() - exact_gradient).norm() / exact_gradient.norm())


def time_method(config: Config, method: str, repeats: int, device) -> dict:
    import torch
    from ICONRegistrationLib.core.losses import LNCC
    from ICONRegistrationLib.core.networks import low_precision
    from ICONRegistrationLib.core.objective import symmetric_objective

    image_A, image_B = _images(config, device)
    base_rss = _peak_rss_gb()
    spec, net = _build(config, device)
    if method.startswith("ref"):
        module = _reference(config, net.state_dict(), method == "ref-sparse", device)
        del net

        def loss():
            return module(image_A, image_B).all_loss
    else:
        module = net
        fraction = 1.0 if method == "ours-full" else subset_fraction(config.shape)
        precision = torch.bfloat16 if method == LOW_PRECISION_METHOD else None

        def loss():
            with low_precision(net, precision):
                return symmetric_objective(net, image_A, image_B, similarity=LNCC(5), lmbda=1.5, padding="border",
                                           penalty_fraction=fraction).loss
    if method.startswith("ref"):
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-5)  # icon_registration's training loop's optimiser
    else:  # `iconreg train`'s (fused Adam where PyTorch has it)
        from ICONRegistrationLib.training.trainer import TrainingConfig, make_optimizer
        optimizer = make_optimizer(list(module.parameters()), TrainingConfig(learning_rate=1e-5))
    parameters = sum(p.numel() for p in module.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    memory = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
              else _peak_rss_gb() - base_rss)
    return {"best": min(times), "median": statistics.median(times), "memory_gb": memory, "parameters": parameters}


def _child(args) -> int:
    if args.allocator == "keep":  # before torch allocates anything; the same setting for both implementations
        from ICONRegistrationLib.allocator import keep_freed_memory
        keep_freed_memory()
    import os
    os.environ["ICONREG_NATIVE_SAMPLER"] = "1" if args.native_sampler == "on" else "0"
    import torch
    from ICONRegistrationLib.device import choose_device
    device = choose_device(args.device)
    if args.native_sampler == "on" and device.type == "cpu":
        from ICONRegistrationLib.core import native_sampler
        native_sampler.enable()  # as `iconreg train` does (icon_registration samples with grid_sample itself)
    config = CONFIGS[args.child_config]
    if args.child_method == "check":
        print(json.dumps(check_equivalence(config, device)))
    else:
        print(json.dumps(time_method(config, args.child_method, args.repeats, device)))
    return 0


def _run_child(args, config_key: str, method: str):
    command = [sys.executable, __file__, "--child-config", config_key, "--child-method", method,
               "--repeats", str(args.repeats), "--device", args.device, "--allocator", args.allocator,
               "--native-sampler", args.native_sampler]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["failed"]
        return {"error": tail[0]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write every number here")
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep",
                        help="keep (default): glibc keeps freed memory for reuse, as `iconreg train` sets it; "
                             "system: glibc's defaults. Both implementations run with the same setting")
    parser.add_argument("--native-sampler", choices=["on", "off"], default="on",
                        help="on (default): the project samples through its compiled CPU sampler where it builds, as "
                             "`iconreg train` does; off: grid_sample only")
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_config:
        return _child(args)

    import torch
    from ICONRegistrationLib.device import choose_device, device_description, has_native_bfloat16
    try:
        import icon_registration  # noqa: F401
        have_reference = True
    except ImportError:
        have_reference = False
    device = choose_device(args.device)
    sampler = "off (grid_sample)"
    if args.native_sampler == "on" and device.type == "cpu":
        from ICONRegistrationLib.core import native_sampler
        state = native_sampler.enable()
        sampler = "compiled kernel" if state.available else f"grid_sample ({state.reason})"
    methods = METHODS + ((LOW_PRECISION_METHOD,) if has_native_bfloat16(device) else ())
    print(f"{device_description(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best of {args.repeats} steps after one warm-up, each method in its own process, allocator: "
          f"{'keep freed memory' if args.allocator == 'keep' else 'system'} (both implementations); "
          f"the project's sampler: {sampler}")
    if not have_reference:
        print("icon_registration is not installed: reference columns are empty "
              "(pip install icon_registration==1.1.9 --no-deps; pip install itk tqdm matplotlib)")
    print("| configuration | parameters | penalty | this project | icon_registration | ratio (ref / ours) | "
          "peak memory ours / ref | objective rel. diff | gradient rel. diff | our float32 gradient vs float64 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    everything = {}
    for key in args.configs:
        config = CONFIGS[key]
        results = {m: _run_child(args, key, m) for m in methods if have_reference or m.startswith("ours")}
        check = _run_child(args, key, "check") if have_reference else {}
        everything[key] = {"results": results, "check": check}
        for ours, ref, label, check_key in (("ours-full", "ref-full", "full (GradientICON)", "full"),
                                            ("ours-subset", "ref-sparse",
                                             f"subset {subset_fraction(config.shape):.3f} (GradientICONSparse)",
                                             "sparse"),
                                            (LOW_PRECISION_METHOD, "ref-sparse",
                                             f"subset {subset_fraction(config.shape):.3f}, bfloat16 UNets "
                                             "(against float32 GradientICONSparse)", "sparse-bf16")):
            if ours not in methods:
                continue
            mine, theirs = results.get(ours, {}), results.get(ref, {})
            equal = check.get(check_key, {})

            def cell(result, field, fmt):
                return fmt.format(result[field]) if field in result else result.get("error", "—")
            ratio = (f"{theirs['best'] / mine['best']:.2f}×" if "best" in mine and "best" in theirs else "—")
            print(f"| {config.name} | {cell(mine, 'parameters', '{:,}')} | {label} | {cell(mine, 'best', '{:.2f} s')}"
                  f" | {cell(theirs, 'best', '{:.2f} s')} | {ratio} | {cell(mine, 'memory_gb', '{:.2f}')} / "
                  f"{cell(theirs, 'memory_gb', '{:.2f}')} GB | {cell(equal, 'objective_rel', '{:.1e}')} | "
                  f"{cell(equal, 'gradient_rel', '{:.1e}')} | {cell(equal, 'gradient_rel_float64', '{:.1e}')} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
