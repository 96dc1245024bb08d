"""The one place that turns a user's device choice into a ``torch.device``."""

from __future__ import annotations

import torch

from .errors import UserError


def choose_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    ``"auto"`` picks the first CUDA GPU when one is usable, else Apple's MPS, else the CPU.
    Asking for a GPU that is not there raises :class:`UserError`.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name in ("gpu",):
        name = "cuda"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                "A CUDA GPU was requested but PyTorch sees none on this machine; "
                "use device 'cpu' or 'auto', or install a CUDA build of PyTorch."
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"GPU {dev.index} does not exist; this machine has {torch.cuda.device_count()}.")
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("Apple MPS was requested but is not available; use 'cpu' or 'auto'.")
        return torch.device("mps")
    raise UserError(f"Unknown device '{device}': use auto, cpu, cuda, cuda:N or mps.")


def device_description(device: torch.device) -> str:
    """A human-readable name of ``device`` (the GPU model for CUDA)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type



def _cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux: x86's ``flags``, Arm's ``Features``; empty
    elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: CPU flags of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension (``bf16``)
NATIVE_BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def has_native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: an NVIDIA GPU of compute capability 8.0 or newer (Ampere;
    older ones emulate it), or a CPU whose ``/proc/cpuinfo`` lists AVX512-BF16, AMX-BF16 or Arm's BF16 (there
    oneDNN's bfloat16 3-D convolutions run about twice as fast as float32; on CPUs without them oneDNN emulates
    bfloat16, and a measurement on such a CPU found it many times slower than float32). Other devices (Apple MPS,
    CPUs without ``/proc/cpuinfo``): ``False``."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type == "cpu":
        return bool(NATIVE_BFLOAT16_CPU_FLAGS & _cpu_flags())
    return False
