"""Smoke test of the cluster-scale benchmark (benchmarks/scale.py, issue 16): with 4 real
node processes per system it must form the mesh, measure every phase, deliver the alerts to
both collectors exactly once, bring each retained write to every node, see the SIGKILLed
node go down everywhere, and leave no process behind. No timing is asserted: the figures
are the benchmark's business, this checks that the harness measures what it says."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.timeout(300)


def _run(tmp_path: Path, systems: str) -> dict:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--sizes", "4", "--systems", systems,
         "--idle-seconds", "1", "--alert-seconds", "2", "--no-save", "--out", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=280,
    )
    assert out.exists(), f"no report; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return report


def _check(report: dict, system: str) -> None:
    (row,) = [r for r in report["rows"] if r["system"] == system]
    assert "error" not in row, row
    assert row["converge"]["converged"] and row["converge"]["nodes_full"] == 4
    idle = row["idle"]
    assert idle["fds_per_node"]["max"] > 0 and idle["rss_mib_per_node"]["max"] > 0
    assert idle["cpu_pct_per_node"]["max"] >= 0
    alerts = row["alerts"]
    assert alerts["sent"] > 0
    assert alerts["delivered_once_each"], alerts["collectors"]
    assert len(alerts["collectors"]) == 2
    assert alerts["data_conns_non_collector"]["max"] >= 1  # today every node talks to every node
    assert row["retained"]["incomplete_writes"] == 0 and row["retained"]["p99_ms"] is not None
    assert row["kill"]["victims"] == 1 and row["kill"]["observers_never_saw"] == 0


def _no_process_left(report: dict) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(report["process_group"], 0)


def test_scale_quick_measures_every_phase_for_zmesh_and_leaves_nothing_running(tmp_path: Path) -> None:
    report = _run(tmp_path, "zmesh")
    _check(report, "zmesh")
    _no_process_left(report)


@pytest.mark.skipif(importlib.util.find_spec("zenoh") is None, reason="eclipse-zenoh is not installed")
def test_scale_quick_measures_every_phase_for_zenoh_and_leaves_nothing_running(tmp_path: Path) -> None:
    report = _run(tmp_path, "zenoh")
    _check(report, "zenoh")
    _no_process_left(report)
