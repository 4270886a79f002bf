"""Cartesian k-space sampling masks, seeded per call, never touching global random state.

- ``random_mask``: fastMRI ``RandomMaskFunc`` semantics: a centred block of
  ``round(W * center_fraction)`` columns plus each other column kept with probability
  ``(W / R - n_low) / (W - n_low)`` (so the *expected* acceleration is R; the realised one is reported).
- ``equispaced_mask``: fastMRI ``EquispacedMaskFractionFunc`` semantics: the centre block plus columns
  every ``R_adj = R (n_low - W) / (n_low R - W)`` (rounded positions) from a random offset, so the
  overall fraction sampled is ``1 / R``.
- ``poisson_mask``: 2D variable-density Poisson-disc (sigpy's sampler) with a fully sampled
  ``round(H cf) x round(W cf)`` calibration square; exactly ``round(H W / R)`` samples.

Column masks are ``(W,)`` (phase encoding along the last dim, as in fastMRI), Poisson masks ``(H, W)``;
both broadcast onto ``(..., H, W)`` k-space. ``SamplingMask.acceleration`` is exact: total / sampled.
Apply masks with :func:`apply_mask` (``where``, not multiplication, so no ``-0.0`` appears).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MASK_KINDS = ("equispaced", "random", "poisson")


@dataclass(frozen=True)
class SamplingMask:
    """A binary sampling mask (1 = measured) with its exact acceleration and centre fraction."""

    mask: np.ndarray  # float32, (W,) columns or (H, W)
    acceleration: float  # exact: number of k-space locations / number sampled
    center_fraction: float
    kind: str = ""
    shape: tuple[int, int] = (0, 0)  # (H, W) of the k-space it was made for

    def full(self) -> np.ndarray:
        """The mask broadcast to (H, W) float32."""
        return np.broadcast_to(self.mask, self.shape).astype(np.float32)


def _check(shape: tuple[int, ...], acceleration: float, center_fraction: float) -> tuple[int, int]:
    """Validate arguments; return (H, W)."""
    if len(shape) < 2:
        raise ValueError(f"mask shape needs (..., H, W), got {tuple(shape)}")
    if not acceleration > 1:
        raise ValueError(f"acceleration must be > 1, got {acceleration}")
    if not 0 < center_fraction < 1 / acceleration + 1e-9:
        raise ValueError(
            f"center_fraction must be in (0, 1/acceleration] = (0, {1 / acceleration:.3f}], "
            f"got {center_fraction}"
        )
    return int(shape[-2]), int(shape[-1])


def _center_columns(num_cols: int, center_fraction: float) -> tuple[np.ndarray, int]:
    """fastMRI centre block: ``round(W cf)`` columns starting at ``(W - n_low + 1) // 2``."""
    num_low = round(num_cols * center_fraction)
    mask = np.zeros(num_cols, dtype=np.float32)
    pad = (num_cols - num_low + 1) // 2
    mask[pad : pad + num_low] = 1
    return mask, num_low


def _finish(mask: np.ndarray, kind: str, hw: tuple[int, int], cf: float) -> SamplingMask:
    """Wrap a mask with its exact acceleration."""
    mask = mask.astype(np.float32)
    return SamplingMask(
        mask=mask, acceleration=float(mask.size / mask.sum()), center_fraction=cf, kind=kind, shape=hw
    )


def random_mask(
    shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: int = 0
) -> SamplingMask:
    """fastMRI RandomMaskFunc: centre block + random columns (expected acceleration R)."""
    h, w = _check(shape, acceleration, center_fraction)
    rng = np.random.default_rng(seed)
    center, num_low = _center_columns(w, center_fraction)
    prob = (w / acceleration - num_low) / max(w - num_low, 1)
    accel = (rng.uniform(size=w) < prob).astype(np.float32)
    return _finish(np.maximum(center, accel), "random", (h, w), center_fraction)


