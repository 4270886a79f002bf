"""Metrics against scikit-image / fastMRI's definitions on fixed arrays, and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_laplace
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medidiff.metrics import all_metrics, hfen, nmse, psnr, ssim


def _volume(seed: int = 0, shape: tuple[int, int, int] = (32, 28, 5)) -> np.ndarray:
    """A smooth positive test volume (H, W, S) whose slices have different maxima."""
    rng = np.random.default_rng(seed)
    h, w, s = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    base = np.exp(-(xx**2 + yy**2) * 2.0)
    vol = np.stack([base * (1.0 + k) + 0.05 * rng.standard_normal((h, w)) for k in range(s)], axis=-1)
    return np.abs(vol).astype(np.float32)


def test_identical_arrays_give_perfect_scores() -> None:
    gt = _volume()
    m = all_metrics(gt, gt.copy())
    assert m["psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0)
    assert m["nmse"] == 0.0
    assert m["hfen"] == 0.0


def test_psnr_known_value_and_skimage() -> None:
    gt = np.zeros((16, 16, 3), np.float32)
    gt[4:12, 4:12, :] = 2.0
    pred = gt + 0.1  # MSE 0.01, peak 2 -> 10 log10(4 / 0.01)
    assert psnr(gt, pred) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)
    vol, noisy = _volume(1), _volume(2)
    assert psnr(vol, noisy) == pytest.approx(peak_signal_noise_ratio(vol, noisy, data_range=vol.max()))
    assert psnr(vol, noisy, data_range=10.0) == pytest.approx(
        peak_signal_noise_ratio(vol, noisy, data_range=10.0)
    )


def test_ssim_is_fastmri_per_slice_mean_with_volume_max() -> None:
    gt, pred = _volume(3), _volume(4)
    expected = np.mean(
        [
            structural_similarity(gt[..., k], pred[..., k], data_range=float(gt.max()))
            for k in range(gt.shape[-1])
        ]
    )
    assert ssim(gt, pred) == pytest.approx(expected, rel=1e-6)
    # Per-slice data ranges would give a different number: the volume max is what is used.
    per_slice = np.mean(
        [
            structural_similarity(gt[..., k], pred[..., k], data_range=float(gt[..., k].max()))
            for k in range(gt.shape[-1])
        ]
    )
    assert abs(ssim(gt, pred) - per_slice) > 1e-4
    # slices on axis 0 (fastMRI's layout) give the same answer as on the last axis
    assert ssim(np.moveaxis(gt, -1, 0), np.moveaxis(pred, -1, 0), slice_axis=0) == pytest.approx(
        ssim(gt, pred)
    )


def test_nmse_known_value() -> None:
    gt = np.ones((8, 8, 2), np.float32)
    assert nmse(gt, 1.5 * gt) == pytest.approx(0.25)
    assert nmse(gt, np.zeros_like(gt)) == pytest.approx(1.0)


def test_hfen_known_values() -> None:
    gt = _volume(5)
    assert hfen(gt, 2.0 * gt) == pytest.approx(1.0, rel=1e-6)  # LoG is linear
    assert hfen(gt, np.zeros_like(gt)) == pytest.approx(1.0)
    # LoG nearly ignores a constant offset (scipy's truncated kernel sums to almost zero)
    assert hfen(gt, gt + 3.0) < 0.02
    pred = _volume(6)
    log_gt = np.stack([gaussian_laplace(gt[..., k].astype(np.float64), 1.5) for k in range(gt.shape[-1])])
    log_pr = np.stack([gaussian_laplace(pred[..., k].astype(np.float64), 1.5) for k in range(gt.shape[-1])])
    assert hfen(gt, pred) == pytest.approx(np.linalg.norm(log_pr - log_gt) / np.linalg.norm(log_gt))


def test_better_prediction_scores_better() -> None:
    gt = _volume(7)
    rng = np.random.default_rng(0)
    small = gt + 0.01 * rng.standard_normal(gt.shape).astype(np.float32)
    large = gt + 0.1 * rng.standard_normal(gt.shape).astype(np.float32)
    good, bad = all_metrics(gt, small), all_metrics(gt, large)
    assert good["psnr"] > bad["psnr"] and good["ssim"] > bad["ssim"]
    assert good["nmse"] < bad["nmse"] and good["hfen"] < bad["hfen"]


def test_2d_and_small_slices_and_errors() -> None:
    gt = _volume(8)[..., 0]
    pred = _volume(9)[..., 0]
    assert ssim(gt, pred) == pytest.approx(structural_similarity(gt, pred, data_range=float(gt.max())))
    tiny = _volume(10, shape=(5, 6, 2))
    assert 0 < ssim(tiny, tiny * 0.9) < 1
    with pytest.raises(ValueError, match="same shape"):
        psnr(gt, pred[:-1])
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((8, 8)), np.ones((8, 8)))
