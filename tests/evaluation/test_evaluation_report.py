"""Comparison bookkeeping: per-method means, the issue's target checks, Markdown/CSV tables, case loading."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medidiff.evaluation.compare import Case, EvaluationError, Method, evaluate_cases, load_cases, summarise
from medidiff.evaluation.report import markdown_tables, target_checks, write_csv
from medidiff.io.nifti import write_nifti
from medidiff.io.volume import Volume


def _rows() -> list[dict]:
    """Two scans, SR baselines and one learned method."""
    return [
        {"scan": "a", "method": "sinc", "psnr": 30.0, "ssim": 0.90, "nmse": 0.01, "hfen": 0.2,
         "seconds": 0.1},
        {"scan": "a", "method": "bicubic", "psnr": 29.5, "ssim": 0.91, "nmse": 0.01, "hfen": 0.2,
         "seconds": 0.1},
        {"scan": "a", "method": "medidiff-4", "psnr": 33.0, "ssim": 0.95, "nmse": 0.005, "hfen": 0.1,
         "seconds": 2.0, "network_evals": 4.0},
        {"scan": "b", "method": "sinc", "psnr": 40.0, "ssim": 0.97, "nmse": 0.001, "hfen": 0.1,
         "seconds": 0.1},
        {"scan": "b", "method": "bicubic", "psnr": 39.0, "ssim": 0.96, "nmse": 0.001, "hfen": 0.1,
         "seconds": 0.1},
        {"scan": "b", "method": "medidiff-4", "psnr": 39.8, "ssim": 0.97, "nmse": 0.001, "hfen": 0.1,
         "seconds": 2.0, "network_evals": 4.0},
        {"scan": "b", "method": "unet", "error": "RuntimeError: boom"},
    ]


def test_summary_means_and_failures() -> None:
    summary = summarise(_rows(), ["sinc", "bicubic", "medidiff-4", "unet"])
    by = {r["method"]: r for r in summary}
    assert by["sinc"]["psnr"] == pytest.approx(35.0) and by["sinc"]["n"] == 2
    assert by["medidiff-4"]["network_evals"] == 4.0
    assert by["unet"]["n"] == 0 and by["unet"]["failed"] == 1 and "psnr" not in by["unet"]


def test_target_checks_use_the_better_baseline_and_the_worst_scan() -> None:
    rows = _rows()
    lines = target_checks("sr", summarise(rows, ["sinc", "bicubic", "medidiff-4"]), rows)
    sr_line = next(line for line in lines if "ΔPSNR" in line)
    # vs sinc (the better baseline): +3.0 and -0.2 -> mean +1.4 (< 1.5) and worst -0.2 (< -0.1) -> FAIL
    assert sr_line.startswith("FAIL medidiff-4") and "vs sinc +1.40 dB" in sr_line
    assert "-0.20" in sr_line.replace("−", "-")
    assert any(line.startswith("PASS medidiff-4: 4 network evaluations") for line in lines)
    recon_rows = [
        {"scan": "a", "method": "zero-filled", "psnr": 25.0}, {"scan": "a", "method": "cs", "psnr": 26.0},
        {"scan": "a", "method": "medidiff-4", "psnr": 30.0, "network_evals": 4.0},
    ]
    recon = target_checks("recon", summarise(recon_rows, ["zero-filled", "cs", "medidiff-4"]), recon_rows)
    assert recon[0].startswith("PASS medidiff-4") and "+4.00" in recon[0] and "+5.00" in recon[0]


def test_tables(tmp_path: Path) -> None:
    rows = _rows()
    mean, per_scan = markdown_tables(summarise(rows, ["sinc", "unet"]), rows)
    assert mean.splitlines()[0].startswith("| method | scans | PSNR (dB) | SSIM")
    assert "| sinc | 2 | 35.00 |" in mean and "| unet | 0 (1 failed) |" in mean
    assert "error: RuntimeError: boom" in per_scan
    path = write_csv(rows, tmp_path / "rows.csv")
    back = list(csv.DictReader(path.open()))
    assert len(back) == len(rows) and back[-1]["error"] == "RuntimeError: boom"


def test_evaluate_cases_scores_on_the_reference_and_records_failures() -> None:
    ref = Volume(np.random.default_rng(0).random((16, 16, 2)).astype(np.float32) + 0.1, np.eye(4))
    case = Case("s", ref)  # no low-res input: slices along the last axis, like k-space cases

    def broken(c: Case):
        raise RuntimeError("boom")

    methods = [Method("same", lambda c: (c.reference, {})), Method("broken", broken),
               Method("wrong-grid", lambda c: (Volume(np.zeros((8, 8, 2)), np.eye(4)), {}))]
    rows, outputs = evaluate_cases([case], methods)
    assert rows[0]["psnr"] == np.inf and rows[0]["ssim"] == pytest.approx(1.0)
    assert rows[1]["error"] == "RuntimeError: boom"
    assert "differs from reference" in rows[2]["error"]
    assert list(outputs["s"]) == ["same"]


def test_load_cases_pairs_files_and_names_problems(tmp_path: Path) -> None:
    ref = Volume(np.ones((8, 8, 2), np.float32), np.eye(4))
    write_nifti(ref, tmp_path / "x_ref.nii.gz")
    write_nifti(Volume(np.ones((4, 4, 2), np.float32), np.diag([2, 2, 1, 1.0])), tmp_path / "x_lr.nii.gz")
    cases = load_cases(tmp_path, "sr")
    assert [c.name for c in cases] == ["x"] and cases[0].sr_axes == (0, 1) and cases[0].sr_factor == 2
    assert cases[0].slice_axis == 2
    write_nifti(Volume(np.ones((4, 4, 2), np.float32), np.eye(4)), tmp_path / "y_lr.nii.gz")
    with pytest.raises(EvaluationError, match="y_lr.nii.gz: no matching reference y_ref.nii.gz"):
        load_cases(tmp_path, "sr")
    with pytest.raises(EvaluationError, match="no '\\*_kspace.h5' inputs"):
        load_cases(tmp_path, "recon")


def test_cs_tuning_set_mirrors_the_evaluation_mask() -> None:
    from medidiff.evaluation.compare import cs_tuning_set
    from medidiff.io.kspace import KSpaceData
    from medidiff.physics.masks import make_mask

    mask = make_mask("equispaced", (64, 80), 4, 0.08, seed=3)
    like = KSpaceData(np.zeros((1, 64, 80), np.complex64), mask.mask, np.eye(4))
    rng = np.random.default_rng(0)
    pool = [Volume(rng.random((70, 72, 10)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))]
    pairs = cs_tuning_set(like, slices_per_volume=3, volumes=pool)
    data, ref = pairs[0]
    assert data.kspace.shape == (3, 70, 72) and ref.shape == (70, 72, 3)
    full = np.broadcast_to(data.mask, (70, 72))
    assert full.size / full.sum() == pytest.approx(4.0, rel=0.1)
    np.testing.assert_allclose(ref, pool[0].array[..., 4:7])  # the central slices


def test_gate_summary_counts_known_points():
    from medidiff.evaluation.report import gate_summary

    pts = {"medidiff-1": [(0.2, 0.5, True), (0.4, 0.3, True), (0.1, 0.6, False), (0.0, -0.3, True)]}
    (line,) = gate_summary(pts)
    assert line.startswith("medidiff-1: 4 cases")
    assert "predicted ≤ actual in 2 " in line  # (0.2, 0.5) and (0.1, 0.6)
    assert "enhanced 3 (of which the candidate lost > 0.1 dB: 1)" in line
    assert "declined 1 (of which the candidate would have gained > 0.3 dB: 1)" in line
