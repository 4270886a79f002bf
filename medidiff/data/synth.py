"""Synthetic training subjects from the MNI152 template.

``synth_subject(seed)`` turns the shipped MNI152 T1 and its GM/WM maps (CSF and "other" tissue from the
head mask; ``medidiff.data.shipped``) into a new random "subject", all drawn from
``np.random.default_rng(seed)`` (global numpy/torch random state is never touched):

1. per-tissue contrast: T1-, T2-, PD-, FLAIR-like or random tissue intensities; non-brain tissue (scalp,
   skull, eyes, muscle) through a random transfer curve of the template's T1 intensity;
2. anatomy: a small random affine (rotation, scale, shift) plus a smooth elastic deformation (a coarse
   random displacement field of a few mm, expanded with Gaussian basis functions), resampled with
   ``scipy.ndimage.map_coordinates`` onto the head bounding box (or onto ``shape``, antialiased);
3. fine texture inside tissue (multiplicative correlated noise, per-tissue strength, zero for about a
   quarter of subjects so the model also sees scans with no fine detail to add);
4. random blur (resolution), a smooth multiplicative bias field, an intensity scale and Rician noise.

The nilearn template is brain-extracted, so subjects are brains without skull or scalp.
About 1.5-2 s per subject at full resolution (145x181x155 at 1 mm) and 0.8 s at 2 mm, on one core
(plus about 2 s once per process to load and crop the template).
``write_cohort(n, out_dir, seed)`` writes subjects as NIfTI (``medidiff data synth``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from medidiff.data.shipped import mni_head_mask, mni_t1, mni_tissue_maps
from medidiff.io import Volume, write_nifti

CONTRASTS = ("t1", "t2", "pd", "flair", "random")
_CONTRAST_P = (0.3, 0.25, 0.15, 0.1, 0.2)
# Relative tissue intensities (low, high) for (gm, wm, csf).
_TISSUE_RANGES = {
    "t1": ((0.45, 0.65), (0.85, 1.0), (0.03, 0.2)),
    "t2": ((0.45, 0.65), (0.28, 0.45), (0.85, 1.0)),
    "pd": ((0.7, 0.85), (0.55, 0.7), (0.75, 0.95)),
    "flair": ((0.6, 0.8), (0.4, 0.55), (0.03, 0.2)),
}
_MARGIN = 4  # voxels kept around the head bounding box in the cached template crop


@lru_cache(maxsize=1)
def _template() -> dict:
    """The cropped template stacks (t1n, gm, wm, csf, other), bounding box and affine; cached per process."""
    from scipy.ndimage import gaussian_filter

    t1 = mni_t1()
    maps = mni_tissue_maps()
    head = mni_head_mask()
    idx = np.argwhere(head)
    lo, hi = idx.min(0), idx.max(0) + 1
    c0 = np.maximum(lo - _MARGIN, 0)
    c1 = np.minimum(hi + _MARGIN, np.asarray(head.shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(c0, c1, strict=True))
    t1n = t1.array / max(float(np.percentile(t1.array[head], 99.5)), 1e-6)
    headf = gaussian_filter(head.astype(np.float32), 0.7)
    gm, wm, csf = (maps[k] for k in ("gm", "wm", "csf"))
    other = np.clip(headf - gm - wm - csf, 0, 1)
    stacks = {
        k: np.ascontiguousarray(a[sl], dtype=np.float32)
        for k, a in {"t1n": t1n, "gm": gm, "wm": wm, "csf": csf, "other": other}.items()
    }
    return {
        "stacks": stacks,
        "crop_origin": c0.astype(np.float64),
        "bbox_lo": lo.astype(np.float64),
        "bbox_size": (hi - lo).astype(np.int64),
        "affine": t1.affine.copy(),
        "spacing": np.asarray(t1.spacing, np.float64),
    }


def head_shape() -> tuple[int, int, int]:
    """Shape of a full-resolution synthetic subject (the template's head bounding box)."""
    return tuple(int(s) for s in _template()["bbox_size"])  # type: ignore[return-value]


def _contrast(rng: np.random.Generator, st: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Template-space image with random tissue contrast, and the texture-strength map."""
    kind = str(rng.choice(CONTRASTS, p=_CONTRAST_P))
    if kind == "random":
        c_gm, c_wm, c_csf = rng.uniform(0.03, 1.0, 3)
    else:
        c_gm, c_wm, c_csf = (rng.uniform(*r) for r in _TISSUE_RANGES[kind])
    # Non-brain tissue: a random piecewise-linear transfer curve of the template T1 intensity.
    knots_x = np.linspace(0.0, 1.2, 6)
    if kind == "t1":
        knots_y = np.clip(knots_x * rng.uniform(0.8, 1.1) + rng.normal(0, 0.08, 6), 0, 1.3)
    else:
        knots_y = rng.uniform(0.0, 1.1, 6)
    knots_y[0] = rng.uniform(0.0, 0.05)  # air/bone stays dark
    other = np.interp(st["t1n"], knots_x, knots_y).astype(np.float32)
    img = c_gm * st["gm"] + c_wm * st["wm"] + c_csf * st["csf"] + st["other"] * other
    mix = 0.0
    if kind == "t1":  # blend with the template's own (more detailed) T1 contrast
        mix = float(rng.uniform(0.0, 0.8))
        img = (1 - mix) * img + mix * np.clip(st["t1n"], 0, None) ** rng.uniform(0.7, 1.4)
    # Texture strength per tissue: none for ~25 % of subjects.
    strength = 0.0 if rng.random() < 0.25 else float(np.exp(rng.uniform(np.log(0.01), np.log(0.08))))
    s = strength * rng.uniform(0.5, 1.5, 4)
    tex = s[0] * st["gm"] + s[1] * st["wm"] + s[2] * st["csf"] + s[3] * st["other"]
    params = {
        "contrast": kind,
        "c_gm": float(c_gm),
        "c_wm": float(c_wm),
        "c_csf": float(c_csf),
        "t1_mix": mix,
        "texture": strength,
    }
    return img.astype(np.float32), tex.astype(np.float32), params


def _basis(n: int, k: int, step: float, lo: float) -> np.ndarray:
    """(n, k) normalised Gaussian basis over output samples for ``k`` control points spanning the grid."""
    x = lo + (np.arange(n) + 0.5) * step
    span = n * step
    centres = lo + np.linspace(0, span, k)
    width = span / (k - 1)
    b = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
    return (b / b.sum(axis=1, keepdims=True)).astype(np.float32)


def _coordinates(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    step: np.ndarray,
    lo: np.ndarray,
    spacing: np.ndarray,
) -> tuple[np.ndarray, dict]:
    """Template voxel coordinates (3, *shape) of each output voxel: random affine + elastic displacement."""
    ang = np.deg2rad(rng.normal(0, 4.0, 3))
    rot = np.eye(3)
    for axis, a in enumerate(ang):
        c, s = np.cos(a), np.sin(a)
        i, j = [q for q in range(3) if q != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    shift_mm = rng.uniform(-3, 3, 3)
    # In mm about the bounding-box centre: x_src = centre + R S (x - centre) + shift + elastic(x).
    m = rot * scale[None, :]  # acts on mm offsets
    axes_mm = [(lo[d] + (np.arange(shape[d]) + 0.5) * step[d] - 0.5) * spacing[d] for d in range(3)]
    centre = np.asarray([a.mean() for a in axes_mm])
    off = [a - c for a, c in zip(axes_mm, centre, strict=True)]
    k = 5
    amp = float(rng.uniform(0.5, 3.0))
    bases = [_basis(shape[d], k, step[d] * spacing[d], 0.0) for d in range(3)]
    coords = np.empty((3, *shape), np.float32)
    for i in range(3):
        ci = (
            centre[i]
            + shift_mm[i]
            + m[i, 0] * off[0][:, None, None]
            + m[i, 1] * off[1][None, :, None]
            + m[i, 2] * off[2][None, None, :]
        )
        coeff = rng.normal(0, amp, (k, k, k)).astype(np.float32)
        d = np.tensordot(bases[0], coeff, axes=(1, 0))  # (n0, k, k)
        d = np.tensordot(d, bases[1], axes=(1, 1))  # (n0, k, n1)
        d = np.tensordot(d, bases[2], axes=(1, 1))  # (n0, n1, n2)
        coords[i] = (ci + d) / spacing[i]
    params = {
        "rotation_deg": [float(a) for a in np.rad2deg(ang)],
        "scale": [float(s) for s in scale],
        "shift_mm": [float(s) for s in shift_mm],
        "elastic_mm": amp,
    }
    return coords, params


def synth_subject(seed: int, *, shape: tuple[int, int, int] | None = None) -> Volume:
    """A random synthetic MR "subject" (float32 Volume on the head bounding box of MNI152, 1 mm by default).

    ``shape`` resamples the same field of view onto another grid (e.g. half of ``head_shape()`` for a 2x
    faster, 2 mm subject); the affine gives the voxel size. Deterministic in ``seed``.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(seed)
    tpl = _template()
    st = tpl["stacks"]
    bbox = tpl["bbox_size"].astype(np.float64)
    out_shape = tuple(int(s) for s in (bbox if shape is None else shape))
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    step = bbox / np.asarray(out_shape, np.float64)  # template voxels per output voxel
    params: dict = {"seed": int(seed)}

    img, tex, p = _contrast(rng, st)
    params.update(p)
    sigma_aa = 0.5 * np.sqrt(np.clip(step**2 - 1.0, 0, None))
    if np.any(sigma_aa > 0.05):  # antialias before resampling onto a coarser grid
        img = gaussian_filter(img, sigma_aa, mode="nearest")
        tex = gaussian_filter(tex, sigma_aa, mode="nearest")

    coords, p = _coordinates(rng, out_shape, step, tpl["bbox_lo"], tpl["spacing"])
    params.update(p)
    coords -= tpl["crop_origin"][:, None, None, None].astype(np.float32)
    img = map_coordinates(img, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    tex = map_coordinates(tex, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    del coords

    if params["texture"] > 0:  # fine multiplicative texture, correlated over ~1 voxel
        t_sigma = float(rng.uniform(0.5, 1.3))
        t = gaussian_filter(rng.standard_normal(out_shape, dtype=np.float32), t_sigma)
        t /= max(float(t.std()), 1e-6)
        img *= np.clip(1.0 + tex * t, 0.0, None)
        params["texture_sigma"] = t_sigma

    blur = rng.uniform(0.0, 1.0, 3) * (rng.random(3) < 0.5)  # per-axis resolution loss (voxels)
    if np.any(blur > 0.05):
        img = gaussian_filter(img, blur, mode="constant")
    params["blur_sigma"] = [float(b) for b in blur]

    # Smooth bias field: exp of a random quadratic polynomial over the normalised grid.
    amp = float(rng.uniform(0.0, 0.4))
    ax = [np.linspace(-1, 1, n, dtype=np.float32) for n in out_shape]
    x, y, z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
    a = rng.normal(0, 1, 9) * amp / 3
    log_bias = a[0] * x + a[1] * y + a[2] * z + a[3] * x * y + a[4] * x * z + a[5] * y * z
    log_bias = log_bias + a[6] * (x**2 - 1 / 3) + a[7] * (y**2 - 1 / 3) + a[8] * (z**2 - 1 / 3)
    img *= np.exp(log_bias).astype(np.float32)
    params["bias_amplitude"] = amp

    gain = float(np.exp(rng.uniform(np.log(100.0), np.log(4000.0))))
    img *= gain / max(float(np.percentile(img[::2, ::2, ::2], 99.5)), 1e-6)
    noise_rel = 0.0 if rng.random() < 0.1 else float(rng.uniform(0.003, 0.03))
    if noise_rel > 0:  # Rician: magnitude of the image plus complex Gaussian noise
        sigma = np.float32(noise_rel * gain)
        re = img + sigma * rng.standard_normal(out_shape, dtype=np.float32)
        im = sigma * rng.standard_normal(out_shape, dtype=np.float32)
        img = np.sqrt(re * re + im * im)
    params.update(gain=gain, noise_rel=noise_rel)

    vox = np.diag([*step, 1.0])
    vox[:3, 3] = tpl["bbox_lo"] + 0.5 * step - 0.5  # output voxel centres in template voxel coordinates
    affine = tpl["affine"] @ vox
    meta = {"description": f"synthetic subject (seed {seed})", "modality": "MR", "synth": params}
    return Volume(np.ascontiguousarray(img, dtype=np.float32), affine, meta)


def cohort_seed(seed: int, i: int) -> int:
    """Seed of subject ``i`` of the cohort drawn with ``seed``."""
    return int(seed) * 100_000 + int(i)


def write_cohort(
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``n`` synthetic subjects as ``synth_<i>_seed<s>.nii.gz`` into ``out_dir``; return their paths."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        s = cohort_seed(seed, i)
        vol = synth_subject(s, shape=shape)
        paths.append(write_nifti(vol, out / f"synth_{i:04d}_seed{s}.nii.gz"))
        if progress is not None:
            progress(i + 1, n)
    return paths
