"""`medidiff evaluate --data shipped`: the held-out real scans, degraded on the fly.

They are never in the CS tuning set.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

shipped = pytest.importorskip("medidiff.data.shipped", reason="medidiff.data.shipped not available")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "medidiff", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_shipped_sr_cases_are_the_evaluation_volumes_on_their_grids() -> None:
    from medidiff.evaluation.compare import shipped_cases

    names = [name for name, _ in shipped.real_evaluation_volumes()]
    cases = shipped_cases("sr")
    assert [c.name for c in cases] == names
    for c in cases:
        assert c.sr_axes == (0, 1) and c.sr_factor == 2
        assert c.reference.array.dtype.name == "float32"


def test_evaluate_shipped_recon_tunes_cs_on_training_data(tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = _run(["evaluate", "--data", "shipped", "--task", "recon", "--methods", "zero-filled,cs",
                "--max-scans", "1", "--cs-iters", "20", "--out", str(out), "--no-tracking"], tmp_path)
    assert res.returncode == 0, res.stderr
    report = (out / "report.md").read_text()
    assert "tuned on held-in training slices" in report
    rows = list(csv.DictReader((out / "per_scan.csv").open()))
    assert {r["method"] for r in rows} == {"zero-filled", "cs"}
    assert all(float(r["psnr"]) > 15 for r in rows)
