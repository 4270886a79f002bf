"""Per-patch hallucination flags: structure in the model-filled band that the measurement does not support.

In the spirit of the FDA's sFRC (Kc et al., "sFRC for assessing hallucinations in medical image
restoration", 2024): the image is cut into overlapping Hann-windowed patches (``patch`` px, ``stride`` px)
and each patch's spectrum is split into the *measured* band (what the degraded data determine; the
data-consistent classical image holds exactly this) and the *model-filled* band (what the network
invents). For SR x f the measured band is the central ``1/f`` of k-space along both plane axes; for
``sr_thick`` it is ``1/f`` along the thick (last) plane axis; for ``recon`` it is approximated by the disc of
radius ``1/f`` of Nyquist (the fully sampled centre is smaller, the random lines reach further). Two tests,
each giving an *unsupported* band energy and so an amplitude in image units:

* **support (any K)** — real structure that continues into the model-filled band (edges, texture seen at
  coarser scale) also has energy at the top of the measured band, where the classical image shows it.
  Unsupported energy ``H - support_ratio * M``: ``H`` the model-filled band energy of the enhanced patch,
  ``M`` the energy of the classical patch in the top octave of the measured band (``1/(2f)..1/f`` of
  Nyquist). A sharp edge gives ``H/M < 1``, a 1/k^2 texture about ``log2 f``, white texture
  ``(f^2 - 1) / 0.75``; ``support_ratio = 3`` sits above natural content and below invented texture.
* **agreement (K >= 2)** — independent posterior samples agree in the model-filled band where the
  measurement and the prior pin the content down and disagree where the model invents it. With ``C`` the
  mean cross-power of sample pairs and ``T`` the mean power in the band (``C / T`` is the band's Fourier
  ring correlation averaged over pairs), the unsupported energy is ``(T - C) - C (1 - t) / t``, positive
  exactly when ``C / T < t`` (``t = frc_threshold``, 0.5 as in sFRC).

A patch's score is its larger unsupported amplitude (RMS over the patch, image units) divided by
``min_amplitude`` times the robust intensity scale of the classical image; structure weaker than
``min_amplitude`` (2 % of the scale: about the noise level of clinical MR) is never flagged. Patch scores
are spread back to voxels with the same Hann weights (a partition of unity at 50 % overlap), and a voxel is
flagged where the score reaches 1. 3D inputs are analysed plane by plane across ``slice_axis``.

Within the measured band the enhanced image should equal the classical one; departures there are the
data-consistency residual, which the pipeline already writes, so they are not scored again here. Patch
energy is an RMS over the patch, so an isolated dot of a pixel or two is diluted in 32 px patches:
``patch=16, stride=8`` finds such dots at about the same false-flag rate on faithful output (see tests).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from medidiff.tasks import intensity_scale

__all__ = [
    "FRC_THRESHOLD",
    "MIN_AMPLITUDE",
    "SUPPORT_RATIO",
    "band_masks",
    "flag_precision_recall",
    "flag_scores",
    "flag_summary",
    "flags",
]

MIN_AMPLITUDE = 0.02  # fraction of the robust intensity scale
SUPPORT_RATIO = 3.0
FRC_THRESHOLD = 0.5
_GUARD_BINS = 1  # bins skipped above the measured edge: the Hann window's main lobe leaks into them
TASKS = ("sr", "sr_thick", "recon")


def band_masks(task: str, factor: float, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(model-filled band, top octave of the measured band) on a ``patch x patch`` ``np.fft.fft2`` grid."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    u = np.abs(np.fft.fftfreq(patch)) / 0.5  # fraction of Nyquist
    uy, ux = np.meshgrid(u, u, indexing="ij")
    if task == "sr":
        radius = np.maximum(uy, ux)
    elif task == "sr_thick":
        radius = ux
    else:
        radius = np.hypot(uy, ux)
    edge = 1.0 / factor
    guard = 2.0 * _GUARD_BINS / patch
    filled = radius > edge + guard
    upper = (radius > edge / 2) & (radius <= edge)
    if not filled.any() or not upper.any():
        raise ValueError(f"patch {patch} is too small to resolve the bands of {task} x{factor}")
    return filled, upper


def _window(patch: int) -> np.ndarray:
    """Periodic 2D Hann window: shifted copies at stride ``patch / 2`` sum to one."""
    w = np.hanning(patch + 1)[:-1]
    return np.outer(w, w)


def _patches(plane: np.ndarray, patch: int, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Overlapping patches ``(ny, nx, patch, patch)`` of the reflect-padded plane, and the padding.

    The padding is ``(top, left)``.
    """
    pad = patch // 2
    h, w = plane.shape
    extra_h = (-(h + 2 * pad - patch)) % stride
    extra_w = (-(w + 2 * pad - patch)) % stride
    padded = np.pad(plane, ((pad, pad + extra_h), (pad, pad + extra_w)), mode="reflect")
    return sliding_window_view(padded, (patch, patch))[::stride, ::stride], (pad, pad)


