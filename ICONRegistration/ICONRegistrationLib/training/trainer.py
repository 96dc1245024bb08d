"""GradICON training (Tian et al., CVPR 2023, §4.2), resumable, with validation, CSV logs and curves.

Loss: LNCC(A∘Φ_AB, B) + LNCC(B∘Φ_BA, A) + λ‖∇(Φ_AB∘Φ_BA) − I‖²_F (the spec's similarity and λ; the ICON
penalty and SSD are options), Adam. Stage 1 trains the multi-resolution network without the final
full-resolution step; stage 2 adds that step (``spec.last_step``) and trains everything, starting from stage 1.
Augmentation: the same random axis flips for both images of a pair, then an independent small random affine
warp of each image, optionally with a random smooth (elastic) displacement added to it and a random intensity
gamma per image. Optionally, before that, anatomy mixing: an image and its labels warped part of the way toward
another training volume's anatomy by a frozen registration network (:func:`mix_anatomy`).

Every random draw comes from one ``torch.Generator`` whose state is saved in the checkpoint, so a resumed run
takes exactly the step an uninterrupted run would have taken.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.coordinates import identity_map, jacobian_determinant, sample_at, vector_length, voxel_scale
from ..core.inversion import symmetrize_maps
from ..core import native_sampler
from ..core.networks import low_precision
from ..core.losses import (fold_penalty, label_fractions, label_indices, make_similarity, soft_dice_loss,
                           soft_dice_loss_of_warped_labels)
from ..core.objective import both_directions, symmetric_objective
from ..core.optimizers import adam, load_optimizer_state
from ..core.registration_modules import TwoStep
from ..device import choose_device, device_description, has_native_bfloat16
from ..errors import UserError
from ..io.atomic import atomic_path
from ..overlap import dice_scores
from ..models.build import build_network
from ..models.spec import ModelSpec, are_flip_axes
from ..models.weights import load_state_dict_strict, read_state_dict, write_state_dict
from ..progress import ProgressCallback, report
from .averaging import SNAPSHOT_FOLDER, snapshot_path
from .data import PreparedSet

CHECKPOINT_NAME = "checkpoint.pt"
#: the network at the best validation Dice of the run so far: {"model": state dict, "step": n, "val_dice": d}
#: (``--init``, ``--export`` and :func:`export_weights` read it like a checkpoint)
BEST_NAME = "best.pt"
LABEL_LOSSES = (None, "dice")
LR_SCHEDULES = ("constant", "cosine")
#: plain fixed-point steps of each inversion in a training step's symmetric label loss (unrolled, see
#: core.inversion.unrolled_inverse): within a few hundredths of a voxel of the accurate inverse, at a twentieth
#: of its cost
SYMMETRIC_TRAINING_STEPS = 4


@dataclasses.dataclass
class TrainingConfig:
    """Settings of one training stage (defaults: the GradICON protocol)."""

    steps: int = 1000
    stage: int = 2
    batch_size: int = 4
    learning_rate: float = 5e-5
    # "constant", or "cosine": the rate falls from learning_rate to 0 along half a cosine from step warmup_steps to
    # step `steps` (a function of the step: a run resumed with the same steps, warmup and rate follows the same
    # curve); both after warmup_steps of linear warmup from the stage's first step
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    penalty: Optional[str] = None  # default: the spec's (gradicon, bending or diffusion by architecture)
    similarity: Optional[str] = None  # default: the spec's
    lmbda: Optional[float] = None  # default: the spec's
    flip_axes: tuple[int, ...] = (0, 1, 2)  # tensor axes that may be flipped (same flip for both images)
    affine_strength: float = 0.05  # max relative deformation of the random affine warps
    # random smooth displacement added to each image's affine warp: standard deviation of each component at the
    # control points, in voxels of the network grid (0: none), control points every elastic_spacing voxels
    elastic_voxels: float = 0.0
    elastic_spacing: int = 16
    # random intensity gamma per image, I ↦ I^γ with log γ ~ U(−g, g) on the [0, 1] network input (0: none)
    intensity_gamma: float = 0.0
    # random smooth multiplicative bias field per image, I ↦ I · exp(b), b Gaussian with this standard deviation at
    # control points every elastic_spacing voxels, trilinear in between (MRI intensity non-uniformity; 0: none)
    bias_field: float = 0.0
    validate_every: int = 100
    checkpoint_every: int = 100
    keep_every: int = 0  # also keep the network every this many steps in snapshots/ (for weight averaging; 0: no)
    seed: int = 0
    # the UNets in bfloat16 (core.networks.low_precision; maps, sampling and losses stay float32):
    # a GPU, or a CPU with native bfloat16 (device.has_native_bfloat16)
    mixed_precision: bool = False
    # GradICON/ICON penalty on a random 1/8 of the jittered grid points: the full penalty's expectation at a
    # fraction of its cost (see core.losses.jittered_identity); 1.0 evaluates it at every grid point.
    penalty_fraction: float = 0.125
    # μ of an ICON term added to the GradICON penalty: μ × mean squared round-trip error ‖Φ_AB(Φ_BA(x)) − x‖² in
    # voxels² at the penalty's points (0: the paper's objective; see core.objective.symmetric_objective)
    icon_weight: float = 0.0
    # κ: the ICON term becomes a weighted mean, weight 1 + κ at points inside the labels of the image where the
    # round trip starts, 1 elsewhere (0: uniform; μ keeps the term's overall strength). Needs icon_weight > 0 and
    # label maps; asks for inverse consistency on the structures.
    icon_label_weight: float = 0.0
    # weight of a fold penalty on both directions' maps (core.losses.fold_penalty: mean relu(0.1 − det J) over the
    # network grid's voxels; 0: off). Aims at the few folded voxels directly, where a larger λ smooths everything.
    fold_weight: float = 0.0
    # anatomy mixing (learned-deformation augmentation): with this probability per image (0: off, and no draws, as
    # before the option), the image and its labels are first warped a fraction α ~ U(0, anatomy_mix_max) of the way
    # toward another training volume's anatomy by a frozen registration network's map (the weights
    # anatomy_mix_weights, by default the run's --init): new subjects between the training subjects, with their
    # labels moved exactly alike (see mix_anatomy)
    anatomy_mix: float = 0.0
    anatomy_mix_max: float = 1.0
    anatomy_mix_weights: Optional[str] = None
    # fraction of the batch's pairs that are a volume with itself (each copy still augmented independently): the
    # network then also sees pairs whose answer is the augmentation alone, and learns not to deform identical
    # images (0: pairs of two different volumes only, the draws of earlier versions)
    self_pair_fraction: float = 0.0
    # Optional supervision: "dice" adds label_weight × soft Dice loss of the warped moving labels (one-hot,
    # linear interpolation) against the fixed labels, both directions. Inference stays image-only.
    label_loss: Optional[str] = None
    label_weight: float = 1.0
    label_downsample: int = 1  # the label loss is evaluated on blocks of this many voxels per axis (1: full resolution)
    # take the label loss on the maps made consistent as register(symmetric=True) makes them (each direction the mean
    # of itself and the inverse of the other, differentiable): the network learns to fit the labels in the output a
    # user who needs consistent transforms gets; validation then also reports that output's Dice
    symmetric_label_loss: bool = False
    # train only the outermost step of a TwoStep network (stage 2's new final step, started by --init at the
    # identity): the inner network keeps its weights and running statistics (evaluation mode, no gradients, so no
    # backward pass through it), and the outer step learns to correct what the inner one predicts at inference
    freeze_inner: bool = False
    # decoupled weight decay (AdamW, Loshchilov & Hutter 2019): each step multiplies the convolution and
    # transposed-convolution weights by 1 − rate × weight_decay (biases and batch-norm parameters are not decayed);
    # 0: plain Adam, as before the option
    weight_decay: float = 0.0
    time_limit: Optional[float] = None  # seconds: stop (checkpoint and validation written) once exceeded


def learning_rate_at(config: TrainingConfig, step: int) -> float:
    """The learning rate of step ``step + 1`` (``step`` steps done) of a stage of ``config.steps`` steps."""
    rate = config.learning_rate
    if step < config.warmup_steps:
        return rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(config.steps - config.warmup_steps, 1)
        progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
        rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


def check_config(config: TrainingConfig) -> None:
    """:class:`UserError` for settings that make no sense, checked before any data are prepared: rates, intervals,
    weights, fractions and augmentation strengths (they used to train something else without a word — a negative λ
    or augmentation strength, a flip axis given twice — or stop with a traceback — a NaN or negative rate,
    ``validate_every`` 0), and options that need another one. (``steps`` 0 and learning rate 0 stay possible here,
    for tests; ``iconreg train`` refuses them.)"""
    if not (math.isfinite(config.learning_rate) and config.learning_rate >= 0):
        raise UserError(f"--learning-rate must be a number ≥ 0, got {config.learning_rate}.")
    for option, every in (("--validate-every", config.validate_every), ("--checkpoint-every", config.checkpoint_every)):
        if every < 1:
            raise UserError(f"{option} must be a number of steps ≥ 1, got {every}.")
    if not are_flip_axes(list(config.flip_axes)):
        raise UserError(f"--flip-axes must be distinct tensor axes 0, 1, 2 (or none), got {config.flip_axes}.")
    for option, value in (("--lambda", config.lmbda), ("--affine", config.affine_strength),
                          ("--elastic", config.elastic_voxels), ("--gamma", config.intensity_gamma),
                          ("--bias-field", config.bias_field)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{option} must be a number ≥ 0, got {value}.")
    if not 0 < config.penalty_fraction <= 1:
        raise UserError(f"The penalty fraction must be in (0, 1], got {config.penalty_fraction}.")
    if config.label_loss not in LABEL_LOSSES:
        raise UserError(f"Unknown label loss '{config.label_loss}': use one of "
                        f"{', '.join(str(name) for name in LABEL_LOSSES[1:])}.")
    if config.label_loss is not None and not (math.isfinite(config.label_weight) and config.label_weight > 0):
        raise UserError(f"The label weight must be a positive number, got {config.label_weight}.")
    if config.time_limit is not None and not (math.isfinite(config.time_limit) and config.time_limit >= 0):
        raise UserError(f"The time limit must be a number of seconds ≥ 0, got {config.time_limit}.")
    if not 0 <= config.self_pair_fraction <= 1:
        raise UserError(f"The self-pair fraction must be in [0, 1], got {config.self_pair_fraction}.")
    if not (math.isfinite(config.icon_weight) and config.icon_weight >= 0):
        raise UserError(f"The ICON weight must be a number ≥ 0, got {config.icon_weight}.")
    if not (math.isfinite(config.fold_weight) and config.fold_weight >= 0):
        raise UserError(f"--fold-weight must be a number ≥ 0, got {config.fold_weight}.")
    if not (math.isfinite(config.icon_label_weight) and config.icon_label_weight >= 0):
        raise UserError(f"--icon-label-weight must be a number ≥ 0, got {config.icon_label_weight}.")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise UserError(f"--weight-decay must be a number ≥ 0, got {config.weight_decay}.")
    if config.icon_label_weight and not config.icon_weight:
        raise UserError("--icon-label-weight weights the ICON term inside the labels: give --icon-weight > 0 too.")
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"Unknown learning-rate schedule '{config.lr_schedule}': use one of {', '.join(LR_SCHEDULES)}.")
    if config.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be a number of steps ≥ 0, got {config.warmup_steps}.")
    if config.keep_every < 0:
        raise UserError(f"--keep-every must be a number of steps ≥ 0 (0: keep no snapshots), got {config.keep_every}.")
    if config.symmetric_label_loss and not config.label_loss:
        raise UserError("--symmetric-label-loss takes the label loss on the symmetric maps: give --label-loss too.")
    if not 0 <= config.anatomy_mix <= 1:
        raise UserError(f"--anatomy-mix is a probability per image in [0, 1], got {config.anatomy_mix}.")
    if not (math.isfinite(config.anatomy_mix_max) and 0 < config.anatomy_mix_max <= 2):
        raise UserError(f"--anatomy-mix-max is the largest fraction of the way toward the other volume, in (0, 2], "
                        f"got {config.anatomy_mix_max}.")


def check_mixed_precision(config: TrainingConfig, device: torch.device) -> None:
    """:class:`UserError` when ``config.mixed_precision`` asks for bfloat16 on a device without native bfloat16
    (there it would be slower than float32, not faster). A run of 0 steps (preparing data alone) trains nothing and
    passes."""
    if config.mixed_precision and config.steps > 0 and not has_native_bfloat16(device):
        raise UserError(f"--mixed-precision needs native bfloat16 (an NVIDIA GPU of compute capability 8.0 or newer, "
                        f"or a CPU with AVX512-BF16, AMX or Arm BF16 listed in /proc/cpuinfo); "
                        f"{device_description(device)} here has none that this can tell, and emulated bfloat16 is "
                        "slower than float32. Leave the option out.")


def stage_spec(spec: ModelSpec, stage: int) -> ModelSpec:
    """Stage 1: the multi-resolution network without the final step(s); stage 2: the spec as given.

    Only GradICON networks are trained in stages; ConstrICON and SITReg networks train whole in either stage.
    """
    if stage not in (1, 2):
        raise UserError("stage must be 1 (multi-resolution network) or 2 (adds the final full-resolution step).")
    if stage == 1 and spec.last_step and spec.architecture == "gradicon":
        options = {k: v for k, v in spec.options.items() if k != "final_steps"}
        return dataclasses.replace(spec, last_step=False, options=options)
    return spec


def trainable_parameters(net: torch.nn.Module, freeze_inner: bool) -> list[torch.nn.Parameter]:
    """The parameters a run trains: all of them, or with ``freeze_inner`` those of the outermost step of a
    :class:`~ICONRegistrationLib.core.registration_modules.TwoStep` network (``netPsi``), after switching the
    gradients of the inner network (``netPhi``) off."""
    if not freeze_inner:
        return list(net.parameters())
    if not isinstance(net, TwoStep):
        raise UserError("--freeze-inner trains only the outer step of a network built in steps: a GradICON network "
                        "with its final step (last_step, stage 2).")
    net.netPhi.requires_grad_(False)
    return list(net.netPsi.parameters())


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.Adam:
    """Adam over ``parameters`` (from :func:`trainable_parameters`; fused where PyTorch has it, see
    :mod:`~ICONRegistrationLib.core.optimizers`), with ``config.weight_decay`` > 0 decoupled weight decay on the
    parameters with more than one dimension (convolution kernels) in a second group."""
    if not config.weight_decay:
        return adam(parameters, lr=config.learning_rate)
    groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]
    return adam(groups, lr=config.learning_rate, decoupled_weight_decay=True)


def set_training_mode(net: torch.nn.Module, freeze_inner: bool) -> None:
    """``net.train()``, except that a frozen inner network stays in evaluation mode (its batch norms use and keep
    their running statistics, as at inference)."""
    net.train()
    if freeze_inner:
        net.netPhi.eval()


def initialise(net: torch.nn.Module, source: str | Path) -> str:
    """Load ``source`` (a checkpoint or weights file) into ``net``, or into the innermost part of ``net`` that it
    fits: a stage-1 state goes into a stage-2 network's multi-resolution part, and a network's state into one
    that adds further final steps (``options["final_steps"]``) around it. Every new final step starts at the
    identity (its UNet's last convolution is zero), so the result equals the source network until trained.
    Returns what was loaded, for the log."""
    state = read_state_dict(source)
    inner, depth = net, 0
    while inner is not None:
        if set(state) == set(inner.state_dict()):
            load_state_dict_strict(inner, state, source=f"initial weights '{source}'")
            if depth == 0:
                return "all weights"
            outer = "the outer step starts" if depth == 1 else f"the outer {depth} steps start"
            return f"the inner network ({outer} at the identity)"
        inner, depth = getattr(inner, "netPhi", None), depth + 1
    load_state_dict_strict(net, state, source=f"initial weights '{source}'")  # raises with the differences
    return "all weights"


def random_affine_grids(batch: int, shape, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``F.affine_grid`` sampling grids of ``batch`` random affine maps I + U(−s, s) with shifts U(−s, s); for
    ``s = 0`` the identity's grids, without drawing from ``generator``."""
    theta = torch.eye(3, 4).repeat(batch, 1, 1)
    if strength > 0:
        theta += (torch.rand(batch, 3, 4, generator=generator) * 2 - 1) * strength
    return F.affine_grid(theta, [batch, 1, *shape], align_corners=False)


def random_smooth_fields(batch: int, channels: int, shape, std: float, spacing: int,
                         generator: torch.Generator) -> torch.Tensor:
    """Random smooth fields ``[batch, channels, *shape]``: Gaussian values with standard deviation ``std`` at
    control points every ``spacing`` voxels (at least 2 per axis, the outermost at the grid's corners),
    interpolated trilinearly in between."""
    controls = [max(2, math.ceil(size / spacing) + 1) for size in shape]
    noise = torch.randn(batch, channels, *controls, generator=generator) * std
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def random_elastic_displacements(batch: int, shape, voxels: float, spacing: int,
                                 generator: torch.Generator) -> torch.Tensor:
    """Random smooth displacements ``[batch, *shape, 3]`` in ``F.grid_sample``'s normalised units
    (``align_corners=False``, component ``k`` along the grid's ``k``-th coordinate, i.e. tensor axis ``−1 − k``).

    Each component is Gaussian with standard deviation ``voxels`` (voxels of ``shape``) at control points every
    ``spacing`` voxels, interpolated trilinearly in between (the field's overall standard deviation is about
    0.54 × ``voxels``): a smooth field whose Jacobian stays near the identity when ``voxels`` is small against
    ``spacing``.
    """
    field = random_smooth_fields(batch, 3, shape, voxels, spacing, generator)
    per_voxel = torch.tensor([2.0 / size for size in reversed(shape)]).view(1, 3, 1, 1, 1)
    return (field * per_voxel).permute(0, 2, 3, 4, 1)


def augment(images_A: torch.Tensor, images_B: torch.Tensor, config: TrainingConfig,
            generator: torch.Generator, labels: Optional[tuple[torch.Tensor, torch.Tensor]] = None
            ) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Same random flips for A and B (pairs stay anatomically consistent), independent random affine warps, each
    optionally with a random smooth displacement (``config.elastic_voxels``), then per image an independent random
    smooth multiplicative bias field (``config.bias_field``, clipped to [0, 1] as the preprocessing clips) and
    an independent random intensity gamma (``config.intensity_gamma``).

    ``images_A``, ``images_B`` ``[b, 1, *S]`` in [0, 1]; ``labels`` ``(labels_A, labels_B)`` ``[b, 1, *S]``
    (float) get exactly the flips and warps of their images (nearest neighbour); the random draws are the same with
    or without them. Returns ``(A, B, labels)``.
    """
    for axis in config.flip_axes:
        flip = torch.rand(images_A.shape[0], generator=generator) < 0.5
        if flip.any():
            where = flip.view(-1, 1, 1, 1, 1)
            images_A = torch.where(where, images_A.flip(axis + 2), images_A)
            images_B = torch.where(where, images_B.flip(axis + 2), images_B)
            if labels is not None:
                labels = tuple(torch.where(where, part.flip(axis + 2), part) for part in labels)
    batch = images_A.shape[0]
    shape = images_A.shape[2:]
    if config.affine_strength > 0 or config.elastic_voxels > 0:
        grids = random_affine_grids(2 * batch, shape, config.affine_strength, generator)
        if config.elastic_voxels > 0:
            grids = grids + random_elastic_displacements(2 * batch, shape, config.elastic_voxels,
                                                         config.elastic_spacing, generator)
        grids = grids.to(images_A.device, images_A.dtype)
        both = F.grid_sample(torch.cat([images_A, images_B]), grids, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        images_A, images_B = both.split(batch)
        if labels is not None:
            warped = F.grid_sample(torch.cat(labels), grids, mode="nearest", padding_mode="zeros",
                                   align_corners=False)
            labels = tuple(warped.split(batch))
    if config.bias_field > 0:
        log_bias = random_smooth_fields(2 * batch, 1, shape, config.bias_field, config.elastic_spacing, generator)
        both = torch.cat([images_A, images_B]) * log_bias.exp().to(images_A.device, images_A.dtype)
        images_A, images_B = both.clamp(0, 1).split(batch)
    if config.intensity_gamma > 0:
        log_gamma = (torch.rand(2 * batch, generator=generator) * 2 - 1) * config.intensity_gamma
        gamma = log_gamma.exp().view(-1, 1, 1, 1, 1).to(images_A.device, images_A.dtype)
        both = torch.cat([images_A, images_B]).clamp(0, 1) ** gamma
        images_A, images_B = both.split(batch)
    return images_A, images_B, labels


def anatomy_network(spec: ModelSpec, source: str | Path, device: torch.device) -> torch.nn.Module:
    """The frozen network that :func:`mix_anatomy` warps with: ``spec``'s network with the weights in ``source``
    (a weights file or checkpoint, loaded as ``--init`` loads it), in evaluation mode, without gradients."""
    network = build_network(spec)
    initialise(network, source)
    return anatomy_network_from(network, device)


def anatomy_network_from(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` frozen for :func:`mix_anatomy`: evaluation mode, no gradients, on ``device``."""
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.to(device)


def mix_anatomy(images: torch.Tensor, labels: Optional[torch.Tensor], pool: torch.Tensor,
                network: torch.nn.Module, probability: float, max_fraction: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Anatomy mixing: each of ``images`` ``[n, 1, *S]`` (float, on the network grid), with probability
    ``probability``, is moved a fraction α ~ U(0, ``max_fraction``) of the way toward a random volume ``V`` of
    ``pool`` ``[N, 1, *S]``.

    With Φ = ``network``(image, V) on the grid (image ∘ Φ ≈ V, the map convention of
    :mod:`~ICONRegistrationLib.core.coordinates`), the image is resampled at Id + α (Φ − Id), trilinearly with the
    border repeated: at α = 1 it has ``V``'s shape and its own intensities. ``labels`` ``[n, 1, *S]`` (label values
    as floats) are resampled at the same points by nearest neighbour, so they stay the image's labels. The network
    runs on its own device without gradients; the results are on ``images``' device.

    Draws ``3 n`` numbers from ``generator`` (which image, which volume, α), whatever is chosen; none when
    ``probability`` is 0. Returns ``(images, labels)``, new tensors where anything moved.
    """
    if probability <= 0:
        return images, labels
    count = images.shape[0]
    chosen = torch.rand(count, generator=generator) < probability
    partners = torch.randint(0, pool.shape[0], (count,), generator=generator)
    fractions = torch.rand(count, generator=generator) * max_fraction
    if not chosen.any():
        return images, labels
    device = next(network.parameters()).device
    index = chosen.nonzero().flatten()
    source = images[index].to(device)
    with torch.no_grad():
        identity = identity_map(source.shape[2:], dtype=source.dtype, device=device)
        towards = network(source, pool[partners[index]].to(device, source.dtype))(identity)
        alpha = fractions[index].to(device, source.dtype).view(-1, *([1] * (source.dim() - 1)))
        points = identity + alpha * (towards - identity)
        images = images.clone()
        images[index] = sample_at(source, points, padding="border").to(images.device)
        if labels is not None:
            labels = labels.clone()
            labels[index] = sample_at(labels[index].to(device, source.dtype), points, padding="border",
                                      mode="nearest").to(labels.device, labels.dtype)
    return images, labels


def label_values(data: PreparedSet, needed_by: str = "A label loss") -> torch.Tensor:
    """The foreground label values of a prepared set (sorted), the channels of the label loss; ``needed_by``
    names the option that needs them in the errors."""
    if data.labels is None:
        raise UserError(f"{needed_by} needs label maps for every training volume (a labels/ folder beside "
                        "images/, or a 'label' column in the CSV).")
    values = torch.unique(data.labels)
    values = values[values != 0].long()
    if values.numel() == 0:
        raise UserError(f"The training label maps hold only background (0); {needed_by} needs labels.")
    return values


def coarse_coordinates(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """Maps ``[b, d, *S]`` on a grid of size ``S`` as maps on the grid of ``factor``-blocks (size ``S/factor``):
    each block's value is the mean of its fine values (the map at the block centre, for a smooth map), and the
    coordinates are re-expressed for an image on the block grid (block ``i`` centred at fine index
    ``factor·i + (factor − 1)/2``)."""
    if factor == 1:
        return maps
    fine = torch.tensor([size - 1 for size in maps.shape[2:]], dtype=maps.dtype, device=maps.device)
    coarse = torch.tensor([size // factor - 1 for size in maps.shape[2:]], dtype=maps.dtype, device=maps.device)
    view = (1, -1) + (1,) * (maps.dim() - 2)
    pooled = F.avg_pool3d(maps, factor) if maps.dim() == 5 else F.avg_pool2d(maps, factor)
    return ((pooled * fine.view(view) - (factor - 1) / 2) / factor) / coarse.view(view)


def label_loss(maps: torch.Tensor, labels_A: torch.Tensor, labels_B: torch.Tensor, values: torch.Tensor,
               factor: int = 1) -> torch.Tensor:
    """Soft Dice loss of the moving labels warped linearly onto the fixed labels, both directions.

    ``maps`` ``[Φ_AB; Φ_BA]`` ``[2b, d, *S]`` on the grid of the label maps ``[b, 1, *S]``; ``values`` the label
    values (one channel each). ``factor`` 1: at full resolution, one-hot labels, computed without one-hot maps
    (:func:`~ICONRegistrationLib.core.losses.soft_dice_loss_of_warped_labels`: forward and backward in 1.0 s for 56
    labels at 80×96×80, batch 2, both directions, on 2 cores, against 6.2 s for the 56-channel sampling it equals;
    0.07 s with its compiled kernels). ``factor`` > 1: on the
    grid of ``factor``-blocks, with label fractions per block (a coarser loss, kept for comparison).
    """
    both = torch.cat([labels_A, labels_B])
    if factor == 1:
        moving = label_indices(both, values)
        fixed = torch.cat([moving[labels_A.shape[0]:], moving[:labels_A.shape[0]]])
        return soft_dice_loss_of_warped_labels(moving, fixed, maps, values.numel())
    moving = label_fractions(both, values, factor, dtype=maps.dtype)
    fixed = torch.cat([moving[labels_A.shape[0]:], moving[:labels_A.shape[0]]])
    return soft_dice_loss(sample_at(moving, coarse_coordinates(maps, factor), padding="zeros"), fixed)


def training_label_loss(maps: torch.Tensor, labels_A: torch.Tensor, labels_B: torch.Tensor, values: torch.Tensor,
                        config: TrainingConfig) -> torch.Tensor:
    """The label loss of a training step: :func:`label_loss` of ``maps`` ``[Φ_AB; Φ_BA]`` (in float32), on the
    maps made consistent first when ``config.symmetric_label_loss`` (:func:`symmetrize_maps` with
    ``SYMMETRIC_TRAINING_STEPS`` unrolled inversion steps), at ``config.label_downsample``."""
    maps = maps.float()
    if config.symmetric_label_loss:
        maps = symmetrize_maps(maps, unrolled_steps=SYMMETRIC_TRAINING_STEPS)[0]
    return label_loss(maps, labels_A, labels_B, values, config.label_downsample)


def draw_pairs(count: int, batch: int, generator: torch.Generator, self_pair_fraction: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(A, B)`` ``[batch]`` of the training pairs: two different volumes of ``count``, except that each
    pair is a volume with itself with probability ``self_pair_fraction`` (no extra draw when it is 0)."""
    index_A = torch.randint(count, (batch,), generator=generator)
    index_B = (index_A + torch.randint(1, count, (batch,), generator=generator)) % count
    if self_pair_fraction > 0:
        same = torch.rand(batch, generator=generator) < self_pair_fraction
        index_B = torch.where(same, index_A, index_B)
    return index_A, index_B


@torch.no_grad()
def validate(net: torch.nn.Module, data: PreparedSet, device: torch.device, max_pairs: int = 20,
             symmetric: bool = False) -> dict:
    """Mean Dice (over the labels present in both images of a pair), % voxels with det ≤ 0 and IC error (network
    voxels; also inside the fixed image's labels, ``val_ic_error_in_labels_voxels``: per pair the mean over the
    labelled voxels of both directions) on pairs (i, i+1) of ``data``, both directions; and the mean displacement
    (network voxels) when volume i is registered to itself, where the right answer is the identity
    (``val_self_displacement_voxels``).
    With ``symmetric`` also the Dice of the maps made consistent (``val_dice_symmetric``, as
    ``register(symmetric=True)`` predicts)."""
    pairs = [(i, i + 1) for i in range(len(data) - 1)][:max_pairs]
    if not pairs:
        return {}
    net.eval()
    dices, symmetric_dices, folds, ic_errors, ic_in_labels, self_displacements = [], [], [], [], [], []
    shape = data.shape
    grid = identity_map(shape, device=device)
    scale = voxel_scale(shape, device=device)
    for i, j in pairs:
        A = data.images[i:i + 1].to(device, torch.float32)
        B = data.images[j:j + 1].to(device, torch.float32)
        maps = both_directions(net, A, B)(grid)  # [Φ_AB; Φ_BA]
        # Φ_AA: one pass for a network without forward_and_inverse (both directions are the same pass)
        itself = both_directions(net, A, A)(grid) if hasattr(net, "forward_and_inverse") else net(A, A)(grid)
        self_displacements.append(float(vector_length((itself - grid) * scale).mean()))
        jac = jacobian_determinant(maps)
        folds.append(100.0 * float((jac <= 0).float().mean()))
        back = torch.cat([maps[1:], maps[:1]])
        round_trip = sample_at(back, maps, padding="border")  # Φ_BA(Φ_AB(x)), Φ_AB(Φ_BA(y))
        ic_error = ((round_trip - grid) * scale).norm(dim=1)  # [2, *S]: on B's grid, then on A's
        ic_errors.append(float(ic_error.mean()))
        if data.labels is not None:
            labels_A = data.labels[i:i + 1].to(device).float()
            labels_B = data.labels[j:j + 1].to(device).float()
            fixed = torch.cat([labels_B, labels_A])  # each direction's fixed labels, on its round trip's grid
            inside = fixed[:, 0] != 0
            if inside.any():
                ic_in_labels.append(float(ic_error[inside].mean()))
            dices += _pair_dices(maps, labels_A, labels_B)
            if symmetric:
                symmetric_dices += _pair_dices(symmetrize_maps(maps)[0], labels_A, labels_B)
    net.train()
    result = {"val_folds_percent": sum(folds) / len(folds), "val_ic_error_voxels": sum(ic_errors) / len(ic_errors),
              "val_self_displacement_voxels": sum(self_displacements) / len(self_displacements)}
    if dices:
        result["val_dice"] = sum(dices) / len(dices)
    if symmetric_dices:
        result["val_dice_symmetric"] = sum(symmetric_dices) / len(symmetric_dices)
    if ic_in_labels:
        result["val_ic_error_in_labels_voxels"] = sum(ic_in_labels) / len(ic_in_labels)
    return result


def _pair_dices(maps: torch.Tensor, labels_A: torch.Tensor, labels_B: torch.Tensor) -> list[float]:
    """Mean Dice of each direction of ``maps`` ``[Φ_AB; Φ_BA]`` over the labels present in both images (labels
    warped nearest-neighbour; a pair without a label in common gives none)."""
    fixed = torch.cat([labels_B, labels_A])
    warped = sample_at(torch.cat([labels_A, labels_B]), maps, padding="zeros", mode="nearest").round()
    # the labels present in both images, as iconreg evaluate scores them (a structure one image lacks cannot match)
    present = sorted({int(v) for v in torch.unique(labels_A)} & {int(v) for v in torch.unique(labels_B)} - {0})
    dices = []
    for k in range(2):
        scores = {label: value for label, value in dice_scores(warped[k].cpu().numpy(), fixed[k].cpu().numpy(),
                                                               present).items() if not math.isnan(value)}
        if scores:
            dices.append(sum(scores.values()) / len(scores))
    return dices


def _append_csv(path: Path, row: dict) -> None:
    """Append ``row`` to the log at ``path`` by column name. A row with columns the file's header lacks (a run
    resumed by a newer version, or with other settings) extends the header once; older rows leave them empty."""
    fields: list[str] = []
    if path.exists():
        with path.open(newline="", encoding="utf-8") as handle:
            fields = next(csv.reader(handle), [])
    missing = [key for key in row if key not in fields]
    if fields and missing:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        fields = fields + missing
        with atomic_path(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(row), restval="")
        if not fields:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, last_step: int) -> None:
    """Drop the rows of a log with ``step > last_step`` (a resumed run takes those steps again)."""
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, [row for row in reader if int(row["step"]) <= last_step]
    if fields is None:
        return
    with atomic_path(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(out_dir: Path) -> Optional[Path]:
    """``curves.png`` from ``train_log.csv`` and ``validation_log.csv`` (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def read(name):
        path = out_dir / name
        if not path.exists():
            return []
        with path.open(encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    train_rows, val_rows = read("train_log.csv"), read("validation_log.csv")
    if not train_rows:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [int(r["step"]) for r in train_rows]
    for key in [k for k in ("loss", "similarity", "penalty", "label_loss") if k in train_rows[0]]:
        logged = [(step, float(r[key])) for step, r in zip(steps, train_rows) if r.get(key)]  # empty: not logged
        axes[0].plot([p[0] for p in logged], [p[1] for p in logged], label=key, linewidth=0.8)
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title("training objective")
    if val_rows:
        vsteps = [int(r["step"]) for r in val_rows]
        if "val_dice" in val_rows[0]:
            axes[1].plot(vsteps, [float(r["val_dice"]) for r in val_rows], marker="o")
        axes[1].set_title("validation Dice")
        axes[2].plot(vsteps, [float(r["val_ic_error_voxels"]) for r in val_rows], marker="o", label="IC error (vox)")
        axes[2].plot(vsteps, [float(r["val_folds_percent"]) for r in val_rows], marker="s", label="folds %")
        inside = [(step, float(r["val_ic_error_in_labels_voxels"])) for step, r in zip(vsteps, val_rows)
                  if r.get("val_ic_error_in_labels_voxels")]  # absent without labels and in earlier logs
        if inside:
            axes[2].plot([p[0] for p in inside], [p[1] for p in inside], marker="v", label="IC error in labels (vox)")
        itself = [(step, float(r["val_self_displacement_voxels"])) for step, r in zip(vsteps, val_rows)
                  if r.get("val_self_displacement_voxels")]  # absent in logs of earlier versions
        if itself:
            axes[2].plot([p[0] for p in itself], [p[1] for p in itself], marker="^",
                         label="self-registration displacement (vox)")
        axes[2].legend()
        axes[2].set_title("regularity")
        for ax in axes[1:]:
            ax.set_xlabel("step")
    figure.tight_layout()
    path = out_dir / "curves.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_validation_table(out_dir: Path) -> Optional[Path]:
    """``validation.md``: the validation log as a Markdown table (step, Dice, IC error, folds)."""
    path = out_dir / "validation_log.csv"
    if not path.exists():
        return None
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    columns = [("step", "step"), ("val_dice", "validation Dice"), ("val_ic_error_voxels", "IC error (voxels)"),
               ("val_ic_error_in_labels_voxels", "IC error inside the labels (voxels)"),
               ("val_folds_percent", "% det J ≤ 0"),
               ("val_self_displacement_voxels", "displacement registering a volume to itself (voxels)")]
    columns = [(key, title) for key, title in columns if key in rows[0]]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row[key] for key, _ in columns) + " |" for row in rows]
    table = out_dir / "validation.md"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table


def largest_batch(spec: ModelSpec, data: PreparedSet, config: TrainingConfig, device: str = "auto",
                  candidates: tuple[int, ...] = (64, 32, 16, 8, 4, 2, 1)) -> int:
    """The largest batch (of ``candidates``) whose training step fits in the GPU's memory with room to spare: one
    trial step per size, largest first (bfloat16 UNets if ``config.mixed_precision``, the label loss if
    ``config.label_loss``), and then the next smaller candidate is returned, leaving headroom for the optimiser's
    state and fragmentation. On a CPU: 2 (memory is rarely the limit there, time is)."""
    torch_device = choose_device(device)
    if torch_device.type != "cuda":
        return 2
    net = build_network(stage_spec(spec, config.stage)).to(torch_device)
    trainable_parameters(net, config.freeze_inner)  # a frozen inner network needs no backward pass or gradients
    set_training_mode(net, config.freeze_inner)
    similarity = make_similarity(**spec.similarity)
    values = label_values(data).to(torch_device) if config.label_loss else None
    for position, batch in enumerate(candidates):
        try:
            index = torch.arange(batch) % len(data)
            images = data.images[index].float().to(torch_device)
            with low_precision(net, torch.bfloat16 if config.mixed_precision else None):
                terms = symmetric_objective(net, images, images.roll(1, 0), similarity=similarity,
                                            lmbda=spec.lmbda, penalty=config.penalty or spec.penalty,
                                            penalty_fraction=config.penalty_fraction)
                loss = terms.loss
                if values is not None:
                    labels = data.labels[index].float().to(torch_device)
                    loss = loss + training_label_loss(terms.maps, labels, labels.roll(1, 0), values, config)
            loss.backward()
            net.zero_grad(set_to_none=True)
            del terms, loss, images
            torch.cuda.synchronize(torch_device)
            torch.cuda.empty_cache()
            return candidates[min(position + 1, len(candidates) - 1)]
        except torch.cuda.OutOfMemoryError:
            net.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise UserError("Not even a batch of 1 fits in the GPU's memory; use a smaller grid or --device cpu.")


def _best_so_far(out_dir: Path) -> tuple[float, Optional[int]]:
    """Validation Dice and step of the run's ``best.pt`` (−inf and None when there is none)."""
    path = out_dir / BEST_NAME
    if not path.exists():
        return -math.inf, None
    saved = torch.load(str(path), map_location="cpu", weights_only=True)
    return float(saved["val_dice"]), int(saved["step"])


def _record_validation(out_dir: Path, net, row: dict, best_dice: float) -> float:
    """Append a validation row to the log; when its Dice beats ``best_dice``, save the network as ``best.pt``.
    Returns the best Dice so far."""
    _append_csv(out_dir / "validation_log.csv", {k: (f"{v:.5f}" if isinstance(v, float) else v)
                                                 for k, v in row.items()})
    dice = row.get("val_dice")
    if dice is not None and dice > best_dice:
        with atomic_path(out_dir / BEST_NAME) as temporary:
            torch.save({"model": net.state_dict(), "step": int(row["step"]), "val_dice": float(dice)},
                       str(temporary))
        return float(dice)
    return best_dice


def _save_snapshot(out_dir: Path, net, step: int) -> None:
    """The network at ``step`` (weights only) in the run's snapshot folder, for :mod:`.averaging`."""
    path = snapshot_path(out_dir, step)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as temporary:
        torch.save({"model": net.state_dict(), "step": step}, str(temporary))


def _save_checkpoint(path: Path, net, optimizer, step: int, generator: torch.Generator, spec: ModelSpec,
                     config: TrainingConfig, data: dict, mixer: Optional[torch.nn.Module] = None) -> None:
    """The run's state after ``step`` steps; ``data`` identifies its training and validation sets
    (:func:`_data_identity`), which a resumption must give again. ``mixer``: the network that anatomy mixing warps
    with, kept so that a resumed run mixes with the same one whatever happened to its file."""
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "generator": generator.get_state(), "spec": spec.to_dict(),
             "config": dataclasses.asdict(config), "data": data}
    if mixer is not None:
        state["anatomy_mix_model"] = mixer.state_dict()
    with atomic_path(path) as temporary:
        torch.save(state, str(temporary))


