"""Where a scan has signal: a mask of body vs air, so that air slices and air borders can skip the network.

The air level comes from the image corners: in magnitude MR images air is either exactly zero (masked by
the scanner) or a Rician noise floor, which for a single coil is Rayleigh distributed with
median σ·√(2 ln 2). Pixels above a few σ of that floor are signal; a majority filter drops isolated noise
pixels, holes inside the body are filled (air inside the body stays with it) and the mask grows by a
margin in-plane and across slices, so edges and partial-volume slices keep the full treatment.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

RAYLEIGH_MEDIAN = float(np.sqrt(2 * np.log(2)))  # median of a Rayleigh(σ = 1) variable


def air_noise_sigma(stack: np.ndarray, corner_fraction: float = 1 / 16) -> float:
    """σ of the air noise of a magnitude stack ``(N, H, W)``, from the median of its four corner patches.

    Zero where the background is masked to zero; overestimated where the body fills the corners
    (:func:`foreground_mask` caps the threshold for that case).
    """
    mag = np.abs(np.asarray(stack))
    h, w = mag.shape[-2:]
    ch, cw = max(2, round(h * corner_fraction)), max(2, round(w * corner_fraction))
    corners = np.concatenate([mag[..., :ch, :cw].ravel(), mag[..., :ch, -cw:].ravel(),
                              mag[..., -ch:, :cw].ravel(), mag[..., -ch:, -cw:].ravel()])
    return float(np.median(corners)) / RAYLEIGH_MEDIAN


def foreground_mask(
    stack: np.ndarray,
    *,
    k_sigma: float = 5.0,
    min_fraction: float = 0.01,
    max_fraction: float = 0.1,
    margin: int | None = None,
    slice_margin: int = 1,
) -> np.ndarray:
    """Boolean mask ``(N, H, W)`` of the slices ``stack`` (real or complex) that holds signal, with margins.

    Threshold: ``k_sigma`` times the air noise σ (:func:`air_noise_sigma`), but at least ``min_fraction`` and
    at most ``max_fraction`` of the stack's 99.5th percentile (the cap keeps dim tissue when the body fills
    the corners). ``margin`` pixels in-plane (default 3 % of the smaller side, at least 2) and
    ``slice_margin`` slices are added around the signal. A slice with no True pixel is all air.
    """
    mag = np.abs(np.asarray(stack)).astype(np.float32, copy=False)
    if mag.ndim != 3:
        raise ValueError(f"foreground_mask expects slices (N, H, W), got shape {mag.shape}")
    top = float(np.percentile(mag, 99.5)) if mag.size else 0.0
    if top <= 0:
        return np.zeros(mag.shape, bool)
    thr = float(np.clip(k_sigma * air_noise_sigma(mag), min_fraction * top, max_fraction * top))
    signal = mag > thr
    # majority of the 3x3 neighbourhood: isolated noise pixels go, body interiors and edges stay
    signal = ndimage.uniform_filter(signal.astype(np.float32), size=(1, 3, 3), mode="constant") > 0.5
    for i in np.flatnonzero(signal.any(axis=(1, 2))):
        signal[i] = ndimage.binary_fill_holes(signal[i])
    if margin is None:
        margin = max(2, round(0.03 * min(mag.shape[1:])))
    size = (2 * max(0, slice_margin) + 1, 2 * max(0, margin) + 1, 2 * max(0, margin) + 1)
    return ndimage.maximum_filter(signal, size=size, mode="constant", cval=False)
