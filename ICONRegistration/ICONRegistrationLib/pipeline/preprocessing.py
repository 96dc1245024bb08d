"""Intensity preprocessing per modality and model (uniGradICON's rules, plus model-specific ones).

Rules read from ``spec.preprocessing``:

* ``scale_max_to: s`` — multiply by ``s / max`` whatever the modality (GradICON brain: 0.9).
* CT (``ct_window: [lo, hi]``, HU) — clamp to the window, map to [0, 1].
* MRI (``mri_percentile: p``) — clamp to [min, p-th percentile], map to [0, 1].
* ``require_mask: true`` — the model needs a mask (GradICON lung); masks multiply the normalised image.
"""

from __future__ import annotations

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
        if modality == "ct":
            low, high = (float(v) for v in rules.get("ct_window", (-1000.0, 1000.0)))
        else:
            low = float(array.min())
            high = percentile(array, float(rules.get("mri_percentile", 99)))
            if high <= low:  # mostly-background images: fall back to the full range
                high = float(array.max())
        # float64: the range of a float32 image can exceed float32 (±3e38 voxels), its normalised values cannot.
        # NumPy's (clip(array) − low) / (high − low) in float64, bit for bit, in torch's threads. torch is imported
        # here, not above: guess_modality serves the Slicer form, which must not load torch.
        import torch

        if array.dtype.kind in "biu":  # NumPy clips integers against float bounds in float64
            array = array.astype(np.float64)
        elif not array.dtype.isnative:  # torch reads native byte order only
            array = array.astype(array.dtype.newbyteorder("="))
        values = torch.from_numpy(np.ascontiguousarray(array)).clamp(low, high)
        result = values.to(torch.float64).sub_(low).div_(high - low).to(torch.float32).numpy()
    result = result.astype(np.float32, copy=False)
    if mask is not None:
        result = result * mask
    return result
