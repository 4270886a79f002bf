"""Anatomy-agnostic synthetic MR-like reference images, generated on the fly (SynthSeg-style).

``synthetic_image(rng, size)`` draws one 2D magnitude image from an explicit ``np.random.Generator``
(global random state is never touched). No anatomy is assumed, so a model trained on these images learns
what MR images have in common (piecewise-smooth tissue, partial-volume edges, bias, Rician noise, ringing)
rather than what one brain template looks like:

1. a pixel size drawn log-uniformly in 0.2-2 mm; every structure size below is drawn in millimetres, so the
   same structures appear from a few pixels to the whole field of view;
2. a random label map on a 2x oversampled grid: the argmax of smooth random fields (optionally stretched and
   rotated), thin curvilinear structures (a level set of another field) and random ellipses, star-shaped blobs
   and polygons at several scales, inside a random "body" outline (or filling the field of view);
3. per-label intensities from Gaussian mixtures of T1/T2/PD/FLAIR-like contrasts (or uniform), correlated
   multiplicative texture inside tissue (none in a quarter of images), partial volume (Gaussian smoothing of
   the boundaries) and a smooth multiplicative bias field;
4. down to the final grid through k-space: cropping the spectrum is truncation at exactly the final
   resolution (never coarser), with a random Tukey apodisation from none (full Gibbs ringing) to strong
   (almost none);
5. a random rotation by 90 degrees and flip, normalisation (99th percentile inside the body = 1), Rician
   noise over the configured SNR range, and a background that is either the Rician noise floor or exactly
   zero outside a slightly dilated body mask (as scanners mask real DICOM).

:func:`acquire` (steps 5) and the other small functions are shared with the natural-image and real-MR
sources. About 5-10 ms per 128x128 image on one core (``benchmarks/bench_data.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

#: Tissue-intensity Gaussian mixtures per contrast: (weight, mean, std) per component, relative to the
#: brightest tissue. Components stand for fluid, grey-matter-, white-matter-, fat-, muscle-like and dark
#: (tendon, bone, air) tissue; FLAIR adds bright lesion-like values.
CONTRAST_MIXTURES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "t1": ((0.25, 0.12, 0.06), (0.25, 0.5, 0.08), (0.2, 0.78, 0.07), (0.1, 0.97, 0.05), (0.2, 0.35, 0.07)),
    "t2": ((0.3, 0.95, 0.05), (0.25, 0.5, 0.08), (0.2, 0.33, 0.06), (0.1, 0.7, 0.08), (0.15, 0.1, 0.05)),
    "pd": ((0.25, 0.88, 0.06), (0.5, 0.65, 0.1), (0.25, 0.22, 0.08)),
    "flair": ((0.3, 0.07, 0.04), (0.3, 0.6, 0.08), (0.25, 0.45, 0.07), (0.15, 0.92, 0.06)),
}
CONTRASTS = (*CONTRAST_MIXTURES, "uniform")
_CONTRAST_P = (0.28, 0.28, 0.14, 0.12, 0.18)


@dataclass(frozen=True)
class AcquisitionConfig:
    """Noise and background of a reference image (shared by every source)."""

    snr: tuple[float, float] = (10.0, 120.0)  # 1 / noise std, the tissue 99th percentile being 1
    zero_background_p: float = 0.4  # chance that the background is exactly zero (scanner-masked)
    mask_dilation_px: tuple[int, int] = (0, 3)  # the scanner mask is the body dilated by this many pixels

    def __post_init__(self) -> None:
        lo, hi = self.snr
        if not 0 < lo <= hi:
            raise ValueError(f"snr must be a range 0 < low <= high, got {self.snr}")
        if not 0.0 <= self.zero_background_p <= 1.0:
            raise ValueError(f"zero_background_p must be in [0, 1], got {self.zero_background_p}")


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the synthetic-image generator (defaults cover clinical MR)."""

    pixel_mm: tuple[float, float] = (0.2, 2.0)
    labels: tuple[int, int] = (3, 10)  # smooth-field labels (shapes add up to 4 more)
    max_shapes: int = 12
    full_fov_p: float = 0.3  # chance that tissue fills the field of view (no background)
    texture_free_p: float = 0.25
    texture: tuple[float, float] = (0.02, 0.15)  # multiplicative texture amplitude per label
    bias: float = 0.35  # log-amplitude of the bias field
    partial_volume_px: tuple[float, float] = (0.2, 0.8)  # boundary smoothing, final pixels
    ringing_p: float = 0.5  # chance of little apodisation (visible Gibbs ringing)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)

    def __post_init__(self) -> None:
        lo, hi = self.pixel_mm
        if not 0 < lo <= hi:
            raise ValueError(f"pixel_mm must be a range 0 < low <= high, got {self.pixel_mm}")
        if not 2 <= self.labels[0] <= self.labels[1]:
            raise ValueError(f"labels must be a range 2 <= low <= high, got {self.labels}")