def equispaced_mask(
    shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: int = 0
) -> SamplingMask:
    """fastMRI EquispacedMaskFractionFunc: centre block + equispaced columns, overall fraction 1/R."""
    h, w = _check(shape, acceleration, center_fraction)
    rng = np.random.default_rng(seed)
    center, num_low = _center_columns(w, center_fraction)
    accel = np.zeros(w, dtype=np.float32)
    if num_low * acceleration < w:  # otherwise the centre alone already reaches the fraction 1/R
        adjusted = (acceleration * (num_low - w)) / (num_low * acceleration - w)
        offset = int(rng.integers(0, max(1, round(adjusted))))
        positions = np.around(np.arange(offset, w - 1, adjusted)).astype(np.int64)
        accel[positions[positions < w]] = 1
    return _finish(np.maximum(center, accel), "equispaced", (h, w), center_fraction)


def poisson_mask(
    shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: int = 0
) -> SamplingMask:
    """2D variable-density Poisson-disc mask (sigpy's sampler) with a fully sampled centre square.

    sigpy's ``poisson`` loops forever when its tolerance cannot be met, so the density-slope search
    is done here with a bounded bisection around sigpy's Poisson-disc kernel; the sample count is then
    trimmed or topped up at random outside the calibration square to the exact target ``H W / R``.
    """
    from sigpy.mri.samp import _poisson  # the numba kernel (uses numba's own RNG, not NumPy's global)

    h, w = _check(shape, acceleration, center_fraction)
    rng = np.random.default_rng(seed)
    calib = (max(1, round(h * center_fraction)), max(1, round(w * center_fraction)))
    yy, xx = np.mgrid[:h, :w]
    x = np.maximum(np.abs(xx - w / 2) - calib[1] / 2, 0)
    y = np.maximum(np.abs(yy - h / 2) - calib[0] / 2, 0)
    r = np.sqrt((x / max(x.max(), 1e-9)) ** 2 + (y / max(y.max(), 1e-9)) ** 2)
    target = round(h * w / acceleration)
    sub_seed = int(rng.integers(0, 2**31 - 1))
    lo, hi = 0.0, float(max(h, w))
    best: np.ndarray | None = None
    for _ in range(24):
        slope = (lo + hi) / 2
        radius_x = np.clip((1 + r * slope) * w / max(h, w), 1, None)
        radius_y = np.clip((1 + r * slope) * h / max(h, w), 1, None)
        mask = _poisson(w, h, 30, radius_x, radius_y, calib, sub_seed) * (r < 1)
        if best is None or abs(mask.sum() - target) < abs(best.sum() - target):
            best = mask
        if abs(mask.sum() - target) <= 0.005 * target:
            break
        if mask.sum() > target:
            lo = slope
        else:
            hi = slope
    assert best is not None
    best = best.astype(bool)
    calib_region = np.zeros((h, w), bool)
    calib_region[
        int(h / 2 - calib[0] / 2) : int(h / 2 + calib[0] / 2),
        int(w / 2 - calib[1] / 2) : int(w / 2 + calib[1] / 2),
    ] = True
    best |= calib_region
    extra = int(best.sum()) - target
    if extra > 0:  # drop random samples outside the calibration square
        candidates = np.flatnonzero(best & ~calib_region)
        best.flat[rng.choice(candidates, size=min(extra, candidates.size), replace=False)] = False
    elif extra < 0:  # add random unsampled locations
        candidates = np.flatnonzero(~best)
        best.flat[rng.choice(candidates, size=min(-extra, candidates.size), replace=False)] = True
    return _finish(best, "poisson", (h, w), center_fraction)


def make_mask(
    kind: str, shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: int = 0
) -> SamplingMask:
    """Dispatch on ``kind`` in {'equispaced', 'random', 'poisson'}."""
    makers = {"equispaced": equispaced_mask, "random": random_mask, "poisson": poisson_mask}
    if kind not in makers:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    return makers[kind](shape, acceleration, center_fraction, seed)


def apply_mask(
    kspace: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray
) -> torch.Tensor | np.ndarray:
    """Zero the unmeasured k-space locations (``where``, so the zeros are +0, never -0.0)."""
    if isinstance(kspace, torch.Tensor):
        m = torch.as_tensor(mask, device=kspace.device)
        return torch.where(m == 0, torch.zeros((), dtype=kspace.dtype, device=kspace.device), kspace)
    return np.where(np.asarray(mask) == 0, np.zeros((), dtype=kspace.dtype), kspace)
