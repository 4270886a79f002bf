"""`medidiff data synth` run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from medidiff.io import read_nifti


def test_data_cli_synth_writes_readable_nifti(tmp_path: Path):
    exe = Path(sys.executable).parent / "medidiff"
    cmd = [str(exe), "data", "synth", "--n", "2", "--out", str(tmp_path / "cohort"), "--seed", "1"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    files = sorted((tmp_path / "cohort").glob("*.nii.gz"))
    assert len(files) == 2 and "wrote 2" in res.stdout
    a, b = (read_nifti(f) for f in files)
    assert a.shape == b.shape and a.array.dtype == np.float32 and a.array.max() > 0
    assert not np.array_equal(a.array, b.array)


def test_data_cli_synth_rejects_bad_n(tmp_path: Path):
    exe = Path(sys.executable).parent / "medidiff"
    res = subprocess.run(
        [str(exe), "data", "synth", "--n", "0", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "--n" in res.stderr