class SyntheticImage(NamedTuple):
    """One generated reference: the noisy image, its noise-free version, the body mask and the draws."""

    image: np.ndarray  # (H, W) float32 magnitude: what a scan would show
    clean: np.ndarray  # (H, W) float32 before noise and background masking
    body: np.ndarray  # (H, W) bool, where the object has signal
    params: dict


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A draw that is uniform in ``log`` between ``lo`` and ``hi``."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _gaussian_basis(n: int, cells: int) -> np.ndarray:
    """(n, cells) row-normalised Gaussian basis whose centres span the ``n`` samples (and a little beyond)."""
    centres = np.linspace(-0.5, n - 0.5, cells)
    width = (n / max(cells - 1, 1)) * 0.8
    b = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / width) ** 2)
    return (b / b.sum(axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's controller (installed with scikit-learn), or None."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _single_threaded_blas() -> AbstractContextManager:
    """BLAS limited to one thread: these matrices are small, and threads only contend (5x slower when the
    cores are shared with torch or other processes)."""
    ctl = _blas_controller()
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else nullcontext()


def smooth_fields(
    rng: np.random.Generator, count: int, shape: tuple[int, int], length_px: tuple[float, float]
) -> np.ndarray:
    """``count`` smooth random fields (count, H, W) of unit variance, correlated over ``length_px`` (y, x).

    Long correlation lengths: coarse Gaussian noise expanded with separable Gaussian bases (two small matrix
    products, at most 48 control points per axis). Short ones (under ~3 pixels): white noise filtered with
    a Gaussian of that width.
    """
    from scipy.ndimage import gaussian_filter

    if min(length_px) < 3.0:
        noise = rng.standard_normal((count, *shape), dtype=np.float32)
        sigma = (0.0, 0.5 * max(length_px[0], 0.5), 0.5 * max(length_px[1], 0.5))
        out = gaussian_filter(noise, sigma, mode="wrap", truncate=3.0)
    else:
        cells = [int(np.clip(np.ceil(n / ell), 1, 47)) + 1 for n, ell in zip(shape, length_px, strict=True)]
        by, bx = _gaussian_basis(shape[0], cells[0]), _gaussian_basis(shape[1], cells[1])
        coeff = rng.standard_normal((count, cells[0], cells[1]), dtype=np.float32)
        with _single_threaded_blas():
            out = by @ coeff @ bx.T
    return out / np.maximum(out.std(axis=(1, 2), keepdims=True), 1e-6)


def star_mask(
    shape: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    *,
    harmonics: int = 0,
    roughness: float = 0.0,
    aspect: float = 1.0,
) -> np.ndarray:
    """Boolean mask of a random star-shaped blob: an ellipse (aspect, random angle) whose radius varies with
    the polar angle by ``harmonics`` random cosines of total relative amplitude ``roughness``."""
    amp = rng.dirichlet(np.ones(harmonics)) * roughness if harmonics else np.zeros(0)
    phase = rng.uniform(0, 2 * np.pi, harmonics)
    angle = rng.uniform(0, np.pi)
    reach = radius * (1 + roughness) * max(aspect, 1 / aspect) + 1
    cy, cx = centre
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, shape[0])
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, shape[1])
    mask = np.zeros(shape, bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / aspect, (-s * dx + c * dy) * aspect
    rho = np.sqrt(u * u + v * v)
    r = np.full_like(rho, radius)
    if harmonics:
        theta = np.arctan2(v, u)
        for k in range(harmonics):
            r = r + radius * amp[k] * np.cos((k + 1) * theta + phase[k])
    mask[y0:y1, x0:x1] = rho <= r
    return mask


def _polygon_mask(
    shape: tuple[int, int], centre: tuple[float, float], radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of a random polygon (3-8 vertices at random angles and radii around ``centre``)."""
    from skimage.draw import polygon

    n = int(rng.integers(3, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = radius * rng.uniform(0.4, 1.0, n)
    rr, cc = polygon(centre[0] + rad * np.sin(ang), centre[1] + rad * np.cos(ang), shape)
    mask = np.zeros(shape, bool)
    mask[rr, cc] = True
    return mask


def random_label_map(
    rng: np.random.Generator, shape: tuple[int, int], pixel_mm: float, cfg: SynthConfig
) -> tuple[np.ndarray, int]:
    """Random labels (int16, -1 = outside the body) on ``shape`` at ``pixel_mm``, and the number of labels."""
    n_labels = int(rng.integers(cfg.labels[0], cfg.labels[1] + 1))
    length = log_uniform(rng, 4.0, 40.0) / pixel_mm  # correlation length of the partition, pixels
    stretch = log_uniform(rng, 1.0, 3.0) if rng.random() < 0.3 else 1.0
    fields = smooth_fields(rng, n_labels, shape, (length * stretch, length / stretch))
    fields += rng.normal(0.0, 0.5, (n_labels, 1, 1)).astype(np.float32)  # uneven label volumes
    labels = np.argmax(fields, axis=0).astype(np.int16)
    if stretch > 1.0:  # rotate stretched structures to a random orientation
        from scipy.ndimage import rotate

        labels = rotate(labels, rng.uniform(0, 180), reshape=False, order=0, mode="reflect")
    n_total = n_labels
    if rng.random() < 0.3:  # thin curvilinear structures (vessel- or sulcus-like): a thin level set
        line = smooth_fields(rng, 1, shape, (length, length))[0]
        width = rng.uniform(0.02, 0.08)
        labels[np.abs(line) < width] = n_total
        n_total += 1
    for _ in range(int(rng.integers(0, cfg.max_shapes + 1))):
        radius = log_uniform(rng, 0.5, 40.0) / pixel_mm
        if radius < 1.0 or radius > max(shape):
            continue
        centre = (rng.uniform(0, shape[0]), rng.uniform(0, shape[1]))
        kind = rng.random()
        if kind < 0.4:
            mask = star_mask(shape, centre, radius, rng, aspect=log_uniform(rng, 1.0, 3.0))
        elif kind < 0.8:
            mask = star_mask(
                shape, centre, radius, rng, harmonics=int(rng.integers(2, 6)),
                roughness=rng.uniform(0.1, 0.5), aspect=log_uniform(rng, 1.0, 2.0),
            )  # fmt: skip
        else:
            mask = _polygon_mask(shape, centre, radius, rng)
        label = int(rng.integers(0, n_labels + 4))
        labels[mask] = label
        n_total = max(n_total, label + 1)
    if rng.random() >= cfg.full_fov_p:  # a body outline; outside it there is no signal
        body_radius = log_uniform(rng, 30.0, 200.0) / pixel_mm
        if body_radius < 0.75 * max(shape):
            jitter = 0.15 * np.asarray(shape) * rng.uniform(-1, 1, 2)
            centre = (shape[0] / 2 + jitter[0], shape[1] / 2 + jitter[1])
            body = star_mask(
                shape, centre, body_radius, rng, harmonics=3, roughness=rng.uniform(0.0, 0.25),
                aspect=log_uniform(rng, 1.0, 1.6),
            )  # fmt: skip
            if body.mean() > 0.05:
                labels[~body] = -1
    return labels, n_total


def label_intensities(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    """Mean intensity of each of ``n`` labels (float32) drawn from one random contrast's mixture."""
    contrast = str(rng.choice(CONTRASTS, p=_CONTRAST_P))
    if contrast == "uniform":
        return rng.uniform(0.02, 1.0, n).astype(np.float32), contrast
    comp = np.asarray(CONTRAST_MIXTURES[contrast], np.float64)
    w = comp[:, 0] / comp[:, 0].sum()
    pick = rng.choice(len(comp), size=n, p=w)
    values = rng.normal(comp[pick, 1], comp[pick, 2])
    return np.clip(values, 0.01, 1.2).astype(np.float32), contrast


def bias_field(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative bias (float32, geometric mean about 1) with log-amplitude up to ``strength``."""
    amp = rng.uniform(0.0, strength)
    return np.exp(amp * smooth_fields(rng, 1, shape, (shape[0] / 2, shape[1] / 2))[0]).astype(np.float32)


def _tukey(n: int, taper: float) -> np.ndarray:
    """Tukey window over the ``n`` centred frequencies of an axis.

    1 in the middle, a cosine taper to 0 at the edge.
    """
    f = np.abs(np.fft.fftfreq(n)) * 2.0  # 0 at DC, 1 at Nyquist (numpy's unshifted order)
    if taper <= 0:
        return np.ones(n, np.float32)
    edge = 1.0 - taper
    w = np.where(f <= edge, 1.0, 0.5 * (1 + np.cos(np.pi * np.clip((f - edge) / taper, 0, 1))))
    return w.astype(np.float32)


def kspace_downsample(image: np.ndarray, size: tuple[int, int], taper: float = 0.0) -> np.ndarray:
    """Resample a real image onto a coarser ``size`` grid by cropping its spectrum (truncation at the new
    grid's Nyquist: Gibbs ringing at its full strength when ``taper`` = 0) with a Tukey apodisation."""
    h, w = image.shape
    n, m = size
    spec = np.fft.rfft2(image)
    rows = np.r_[0 : n // 2, h - n // 2 : h]
    spec = spec[rows, : m // 2 + 1]
    spec *= _tukey(n, taper)[:, None] * _tukey(m, taper)[None, : m // 2 + 1]
    return (np.fft.irfft2(spec, s=(n, m)) * (n * m / (h * w))).astype(np.float32)


def rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``clean`` plus complex Gaussian noise of std ``sigma`` per channel (Rician)."""
    re = clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)
    im = np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def normalise_tissue(clean: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``clean`` scaled so that its 99th percentile inside ``body`` is 1.

    The whole image counts when ``body`` is empty.
    """
    inside = clean[body] if body.any() else clean
    p99 = float(np.percentile(inside, 99)) if inside.size else 0.0
    return (clean / p99).astype(np.float32) if p99 > 0 else clean.astype(np.float32)


def acquire(
    clean: np.ndarray, body: np.ndarray, rng: np.random.Generator, cfg: AcquisitionConfig
) -> tuple[np.ndarray, dict]:
    """Noise and background of a real scan on a clean, normalised magnitude image.

    Rician noise with ``sigma = 1 / snr`` (``snr`` log-uniform in ``cfg.snr``); then, with probability
    ``cfg.zero_background_p`` and when there is background, every pixel outside the body dilated by a few
    pixels is set to exactly zero. Returns the image (float32, >= 0) and the draws.
    """
    from scipy.ndimage import binary_dilation

    snr = log_uniform(rng, *cfg.snr)
    image = rician(clean, 1.0 / snr, rng)
    zero = bool(rng.random() < cfg.zero_background_p) and not body.all()
    params: dict = {"snr": snr, "noise_sigma": 1.0 / snr, "background": "zero" if zero else "noise"}
    if zero:
        grow = int(rng.integers(cfg.mask_dilation_px[0], cfg.mask_dilation_px[1] + 1))
        kept = binary_dilation(body, iterations=grow) if grow > 0 else body
        image[~kept] = 0.0
        params["mask_dilation_px"] = grow
    params["background_fraction"] = float((image == 0).mean()) if zero else 0.0
    return image.astype(np.float32, copy=False), params


def random_orientation(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random rotation by a multiple of 90 degrees (180 for non-square arrays, to keep the shape)
    and optional flip applied to every array."""
    k, flip = int(rng.integers(0, 4)), bool(rng.random() < 0.5)
    if arrays and arrays[0].shape[0] != arrays[0].shape[1]:
        k = 2 * (k % 2)
    out = []
    for a in arrays:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def synthetic_image(
    rng: np.random.Generator, size: int | tuple[int, int] = 128, cfg: SynthConfig | None = None
) -> SyntheticImage:
    """One random synthetic reference image of ``size`` (see the module docstring for the steps)."""
    from scipy.ndimage import gaussian_filter

    cfg = cfg or SynthConfig()
    out_shape = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(out_shape) < 8 or any(s % 2 for s in out_shape):
        raise ValueError(f"size must be even and >= 8 pixels, got {size}")
    work = (2 * out_shape[0], 2 * out_shape[1])  # 2x oversampled grid: edges finer than the final pixel
    pixel_mm = log_uniform(rng, *cfg.pixel_mm)
    labels, n_labels = random_label_map(rng, work, pixel_mm / 2, cfg)
    means, contrast = label_intensities(rng, n_labels)
    body_work = labels >= 0
    lab = np.maximum(labels, 0)
    img = np.where(body_work, means[lab], np.float32(0.0))

    textured = rng.random() >= cfg.texture_free_p
    if textured:
        amp = rng.uniform(*cfg.texture, n_labels).astype(np.float32) * (rng.random(n_labels) < 0.8)
        grain_mm = log_uniform(rng, 0.3, 3.0)
        grain_px = max(grain_mm / (pixel_mm / 2), 0.7)
        tex = smooth_fields(rng, 1, work, (grain_px, grain_px))[0]
        img *= np.clip(1.0 + amp[lab] * tex, 0.0, None)
    pv_px = rng.uniform(*cfg.partial_volume_px)
    img = gaussian_filter(img, 2 * pv_px, mode="nearest")
    img *= bias_field(rng, work, cfg.bias)

    taper = rng.uniform(0.0, 0.3) if rng.random() < cfg.ringing_p else rng.uniform(0.5, 1.0)
    clean = kspace_downsample(img, out_shape, taper)
    body = body_work.reshape(out_shape[0], 2, out_shape[1], 2).mean(axis=(1, 3)) > 0.5
    clean, body = random_orientation(rng, clean, body)
    clean = np.abs(normalise_tissue(clean, body))  # magnitude: Gibbs undershoots fold back, as on a scanner
    image, acq = acquire(clean, body, rng, cfg.acquisition)
    params = {
        "pixel_mm": pixel_mm,
        "labels": n_labels,
        "contrast": contrast,
        "textured": textured,
        "partial_volume_px": pv_px,
        "apodisation_taper": taper,
        **acq,
    }
    return SyntheticImage(image, clean.astype(np.float32), body, params)
