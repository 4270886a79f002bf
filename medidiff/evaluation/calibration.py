"""Split-conformal calibration of the K-sample spread, and how well uncertainty tracks the error.

The sampler's per-voxel standard deviation ``sigma`` over K samples is a *relative* statement: it says
where the samples disagree, not how large the error is. Split-conformal calibration (Angelopoulos & Bates,
"A gentle introduction to conformal prediction", 2021; per-pixel intervals for image-to-image regression as
in Angelopoulos et al., ICML 2022) turns it into an interval with a stated coverage:

* on held-out calibration cases (reference known), every body voxel gives a score
  ``s = |error| / (sigma + eps)``, all intensities divided by the scan's robust scale
  (:func:`medidiff.tasks.intensity_scale`), so cases of different brightness pool;
* ``q`` is the ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile of the ``n`` scores (the finite-sample
  correction; ``inf`` when that rank exceeds ``n``);
* on a new scan the calibrated half-width is ``q * (sigma + eps * scale)``: ``|error| <= half-width`` holds
  for a fraction ``>= 1 - alpha`` of voxels, marginally over voxels of scans exchangeable with the
  calibration ones.

``eps`` is a floor that keeps voxels with ``sigma == 0`` (all samples equal, or K = 1) from getting a zero
width. It is a fraction of the robust intensity scale, chosen on the calibration set from
:data:`EPSILON_GRID` as the value that gives the narrowest mean interval at the requested coverage (a
choice among a handful of values over millions of voxels, so its optimism is negligible); pass
``epsilon=`` to fix it.

The result is a frozen :class:`Calibration`, stored as ``calibration.json`` beside a model's ``config.json``
(:func:`save_calibration` / :func:`load_calibration`); calibrations for other sample counts K sit beside it as
``calibration_k<K>.json``, and a run with K samples uses the one made with K where there is one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import pearsonr, spearmanr
from skimage.filters import threshold_otsu

from medidiff.io import atomic
from medidiff.tasks import intensity_scale

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_LEVELS",
    "EPSILON_GRID",
    "Calibration",
    "CalibrationCase",
    "apply",
    "assess",
    "body_mask",
    "calibrate",
    "conformal_quantile",
    "empirical_coverage",
    "calibration_path",
    "load_calibration",
    "make_case",
    "reliability_curve",
    "save_calibration",
    "scan_level_agreement",
    "uncertainty_error_spearman",
]

CALIBRATION_FILE = "calibration.json"
EPSILON_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # fractions of the robust intensity scale
DEFAULT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
_SELECTION_VOXELS = 200_000  # scores used to choose eps (the quantile itself uses every voxel)


def body_mask(image: np.ndarray, smoothing_px: float = 1.5, slice_axis: int = -1) -> np.ndarray:
    """Where the image has signal: Otsu threshold of the Gaussian-smoothed magnitude, holes filled.

    Made from the image itself (not the reference), so it can be used on any scan. Holes are filled in
    n-D and then slice by slice along ``slice_axis`` (3D input), and specks smaller than 1 % of the largest
    component are dropped. An image without contrast gives an all-true mask.
    """
    mag = np.abs(np.asarray(image, dtype=np.float64))
    smooth = ndimage.gaussian_filter(mag, smoothing_px)
    if not np.ptp(smooth) > 0:
        return np.ones(mag.shape, bool)
    mask = smooth > threshold_otsu(smooth.ravel())
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.01 * sizes.max()))
    mask = ndimage.binary_fill_holes(mask)
    if mask.ndim == 3:
        moved = np.moveaxis(mask, slice_axis, 0)
        moved = np.stack([ndimage.binary_fill_holes(s) for s in moved])
        mask = np.moveaxis(moved, 0, slice_axis)
    return mask


@dataclass(frozen=True)
class CalibrationCase:
    """One held-out scan: its K-sample spread, absolute error vs the reference, body mask, intensity scale."""

    name: str
    std: np.ndarray = field(repr=False)
    abs_err: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.std.shape == self.abs_err.shape == self.mask.shape):
            raise ValueError(
                f"case {self.name!r}: std {self.std.shape}, abs_err {self.abs_err.shape} and mask "
                f"{self.mask.shape} must have one shape"
            )
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"case {self.name!r}: scale must be positive and finite, got {self.scale}")
        if not np.any(self.mask):
            raise ValueError(f"case {self.name!r}: the body mask is empty")


def make_case(
    name: str,
    enhanced: np.ndarray,
    reference: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    scale: float | None = None,
) -> CalibrationCase:
    """A case from an enhanced scan, its reference and its K-sample std.

    Mask and scale default to those of the enhanced image; pass ``scale`` to use the one the pipeline
    normalised with, so that calibration and :func:`apply` see the same number.
    """
    enhanced = np.asarray(enhanced, dtype=np.float32)
    return CalibrationCase(
        name=name,
        std=np.asarray(std, dtype=np.float32),
        abs_err=np.abs(enhanced - np.asarray(reference, dtype=np.float32)),
        mask=body_mask(enhanced) if mask is None else np.asarray(mask, bool),
        scale=intensity_scale(enhanced) if scale is None else float(scale),
    )


@dataclass(frozen=True)
class Calibration:
    """A calibrated spread.

    The half-width ``quantile * (std + epsilon * scale)`` covers ``coverage`` of voxels.
    """

    coverage: float
    quantile: float
    epsilon: float  # fraction of the scan's robust intensity scale
    samples_k: int
    task: str
    n_cases: int
    n_voxels: int
    cases: list[str]

    def to_json(self) -> str:
        """The calibration as JSON (``inf`` quantiles are written as null)."""
        data = asdict(self)
        if not math.isfinite(self.quantile):
            data["quantile"] = None
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["quantile"] = math.inf if data["quantile"] is None else float(data["quantile"])
        data["cases"] = list(data["cases"])
        return cls(**data)

    def describe(self) -> str:
        """One line for a NIfTI description, a DICOM DerivationDescription or a manifest."""
        return (
            f"{100 * self.coverage:g}% interval half-width (split-conformal, {self.task}, "
            f"K={self.samples_k}, {self.n_cases} calibration cases)"
        )


def calibration_path(directory: str | Path, samples_k: int | None = None) -> Path:
    """``calibration.json`` (the model's default calibration) or, with ``samples_k``, the file of the
    calibration made with that many samples, ``calibration_k<K>.json``."""
    name = CALIBRATION_FILE if samples_k is None else f"calibration_k{int(samples_k)}.json"
    return Path(directory) / name


def save_calibration(calib: Calibration, directory: str | Path, default: bool = True) -> Path:
    """Write the calibration into ``directory`` (a model's folder, beside ``config.json``): as the model's
    default ``calibration.json`` (which supersedes a ``calibration_k<K>.json`` of the same K), or with
    ``default=False`` as ``calibration_k<K>.json`` for runs with its K."""
    path = calibration_path(directory, None if default else calib.samples_k)
    written = atomic.write_text(path, calib.to_json())
    if default:
        calibration_path(directory, calib.samples_k).unlink(missing_ok=True)
    return written


def load_calibration(directory: str | Path, samples_k: int | None = None) -> Calibration | None:
    """The calibration stored in ``directory``, or None when the model has none.

    With ``samples_k``: the calibration made with that many samples where the folder has one (the default
    file's or a ``calibration_k<K>.json``), else the default one."""
    default = calibration_path(directory)
    calib = Calibration.from_json(default.read_text()) if default.exists() else None
    if samples_k is not None and (calib is None or calib.samples_k != samples_k):
        per_k = calibration_path(directory, samples_k)
        if per_k.exists():
            return Calibration.from_json(per_k.read_text())
    return calib


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ``ceil((n + 1) coverage)``-th smallest score (``inf`` when that rank exceeds ``n``)."""
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must lie in (0, 1), got {coverage}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = scores.size
    if n == 0:
        raise ValueError("conformal_quantile needs at least one score")
    rank = math.ceil((n + 1) * coverage)
    if rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


def _normalised(cases: Sequence[CalibrationCase]) -> tuple[np.ndarray, np.ndarray]:
    """Body-voxel std and |error| of all cases, each divided by its case's scale (float64, 1D)."""
    std = np.concatenate([c.std[c.mask].astype(np.float64) / c.scale for c in cases])
    err = np.concatenate([c.abs_err[c.mask].astype(np.float64) / c.scale for c in cases])
    return std, err


def _choose_epsilon(std: np.ndarray, err: np.ndarray, coverage: float) -> float:
    """The grid value of eps giving the narrowest mean calibrated half-width (on a strided subsample)."""
    step = max(1, std.size // _SELECTION_VOXELS)
    std_s, err_s = std[::step], err[::step]
    widths = []
    for eps in EPSILON_GRID:
        q = conformal_quantile(err_s / (std_s + eps), coverage)
        widths.append(q * float(np.mean(std_s + eps)))
    return float(EPSILON_GRID[int(np.argmin(widths))])


def calibrate(
    cases: Iterable[CalibrationCase],
    coverage: float = 0.9,
    *,
    epsilon: float | None = None,
    samples_k: int = 1,
    task: str = "",
) -> Calibration:
    """Split-conformal quantile of ``|error| / (std + eps)`` over the body voxels of the calibration cases."""
    cases = list(cases)
    if not cases:
        raise ValueError("calibrate needs at least one calibration case")
    std, err = _normalised(cases)
    eps = _choose_epsilon(std, err, coverage) if epsilon is None else float(epsilon)
    if eps < 0:
        raise ValueError(f"epsilon must be >= 0, got {eps}")
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(err == 0, 0.0, err / (std + eps))
    return Calibration(
        coverage=float(coverage),
        quantile=conformal_quantile(scores, coverage),
        epsilon=eps,
        samples_k=int(samples_k),
        task=task,
        n_cases=len(cases),
        n_voxels=int(scores.size),
        cases=[c.name for c in cases],
    )


def apply(calib: Calibration, std: np.ndarray, scale: float) -> np.ndarray:
    """Calibrated per-voxel half-width ``q * (std + eps * scale)`` (float32, the image's units)."""
    std = np.asarray(std, dtype=np.float32)
    return (calib.quantile * (std + np.float32(calib.epsilon * scale))).astype(np.float32)


def empirical_coverage(halfwidth: np.ndarray, abs_err: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of (body) voxels whose absolute error lies within the half-width."""
    halfwidth, abs_err = np.asarray(halfwidth), np.asarray(abs_err)
    if halfwidth.shape != abs_err.shape:
        raise ValueError(f"half-width {halfwidth.shape} and abs_err {abs_err.shape} differ in shape")
    inside = abs_err <= halfwidth
    return float(inside[np.asarray(mask, bool)].mean() if mask is not None else inside.mean())


def reliability_curve(
    calibration_cases: Sequence[CalibrationCase],
    test_cases: Sequence[CalibrationCase],
    levels: Sequence[float] = DEFAULT_LEVELS,
    *,
    epsilon: float | None = None,
) -> list[dict[str, float]]:
    """Nominal vs empirical coverage on ``test_cases``, calibrating at each level on ``calibration_cases``.

    ``eps`` is chosen once (at 90 %, unless given) so the curve shows the quantile alone at work.
    """
    std_c, err_c = _normalised(calibration_cases)
    eps = _choose_epsilon(std_c, err_c, 0.9) if epsilon is None else float(epsilon)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores_c = np.where(err_c == 0, 0.0, err_c / (std_c + eps))
    std_t, err_t = _normalised(test_cases)
    rows = []
    for level in levels:
        q = conformal_quantile(scores_c, level)
        rows.append(
            {"nominal": float(level), "empirical": float(np.mean(err_t <= q * (std_t + eps))), "quantile": q}
        )
    return rows


def uncertainty_error_spearman(
    uncertainty: np.ndarray, abs_err: np.ndarray, mask: np.ndarray, max_voxels: int = 200_000
) -> float:
    """Spearman rank correlation of per-voxel uncertainty and |error| inside the mask (strided subsample)."""
    u = np.asarray(uncertainty)[np.asarray(mask, bool)]
    e = np.asarray(abs_err)[np.asarray(mask, bool)]
    step = max(1, u.size // max_voxels)
    if u.size < 3 or np.ptp(u) == 0 or np.ptp(e) == 0:
        return math.nan
    return float(spearmanr(u[::step], e[::step]).statistic)


def scan_level_agreement(cases: Sequence[CalibrationCase], calib: Calibration | None = None) -> dict:
    """Per-scan mean uncertainty vs per-scan mean |error| (body voxels), and their correlation across scans.

    With ``calib`` the uncertainty is the calibrated half-width, otherwise the raw std.
    """
    rows = []
    for c in cases:
        unc = apply(calib, c.std, c.scale) if calib is not None else c.std
        rows.append(
            {
                "case": c.name,
                "mean_uncertainty": float(np.mean(unc[c.mask])),
                "mean_abs_error": float(np.mean(c.abs_err[c.mask])),
            }
        )
    u = np.array([r["mean_uncertainty"] for r in rows])
    e = np.array([r["mean_abs_error"] for r in rows])
    ok = len(rows) >= 3 and np.ptp(u) > 0 and np.ptp(e) > 0
    return {
        "cases": rows,
        "spearman": float(spearmanr(u, e).statistic) if ok else math.nan,
        "pearson": float(pearsonr(u, e).statistic) if ok else math.nan,
    }


def assess(calib: Calibration, cases: Sequence[CalibrationCase]) -> dict:
    """Everything the report states about a calibration on held-out cases (never the calibration ones)."""
    overlap = sorted(set(calib.cases) & {c.name for c in cases})
    if overlap:
        raise ValueError(f"held-out cases overlap the calibration set: {overlap}")
    per_case = []
    inside = total = 0
    for c in cases:
        hw = apply(calib, c.std, c.scale)
        hit = c.abs_err[c.mask] <= hw[c.mask]
        inside += int(hit.sum())
        total += hit.size
        per_case.append(
            {
                "case": c.name,
                "coverage": float(hit.mean()),
                "mean_halfwidth": float(hw[c.mask].mean()),
                "spearman": uncertainty_error_spearman(c.std, c.abs_err, c.mask),
            }
        )
    std, err = _normalised(cases)
    return {
        "nominal": calib.coverage,
        "coverage": inside / total,
        "spearman": uncertainty_error_spearman(std, err, np.ones(std.shape, bool)),
        "per_case": per_case,
        "scans": scan_level_agreement(cases, calib),
    }
