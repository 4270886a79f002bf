"""Image-quality metrics with fastMRI's conventions (``fastmri/evaluate.py``), plus HFEN.

* PSNR and SSIM use ``data_range = gt.max()`` of the **whole volume** (not per slice), as fastMRI does.
* SSIM is scikit-image's ``structural_similarity`` computed per 2D slice and averaged over the volume.
* NMSE is ``||gt - pred||² / ||gt||²`` over the whole volume.
* HFEN (Ravishankar & Bresler 2011) is ``||LoG(pred) - LoG(gt)|| / ||LoG(gt)||`` with a 2D Laplacian of
  Gaussian (sigma 1.5 px) applied per slice.

Inputs are magnitude images: real arrays, 2D ``(H, W)`` or 3D volumes whose slices lie along
``slice_axis`` (default -1: ``(H, W, S)``, the layout of a ``Volume`` built from k-space). Complex inputs
are reduced to their magnitude.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_laplace
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["HFEN_SIGMA", "all_metrics", "hfen", "nmse", "psnr", "ssim"]

HFEN_SIGMA = 1.5


def _prepare(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude float64 copies of both arrays, after checking that their shapes agree."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"metrics need arrays of the same shape, got gt {gt.shape} and pred {pred.shape}")
    if gt.ndim not in (2, 3):
        raise ValueError(f"metrics need a 2D slice or a 3D volume, got {gt.ndim}D shape {gt.shape}")
    gt = np.abs(gt) if np.iscomplexobj(gt) else gt
    pred = np.abs(pred) if np.iscomplexobj(pred) else pred
    return gt.astype(np.float64), pred.astype(np.float64)


def _slices(arr: np.ndarray, slice_axis: int) -> np.ndarray:
    """The volume as a stack of 2D slices ``(S, H, W)``; a 2D array becomes one slice."""
    if arr.ndim == 2:
        return arr[None]
    return np.moveaxis(arr, slice_axis, 0)


def _data_range(gt: np.ndarray, data_range: float | None) -> float:
    """fastMRI's default: the maximum of the whole reference volume."""
    value = float(gt.max()) if data_range is None else float(data_range)
    if not value > 0:
        raise ValueError(f"data_range must be positive (gt.max() is {float(gt.max())}); pass data_range")
    return value


def psnr(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB over the whole volume; ``inf`` for identical arrays."""
    gt, pred = _prepare(gt, pred)
    rng = _data_range(gt, data_range)
    if np.array_equal(gt, pred):
        return math.inf
    return float(peak_signal_noise_ratio(gt, pred, data_range=rng))


def _win_size(shape: tuple[int, ...]) -> int | None:
    """scikit-image's default 7-pixel window, shrunk (odd, >= 3) for slices smaller than that."""
    smallest = min(shape)
    if smallest >= 7:
        return None
    if smallest < 3:
        raise ValueError(f"SSIM needs slices of at least 3x3 pixels, got {shape}")
    return smallest if smallest % 2 == 1 else smallest - 1


def ssim(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None, slice_axis: int = -1) -> float:
    """Structural similarity averaged over 2D slices, data range = the whole volume's maximum."""
    gt, pred = _prepare(gt, pred)
    rng = _data_range(gt, data_range)
    gt_s, pred_s = _slices(gt, slice_axis), _slices(pred, slice_axis)
    win = _win_size(gt_s.shape[1:])
    values = [
        structural_similarity(g, p, data_range=rng, win_size=win) for g, p in zip(gt_s, pred_s, strict=True)
    ]
    return float(np.mean(values))


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mean squared error ``||gt - pred||² / ||gt||²`` over the whole volume."""
    gt, pred = _prepare(gt, pred)
    denom = float(np.linalg.norm(gt) ** 2)
    if denom == 0:
        raise ValueError("NMSE is undefined for an all-zero reference")
    return float(np.linalg.norm(gt - pred) ** 2 / denom)


def hfen(gt: np.ndarray, pred: np.ndarray, sigma: float = HFEN_SIGMA, slice_axis: int = -1) -> float:
    """High-frequency error norm: relative L2 error of the per-slice 2D Laplacian of Gaussian."""
    gt, pred = _prepare(gt, pred)
    gt_s, pred_s = _slices(gt, slice_axis), _slices(pred, slice_axis)
    log_gt = np.stack([gaussian_laplace(s, sigma=sigma) for s in gt_s])
    log_pred = np.stack([gaussian_laplace(s, sigma=sigma) for s in pred_s])
    denom = float(np.linalg.norm(log_gt))
    if denom == 0:
        raise ValueError("HFEN is undefined for a reference without high-frequency content")
    return float(np.linalg.norm(log_pred - log_gt) / denom)


def all_metrics(
    gt: np.ndarray, pred: np.ndarray, data_range: float | None = None, slice_axis: int = -1
) -> dict[str, float]:
    """PSNR (dB), SSIM, NMSE and HFEN of ``pred`` against ``gt`` as one dict."""
    return {
        "psnr": psnr(gt, pred, data_range),
        "ssim": ssim(gt, pred, data_range, slice_axis=slice_axis),
        "nmse": nmse(gt, pred),
        "hfen": hfen(gt, pred, slice_axis=slice_axis),
    }