def _data_identity(train_set: PreparedSet, validation_set: Optional[PreparedSet]) -> dict:
    """The volume names and grids of a run's training and validation sets, kept in its checkpoint."""
    return {"train": train_set.identity(),
            "validation": validation_set.identity() if validation_set is not None else None}


def _check_same_data(out_dir: Path, saved: Optional[dict], now: dict) -> None:
    """Raise :class:`UserError` when a run is resumed on other training volumes than it was trained on, or
    validated on other volumes than its ``best.pt`` was chosen on (checkpoints from before the check: no check;
    a validation set given on one side only: nothing to compare)."""
    if saved is None:
        return
    for role, option in (("train", "--data"), ("validation", "--val")):
        before, after = saved.get(role), now.get(role)
        if before is None or after is None or before == after:
            continue
        raise UserError(f"The run in '{out_dir}' was {'trained' if role == 'train' else 'validated'} on other "
                        f"volumes ({len(before['names'])} on a {'×'.join(map(str, before['shape']))} grid, the first "
                        f"'{before['names'][0] if before['names'] else ''}') than {option} gives now "
                        f"({len(after['names'])}, the first '{after['names'][0] if after['names'] else ''}'); resume "
                        "it with the same data, or start a new run from its weights (another --out, or --restart, "
                        f"with --init '{out_dir / CHECKPOINT_NAME}').")