def _band_energy(spectra: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Sum of |F|^2 over the band, per patch."""
    return np.sum(np.abs(spectra[..., band]) ** 2, axis=-1)


def _plane_scores(
    enhanced: np.ndarray,
    classical: np.ndarray,
    samples: np.ndarray | None,
    filled: np.ndarray,
    upper: np.ndarray,
    patch: int,
    stride: int,
    floor: float,
    support_ratio: float,
    frc_threshold: float,
) -> np.ndarray:
    """Per-voxel score map of one 2D plane."""
    win = _window(patch)
    norm = float(np.sum(win**2))  # band energy / norm = mean square amplitude over the patch

    def spectra(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        p, pad = _patches(img.astype(np.float64), patch, stride)
        return np.fft.fft2(p * win, norm="ortho"), pad

    f_enh, pad = spectra(enhanced)
    f_cls, _ = spectra(classical)
    unsupported = _band_energy(f_enh, filled) - support_ratio * _band_energy(f_cls, upper)
    if samples is not None and len(samples) >= 2:
        k = len(samples)
        f_s = np.stack([spectra(s)[0][..., filled] for s in samples])  # (K, ny, nx, n_band)
        power = np.sum(np.abs(f_s) ** 2, axis=(0, -1))  # sum over samples and band
        total = np.sum(np.abs(f_s.sum(axis=0)) ** 2, axis=-1)
        cross = (total - power) / (k * (k - 1))  # mean pair cross-power
        spread = (k * power - total) / (k * (k - 1))  # T - C, summed sample variance
        disagreement = spread - cross * (1 - frc_threshold) / frc_threshold
        unsupported = np.maximum(unsupported, disagreement)
    score = np.sqrt(np.maximum(unsupported, 0.0) / norm) / floor  # (ny, nx)

    # Spread patch scores back with the Hann weights: overlap-add in stride-sized tiles, then divide by
    # the weights.
    ny, nx = score.shape
    m = patch // stride
    tiles = (win[None, None] * score[:, :, None, None]).reshape(ny, nx, m, stride, m, stride)
    wtiles = np.broadcast_to(win.reshape(m, stride, m, stride), (ny, nx, m, stride, m, stride))
    acc = np.zeros((ny + m - 1, nx + m - 1, stride, stride))
    wsum = np.zeros_like(acc)
    for a in range(m):
        for b in range(m):
            acc[a : a + ny, b : b + nx] += tiles[:, :, a, :, b, :]
            wsum[a : a + ny, b : b + nx] += wtiles[:, :, a, :, b, :]
    acc = acc.transpose(0, 2, 1, 3).reshape((ny + m - 1) * stride, (nx + m - 1) * stride)
    wsum = wsum.transpose(0, 2, 1, 3).reshape(acc.shape)
    h, w = enhanced.shape
    out = acc / np.maximum(wsum, 1e-12)
    return out[pad[0] : pad[0] + h, pad[1] : pad[1] + w]


def flag_scores(
    enhanced: np.ndarray,
    classical: np.ndarray,
    samples: np.ndarray | None = None,
    *,
    task: str = "sr",
    factor: float = 2,
    patch: int = 32,
    stride: int = 16,
    min_amplitude: float = MIN_AMPLITUDE,
    support_ratio: float = SUPPORT_RATIO,
    frc_threshold: float = FRC_THRESHOLD,
    slice_axis: int = -1,
    thick_axis: int = -1,
    scale: float | None = None,
) -> np.ndarray:
    """Per-voxel hallucination score (float32, same shape as ``enhanced``); >= 1 means flagged.

    ``samples``: optional ``(K, *enhanced.shape)`` posterior samples (used when K >= 2). 2D inputs are one
    plane (for ``sr_thick`` its last axis is the thick one). 3D inputs are analysed plane by plane across
    ``slice_axis``; for ``sr_thick`` the planes contain ``thick_axis`` (across ``slice_axis`` unless that is
    the thick axis, then across the first other axis). ``scale`` defaults to the classical image's robust
    intensity scale.
    """
    enhanced = np.asarray(enhanced)
    classical = np.asarray(classical)
    if enhanced.shape != classical.shape or enhanced.ndim not in (2, 3):
        raise ValueError(
            f"enhanced {enhanced.shape} and classical {classical.shape} must be one 2D or 3D shape"
        )
    if samples is not None:
        samples = np.asarray(samples)
        if samples.shape[1:] != enhanced.shape:
            raise ValueError(f"samples {samples.shape} must be (K, *{enhanced.shape})")
    if stride <= 0 or patch % stride or patch < 8:
        raise ValueError(f"need patch >= 8 and a stride dividing it, got patch {patch}, stride {stride}")
    filled, upper = band_masks(task, factor, patch)
    floor = min_amplitude * (intensity_scale(classical) if scale is None else float(scale))
    if not floor > 0 or not math.isfinite(floor):
        raise ValueError(f"min_amplitude * scale must be positive, got {floor}")
    args = (filled, upper, patch, stride, floor, support_ratio, frc_threshold)
    if enhanced.ndim == 2:
        return _plane_scores(enhanced, classical, samples, *args).astype(np.float32)
    across = slice_axis % 3
    if task == "sr_thick":
        thick = thick_axis % 3
        if across == thick:
            across = next(a for a in range(3) if a != thick)
        order = (across, next(a for a in range(3) if a not in (across, thick)), thick)
    else:
        order = (across, *(a for a in range(3) if a != across))
    enh = np.transpose(enhanced, order)
    cls = np.transpose(classical, order)
    smp = None if samples is None else np.transpose(samples, (0, *(a + 1 for a in order)))
    out = np.stack(
        [
            _plane_scores(enh[i], cls[i], None if smp is None else smp[:, i], *args)
            for i in range(enh.shape[0])
        ]
    )
    return np.transpose(out, np.argsort(order)).astype(np.float32)


def flags(
    enhanced: np.ndarray,
    classical: np.ndarray,
    samples: np.ndarray | None = None,
    **kwargs,
) -> np.ndarray:
    """Boolean per-voxel hallucination map: :func:`flag_scores` >= 1 (same keyword arguments)."""
    return flag_scores(enhanced, classical, samples, **kwargs) >= 1.0


def flag_summary(flag_map: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Fraction (and count) of body voxels flagged: the per-scan number for a manifest."""
    flag_map = np.asarray(flag_map, bool)
    body = np.ones(flag_map.shape, bool) if mask is None else np.asarray(mask, bool)
    n_body = int(body.sum())
    n_flagged = int((flag_map & body).sum())
    return {
        "flagged_fraction": n_flagged / n_body if n_body else 0.0,
        "flagged_voxels": float(n_flagged),
        "body_voxels": float(n_body),
    }


def flag_precision_recall(
    flag_map: np.ndarray, abs_err: np.ndarray, mask: np.ndarray | None = None, top: float = 0.05
) -> dict[str, float]:
    """Precision and recall of flagged voxels against the ``top`` fraction of largest-error body voxels."""
    flag_map = np.asarray(flag_map, bool)
    abs_err = np.asarray(abs_err)
    body = np.ones(flag_map.shape, bool) if mask is None else np.asarray(mask, bool)
    if flag_map.shape != abs_err.shape or body.shape != abs_err.shape:
        raise ValueError(f"flags {flag_map.shape}, abs_err {abs_err.shape}, mask {body.shape} must agree")
    if not 0 < top < 1:
        raise ValueError(f"top must lie in (0, 1), got {top}")
    err_body = abs_err[body]
    worst = abs_err >= np.quantile(err_body, 1 - top)
    worst &= body
    flagged = flag_map & body
    hit = int((flagged & worst).sum())
    n_flagged, n_worst = int(flagged.sum()), int(worst.sum())
    return {
        "precision": hit / n_flagged if n_flagged else math.nan,
        "recall": hit / n_worst if n_worst else math.nan,
        "flagged_fraction": n_flagged / int(body.sum()),
        "top": float(top),
    }
