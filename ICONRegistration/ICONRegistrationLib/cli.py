"""``iconreg``: register, warp, inspect transforms and manage models from the command line.

Exit codes: 0 success, 2 usage error, 3 user error (one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from .errors import Cancelled, UserError, collect_user_warnings
from .models.spec import MAX_REFINEMENTS

if TYPE_CHECKING:
    from .pipeline.metrics import RegistrationMetrics

EXIT_OK, EXIT_USAGE, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 2, 3, 130
#: commands whose process does registrations (or training steps) one at a time and exits: they keep freed memory
#: for reuse (allocator.keep_freed_memory), so they hold at most one registration's (one step's) peak. ``evaluate``
#: is one of them: with glibc's defaults an LPBA40 evaluation (1 mm volumes, demons beside the network) spent all
#: its CPU time in the kernel, faulting in pages of freshly mapped blocks (about 85,000 page faults a second against
#: 5,000 with reuse). ``train`` too: a label-aware LPBA40 step (80×96×80, batch 2, 2 cores) took 9.6 s with glibc's
#: defaults, half of it system time, and 6.7 s with reuse. App sessions keep glibc's defaults.
REUSE_FREED_MEMORY_COMMANDS = ("register", "demo", "warp", "jacobian", "invert", "evaluate", "train")


class ProgressBar:
    """A progress callback drawing one bar per stage on stderr. When stderr is not a terminal (a log file) it
    writes plain lines instead: at the start and end of each stage, every ``line_step`` of progress, and at least
    every ``line_seconds`` while a stage advances, so that a long training or evaluation shows in its log."""

    def __init__(self, stream=sys.stderr, width: int = 30, line_step: float = 0.1, line_seconds: float = 60.0):
        self.stream = stream
        self.width = width
        self.line_step = line_step
        self.line_seconds = line_seconds
        self.stage: Optional[str] = None
        self.interactive = hasattr(stream, "isatty") and stream.isatty()
        self.last_draw = 0.0
        self.last_fraction = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        new_stage = stage != self.stage
        if new_stage and self.stage is not None and self.interactive:
            self.stream.write("\n")
        self.stage = stage
        if self.interactive:
            if new_stage or fraction >= 1.0 or now - self.last_draw > 0.1:
                filled = int(round(fraction * self.width))
                self.stream.write(f"\r{stage:<24} [{'#' * filled}{'-' * (self.width - filled)}] {100 * fraction:5.1f}%")
                self.stream.flush()
                self.last_draw = now
        elif (new_stage or fraction >= 1.0 or fraction - self.last_fraction >= self.line_step - 1e-9
              or (fraction > self.last_fraction and now - self.last_draw >= self.line_seconds)):
            self.stream.write(f"{stage}: {100 * fraction:.0f}%\n")
            self.stream.flush()
            self.last_draw, self.last_fraction = now, fraction

    def close(self) -> None:
        if self.interactive and self.stage is not None:
            self.stream.write("\n")
            self.stream.flush()
        self.stage = None


def _summary(metrics: "RegistrationMetrics") -> str:
    return (f"model {metrics.model} on {metrics.device} (fixed {metrics.fixed_modality}, moving "
            f"{metrics.moving_modality}), {_prediction_mode(metrics)}: folds {metrics.folds} "
            f"({metrics.folds_percent:.4f} %), Jacobian min {metrics.jacobian_min:.3f}, "
            f"IC error mean {metrics.ic_error_mean_mm:.4f} mm / 95th {metrics.ic_error_p95_mm:.4f} mm"
            f"{metrics.overlap_note(4)}, {metrics.total_seconds:.2f} s")


def _prediction_mode(metrics: "RegistrationMetrics") -> str:
    """How the transform was made, in words: flips averaged, refinements, symmetric, instance optimisation."""
    parts = [f"averaged over flips of axes {','.join(map(str, metrics.flips))}" if metrics.flips
             else "one prediction"]
    if metrics.refinements:
        parts.append(f"{metrics.refinements} refinement{'s' if metrics.refinements > 1 else ''}")
    if metrics.symmetric:
        parts.append("symmetric")
    if metrics.io_iterations:
        parts.append(f"{metrics.io_iterations} instance-optimisation steps ({metrics.io_mode})")
    return ", ".join(parts)


def _warn_unused_io_options(args: argparse.Namespace) -> None:
    """Say so on stderr when instance-optimisation options are given without ``--io-iterations`` (they would
    otherwise be dropped without a word)."""
    if args.io_iterations:
        return
    unused = [option for option, used in (("--io-mode", args.io_mode != "fields"),
                                          ("--io-similarity", getattr(args, "io_similarity", None) is not None),
                                          ("--io-grid", args.io_grid != "network"),
                                          ("--io-learning-rate", args.io_learning_rate is not None)) if used]
    if unused:
        print(f"iconreg: warning: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without "
              "--io-iterations N (N > 0): no instance optimisation runs.", file=sys.stderr)


def _warn_if_no_report(requested: bool = True) -> None:
    """Say so on stderr, before the work, when report.png cannot be written (matplotlib is an optional extra)."""
    from .io.results import report_available

    if requested and not report_available():
        print("iconreg: warning: matplotlib is not installed, so no report.png is written "
              "(pip install 'iconregistration[report]' adds it).", file=sys.stderr)


def _cmd_register(args: argparse.Namespace) -> int:
    from .io import check_output_folder, read_image, result_folder, write_result
    from .io.transforms import check_nifti_geometry
    from .pipeline import register

    out = check_output_folder(args.out)
    _warn_unused_io_options(args)
    _warn_if_no_report(not args.no_report)
    fixed = read_image(args.fixed, "fixed")
    check_nifti_geometry(fixed, out / "warped.nii.gz")  # the results' grids have the fixed image's axes
    moving = read_image(args.moving, "moving")
    fixed_mask = read_image(args.fixed_mask, "fixed mask") if args.fixed_mask else None
    moving_mask = read_image(args.moving_mask, "moving mask") if args.moving_mask else None
    bar = ProgressBar()
    try:
        result, said = collect_user_warnings(lambda: register(
            fixed, moving, args.model, fixed_modality=args.fixed_modality, moving_modality=args.moving_modality,
            fixed_mask=fixed_mask, moving_mask=moving_mask, io_iterations=args.io_iterations,
            io_similarity=args.io_similarity, io_mode=args.io_mode, io_grid=args.io_grid,
            io_learning_rate=args.io_learning_rate, device=args.device, progress=bar, weights=args.weights,
            field_grid=args.field_grid, inverse_qa=args.inverse_qa, exact_inverse=args.exact_inverse,
            flips=args.flips, symmetric=args.symmetric, refinements=args.refinements), log=False)
        with result_folder(out) as staging:
            written = write_result(result, staging, fixed=fixed, moving=moving, report=not args.no_report)
    finally:
        bar.close()
    print(_summary(result.metrics))
    _print_warnings(said)
    inverse = result.metrics.inverse
    if inverse.method == "exact":
        other_way = ("" if inverse.forward_first_max_error_mm is None else
                     f"; forward then inverse at the forward field's voxels: max "
                     f"{inverse.forward_first_max_error_mm:.3f} mm, mean {inverse.forward_first_mean_error_mm:.3f} mm")
        if inverse.outside_field_voxels:
            other_way += (f"; {inverse.outside_field_voxels} voxels map outside the forward field, where ITK applies "
                          f"no displacement (round trip through ITK up to {inverse.itk_max_error_mm:.3f} mm)")
        print(f"exact inverse: {inverse.iterations} iterations, round-trip error max "
              f"{inverse.max_error_mm:.4f} mm ({inverse.max_error_voxels:.4f} voxels){other_way}"
              f"{'' if inverse.invertible else ' — NOT invertible everywhere (folds or no convergence)'}")
    print(f"wrote {', '.join(p.name for p in written.values())} to {out}")
    return EXIT_OK


def _print_warnings(said: list[str]) -> None:
    """The engine's warnings (:func:`~ICONRegistrationLib.errors.collect_user_warnings` with ``log=False``), once."""
    for message in said:
        print(f"iconreg: warning: {message}", file=sys.stderr)