def export_weights(checkpoint: str | Path, out: str | Path, half: bool = True) -> Path:
    """The model weights of a checkpoint as a plain state dict (float16 by default, as shipped)."""
    return write_state_dict(read_state_dict(checkpoint), out, half)


def train(spec: ModelSpec, train_set: PreparedSet, out_dir: str | Path, config: TrainingConfig, *,
          validation_set: Optional[PreparedSet] = None, init: "str | Path | None" = None, resume: bool = True,
          device: str = "auto", progress: Optional[ProgressCallback] = None) -> dict:
    """Train ``spec``'s network (stage ``config.stage``) on ``train_set``; checkpoints and logs go to ``out_dir``.

    With ``resume`` and a checkpoint in ``out_dir`` the run continues from it (same next step as without the
    interruption). Returns the last validation metrics and the paths written. With a labelled validation set,
    ``best.pt`` in ``out_dir`` holds the network at the best validation Dice of the run (kept across resumptions;
    a fresh run starts without one).
    """
    if len(train_set) < 2:
        raise UserError("Training needs at least two volumes.")
    check_config(config)
    train_set.check_grid(spec, "training")
    if validation_set is not None:
        validation_set.check_grid(spec, "validation")
    needed_by = "A label loss" if config.label_loss else "--icon-label-weight"
    values = label_values(train_set, needed_by) if config.label_loss or config.icon_label_weight else None
    factor = config.label_downsample
    if config.label_loss and (factor < 1 or any(size % factor or size // factor < 2 for size in train_set.shape)):
        raise UserError(f"The label loss's downsampling factor {factor} must divide the grid "
                        f"{'×'.join(map(str, train_set.shape))} and leave at least 2 blocks per axis.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = choose_device(device)
    check_mixed_precision(config, torch_device)
    if torch_device.type == "cpu" and config.steps > 0:
        native_sampler.enable()  # the compiled sampler: built once per machine (about 30 s), then cached
    net_spec = stage_spec(spec, config.stage)
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
        torch.manual_seed(config.seed)
        net = build_network(net_spec).to(torch_device)
    optimizer = make_optimizer(trainable_parameters(net, config.freeze_inner), config)
    generator = torch.Generator().manual_seed(config.seed)
    similarity = make_similarity(**({"name": config.similarity, "sigma": net_spec.similarity.get("sigma", 5)}
                                    if config.similarity else net_spec.similarity))
    lmbda = net_spec.lmbda if config.lmbda is None else config.lmbda
    penalty = config.penalty or net_spec.penalty
    if config.icon_weight and penalty != "gradicon":
        raise UserError(f"--icon-weight adds to the GradICON penalty; this run's penalty is '{penalty}'.")
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if config.freeze_inner and init is None and not (resume and checkpoint_path.exists()):
        raise UserError("--freeze-inner keeps the inner network as --init gives it: a new run needs --init.")
    step = 0
    mixer: Optional[torch.nn.Module] = None
    data_identity = _data_identity(train_set, validation_set)
    if resume and checkpoint_path.exists():
        saved = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
        for setting, option in (("freeze_inner", "--freeze-inner"), ("symmetric_label_loss", "--symmetric-label-loss"),
                                ("weight_decay", "--weight-decay"), ("anatomy_mix", "--anatomy-mix"),
                                ("anatomy_mix_max", "--anatomy-mix-max")):
            if setting == "anatomy_mix_max" and not config.anatomy_mix:
                continue
            now = getattr(config, setting)
            before = type(now)(saved.get("config", {}).get(setting, False))  # checkpoints from before it: off (0)
            if before != now:
                how = (f"with {option} {before:g}, not {now:g}" if not isinstance(now, bool)
                       else f"{'with' if before else 'without'} {option}")
                raise UserError(f"The run in '{out_dir}' was trained {how}; resume it with the same setting, or "
                                "start a new run (another --out, or --restart).")
        _check_same_data(out_dir, saved.get("data"), data_identity)
        load_state_dict_strict(net, saved["model"], source=f"checkpoint '{checkpoint_path}'")
        if config.anatomy_mix > 0:  # the network the run mixes with, as it started (kept in the checkpoint)
            mixer = build_network(net_spec)
            load_state_dict_strict(mixer, saved["anatomy_mix_model"], source=f"checkpoint '{checkpoint_path}'")
            mixer = anatomy_network_from(mixer, torch_device)
        load_optimizer_state(optimizer, saved["optimizer"])
        # the state dict restores the saved rate; this command's rate (and schedule) applies from the next step
        generator.set_state(saved["generator"])
        step = int(saved["step"])
        before = saved.get("config", {}).get("label_loss")
        if before != config.label_loss:
            raise UserError(f"The run in '{out_dir}' was trained with label loss {before!r}, not "
                            f"{config.label_loss!r}; resume it with the same setting, or start a new run "
                            "(another --out, or --restart).")
        for log in ("train_log.csv", "validation_log.csv"):  # rows written after the checkpoint are redone
            _truncate_csv(out_dir / log, step)
    else:
        if config.anatomy_mix > 0:  # before a previous run's files go: its checkpoint may be the source
            source = config.anatomy_mix_weights or init
            if source is None:
                raise UserError("--anatomy-mix warps with a trained network: give its weights with "
                                "--anatomy-mix-weights, or --init.")
            mixer = anatomy_network(net_spec, source, torch_device)
        if init is not None:  # first: --init may be this folder's checkpoint.pt or best.pt
            initialise(net, init)
        # a fresh run starts empty: also without another run's checkpoint, which a run stopped before its first
        # checkpoint would otherwise resume
        for log in ("train_log.csv", "validation_log.csv", BEST_NAME, CHECKPOINT_NAME):
            (out_dir / log).unlink(missing_ok=True)
        for snapshot in (out_dir / SNAPSHOT_FOLDER).glob("step_*.pt"):  # another run's: never to be averaged in
            snapshot.unlink()
    set_training_mode(net, config.freeze_inner)
    images = train_set.images
    count = len(train_set)
    last_validation: dict = {}
    best_dice, _ = _best_so_far(out_dir)
    precision = torch.bfloat16 if config.mixed_precision else None
    start_step = step
    start = time.perf_counter()
    while step < config.steps:
        index_A, index_B = draw_pairs(count, config.batch_size, generator, config.self_pair_fraction)
        batch_A = images[index_A].float()
        batch_B = images[index_B].float()
        labels = (train_set.labels[index_A].float(), train_set.labels[index_B].float()) if values is not None \
            else None
        if mixer is not None:
            both, both_labels = mix_anatomy(torch.cat([batch_A, batch_B]),
                                            None if labels is None else torch.cat(labels), images, mixer,
                                            config.anatomy_mix, config.anatomy_mix_max, generator)
            batch_A, batch_B = both.split(batch_A.shape[0])
            labels = None if both_labels is None else tuple(both_labels.split(batch_A.shape[0]))
            same = index_A == index_B  # a self pair stays one subject: its second copy takes the first's mixing
            if same.any():
                batch_B[same] = batch_A[same]
                if labels is not None:
                    labels[1][same] = labels[0][same]
        batch_A, batch_B, labels = augment(batch_A, batch_B, config, generator, labels)
        batch_A, batch_B = batch_A.to(torch_device), batch_B.to(torch_device)
        step_start = time.perf_counter()
        rate = learning_rate_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)
        with low_precision(net, precision):
            terms = symmetric_objective(net, batch_A, batch_B, similarity=similarity, lmbda=lmbda,
                                        penalty=penalty, generator=generator,
                                        penalty_fraction=config.penalty_fraction,
                                        icon_weight=config.icon_weight,
                                        icon_point_weights=None if not config.icon_label_weight else
                                        1.0 + config.icon_label_weight * (labels[0] != 0).to(torch_device,
                                                                                             batch_A.dtype))
            loss = terms.loss
            if config.label_loss:
                label_term = training_label_loss(terms.maps, labels[0].to(torch_device),
                                                 labels[1].to(torch_device), values.to(torch_device), config)
                loss = loss + config.label_weight * label_term
            if config.fold_weight:
                fold_term = fold_penalty(terms.maps)
                loss = loss + config.fold_weight * fold_term
        if not torch.isfinite(loss.detach()):
            raise UserError(f"The loss became {loss.item()} at step {step + 1}; lower the learning rate.")
        loss.backward()
        optimizer.step()
        step += 1
        _append_csv(out_dir / "train_log.csv", {
            "step": step, "loss": f"{loss.item():.6f}", "similarity": f"{terms.similarity.item():.6f}",
            "penalty": f"{terms.penalty.item():.6f}",
            **({"label_loss": f"{label_term.item():.6f}"} if config.label_loss else {}),
            **({"fold_penalty": f"{fold_term.item():.6f}"} if config.fold_weight else {}),
            "seconds": f"{time.perf_counter() - step_start:.3f}", "learning_rate": f"{rate:.4g}",
            **({"round_trip_voxels": f"{terms.round_trip.sqrt().item():.4f}"} if terms.round_trip is not None
               else {})})
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(checkpoint_path, net, optimizer, step, generator, net_spec, config, data_identity,
                             mixer)
        if config.keep_every and step % config.keep_every == 0:
            _save_snapshot(out_dir, net, step)
        if (validation_set is not None and len(validation_set) > 1
                and (step % config.validate_every == 0 or step == config.steps)):
            last_validation = {"step": step, **validate(net, validation_set, torch_device,
                                                            symmetric=config.symmetric_label_loss)}
            set_training_mode(net, config.freeze_inner)
            best_dice = _record_validation(out_dir, net, last_validation, best_dice)
            plot_curves(out_dir)
        report(progress, "training", step / config.steps)
        if config.time_limit is not None and time.perf_counter() - start > config.time_limit \
                and step < config.steps:
            _save_checkpoint(checkpoint_path, net, optimizer, step, generator, net_spec, config, data_identity,
                             mixer)
            if validation_set is not None and len(validation_set) > 1 and last_validation.get("step") != step:
                last_validation = {"step": step, **validate(net, validation_set, torch_device,
                                                            symmetric=config.symmetric_label_loss)}
                best_dice = _record_validation(out_dir, net, last_validation, best_dice)
            break
    seconds = time.perf_counter() - start
    plot_curves(out_dir)
    write_validation_table(out_dir)
    summary = {"steps": step, "stage": config.stage, "device": device_description(torch_device),
               "seconds": round(seconds, 1),
               "seconds_per_step": round(seconds / max(step - start_step, 1), 3) if step > start_step else None,
               "validation": last_validation, "checkpoint": str(checkpoint_path)}
    best_dice, best_step = _best_so_far(out_dir)
    if best_step is not None:
        summary["best"] = {"step": best_step, "val_dice": round(best_dice, 5), "path": str(out_dir / BEST_NAME)}
    return summary
