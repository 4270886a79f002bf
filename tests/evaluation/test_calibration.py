"""Split-conformal calibration on a toy problem with known heteroscedastic noise."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medidiff.evaluation.calibration import (
    Calibration,
    CalibrationCase,
    apply,
    assess,
    body_mask,
    calibrate,
    conformal_quantile,
    empirical_coverage,
    load_calibration,
    make_case,
    reliability_curve,
    save_calibration,
    uncertainty_error_spearman,
)

SIZE = 64


def _phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipse with a darker inclusion on a zero background, and its body mask."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1) * 2 - 1
    a, b = rng.uniform(0.6, 0.85, 2)
    body = (xx / a) ** 2 + (yy / b) ** 2 <= 1
    image = np.where(body, 1.0 + 0.3 * np.sin(3 * xx + 2 * yy), 0.0)
    image[(xx - 0.2) ** 2 + yy**2 < 0.04] *= 0.4
    return (image * rng.uniform(50, 500)).astype(np.float32), body


def _case(name: str, seed: int, k: int = 8, std_factor: float = 1.0) -> CalibrationCase:
    """Truth x; prediction x + s z; K samples prediction + s n_k; s spans ~300x across the body."""
    rng = np.random.default_rng(seed)
    truth, body = _phantom(rng)
    scale = float(np.percentile(truth, 99.5))
    _yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1)
    s = scale * 0.002 * 1000**xx  # 0.2 % .. 200 % of the scale from left to right
    pred = truth + s * rng.standard_normal(truth.shape)
    samples = pred + s * rng.standard_normal((k, *truth.shape))
    return CalibrationCase(
        name=name,
        std=(samples.std(axis=0, ddof=1) * std_factor).astype(np.float32),
        abs_err=np.abs(pred - truth).astype(np.float32),
        mask=body,
        scale=scale,
    )


@pytest.fixture(scope="module")
def split() -> tuple[list[CalibrationCase], list[CalibrationCase]]:
    cases = [_case(f"case{i:02d}", i) for i in range(24)]
    return cases[:12], cases[12:]


def test_conformal_quantile_rank_and_infinite_tail() -> None:
    scores = np.arange(1, 11, dtype=float)  # n = 10
    assert conformal_quantile(scores, 0.5) == 6.0  # ceil(11 * 0.5) = 6th smallest
    assert conformal_quantile(scores, 0.9) == 10.0  # ceil(9.9) = 10
    assert conformal_quantile(scores, 0.95) == math.inf  # ceil(10.45) = 11 > n


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_held_out_coverage_within_two_points(split, coverage: float) -> None:
    cal, test = split
    calib = calibrate(cal, coverage, samples_k=8, task="toy")
    result = assess(calib, test)
    assert abs(result["coverage"] - coverage) < 0.02, result["coverage"]
    for case in test:  # per case too, through the public apply / empirical_coverage pair
        hw = apply(calib, case.std, case.scale)
        assert abs(empirical_coverage(hw, case.abs_err, case.mask) - coverage) < 0.05


def test_uncertainty_tracks_error(split) -> None:
    _, test = split
    rho = [uncertainty_error_spearman(c.std, c.abs_err, c.mask) for c in test]
    assert min(rho) > 0.5, rho


def test_std_reported_three_times_too_small_is_fixed_by_quantile() -> None:
    honest = [_case(f"h{i}", i) for i in range(8)]
    shrunk = [_case(f"s{i}", i, std_factor=1 / 3) for i in range(8)]
    q_honest = calibrate(honest, 0.9, epsilon=1e-6).quantile
    q_shrunk = calibrate(shrunk, 0.9, epsilon=1e-6).quantile
    assert q_shrunk == pytest.approx(3 * q_honest, rel=0.02)
    test = [_case(f"t{i}", 100 + i, std_factor=1 / 3) for i in range(6)]
    calib = calibrate(shrunk, 0.9)
    assert abs(assess(calib, test)["coverage"] - 0.9) < 0.02
    raw = np.mean([empirical_coverage(1.645 * c.std, c.abs_err, c.mask) for c in test])
    assert raw < 0.6  # the uncalibrated "1.645 sigma" interval would be badly overconfident


def test_zero_spread_voxels_get_a_finite_width() -> None:
    cases = [_case(f"z{i}", i) for i in range(6)]
    cases = [
        CalibrationCase(
            c.name,
            np.where(np.arange(c.std.size).reshape(c.std.shape) % 7 == 0, 0, c.std),
            c.abs_err,
            c.mask,
            c.scale,
        )
        for c in cases
    ]
    calib = calibrate(cases, 0.9)
    assert calib.epsilon > 0 and math.isfinite(calib.quantile)
    hw = apply(calib, np.zeros((4, 4), np.float32), scale=100.0)
    assert np.all(hw > 0) and np.allclose(hw, calib.quantile * calib.epsilon * 100.0)


def test_reliability_curve_follows_the_diagonal(split) -> None:
    cal, test = split
    curve = reliability_curve(cal, test, levels=(0.5, 0.7, 0.9, 0.99))
    assert [r["nominal"] for r in curve] == [0.5, 0.7, 0.9, 0.99]
    for row in curve:
        assert abs(row["empirical"] - row["nominal"]) < 0.02, row
    assert all(a["quantile"] < b["quantile"] for a, b in itertools.pairwise(curve))


def test_scan_level_uncertainty_follows_scan_error() -> None:
    cases = [_case(f"c{i}", i) for i in range(6)]
    # scans with globally larger noise: the error and the spread grow together
    boosted = [
        CalibrationCase(c.name, c.std * (1 + i), c.abs_err * (1 + i), c.mask, c.scale)
        for i, c in enumerate(cases)
    ]
    calib = calibrate([_case(f"k{i}", 50 + i) for i in range(6)], 0.9)
    scans = assess(calib, boosted)["scans"]
    assert scans["spearman"] > 0.9 and len(scans["cases"]) == 6


def test_assess_refuses_calibration_cases(split) -> None:
    cal, _ = split
    calib = calibrate(cal, 0.9)
    with pytest.raises(ValueError, match="overlap"):
        assess(calib, cal[:2])


def test_json_round_trip_in_a_model_folder(tmp_path, split) -> None:
    calib = calibrate(split[0], 0.9, samples_k=8, task="sr")
    (tmp_path / "config.json").write_text("{}")
    path = save_calibration(calib, tmp_path)
    assert path.name == "calibration.json"
    assert load_calibration(tmp_path) == calib
    assert load_calibration(tmp_path / "missing") is None
    infinite = Calibration(0.99, math.inf, 0.01, 2, "sr", 1, 10, ["a"])
    assert Calibration.from_json(infinite.to_json()) == infinite
    assert "90%" in calib.describe() and "K=8" in calib.describe()


def test_body_mask_from_the_image_fills_dark_tissue() -> None:
    rng = np.random.default_rng(3)
    truth, body = _phantom(rng)
    noisy = np.abs(truth + 0.03 * truth.max() * rng.standard_normal(truth.shape))
    mask = body_mask(noisy)
    dice = 2 * np.sum(mask & body) / (mask.sum() + body.sum())
    assert dice > 0.95
    vol = np.stack([noisy] * 3, axis=-1)
    assert body_mask(vol).shape == vol.shape
    assert body_mask(np.ones((8, 8))).all()


def test_make_case_builds_error_mask_and_scale() -> None:
    rng = np.random.default_rng(0)
    truth, body = _phantom(rng)
    enhanced = truth + 1.0
    case = make_case("x", enhanced, truth, np.ones_like(truth))
    assert np.allclose(case.abs_err, 1.0)
    assert case.scale == pytest.approx(np.percentile(enhanced, 99.5))
    assert 2 * np.sum(case.mask & body) / (case.mask.sum() + body.sum()) > 0.95


def test_per_k_calibrations_beside_the_default(tmp_path, split) -> None:
    k4 = calibrate(split[0], 0.9, samples_k=4, task="recon")
    k8 = calibrate(split[0], 0.8, samples_k=8, task="recon")
    assert save_calibration(k4, tmp_path).name == "calibration.json"
    assert save_calibration(k8, tmp_path, default=False).name == "calibration_k8.json"
    assert load_calibration(tmp_path) == k4  # the default
    assert load_calibration(tmp_path, 4) == k4 and load_calibration(tmp_path, 8) == k8
    assert load_calibration(tmp_path, 2) == k4  # no K=2 calibration: the default
    # making K=8 the default supersedes its per-K file (no second copy left behind)
    save_calibration(k8, tmp_path)
    assert not (tmp_path / "calibration_k8.json").exists() and load_calibration(tmp_path, 4) == k8
