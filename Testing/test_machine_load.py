"""The load meter behind the busy-machine warnings of `iconreg evaluate` and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ICONRegistrationLib.evaluation import machine_load
from ICONRegistrationLib.evaluation.evaluate import EvaluationReport, EvaluationRow, busy_rows, busy_warning
from ICONRegistrationLib.evaluation.machine_load import BUSY_SHARE, LoadMeter

SPIN = "import time\nend = time.perf_counter() + {seconds}\nwhile time.perf_counter() < end: pass\n"


@pytest.mark.skipif(machine_load.machine_busy_seconds() is None, reason="no /proc/stat on this system")
def test_another_process_spinning_during_the_block_is_counted_as_other_load():
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=2.5)])
    try:
        time.sleep(0.3)  # let it start
        with LoadMeter() as meter:
            time.sleep(1.5)  # this process idles; the spinner keeps one core busy
    finally:
        spinner.wait()  # waited after the block: its CPU time is not this process's children's
    sample = meter.sample
    assert sample.other_cpu_s >= 0.7  # one core for 1.5 s (100 Hz counters; more if the machine is busy anyway)
    # a share of the machine, at most 1 (counters of a saturated machine can add up to a little more)
    assert sample.other_share == pytest.approx(min(1.0, sample.other_cpu_s / (sample.wall_s * os.cpu_count())),
                                               rel=1e-6)
    assert sample.busy == (sample.other_share > BUSY_SHARE)


def test_own_work_and_waited_children_are_not_other_load(monkeypatch):
    """The machine counter is replaced by this process's own CPU time plus a constant: whatever this process and
    its waited children burn is subtracted, so nothing is 'other'."""
    monkeypatch.setattr(machine_load, "machine_busy_seconds", lambda: machine_load.own_cpu_seconds() + 1000.0)
    with LoadMeter() as meter:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
        subprocess.run([sys.executable, "-c", SPIN.format(seconds=0.3)], check=True)
    assert meter.sample.other_cpu_s == pytest.approx(0.0, abs=1e-3)
    assert not meter.sample.busy


def test_without_a_machine_counter_the_load_is_unknown_not_zero(monkeypatch):
    monkeypatch.setattr(machine_load, "machine_busy_seconds", lambda: None)
    with LoadMeter() as meter:
        pass
    assert meter.sample.other_cpu_s is None and meter.sample.other_share is None and not meter.sample.busy


def test_evaluation_reports_name_the_registrations_timed_on_a_busy_machine():
    def row(pair, method, share):
        return EvaluationRow(pair=pair, method=method, dice_mean=0.7, hd95_mm=2.0, seconds=1.0, dice={"1": 0.7},
                             jacobian_nonpositive_percent=0.0, other_load_share=share)

    def report(rows):
        return EvaluationReport(model="m", weights_sha256=None, io_iterations=0, io_mode=None, io_grid=None,
                                io_learning_rate=None, rows=rows)

    rows = [row("S2→S1", "model", 0.4), row("S2→S1", "demons", 0.01), row("S1→S2", "model", None)]
    assert busy_rows(rows) == ["S2→S1 model"]
    warning = busy_warning(report(rows))
    assert "1 of 3 registrations" in warning and "S2→S1 model" in warning
    assert busy_warning(report(rows[1:])) == ""
    assert report(rows).to_dict()["busy_rows"] == ["S2→S1 model"]
