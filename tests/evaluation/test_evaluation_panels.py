"""Evaluation panels.

Per-slice held-out cases, the out-of-domain panel, through-plane SR and the gate scatter.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medidiff.evaluation.compare import image_case, ood_images, panel_cases, slice_interpolate
from medidiff.models import default_model
from medidiff.physics.operators import SliceProfile

ROOT = Path(__file__).resolve().parents[2]


def test_heldout_panel_is_one_case_per_slice():
    cases = panel_cases("sr", "heldout", max_slices=3)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    per_volume = {}
    for n in names:
        per_volume.setdefault(n.split("/")[0], []).append(n)
    assert set(per_volume) == {
        "dipy_t1_coronal_slice", "dipy_aniso_vox", "dipy_S0_10slices", "pydicom_MR_small"
    }
    assert all(len(v) <= 3 for v in per_volume.values()) and len(per_volume["dipy_S0_10slices"]) == 3
    assert all(
        c.lr.shape[2] == 1 and c.reference.shape[:2] == (2 * c.lr.shape[0], 2 * c.lr.shape[1]) for c in cases
    )


def test_ood_panel_has_noisy_natural_images_and_unseen_pixel_sizes():
    items = ood_images(max_slices=1, seed=0)
    names = [n for n, *_ in items]
    assert {"natural/camera", "natural/shepp_logan_phantom"} <= set(names)
    assert any(n.endswith("@0.3mm") for n in names) and any(n.endswith("@2mm") for n in names)
    for _, img, mm, _info in items:
        assert max(img.shape) <= 256 and img.min() >= 0 and mm in (0.3, 1.0, 2.0)
    phantom = {n: img for n, img, *_ in items}["natural/shepp_logan_phantom"]
    assert np.std(phantom[phantom > 0.5]) > 0.005  # Rician noise was added


def test_through_plane_case_and_slice_interpolation():
    rng = np.random.default_rng(0)
    img = np.cumsum(rng.random((32, 64)), axis=1).astype(np.float32)  # smooth along the thick axis
    case = image_case("sr_thick", "ramp", img, 1.0)
    assert case.lr.shape == (1, 32, 16) and case.reference.shape == (1, 32, 64) and case.slice_axis == 0
    lin = slice_interpolate(case.lr, 4, order=1)
    assert lin.shape == case.reference.shape
    # linear interpolation of the thick-slice centres is close for a near-linear ramp, away from the edges
    err = np.abs(lin.array - case.reference.array)[..., 4:-4]
    assert err.mean() < 0.05 * np.abs(case.reference.array).mean()
    # thick slices of the reference are the LR input (the slice-profile operator)
    import torch

    thick = SliceProfile(4).A(torch.from_numpy(case.reference.array)).numpy()
    assert np.allclose(thick, case.lr.array, atol=1e-4)


@pytest.mark.parametrize("task,panel", [("sr_thick", "heldout"), ("sr", "ood")])
def test_evaluate_cli_panels_write_delta_table_and_gate_scatter(tmp_path: Path, task: str, panel: str):
    out = tmp_path / "rep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "medidiff", "evaluate", "--data", "shipped", "--task", task, "--panel", panel,
         "--max-scans", "2", "--max-slices", "1", "--no-dc-variant", "--adapt-seconds", "2", "--no-tracking",
         "--out", str(out)],
        check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "Against the better classical method" in report and "gate_scatter.png" in report
    assert (out / "figures" / "gate_scatter.png").stat().st_size > 1000
    with open(out / "per_scan.csv") as fh:
        rows = list(csv.DictReader(fh))
    methods = {r["method"] for r in rows}
    classical = {"linear", "cubic"} if task == "sr_thick" else {"sinc", "bicubic"}
    # without --steps the model's own step count is evaluated
    steps = default_model(task).recipe.diffusion.steps
    assert classical <= methods and f"medidiff-{steps}" in methods and f"medidiff-{steps}-adapt" in methods
    learned = [r for r in rows if r["method"].startswith("medidiff")]
    assert len({r["scan"] for r in rows}) == 2
    for r in learned:
        assert r["gate_decision"] in ("enhanced", "classical") and r["gate_reason"]
        assert np.isfinite(float(r["actual_gain_db"])) and np.isfinite(float(r["delta_vs_classical_db"]))
    assert all(float(r["adapt_steps"]) >= 0 for r in learned if r["method"].endswith("-adapt"))


def test_evaluate_compares_self_ensemble_sizes(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}  # error boxes unwrapped
    base = [sys.executable, "-m", "medidiff", "evaluate", "--data", "shipped", "--panel", "heldout",
            "--max-scans", "1", "--max-slices", "1", "--no-dc-variant", "--no-adapt-variant", "--no-tracking",
            "--steps", "1", "--self-ensemble", "1,2"]
    proc = subprocess.run([*base, "--task", "sr_thick", "--out", str(tmp_path / "rep")], check=False,
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "rep" / "per_scan.csv") as fh:
        nfe = {r["method"]: float(r["network_evals"]) for r in csv.DictReader(fh) if r["method"][0] == "m"}
    assert nfe == {"medidiff-1-se1": 1.0, "medidiff-1-se2": 2.0}
    bad = subprocess.run([*base, "--task", "sr", "--out", str(tmp_path / "bad")], check=False,
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert bad.returncode == 2 and "for --task sr_thick only" in bad.stderr
