"""Do-no-harm gate: decide per scan how much of the model's residual to keep, and say why.

The scan is checked on itself: its own images are degraded once more with the task's operator and
enhanced; there the truth is known, so the model's residual ``r = model - baseline`` can be compared with
the true residual ``e = reference - baseline``. Two things make the cross-scale check optimistic out of
domain: a weight fitted and scored on the same pixels always looks like a gain, and a half-resolution copy
looks more like the training data than the scan itself. The gate therefore

- **cross-fits**: the check images are cut into tiles dealt into ``FOLDS`` folds; the weight is fitted on the
  other folds and the gain is scored on the held-out fold. The predicted gain is the pooled held-out gain, its
  lower bound the worst fold;
- **shrinks** the weight to the smallest of the fold weights (a weight ``w`` harms only when the true optimum
  is below ``w / 2``);
- tests the **noise floor of the outermost measured band**: when the measured spectrum's edge is at the noise
  floor, the missing band beyond it is noise too and there is nothing to extrapolate;
- enhances only when the lower bound exceeds the task's margin (:func:`margin_db`); otherwise the classical
  image comes back unchanged (weight 0) with the reason.

The margin depends on what the check can see. In-plane SR and reconstruction check the model one step away
from the scan (a half-resolution copy; k-space split into disjoint sets): that step is what makes the check
optimistic out of domain, so the lower bound must clear ``MARGIN_DB``. The through-plane check is at the
scan's own scale: its sharp in-plane axes degraded with the same slice profile and factor, the pairs the
model meets on the thick axis. Nothing there is easier than the scan itself, and on the evaluation panels
the check is pessimistic (its predicted gain was at or below the gain measured against the truth on 32 of
34 held-out and out-of-domain cases with the previous weights, 30 of 34 with the shipped ones; see the gate
sections of ``reports/eval_sr_thick`` and ``reports/ood_sr_thick``), so a lower bound above zero suffices
(``MARGIN_SAME_SCALE_DB``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

FOLDS = 4
TILE = 16  # pixels per tile side in the check images
MARGIN_DB = 0.3  # held-out lower bound needed to enhance when the check is one step away from the scan
MARGIN_SAME_SCALE_DB = 0.0  # ... when the check is at the scan's own scale (through-plane SR)
EDGE_SNR_MIN = 2.0  # outermost measured band power / noise power needed to extrapolate
ENHANCED = "enhanced"
DECLINED = "returned classical image: model not expected to help"


@dataclass
class GateDecision:
    """The gate's numbers for one scan; ``weight`` 0 means the output is the classical image."""

    weight: float
    predicted_gain_db: float  # cross-fitted gain on the scan's own held-out check tiles
    lower_gain_db: float  # worst fold
    fitted_weight: float  # least-squares weight on all check pixels (before cross-fitting and shrinkage)
    edge_snr: float  # outermost measured band power over the noise power (nan: not measured)
    reason: str
    candidate_weight: float = 1.0  # the cross-fitted, shrunk weight the decision was about

    @property
    def enhanced(self) -> bool:
        return self.weight > 0

    def metrics(self) -> dict[str, float | str]:
        """Flat numbers for the result metrics and the manifest (``gate_*`` keys)."""
        out: dict[str, float | str] = {f"gate_{k}": v for k, v in asdict(self).items() if k != "reason"}
        out["gate_decision"] = ENHANCED if self.enhanced else "classical"
        out["gate_reason"] = self.reason
        return out


def off() -> GateDecision:
    """No gate: the model's residual is kept in full."""
    return GateDecision(1.0, math.nan, math.nan, 1.0, math.nan, "enhanced (gate off)", 1.0)


