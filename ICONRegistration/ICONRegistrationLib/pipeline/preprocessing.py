"""Intensity preprocessing per modality and model (uniGradICON's rules, plus model-specific ones).

Rules read from ``spec.preprocessing``:

* ``scale_max_to: s`` — multiply by ``s / max`` whatever the modality (GradICON brain: 0.9).
* CT (``ct_window: [lo, hi]``, HU) — clamp to the window, map to [0, 1].
* MRI (``mri_percentile: p``) — clamp to [min, p-th percentile], map to [0, 1]. Padding outside a scanner's field
  of view (one value at or below :data:`CT_PADDING_BELOW`, −32768, −3024…, with every other voxel above it) is not
  image: it is left out of the minimum and the percentile and becomes 0, the background.
* ``require_mask: true`` — the model needs a mask (GradICON lung); masks multiply the normalised image.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from ..errors import UserError
from .percentile import percentile

MODALITIES = ("ct", "mri")


#: values at or below this are a CT scanner's padding outside its field of view (−3024, −32768, …), not tissue
CT_PADDING_BELOW = -3100.0


def guess_modality(array: np.ndarray) -> str:
    """``"ct"`` when intensities look like Hounsfield units (air well below −200 at the 1st percentile of the voxels
    above :data:`CT_PADDING_BELOW`; padding such as −32768 is left out, it used to make CT look like MRI), else
    ``"mri"``."""
    tissue = array[array > CT_PADDING_BELOW] if float(array.min()) <= CT_PADDING_BELOW else array
    return "ct" if tissue.size and percentile(tissue, 1) < -200 else "mri"


def check_modality(modality: Optional[str], array: np.ndarray, role: str) -> str:
    """Normalise a modality argument; ``"auto"``/``None`` guesses from the intensities."""
    if modality is None or str(modality).lower() == "auto":
        return guess_modality(array)
    value = str(modality).lower()
    if value not in MODALITIES:
        raise UserError(f"Unknown {role} modality '{modality}': use ct, mri or auto.")
    return value


def _without_padding(array: np.ndarray, minimum: float) -> np.ndarray:
    """The voxels of ``array`` that are not padding (a copy, 1-D), or ``array`` itself when it has none. Padding is
    one value, ``minimum`` ≤ :data:`CT_PADDING_BELOW`, that a scanner or converter fills in outside its field of
    view (−32768, −3024…), with every other voxel above :data:`CT_PADDING_BELOW`; an image whose values reach below
    that continuously (or that is nothing but padding) has none."""
    if minimum > CT_PADDING_BELOW:
        return array
    image = array[array > CT_PADDING_BELOW]
    if image.size == 0 or array.size - image.size != int(np.count_nonzero(array == minimum)):
        return array
    return image


def _warning_sample(image: np.ndarray) -> np.ndarray:
    """Every k-th voxel of ``image``, about 2^16 of them: enough for a warning (not a result), at a fraction of the
    cost of a pass over a large image. ``k`` shares no factor with the lengths of the trailing axes, so the sample
    walks through every row and column instead of one plane (256³: every 256th voxel would all lie at x = 0)."""
    flat = image.reshape(-1)
    step = max(1, flat.size // (1 << 16))
    while step > 1 and any(math.gcd(step, n) > 1 for n in image.shape[1:]):
        step += 1
    return flat[::step]


def _check_modality_fits(image: np.ndarray, minimum: float, modality: str, role: str) -> None:
    """Warn when the intensities of ``image`` (the voxels without padding; smallest ``minimum``) contradict
    ``modality``: a "CT" without a single voxel below 0 HU (no air, lung or fat: not Hounsfield units — an MRI, or CT
    stored without its rescale intercept, whose tissue then saturates at the window's top), or an "MRI" that looks
    like CT in HU (:func:`guess_modality`; its min…percentile range is then used instead of the model's CT window).
    Allowed, but the network then sees inputs unlike those it was trained on. The MRI check looks at a strided
    sample (:func:`_warning_sample`)."""
    if modality == "ct" and minimum >= 0.0:
        warnings.warn(f"The {role} image was given as CT but has no voxel below 0 HU (its minimum is "
                      f"{minimum:g}): no air, lung or fat, so it is probably not in Hounsfield units "
                      "(an MRI, or CT stored without its rescale intercept) and the CT window saturates it; "
                      "choose the modality mri, or convert it to HU.", UserWarning, stacklevel=3)
    elif modality == "mri" and guess_modality(_warning_sample(image)) == "ct":
        warnings.warn(f"The {role} image was given as MRI but looks like CT in Hounsfield units (1 % of its voxels "
                      "are below -200, like air): MRI normalisation ignores the model's CT window; choose the "
                      "modality ct (or auto) for CT.", UserWarning, stacklevel=3)


#: warn when more than this share of the voxels above an MRI's minimum (its foreground) saturate at the percentile
SATURATED_FOREGROUND_WARNING = 0.25


def _check_foreground_share(image: np.ndarray, low: float, high: float, role: str) -> None:
    """Warn when the MRI clamp ``[low, high]`` saturates more than :data:`SATURATED_FOREGROUND_WARNING` of the voxels
    above ``low``: the percentile is taken over all voxels, so a background at the minimum that fills more than ~96 %
    of the image (a small object in a large field of view) puts it inside the anatomy, which then looks flat. Estimated
    on a strided sample of about 2^16 voxels (a warning, not a result)."""
    sample = _warning_sample(image)
    foreground = int(np.count_nonzero(sample > low))
    saturated = int(np.count_nonzero(sample > high))
    if foreground and saturated > SATURATED_FOREGROUND_WARNING * foreground:
        warnings.warn(f"The {role} image is mostly background: its intensity percentile clips about "
                      f"{100.0 * saturated / foreground:.0f} % of the voxels above its minimum to the same value, so "
                      "the network sees that part of the anatomy flat; crop the image to the anatomy.",
                      UserWarning, stacklevel=3)


def normalize_intensities(array: np.ndarray, modality: str, rules: dict, mask: Optional[np.ndarray] = None,
                          role: str = "input") -> np.ndarray:
    """Map voxels to the network's intensity range (float32, typically [0, 1]); ``array`` is not modified."""
    if rules.get("require_mask") and mask is None:
        raise UserError(f"This model needs a mask for the {role} image (e.g. a lung mask); pass one.")
    if rules.get("scale_max_to") is not None:
        peak = float(array.max())
        if peak <= 0:
            raise UserError(f"The {role} image has no positive intensity; this model scales by the maximum.")
        result = array * (float(rules["scale_max_to"]) / peak)
    else:
        minimum = float(array.min())
        image = _without_padding(array, minimum)
        image_minimum = minimum if image is array else float(image.min())
        _check_modality_fits(image, image_minimum, modality, role)
        if modality == "ct":
            low, high = (float(v) for v in rules.get("ct_window", (-1000.0, 1000.0)))
        else:
            low = image_minimum
            high = percentile(image, float(rules.get("mri_percentile", 99)))
            if high <= low:  # mostly-background images: fall back to the full range
                high = float(image.max())
            if high <= low:  # constant but for its padding: the padding is the only contrast
                low, high = minimum, float(array.max())
            _check_foreground_share(image, low, high, role)
        # float64: the range of a float32 image can exceed float32 (±3e38 voxels), its normalised values cannot.
        # NumPy's (clip(array) − low) / (high − low) in float64, bit for bit, in torch's threads. torch is imported
        # here, not above: guess_modality serves the Slicer form, which must not load torch.
        import torch

        if array.dtype.kind in "biu":  # NumPy clips integers against float bounds in float64
            array = array.astype(np.float64)
        elif not array.dtype.isnative:  # torch reads native byte order only
            array = array.astype(array.dtype.newbyteorder("="))
        from ..core import native_sampler

        values = torch.from_numpy(np.ascontiguousarray(array))
        if values.dtype == torch.float32 and native_sampler.kernels_eligible(values):
            result = native_sampler.clamp_scale(values, low, high).numpy()  # the same bits, no float64 copy
        else:
            result = values.clamp(low, high).to(torch.float64).sub_(low).div_(high - low).to(torch.float32).numpy()
    result = result.astype(np.float32, copy=False)
    if mask is not None:
        result = result * mask
    return result
