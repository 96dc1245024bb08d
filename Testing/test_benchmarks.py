"""The register benchmark still runs end to end and reports the numbers the speed issue is judged on.

Timings are not asserted (speed targets live in the benchmark's table, never in a timed unit test); what is
checked is that the script measures what it says: one paired forward pass per register() run, the paired ratio as
the median of those pairs, and a register run that holds two network passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_register.py"


def test_bench_register_pairs_each_register_run_with_a_forward_pass(tmp_path):
    pytest.importorskip("SimpleITK")
    out = tmp_path / "bench.json"
    process = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "65", "--repeats", "2", "--device", "cpu",
                              "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert len(result["paired_ratios"]) == len(result["paired_forward_s"]) == 2
    totals = [total - result["register_seconds"].get("load", 0.0) for total in result["register_all_totals_s"]]
    assert result["paired_ratios"] == pytest.approx([t / f for t, f in zip(totals, result["paired_forward_s"])],
                                                    rel=1e-3)
    assert result["ratio_paired_median"] == pytest.approx(float(np.median(result["paired_ratios"])))
    seconds = result["register_seconds"]
    # both directions run: the network stage holds about two forward passes (generous bounds: a shared machine)
    assert 1.3 * result["forward_s"] < seconds["network"] < 6 * result["forward_s"]
    assert 1.3 < result["ratio_paired_median"] < 8
    assert "median of the paired repeats" in process.stdout
    assert "ratio paired (median)" in process.stdout
