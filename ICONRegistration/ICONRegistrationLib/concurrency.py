"""Independent NumPy work side by side.

Most NumPy reductions (``np.percentile``'s partition) run on one core and release the GIL, while PyTorch's
operations already use every thread it is given. Two such NumPy calls in two threads therefore take about the time
of one on a multi-core CPU. The number of threads follows ``torch.get_num_threads()``, so a process limited to one
thread (``OMP_NUM_THREADS=1``, a training run beside it) stays on one core. Keep it to calls with small temporaries:
glibc keeps what a worker thread frees in that thread's own arena, where later large allocations of the main
thread (the network's) cannot reuse it — normalising both 210³ images side by side raised ``register()``'s peak
memory at 175³ by 0.3 GB.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def side_by_side(*calls: Callable[[], T]) -> list[T]:
    """The results of ``calls`` (functions of no arguments) in order, computed in up to
    ``torch.get_num_threads()`` threads; the first exception raised (in call order) propagates. Use it only for
    calls that share no mutable state."""
    workers = min(len(calls), max(1, torch.get_num_threads()))
    if workers <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]
