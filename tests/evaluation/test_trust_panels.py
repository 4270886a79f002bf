"""Trust panels: calibration, the lesion panel's targets and flags.

Calibration runs on disjoint cases with a known noise model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medidiff.evaluation.calibration import load_calibration
from medidiff.evaluation.compare import Case
from medidiff.evaluation.trust_panels import (
    calibration_panel,
    degrade_fn,
    flags_markdown,
    lesion_panel,
    ood_flags_panel,
    trust_cases,
)
from medidiff.io import Volume
from medidiff.physics.operators import KSpaceTruncation
from medidiff.tasks import TaskConfig


def _phantom(seed: int, shape=(64, 64, 4)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2) < 0.4 * shape[0]
    tex = ndimage.gaussian_filter(rng.standard_normal(shape[:2]), 3)
    plane = ndimage.gaussian_filter(disc * (100 + 300 * tex), 1.0)
    return np.repeat(plane[..., None], shape[2], axis=2).astype(np.float32)


def _toy_enhance(case: Case, k: int):
    """Enhanced = reference + Gaussian error whose SD the method reports exactly (heteroscedastic)."""
    ref = np.asarray(case.reference.array, np.float32)
    seed = int(case.name.split("-")[1])
    rng = np.random.default_rng(seed + 1000)
    sd = 1.0 + 10.0 * (np.abs(np.gradient(ref, axis=0)) > 5)  # large error on edges, small in flat tissue
    sd = sd.astype(np.float32)
    return ref + sd * rng.standard_normal(ref.shape).astype(np.float32), sd, ref


def _cases(names) -> list[Case]:
    return [Case(name=n, reference=Volume(_phantom(int(n.split("-")[1])), np.eye(4), {})) for n in names]


def test_calibration_panel_covers_held_out_cases_and_writes_the_calibration(tmp_path: Path) -> None:
    cal, test = _cases([f"cal-{i}" for i in range(4)]), _cases([f"test-{i}" for i in range(10, 14)])
    s = calibration_panel("sr", _toy_enhance, cal, test, 4, 0.9, tmp_path / "report", model_dir=tmp_path)
    assert abs(s["coverage"] - 0.9) <= 0.02 and s["coverage_ok"]
    assert s["spearman"] >= 0.5 and s["spearman_ok"]
    assert s["n_cal"] == 16 and s["n_test"] == 16  # one case per slice
    calib = load_calibration(tmp_path)
    assert calib is not None and calib.samples_k == 4 and calib.task == "sr" and calib.n_cases == 16
    assert 0 < calib.quantile < 1.7  # at most the |N(0,1)| 90 % quantile: the eps floor adds width
    assert (tmp_path / "report" / s["figure"]).stat().st_size > 1000
    assert "| empirical coverage |" in s["markdown"] and "PASS" in s["markdown"]
    with pytest.raises(ValueError, match="overlap"):
        calibration_panel("sr", _toy_enhance, cal, cal[:1], 4, 0.9, tmp_path / "report")
    with pytest.raises(ValueError, match="K >= 2"):
        calibration_panel("sr", _toy_enhance, cal, test, 1, 0.9, tmp_path / "report")


def test_shipped_cases_are_disjoint_and_degraded_with_the_task_operator() -> None:
    for kind in ("sr", "recon"):
        cal, test = trust_cases(kind)
        assert cal and test and not ({c.name for c in cal} & {c.name for c in test})
        for case in cal + test:
            if kind == "sr":
                assert case.lr.shape[0] * 2 == case.reference.shape[0]
            else:
                assert case.kspace.kspace.shape[1:] == case.reference.shape[:2]


def _sinc(lr: np.ndarray) -> np.ndarray:
    return KSpaceTruncation(2).pinv(torch.from_numpy(np.asarray(lr, np.float32))[None])[0].numpy()


def test_lesion_panel_reports_targets_and_flags(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:128, :128]
    body = np.hypot(yy - 64, xx - 64) < 58
    ref = np.where(body, 100.0, 0.0).astype(np.float32)
    cases = [("flat", ndimage.gaussian_filter(ref, 1.0), (1.0, 1.0))]

    checker = 15.0 * (-1.0) ** np.add.outer(np.arange(24), np.arange(24))

    def inventing(lr: np.ndarray) -> np.ndarray:  # sinc plus an invented blob and invented fine texture
        out = _sinc(lr)
        out[70:76, 40:46] += 40.0
        out[30:54, 52:76] += checker
        return out

    task = TaskConfig(kind="sr", factor=2)
    panel = lesion_panel(task, _sinc, _sinc, cases, tmp_path, seed=0, per_image=4)
    summary = panel["summary"]
    assert summary["lesions_worse_than_classical"] == 0 and summary["blobs_ok"]
    assert "lesions ≥ 4 mm keep ≥ 90 %" in panel["markdown"]
    bad = lesion_panel(task, inventing, _sinc, cases, tmp_path, seed=0, per_image=4)
    assert bad["summary"]["blobs_enhanced"] > bad["summary"]["blobs_classical"]
    assert not bad["summary"]["blobs_ok"]
    assert "| invented blobs" in bad["markdown"] and "FAIL" in bad["markdown"]
    assert bad["flags"]["recall"] > panel["flags"]["recall"]
    ood = ood_flags_panel(task, _sinc, _sinc, size=64)
    assert ood["rows"] and 0.0 <= ood["flagged_fraction"] <= 1.0
    assert "out-of-domain" in flags_markdown("sr", bad["flags"], ood)


def test_recon_measurement_is_masked_kspace() -> None:
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    y = degrade_fn(TaskConfig(kind="recon", acceleration=4.0), seed=0)(image)
    assert np.iscomplexobj(y) and y.shape == (32, 32)
    sampled = np.abs(y).sum(axis=0) > 0
    assert 0.2 < sampled.mean() < 0.4  # x4 with an 8 % centre
