"""`medidiff demo` (the README's first command) end to end, as a user runs it: slow, a few minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_the_main_job_on_shipped_data(tmp_path):
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    demo = tmp_path / "demo_out"
    proc = subprocess.run(
        check=False,
        args=[sys.executable, "-m", "medidiff", "demo", "--out", str(demo)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((demo / "output" / "manifest.json").read_text())
    tasks = sorted(e["task"] for e in manifest["scans"].values())
    assert tasks == ["recon", "sr", "sr", "sr_thick"]
    assert all(e["status"] == "done" for e in manifest["scans"].values())
    assert (demo / "output" / "report.html").is_file()
    assert list((demo / "input" / "dicom").rglob("*.dcm")), "a DICOM input series"
    assert list((demo / "output" / "dicom").rglob("*_enhanced_dicom/*.dcm")), "a derived DICOM output series"
    assert "PSNR" in proc.stdout and "report" in proc.stderr
    again = subprocess.run(
        check=False,
        args=[sys.executable, "-m", "medidiff", "demo", "--out", str(demo)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert again.returncode == 0 and "4 already done" in again.stderr.replace("\n", " ")