def _cmd_warp(args: argparse.Namespace) -> int:
    from .io import check_output_file, read_image, write_image
    from .io.transforms import WRITABLE_IMAGE_SUFFIXES
    from .pipeline import warp

    check_output_file(args.out, suffixes=WRITABLE_IMAGE_SUFFIXES)
    image = read_image(args.image, "input")
    reference = read_image(args.reference, "reference")
    warped, said = collect_user_warnings(lambda: warp(image, args.transform, reference,
                                                      interpolator=args.interpolator), log=False)
    _print_warnings(said)
    write_image(warped, args.out)
    print(f"wrote {args.out}")
    return EXIT_OK


def _cmd_jacobian(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .io import check_output_file, read_displacement_field, write_image
    from .io.transforms import WRITABLE_IMAGE_SUFFIXES
    from .pipeline.qa import field_jacobian

    if args.out is not None:
        check_output_file(args.out, suffixes=WRITABLE_IMAGE_SUFFIXES)
    determinant = field_jacobian(read_displacement_field(args.transform))
    values = sitk.GetArrayViewFromImage(determinant)
    folds = int((values <= 0).sum())
    print(json.dumps({"folds": folds, "folds_percent": 100.0 * folds / values.size,
                      "jacobian_min": float(values.min()), "jacobian_max": float(values.max())}))
    if args.out is not None:
        write_image(determinant, args.out)
        print(f"wrote {args.out}")
    return EXIT_OK


def _cmd_invert(args: argparse.Namespace) -> int:
    from .io import check_output_file, read_displacement_field, read_image, write_displacement_field
    from .io.transforms import WRITABLE_FIELD_SUFFIXES
    from .pipeline.inverse import invert_field

    check_output_file(args.out, suffixes=WRITABLE_FIELD_SUFFIXES)
    field = read_displacement_field(args.transform)
    reference = read_image(args.reference, "reference")
    inverse, said = collect_user_warnings(lambda: invert_field(field, reference, tolerance=args.tolerance,
                                                                max_iterations=args.max_iterations,
                                                                allow_folds=args.allow_folds), log=False)
    write_displacement_field(inverse.field, args.out)
    _print_warnings(said)
    if inverse.outside_field_voxels:
        print(f"iconreg: warning: {inverse.outside_field_voxels} reference voxels map to points outside the "
              "transform's field, where this inverse extends the field's edge values but ITK applies no "
              f"displacement: through ITK the round trip misses by up to {inverse.itk_max_error_mm:.3g} mm there "
              "(itk_max_error_mm).", file=sys.stderr)
    print(json.dumps(inverse.to_dict()))
    print(f"wrote {args.out}")
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import (cached_weights_path, download_weights, install_weights, model_names, resolve_spec,
                         sha256_of, weights_state)
    from .models.weights import bundled_weights_path

    if args.source and args.action != "install":
        raise UserError(f"--from FILE installs weights: 'iconreg models install NAME --from FILE', not "
                        f"'models {args.action}'.")
    if args.action == "list":
        if args.name:
            raise UserError(f"'iconreg models list' lists every model; for one, use 'iconreg models info {args.name}'.")
        names = model_names()
        width = max(len(name) for name in names) + 2
        print(f"{'name':<{width}} {'grid (D,H,W)':<14} {'weights':<15} description")
        for name in names:
            spec = resolve_spec(name)
            shape = "×".join(str(n) for n in spec.input_shape)
            print(f"{name:<{width}} {shape:<14} {weights_state(spec):<15} {spec.description}")
            indent = " " * (width + 1)
            if spec.extra.get("use"):
                print(f"{indent}for: {spec.extra['use']}")
            if spec.test_time_flips:
                print(f"{indent}inference: the prediction averaged over flips of network axes "
                      f"{', '.join(map(str, spec.test_time_flips))} ('--flips none': one prediction)")
            validation = spec.extra.get("validation")
            if validation:
                print(f"{indent}validation: {validation_summary(validation)}")
        return EXIT_OK
    if not args.name:
        raise UserError(f"'iconreg models {args.action}' needs a model name (see 'iconreg models list').")
    spec = resolve_spec(args.name)
    if args.action == "info":
        info = spec.to_dict()
        path = bundled_weights_path(spec) or cached_weights_path(spec)
        info["weights_state"] = weights_state(spec)
        info["weights_path"] = str(path)
        if path.is_file():
            info["weights_sha256_actual"] = sha256_of(path)
        print(json.dumps(info, indent=2))
        return EXIT_OK
    if args.action == "install":
        if not args.source:
            raise UserError("'iconreg models install NAME --from FILE' needs --from FILE.")
        target = install_weights(spec, args.source)
    else:  # download
        bar = ProgressBar()
        try:
            target = download_weights(spec, progress=bar)
        finally:
            bar.close()
    print(f"installed {spec.name} weights at {target} (sha256 {sha256_of(target)})")
    return EXIT_OK


def validation_summary(validation: dict) -> str:
    """One line from a zoo entry's ``validation`` record: Dice against the baselines, folds, IC error."""
    baselines = ", ".join(f"{name} {value:.3f}" for name, value in validation.get("baselines", {}).items())
    optimised = validation.get("instance_optimisation")
    with_io = (f", with {optimised['iterations']} instance-optimisation steps {optimised['dice']:.3f} "
               f"in {optimised['seconds']:.0f} s" if optimised else "")
    parts = [f"Dice {validation['dice']:.3f}{with_io}" + (f" ({baselines})" if baselines else ""),
             f"{validation['folds_percent']:.4f} % det J ≤ 0"]
    if validation.get("ic_error_mm") is not None:
        parts.append(f"IC error {validation['ic_error_mm']:.2f} mm")
    parts.append(f"{validation['registrations']} registrations: {validation['data']}")
    return "; ".join(parts)


def _positive_int(text: str, option: str) -> int:
    """``text`` as an integer ≥ 1, else a user error naming ``option``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise UserError(f"{option} must be a whole number ≥ 1 or 'auto', got '{text}'.")
    return value


SYMMETRIC_HELP = ("make the network's two directions consistent: each the mean of itself and the exact inverse of "
                  "the other (swapping fixed and moving swaps the result; trades a label-trained model's "
                  "direction-specific fit for inverse consistency)")
FLIPS_HELP = ("average the network's prediction over flips of both images: 'model' (default: the axes the "
              "model lists in test_time_flips), 'none' (one prediction) or network-grid axes such as '2' or '0,1,2' "
              "(2^k passes)")

REFINEMENTS_HELP = ("refine the network's prediction N times: each refinement registers the moving image warped so far "
                    "to the fixed image again and composes the correction (one more prediction each; 'model', the "
                    f"default: the model's test_time_refinements; 0 to {MAX_REFINEMENTS})")


def _refinements(text: str) -> "int | None":
    """``--refinements``: ``model`` → ``None`` (the model's ``test_time_refinements``), or 0…MAX_REFINEMENTS."""
    if text.strip().lower() == "model":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_REFINEMENTS:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'model' or a whole number from 0 to {MAX_REFINEMENTS}")
    return value


def _flips(text: str) -> "list[int] | None":
    """``--flips``: ``model`` → None (the model decides), ``none`` → [], ``0,2`` → [0, 2]."""
    if text == "model":
        return None
    if text == "none":
        return []
    parts = [p.strip() for p in text.split(",")]
    if not all(p in ("0", "1", "2") for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not 'model', 'none' or distinct axes 0, 1, 2 "
                                         "separated by commas")
    return sorted(int(p) for p in parts)


def _flip_axes(text: str) -> "tuple[int, ...]":
    """``train --flip-axes``: ``''`` → ``()``, ``0,2`` → ``(0, 2)``; distinct axes 0, 1, 2 (``x`` used to stop
    with a traceback, ``5`` after the data were prepared)."""
    parts = [p.strip() for p in text.split(",") if p.strip() != ""]
    if not all(p in ("0", "1", "2") for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not distinct axes 0, 1, 2 separated by commas (or '')")
    return tuple(int(p) for p in parts)


def _cmd_train(args: argparse.Namespace) -> int:
    from .models.zoo import resolve_spec
    from .datasets import list_volumes, split_validation
    from .training.data import PREPARED_SUFFIXES, PreparedSet, prepare
    from .training.trainer import (TrainingConfig, check_config, check_mixed_precision, export_weights,
                                   largest_batch, train)

    from .io import check_output_file

    spec = resolve_spec(args.spec)
    if args.export is not None:
        check_output_file(args.export, "--export")
    config = TrainingConfig(steps=args.steps, stage=args.stage, batch_size=2 if args.batch_size == "auto"
                            else _positive_int(args.batch_size, "--batch-size"),
                            learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
                            warmup_steps=args.warmup_steps, penalty=args.penalty, similarity=args.similarity,
                            lmbda=args.lmbda, affine_strength=args.affine, elastic_voxels=args.elastic,
                            intensity_gamma=args.gamma, bias_field=args.bias_field,
                            validate_every=args.validate_every,
                            checkpoint_every=args.checkpoint_every, keep_every=args.keep_every, seed=args.seed,
                            mixed_precision=args.mixed_precision, penalty_fraction=args.penalty_fraction,
                            icon_weight=args.icon_weight, icon_label_weight=args.icon_label_weight,
                            fold_weight=args.fold_weight, self_pair_fraction=args.self_pairs,
                            anatomy_mix=args.anatomy_mix, anatomy_mix_max=args.anatomy_mix_max,
                            anatomy_mix_weights=args.anatomy_mix_weights,
                            label_loss=args.label_loss, label_weight=args.label_weight,
                            label_downsample=args.label_downsample, freeze_inner=args.freeze_inner,
                            symmetric_label_loss=args.symmetric_label_loss, weight_decay=args.weight_decay,
                            time_limit=args.time_limit,
                            flip_axes=args.flip_axes)
    check_config(config)  # before the data are prepared
    from .device import choose_device
    check_mixed_precision(config, choose_device(args.device))  # before the data are prepared
    if args.steps == 0 and not args.save_prepared:
        raise UserError("--steps 0 trains nothing: give --save-prepared to only prepare the data, or a number of "
                        "steps.")
    if not 0 <= args.val_fraction <= 1:  # before the folder is made
        raise UserError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}.")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot create the training folder '{out}' ({error.strerror or error}).") from None
    if args.data.endswith(PREPARED_SUFFIXES):
        train_set = PreparedSet.load(args.data)
        validation_set = PreparedSet.load(args.val) if args.val else None
    else:
        entries = list_volumes(args.data)
        if args.val:
            validation_entries = list_volumes(args.val)
        else:
            entries, validation_entries = split_validation(entries, args.val_fraction)
        if len(entries) < 2:
            raise UserError(f"Training needs at least two volumes; '{args.data}' gives {len(entries)} for "
                            "training (after the validation split).")
        print(f"preparing {len(entries)} training and {len(validation_entries)} validation volumes "
              f"on a {'×'.join(map(str, spec.input_shape))} grid", file=sys.stderr)
        train_set = prepare(entries, spec)
        validation_set = prepare(validation_entries, spec) if validation_entries else None
        if args.save_prepared:
            train_set.save(out / "train_prepared.npz")
            if validation_set is not None:
                validation_set.save(out / "validation_prepared.npz")
    if args.batch_size == "auto":
        config.batch_size = largest_batch(spec, train_set, config, device=args.device)
        print(f"batch size {config.batch_size}", file=sys.stderr)
    bar = ProgressBar()
    try:
        summary = train(spec, train_set, out, config, validation_set=validation_set, init=args.init,
                        resume=not args.restart, device=args.device, progress=bar)
    finally:
        bar.close()
    if args.export:
        summary["exported"] = str(export_weights(out / "checkpoint.pt", args.export))
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _cmd_average_weights(args: argparse.Namespace) -> int:
    from .io import check_output_file
    from .models import sha256_of
    from .training.averaging import average_weights

    check_output_file(args.out, "--out")
    for source in args.sources:
        if not Path(source).is_file():
            raise UserError(f"No such weights file: '{source}'.")
    if (args.spec is None) != (args.val is None):
        raise UserError("Validating the mean needs both --spec and --val (or neither).")
    if args.spec is not None:  # checked before anything is written
        from .models.zoo import resolve_spec
        from .training.data import PreparedSet

        spec = resolve_spec(args.spec)
        validation_set = PreparedSet.load(args.val)
        validation_set.check_grid(spec, "validation")
    out = average_weights(args.sources, args.out)
    summary = {"sources": [str(source) for source in args.sources], "out": str(out), "sha256": sha256_of(out)}
    print(f"wrote the mean of {len(args.sources)} weight files to {out} (sha256 {summary['sha256']})", file=sys.stderr)
    if args.spec is not None:
        from .device import choose_device
        from .models.build import build_network
        from .training.trainer import initialise, stage_spec, validate

        device = choose_device(args.device)
        net = build_network(stage_spec(spec, args.stage)).to(device)
        initialise(net, out)
        summary["validation"] = validate(net, validation_set, device)
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from .io import check_output_file
    from .models import load_model, sha256_of
    from .models.build import build_network
    from .models.convert import constricon_from_gradicon, widen_gradicon
    from .models.weights import write_state_dict
    from .models.zoo import resolve_spec

    check_output_file(args.out, "--out")
    target = resolve_spec(args.to)
    if target.architecture not in ("constricon", "gradicon"):
        raise UserError(f"--to must be a ConstrICON spec or a wider GradICON spec; '{target.name}' is "
                        f"{target.architecture}.")
    source = load_model(args.source, args.weights, device="cpu", download=False)
    if source.spec.architecture != "gradicon":
        raise UserError(f"--from must be a GradICON model; '{source.spec.name}' is {source.spec.architecture}.")
    if list(source.spec.input_shape) != list(target.input_shape):
        print(f"warning: the networks' grids differ ({source.spec.input_shape} against {target.input_shape}); "
              "the copied steps were trained on the first", file=sys.stderr)
    if target.architecture == "constricon":
        net = constricon_from_gradicon(source.net, build_network(target))
    else:
        net = widen_gradicon(source.net, build_network(target), noise=args.noise, seed=args.seed)
    out = write_state_dict(net.state_dict(), args.out)
    print(json.dumps({"from": source.spec.name, "from_sha256": source.weights_sha256, "to": target.name,
                      "out": str(out), "sha256": sha256_of(out)}, indent=2))
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import busy_warning, evaluate, markdown_table, read_pairs, write_evaluation
    from .io import check_output_folder, result_folder

    out = check_output_folder(args.out, kind="evaluation")
    _warn_unused_io_options(args)
    pairs = read_pairs(args.data, pairing=args.pairing, last_fraction=args.last_fraction,
                       both_directions=not args.one_direction)
    if args.max_pairs:
        pairs = pairs[:args.max_pairs]
    baselines = [b for b in args.baselines.split(",") if b]
    print(f"evaluating {len(pairs)} pairs: {args.model}"
          f"{' (+ instance optimisation)' if args.io_iterations else ''}, {', '.join(baselines) or 'no baselines'}",
          file=sys.stderr)
    bar = ProgressBar()
    try:
        evaluation = evaluate(pairs, args.model, io_iterations=args.io_iterations, io_mode=args.io_mode,
                              io_grid=args.io_grid, io_learning_rate=args.io_learning_rate, baselines=baselines,
                              device=args.device, modality=args.modality, flips=args.flips,
                              symmetric=args.symmetric, refinements=args.refinements,
                              progress=bar)
    finally:
        bar.close()
    with result_folder(out, kind="evaluation") as staging:
        write_evaluation(evaluation, staging)
    print(markdown_table(evaluation), end="")
    warning = busy_warning(evaluation)
    if warning:
        print(warning, file=sys.stderr)
    print(f"wrote {out / 'evaluation.json'} and {out / 'evaluation.md'}")
    return EXIT_OK


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
        import trame_slicer  # noqa: F401
    except ImportError as error:
        raise UserError(f"The browser app needs the 'app' extra ({error.name} is missing): "
                        "pip install -e '.[app]' (or bash scripts/setup.sh).") from None
    import ctypes.util
    import os

    if ctypes.util.find_library("EGL") is None and not os.environ.get("DISPLAY"):
        raise UserError("The browser app renders its slice views offscreen with EGL, and no EGL library was found: "
                        "install libegl1 libegl-mesa0 libgl1-mesa-dri (Debian/Ubuntu).")
    from .webapp.launcher import run

    if args.max_sessions < 1 or args.idle_timeout < 1 or args.max_upload_mb <= 0:
        raise UserError("--max-sessions, --idle-timeout and --max-upload-mb must be positive.")
    run(args.host, args.port, data_dir=args.data_dir, fixed=args.fixed, moving=args.moving,
        max_upload_mb=args.max_upload_mb, max_sessions=args.max_sessions, idle_timeout=args.idle_timeout)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _warn_if_no_report()
    bar = ProgressBar()
    try:
        summary = run_demo(args.out, model=args.model, device=args.device, io_iterations=args.io_iterations,
                           progress=bar)
    finally:
        bar.close()
    print(summary["text"])
    return EXIT_OK


IO_GRID_HELP = ("where the field mode compares the images: the network grid (default) or a grid as fine as the "
                "fixed image, at most twice the network grid per axis (more accurate, several times the cost per "
                "step; not with --io-mode weights)")
IO_LEARNING_RATE_HELP = "instance optimisation's Adam step size (default: 0.1 voxel for fields, 2e-5 for weights)"


def _whole_number_at_least(minimum: int):
    """An argparse type: a whole number ≥ ``minimum`` (``evaluate --max-pairs -1`` used to drop the last pair
    without a word, ``train --steps -5`` to train nothing and exit 0, ``--validate-every 0`` to stop with a
    traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number ≥ {minimum}")
        return value
    return parse


_count = _whole_number_at_least(0)
_at_least_one = _whole_number_at_least(1)


def _positive_number(text: str) -> float:
    """A finite number > 0 (``train --learning-rate 0`` used to train nothing, NaN to stop with a traceback)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return value


def _io_learning_rate(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .models.zoo import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="iconreg", description="Inverse-consistent deep image registration.")
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register a moving image to a fixed image")
    reg.add_argument("--fixed", required=True, help="fixed image file (or DICOM folder)")
    reg.add_argument("--moving", required=True, help="moving image file (or DICOM folder)")
    reg.add_argument("--fixed-modality", default="auto", choices=["ct", "mri", "auto"])
    reg.add_argument("--moving-modality", default="auto", choices=["ct", "mri", "auto"])
    reg.add_argument("--model", default=DEFAULT_MODEL, help="zoo model name or model spec JSON (default: %(default)s)")
    reg.add_argument("--weights", help="weights file overriding the model's")
    reg.add_argument("--io-iterations", type=int, default=0, help="instance-optimisation steps (default 0)")
    reg.add_argument("--io-mode", choices=["fields", "weights"], default="fields",
                     help="instance optimisation of the two displacement fields (default, fast) or of the "
                          "network weights")
    reg.add_argument("--io-similarity", choices=["lncc", "squared_lncc", "ssd", "mind_ssc"],
                     help="similarity for instance optimisation (default: the model's)")
    reg.add_argument("--io-grid", choices=["network", "fixed"], default="network", help=IO_GRID_HELP)
    reg.add_argument("--io-learning-rate", type=_io_learning_rate, help=IO_LEARNING_RATE_HELP)
    reg.add_argument("--flips", type=_flips, default=None, metavar="model|none|AXES", help=FLIPS_HELP)
    reg.add_argument("--symmetric", action="store_true", help=SYMMETRIC_HELP)
    reg.add_argument("--refinements", type=_refinements, default=None, metavar="model|N", help=REFINEMENTS_HELP)
    reg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    reg.add_argument("--fixed-mask", help="fixed mask (non-zero = inside)")
    reg.add_argument("--moving-mask", help="moving mask (non-zero = inside)")
    reg.add_argument("--field-grid", default="network", choices=["network", "fixed"],
                     help="grid of the output fields: the network grid over each image, or the images' own grids")
    reg.add_argument("--inverse-qa", action="store_true",
                     help="also report folds of the inverse transform in metrics.json")
    reg.add_argument("--exact-inverse", action="store_true",
                     help="write the numerical inverse of the forward field (fixed-point, 0.01 voxel) as the "
                          "inverse transform instead of the network's reverse prediction")
    reg.add_argument("--no-report", action="store_true", help="skip report.png")
    reg.add_argument("--out", required=True, help="output folder")
    reg.set_defaults(func=_cmd_register)

    wrp = commands.add_parser("warp", help="apply a transform to an image or label map")
    wrp.add_argument("--image", required=True)
    wrp.add_argument("--transform", required=True, help=".h5/.tfm transform or displacement image")
    wrp.add_argument("--reference", required=True, help="image whose grid the output takes (usually the fixed)")
    wrp.add_argument("--interpolator", default="linear", choices=["linear", "nearest", "bspline"],
                     help="use nearest for label maps")
    wrp.add_argument("--out", required=True)
    wrp.set_defaults(func=_cmd_warp)

    jac = commands.add_parser("jacobian", help="Jacobian determinant and fold count of a displacement field")
    jac.add_argument("--transform", required=True)
    jac.add_argument("--out", help="write the determinant image here")
    jac.set_defaults(func=_cmd_jacobian)

    inv = commands.add_parser("invert", help="the exact inverse of a displacement-field transform on a reference grid")
    inv.add_argument("--transform", required=True, help=".h5/.tfm displacement field transform or field image")
    inv.add_argument("--reference", required=True,
                     help="image whose grid the inverse is sampled on (for a registration's forward transform: "
                          "the moving image)")
    inv.add_argument("--out", required=True, help="output transform (.h5, .tfm, .nii.gz, .mha, .nrrd)")
    inv.add_argument("--tolerance", type=float, default=0.01,
                     help="maximum round-trip error in voxels of the input field (default %(default)s)")
    inv.add_argument("--max-iterations", type=int, default=200, help="cap on fixed-point iterations")
    inv.add_argument("--allow-folds", action="store_true",
                     help="invert a folding field approximately (with a warning) instead of refusing")
    inv.set_defaults(func=_cmd_invert)

    mod = commands.add_parser("models", help="list, inspect, download or install models")
    mod.add_argument("action", choices=["list", "info", "install", "download"])
    mod.add_argument("name", nargs="?")
    mod.add_argument("--from", dest="source", help="weights file to install (offline machines)")
    mod.set_defaults(func=_cmd_models)

    trn = commands.add_parser("train", help="train or fine-tune a model (GradICON protocol), resumable")
    trn.add_argument("--spec", required=True, help="model spec JSON or zoo name (architecture, grid, similarity)")
    trn.add_argument("--data", required=True, help="dataset folder (images/ [+ labels/]), CSV, or prepared .npz")
    trn.add_argument("--val", help="validation folder / CSV / prepared .npz (default: the last --val-fraction)")
    trn.add_argument("--val-fraction", type=float, default=0.2)
    trn.add_argument("--out", required=True, help="folder for checkpoint.pt, logs and curves.png")
    trn.add_argument("--steps", type=_count, default=1000,
                     help="total steps of this stage (resume continues to it; 0 with --save-prepared: only prepare)")
    trn.add_argument("--stage", type=int, default=2, choices=[1, 2],
                     help="1: multi-resolution network only; 2: with the final full-resolution step (default)")
    trn.add_argument("--init", help="initial weights: a checkpoint or weights file (stage-1 weights fit stage 2)")
    trn.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    trn.add_argument("--batch-size", default="4",
                     help="pairs per step, or 'auto': the largest that fits the GPU's memory (2 on a CPU)")
    trn.add_argument("--time-limit", type=float,
                     help="stop after this many seconds (checkpoint and validation written; resumable)")
    trn.add_argument("--learning-rate", type=_positive_number, default=5e-5)
    trn.add_argument("--icon-weight", type=float, default=0.0,
                     help="add this weight × the mean squared round-trip error ‖Φ_AB(Φ_BA(x)) − x‖² (voxels²) to the "
                          "GradICON penalty, which does not see a constant offset of the round trip (default 0)")
    trn.add_argument("--fold-weight", type=float, default=0.0,
                     help="add this weight × the mean over the network grid's voxels of relu(0.1 − det J) of both "
                          "directions' maps: a penalty on folded and nearly folded voxels (default 0)")
    trn.add_argument("--icon-label-weight", type=float, default=0.0,
                     help="make the --icon-weight term a weighted mean, weight 1 + this inside the labels of the image "
                          "where each round trip starts, 1 elsewhere (--icon-weight keeps its strength; needs label "
                          "maps; inverse consistency where a user looks; default 0: uniform)")
    trn.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                     help="constant, or cosine: from --learning-rate down to 0 at --steps (a function of the step: "
                          "resuming with the same --steps, --warmup-steps and rate keeps the curve)")
    trn.add_argument("--warmup-steps", type=int, default=0,
                     help="steps of linear warmup of the learning rate from the stage's first step, counted from "
                          "step 0 of the stage, not from a resumption (default 0)")
    trn.add_argument("--penalty", default=None, choices=["gradicon", "icon", "bending", "diffusion"],
                     help="regulariser (default: the architecture's: gradicon, bending for constricon, "
                          "diffusion for sitreg)")
    trn.add_argument("--penalty-fraction", type=float, default=0.125,
                     help="fraction of grid points (random each step) at which the GradICON/ICON penalty is "
                          "evaluated: same expectation as 1.0 (every point), a fraction of the cost")
    trn.add_argument("--similarity", choices=["lncc", "squared_lncc", "ssd", "mind_ssc"])
    trn.add_argument("--label-loss", choices=["dice"],
                     help="add a soft Dice loss of warped moving labels against fixed labels, both directions "
                          "(needs label maps for the training volumes; inference stays image-only)")
    trn.add_argument("--label-weight", type=float, default=1.0, help="weight of --label-loss (default 1)")
    trn.add_argument("--label-downsample", type=int, default=1,
                     help="evaluate --label-loss on blocks of this many voxels per axis (default 1: full "
                          "resolution, at a cost independent of the number of labels)")
    trn.add_argument("--lambda", dest="lmbda", type=float, help="regularisation weight (default: the spec's)")
    trn.add_argument("--affine", type=float, default=0.05, help="random affine augmentation strength")
    trn.add_argument("--elastic", type=float, default=0.0,
                     help="random smooth displacement added to each affine warp: standard deviation in network-grid "
                          "voxels at control points 16 voxels apart (default 0: none)")
    trn.add_argument("--gamma", type=float, default=0.0,
                     help="random intensity gamma per image, log γ ~ U(−g, g) (default 0: none)")
    trn.add_argument("--bias-field", type=float, default=0.0,
                     help="random smooth multiplicative bias field per image, I·exp(b) with b of this standard "
                          "deviation at control points 16 voxels apart (MRI non-uniformity; default 0: none)")
    trn.add_argument("--flip-axes", type=_flip_axes, default=(0, 1, 2),
                     help="tensor axes to flip at random ('' for none; default 0,1,2)")
    trn.add_argument("--self-pairs", type=float, default=0.0,
                     help="fraction of training pairs that are a volume with itself, each copy augmented "
                          "independently (teaches the network not to deform identical images; default 0)")
    trn.add_argument("--anatomy-mix", type=float, default=0.0,
                     help="probability per image of anatomy mixing: before the other augmentation, the image and its "
                          "labels are warped a random fraction (up to --anatomy-mix-max) of the way toward another "
                          "training volume's anatomy by a trained network (new subjects between the training "
                          "subjects; default 0: none)")
    trn.add_argument("--anatomy-mix-max", type=float, default=1.0,
                     help="largest fraction of the way toward the other volume (default 1: all the way)")
    trn.add_argument("--anatomy-mix-weights",
                     help="weights of the network that --anatomy-mix warps with, for the trained spec (default: "
                          "--init); kept in the run's checkpoint, so a resumption mixes with the same network")
    trn.add_argument("--symmetric-label-loss", action="store_true",
                     help="take the label loss on the two directions made consistent, as 'register --symmetric' "
                          "makes them (each the mean of itself and the inverse of the other); validation then also "
                          "reports their Dice (val_dice_symmetric)")
    trn.add_argument("--freeze-inner", action="store_true",
                     help="train only the final step (stage 2 from stage-1 --init weights, or an added final step): "
                          "the inner network keeps its weights and batch-norm statistics, and the step needs no "
                          "backward pass through it")
    trn.add_argument("--weight-decay", type=float, default=0.0,
                     help="decoupled weight decay (AdamW) of the convolution weights: each step multiplies them by "
                          "1 − learning rate × this (default 0: plain Adam; a resumed run must keep it)")
    trn.add_argument("--validate-every", type=_at_least_one, default=100)
    trn.add_argument("--checkpoint-every", type=_at_least_one, default=100)
    trn.add_argument("--keep-every", type=int, default=0,
                     help="also keep the network every this many steps as OUT/snapshots/step_NNNNNN.pt, to average "
                          "with 'iconreg average-weights' (default 0: keep none)")
    trn.add_argument("--seed", type=int, default=0)
    trn.add_argument("--device", default="auto")
    trn.add_argument("--mixed-precision", action="store_true",
                     help="the UNets in bfloat16 (maps, sampling and losses stay float32): on a GPU, or a CPU "
                          "with native bfloat16 (AVX512-BF16, AMX or Arm BF16)")
    trn.add_argument("--save-prepared", action="store_true",
                     help="also save the resampled data as train_prepared.npz and validation_prepared.npz in "
                          "--out (to copy to a GPU machine)")
    trn.add_argument("--export", help="write the final weights here as float16 (the shipped format)")
    trn.set_defaults(func=_cmd_train)

    avg = commands.add_parser("average-weights",
                              help="the mean of snapshots of one training run (weight averaging), as float16 weights")
    avg.add_argument("sources", nargs="+", help="checkpoints or weights files of one run (at least two)")
    avg.add_argument("--out", required=True, help="weights file to write (the shipped float16 format)")
    avg.add_argument("--spec", help="with --val: validate the mean as 'iconreg train' does (model spec or zoo name)")
    avg.add_argument("--val", help="prepared validation set (.npz, from 'iconreg train --save-prepared')")
    avg.add_argument("--stage", type=int, default=2, choices=[1, 2], help="the training stage of the snapshots")
    avg.add_argument("--device", default="auto")
    avg.set_defaults(func=_cmd_average_weights)

    cnv = commands.add_parser("convert-weights",
                              help="start a ConstrICON network, or a wider GradICON network, from a trained GradICON "
                                   "one (for 'train --init')")
    cnv.add_argument("--from", dest="source", required=True, help="GradICON zoo name or spec JSON")
    cnv.add_argument("--weights", help="its weights file (default: the bundled or installed weights)")
    cnv.add_argument("--to", required=True,
                     help="ConstrICON spec JSON whose SVF steps are pooled as the GradICON steps (svf_downsample), "
                          "or a GradICON spec JSON with the same steps and wider UNets (unet.channels)")
    cnv.add_argument("--noise", type=float, default=1e-2,
                     help="widening: weights touching added channels start as normal noise of this fraction of "
                          "each layer's weights' standard deviation (0: the same function exactly, but the added "
                          "channels start dead)")
    cnv.add_argument("--seed", type=int, default=0, help="widening: seed of that noise")
    cnv.add_argument("--out", required=True, help="weights file to write (float16)")
    cnv.set_defaults(func=_cmd_convert_weights)

    evl = commands.add_parser("evaluate", help="Dice, HD95, folds, IC error and time on labelled pairs, "
                                               "with identity and demons baselines")
    evl.add_argument("--data", required=True, help="CSV (fixed,moving,fixed_label,moving_label) or dataset folder")
    evl.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or spec JSON (default: %(default)s)")
    evl.add_argument("--out", required=True, help="folder for evaluation.json and evaluation.md")
    evl.add_argument("--pairing", default="consecutive", choices=["consecutive", "all"],
                     help="pairs of a dataset folder: (i, i+1) or every pair")
    evl.add_argument("--last-fraction", type=float, default=0.0,
                     help="use only the last fraction of a dataset folder (e.g. 0.2: the validation split)")
    evl.add_argument("--one-direction", action="store_true", help="each pair once instead of both directions")
    evl.add_argument("--max-pairs", type=_count, default=0, help="evaluate at most this many pairs (0 = all)")
    evl.add_argument("--io-iterations", type=int, default=0, help="also evaluate with instance optimisation")
    evl.add_argument("--io-mode", choices=["fields", "weights"], default="fields")
    evl.add_argument("--io-grid", choices=["network", "fixed"], default="network", help=IO_GRID_HELP)
    evl.add_argument("--io-learning-rate", type=_io_learning_rate, help=IO_LEARNING_RATE_HELP)
    evl.add_argument("--flips", type=_flips, default=None, metavar="model|none|AXES", help=FLIPS_HELP)
    evl.add_argument("--symmetric", action="store_true", help=SYMMETRIC_HELP)
    evl.add_argument("--refinements", type=_refinements, default=None, metavar="model|N", help=REFINEMENTS_HELP)
    evl.add_argument("--baselines", default="identity,demons",
                     help="comma-separated: identity, demons, ants-syn, elastix (the last two need "
                          "pip install -e '.[baselines]')")
    evl.add_argument("--modality", default="auto", choices=["ct", "mri", "auto"])
    evl.add_argument("--device", default="auto")
    evl.set_defaults(func=_cmd_evaluate)

    dem = commands.add_parser("demo", help="register the bundled sample pair offline and print a summary")
    dem.add_argument("--out", default="demo-result", help="output folder (default: %(default)s)")
    dem.add_argument("--model", help="model (default: the one named in the sample data's sample.json)")
    dem.add_argument("--io-iterations", type=int, default=0)
    dem.add_argument("--device", default="auto")
    dem.set_defaults(func=_cmd_demo)

    app = commands.add_parser("app", help="the browser front end: Slicer slice views in a web page (one session "
                                          "per browser tab)")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to serve on (default loopback only; 0.0.0.0 serves every network)")
    app.add_argument("--port", type=int, default=8080, help="port of the page (sessions use free ports)")
    app.add_argument("--data-dir", help="folder whose images the page may open (nothing outside it is readable)")
    app.add_argument("--fixed", help="fixed image loaded in every new session (with --moving)")
    app.add_argument("--moving", help="moving image loaded in every new session (with --fixed)")
    app.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted upload (default 512 MB)")
    app.add_argument("--max-sessions", type=int, default=4, help="sessions alive at once (default 4)")
    app.add_argument("--idle-timeout", type=int, default=60,
                     help="seconds a session lives after its tab closed (default 60)")
    app.set_defaults(func=_cmd_app)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that every ``finally`` (temporary files, staging folders) runs."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: OS errors a user causes or can fix (full disk, permissions, read-only or missing folders): exit 3, one line.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                   errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line. Exit codes: 0 success, 2 usage, 3 a user error (one line on stderr, no traceback),
    130 interrupted (Ctrl-C, SIGTERM, cancel); only bugs show a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    if argv is None and args.command in REUSE_FREED_MEMORY_COMMANDS:  # a process of its own: reuse freed memory
        from .allocator import keep_freed_memory
        keep_freed_memory()
    try:
        with _sigterm_as_exception():
            code = args.func(args)
            sys.stdout.flush()  # a closed pipe must fail here, inside the handler, not at interpreter exit
        return code
    except UserError as error:
        print(f"iconreg: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`): not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except RuntimeError as error:
        if type(error).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, outside the network stage
            raise
        print("iconreg: error: out of GPU memory; close other GPU programs or use --device cpu.", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print("iconreg: error: out of memory; close other programs, use a machine with more memory or a model "
              "with a smaller grid.", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        if error.errno not in _USER_OS_ERRORS:
            raise
        where = f" '{error.filename}'" if error.filename else ""
        print(f"iconreg: error: {error.strerror or error}{where}.", file=sys.stderr)
        return EXIT_USER_ERROR
    except (Cancelled, KeyboardInterrupt):
        print("iconreg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
