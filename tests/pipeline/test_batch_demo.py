"""`medidiff demo` (the README's first command) end to end, as a user runs it.

Slow: a few minutes on 2 cores.
"""

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


def test_demo_refuses_a_folder_that_is_not_a_demo_folder(tmp_path):
    """`demo --out DIR` rebuilds DIR/input: a DIR holding the user's own files is refused, nothing removed."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    (tmp_path / "project" / "input").mkdir(parents=True)
    keep = tmp_path / "project" / "input" / "scan.nii.gz"
    keep.write_bytes(b"the user's data")
    proc = subprocess.run(
        [sys.executable, "-m", "medidiff", "demo", "--out", str(tmp_path / "project"), "--fresh"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "not a demo folder" in " ".join(proc.stderr.split()), proc.stderr
    assert keep.read_bytes() == b"the user's data"
