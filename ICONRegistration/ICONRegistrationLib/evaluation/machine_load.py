"""How much of the machine other processes used while this process timed something.

Seconds measured on a CPU are only comparable when nothing else ran: another job on the same cores slows every
method down, and not by the same factor (multi-threaded methods lose more). :class:`LoadMeter` measures, around a
block of work, the CPU time the whole machine used (Linux ``/proc/stat``) minus the CPU time of this process and
its children, so the timings of a run can say when they were taken on a busy machine.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from pathlib import Path
from typing import Optional

#: share of the machine's CPU capacity other processes may use before timings are flagged as inflated
BUSY_SHARE = 0.05


def machine_busy_seconds() -> Optional[float]:
    """CPU seconds all processes on the machine have used since boot (Linux ``/proc/stat``), else ``None``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(children: bool = True) -> float:
    """User + system CPU seconds of this process (all threads) and, with ``children``, of its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclasses.dataclass
class LoadSample:
    """One measured block: ``wall_s`` seconds of wall time, during which other processes used
    ``other_cpu_s`` CPU seconds, ``other_share`` of the machine's capacity (``wall_s × cpu_count``; 0…1).
    ``other_cpu_s`` and ``other_share`` are ``None`` where the machine's CPU time cannot be read (not Linux)."""

    wall_s: float
    other_cpu_s: Optional[float]
    other_share: Optional[float]

    @property
    def busy(self) -> bool:
        """Other processes used more than :data:`BUSY_SHARE` of the machine: timings may be inflated."""
        return self.other_share is not None and self.other_share > BUSY_SHARE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LoadMeter:
    """``with LoadMeter() as meter: work()`` then ``meter.sample`` (a :class:`LoadSample`).

    The machine's counters tick at 100 Hz, so blocks shorter than about a second are only roughly measured."""

    def __enter__(self) -> "LoadMeter":
        self._machine, self._own, self._start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        self.sample: Optional[LoadSample] = None
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        machine, own = machine_busy_seconds(), own_cpu_seconds()
        if self._machine is None or machine is None:
            self.sample = LoadSample(wall, None, None)
            return
        other = max(0.0, (machine - self._machine) - (own - self._own))
        capacity = wall * (os.cpu_count() or 1)
        self.sample = LoadSample(wall, other, min(1.0, other / capacity) if capacity > 0 else 0.0)
