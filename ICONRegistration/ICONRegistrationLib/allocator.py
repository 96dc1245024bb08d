"""How this process's C allocator treats large blocks (no torch import: the command line calls it first)."""

from __future__ import annotations

import ctypes
import os
import sys


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep and reuse freed memory in this process; returns whether it was applied.

    By default glibc maps every allocation above 32 MiB (every large tensor of a 3-D network) as fresh pages and
    returns them to the system when freed, so each forward pass pays page faults and zero-filling again (a third
    of the CPU time of a uniGradICON forward pass at 128³ was system time). With ``M_MMAP_MAX = 0`` and a maximal
    ``M_TRIM_THRESHOLD`` large tensors come from the heap and freed ones are reused. Measured on 2 cores
    (``benchmarks/bench_register.py --sizes 175 --allocator system|keep``): the uniGradICON forward pass at 175³
    took 10.6 s instead of 16.3 s and ``register()`` 22.9 s instead of 37.2 s, at a peak resident size of 3.3 GB
    instead of 2.2 GB (freed memory is not given back until the process ends). Only for command-line processes
    that run registrations or training steps one at a time and exit (``cli.REUSE_FREED_MEMORY_COMMANDS``); the
    library, the app and the Slicer module never call it. ``ICONREG_SYSTEM_MALLOC=1`` (or a
    non-glibc system) leaves the allocator alone.
    """
    if os.environ.get("ICONREG_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