def _tile_folds(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Fold label (0..FOLDS-1) per pixel of images (B, H, W): tiles of ``TILE`` px dealt at random."""
    b, h, w = shape
    th, tw = max(1, math.ceil(h / TILE)), max(1, math.ceil(w / TILE))
    n = b * th * tw
    rng = np.random.default_rng(seed)
    labels = np.resize(np.arange(FOLDS), n)
    rng.shuffle(labels)
    tiles = labels.reshape(b, th, tw)
    return np.repeat(np.repeat(tiles, TILE, axis=1), TILE, axis=2)[:, :h, :w]


def _real(x: torch.Tensor) -> np.ndarray:
    """Real float64 array; complex images as (..., 2) real/imag pairs."""
    x = x.detach().cpu()
    return (torch.view_as_real(x) if x.is_complex() else x).double().numpy()


def cross_fit(r: torch.Tensor, e: torch.Tensor, seed: int = 0) -> tuple[float, float, float, float]:
    """``(weight, predicted_gain_db, lower_gain_db, fitted_weight)`` of residual ``r`` against truth ``e``.

    ``r``, ``e``: (B, H, W) real or complex. The weight of each fold is fitted on the other folds, clipped to
    [0, 1], and scored on the fold; the returned weight is the smallest fold weight.
    """
    rr, ee = _real(r), _real(e)
    folds = _tile_folds(tuple(r.shape[-3:]), seed)
    if rr.ndim == 4:
        folds = folds[..., None]
    folds = np.broadcast_to(folds, rr.shape)
    sums = np.array([[float((rr * ee)[folds == k].sum()), float((rr * rr)[folds == k].sum()),
                      float((ee * ee)[folds == k].sum())] for k in range(FOLDS)])
    tot = sums.sum(axis=0)
    fitted = float(np.clip(tot[0] / tot[1], 0.0, 1.0)) if tot[1] > 0 else 0.0
    weights, err0, err1 = [], [], []
    for k in range(FOLDS):
        rest = tot - sums[k]
        w = float(np.clip(rest[0] / rest[1], 0.0, 1.0)) if rest[1] > 0 else 0.0
        re_, r2, e2 = sums[k]
        weights.append(w)
        err0.append(e2)
        err1.append(e2 - 2 * w * re_ + w * w * r2)
    err0_a, err1_a = np.asarray(err0), np.maximum(np.asarray(err1), 1e-30)
    if err0_a.sum() <= 0:
        return 0.0, 0.0, 0.0, fitted
    pooled = float(10 * np.log10(err0_a.sum() / err1_a.sum()))
    valid = err0_a > 0
    lower = float(np.min(10 * np.log10(err0_a[valid] / err1_a[valid]))) if valid.any() else pooled
    return float(min(weights)), pooled, lower, fitted


def noise_sigma(images: np.ndarray) -> float:
    """Noise std of images (..., H, W) from the median absolute diagonal Haar detail over non-zero pixels."""
    x = np.asarray(images, np.float64)
    h, w = x.shape[-2] - x.shape[-2] % 2, x.shape[-1] - x.shape[-1] % 2
    x = x[..., :h, :w]
    a, b, c, d = x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]
    hh = (a - b - c + d) / 2
    inside = (a != 0) & (b != 0) & (c != 0) & (d != 0)
    vals = np.abs(hh[inside])
    return float(np.median(vals) / 0.6745) if vals.size >= 16 else 0.0


def edge_snr(images: np.ndarray, axes: tuple[int, ...]) -> float:
    """Power of the outer quarter (|k| >= 0.75 k_max) of the measured spectrum along ``axes`` (1 and/or 2)
    over the noise power.

    ``images`` (N, H, W) are the measured (low-resolution) images; with an orthonormal FFT white noise of std
    sigma has power sigma^2 per sample. Infinite when no noise is seen (zero backgrounds, noiseless data).
    """
    x = np.asarray(images, np.float64)
    sigma = noise_sigma(x)
    spec = np.fft.fftshift(np.fft.fftn(x, axes=axes, norm="ortho"), axes=axes)
    band = np.zeros(x.shape[1:], bool)
    for ax in axes:
        n = x.shape[ax]
        freq = np.abs(np.arange(n) - n // 2) / max(n / 2, 1)
        sel = freq >= 0.75
        shape = [1, 1]
        shape[ax - 1] = n
        band |= sel.reshape(shape)
    power = float(np.mean(np.abs(spec[:, band]) ** 2))
    return power / sigma**2 if sigma > 0 else math.inf


def margin_db(task: str) -> float:
    """The lower bound a scan's self-check must clear to be enhanced, for ``task`` (module docstring)."""
    return MARGIN_SAME_SCALE_DB if task == "sr_thick" else MARGIN_DB


def decide(r: torch.Tensor, e: torch.Tensor, snr: float = math.nan, margin_db: float = MARGIN_DB,
           seed: int = 0) -> GateDecision:
    """The gate's decision from the check residuals and the edge test (see the module docstring)."""
    w, pred, lower, fitted = cross_fit(r, e, seed)
    if np.isfinite(snr) and snr < EDGE_SNR_MIN:
        return GateDecision(0.0, pred, lower, fitted, snr,
                            f"{DECLINED} (measured band's edge at the noise floor: SNR {snr:.2f})", w)
    if not (lower > margin_db) or w <= 0:
        return GateDecision(0.0, pred, lower, fitted, snr,
                            f"{DECLINED} (held-out self-check gain {pred:+.2f} dB, "
                            f"lower bound {lower:+.2f} dB <= {margin_db:.2f} dB)", w)
    return GateDecision(w, pred, lower, fitted, snr, ENHANCED, w)


def combine(before: GateDecision, after: GateDecision) -> GateDecision:
    """The decision for an adapted network: enhance only where the original network's check (``before``) and
    the adapted network's held-out check (``after``) both pass, with the smaller weight."""
    w = min(before.candidate_weight, after.candidate_weight)
    if not before.enhanced:
        return dataclasses.replace(after, weight=0.0, candidate_weight=w,
                                   reason=f"{before.reason} (before adaptation)")
    if not after.enhanced:
        return dataclasses.replace(after, candidate_weight=w)
    return dataclasses.replace(after, weight=w, candidate_weight=w)
