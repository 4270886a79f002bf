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


def test_data_cli_preview_writes_a_figure_of_training_pairs(tmp_path: Path):
    from PIL import Image

    recipe = tmp_path / "mix.yaml"
    smoke = (Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml").read_text()
    recipe.write_text(smoke.replace("data: {", "data: {mixture: {synthetic: 1, natural: 1, mri: 1}, "))
    exe = Path(sys.executable).parent / "medidiff"
    out = tmp_path / "preview.png"
    cmd = [str(exe), "data", "preview", "--config", str(recipe), "--out", str(out), "--n", "4", "--seed", "3"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert "wrote 4 training pairs" in res.stdout
    with Image.open(out) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("L"), np.float32)
    assert 500 < w < 1500 and 700 < h < 1500  # 3 columns x 4 rows of 2.5-inch panels at 100 dpi
    assert pixels.std() > 10  # images, not a blank canvas
    again = tmp_path / "again.png"
    subprocess.run(
        [*cmd[:-5], str(again), "--n", "4", "--seed", "3"], check=True, capture_output=True, timeout=180
    )
    assert again.read_bytes() == out.read_bytes()  # the same seed draws the same batch


def test_data_cli_preview_names_a_bad_recipe(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {mixture: {brains: 1}}\n")
    exe = Path(sys.executable).parent / "medidiff"
    res = subprocess.run([str(exe), "data", "preview", "--config", str(bad),
                          "--out", str(tmp_path / "p.png")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "data.mixture" in res.stderr and not (tmp_path / "p.png").exists()
