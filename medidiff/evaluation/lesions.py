"""Lesion panel: are small lesions kept, and are lesion-like blobs invented?

Discs are planted into reference images (2D, or one plane of a 3D volume), the images are degraded and
restored with callables passed in (so evaluation never imports the pipeline), and per lesion:

* **contrast** ``mean(core) - mean(ring)``: core = within the lesion radius, ring = an annulus just outside
  it (gap of one voxel, plus twice the edge width for smooth edges; width ``max(radius, 2 voxels)``);
* **contrast kept** = enhanced (or classical) contrast / reference contrast, each paired with the same
  image made without the lesion (in the panel) so that the tissue under the lesion cancels;
* **CNR** = contrast / standard deviation of the ring, on the reference, the classical image (before) and
  the enhanced image (after).

Lesions: diameters in mm (default 2, 4, 8), contrasts as fractions of the local tissue mean (the ring mean
of the reference; default +-5 %, +-10 %, +-20 %, +-40 %), ``sharp`` edges (a one-voxel anti-aliased rim) or
``smooth`` ones (an erf profile of width a quarter of the diameter). Placement is seeded by the generator
passed in: inside the body mask, the whole ring at least ``margin_mm`` from its boundary, no two lesions
within reach of each other's ring, and among candidate positions the most homogeneous one (lowest
coefficient of variation of the reference in the lesion's neighbourhood), so lesions sit in tissue rather
than on its edges.

Invented blobs are counted by :func:`count_blobs` on ``enhanced - reference`` and ``classical - reference``
of the same scans *without* lesions: the scale-normalised determinant of the Hessian,
``4 s^2 sqrt(det H)`` (the amplitude of a Gaussian blob of matching width, near zero on ridges and edge
residue), at radii 1, 2 and 4 mm (``s = r / sqrt 2``); each voxel keeps its strongest scale, where both
principal curvatures must share a sign and differ by at most 2x (``min_roundness = 0.5``), and the response
must exceed ``z = 5`` robust standard deviations of the scale's ``-2 s^2 LoG`` response inside the body
(and ``min_amplitude`` when given); compact connected components (elongation <= 3) of each scale are
detections, and detections within reach of a larger-scale one (``|c1 - c2| <= r1 + r2``, same plane)
merge into one blob.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy import ndimage
from scipy.special import erfc
from skimage.measure import regionprops

from medidiff.evaluation.calibration import body_mask
from medidiff.tasks import intensity_scale

__all__ = [
    "CONTRASTS",
    "EDGES",
    "SIZES_MM",
    "Lesion",
    "count_blobs",
    "lesion_metrics",
    "plant_lesions",
    "run_lesion_panel",
    "summarise_lesions",
]

SIZES_MM = (2.0, 4.0, 8.0)
CONTRASTS = (-0.4, -0.2, -0.1, -0.05, 0.05, 0.1, 0.2, 0.4)
EDGES = ("sharp", "smooth")
_CANDIDATES = 48  # valid positions drawn per lesion; the most homogeneous one is kept
_TRIES = 4000


@dataclass(frozen=True)
class Lesion:
    """A planted disc: centre voxel, diameter, contrast vs local tissue, edge, and the plane it lies in."""

    center: tuple[int, ...]
    diameter_mm: float
    contrast: float  # fraction of the local tissue mean
    edge: str
    local_mean: float
    spacing_mm: tuple[float, ...]
    slice_axis: int | None = None  # None for a 2D image

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2

    @property
    def edge_width_mm(self) -> float:
        return self.diameter_mm / 4 if self.edge == "smooth" else 0.0

    @property
    def voxel_mm(self) -> float:
        return float(np.mean(self._plane_spacing()))

    def _plane_spacing(self) -> tuple[float, float]:
        sp = list(self.spacing_mm)
        if self.slice_axis is not None:
            sp.pop(self.slice_axis)
        return float(sp[0]), float(sp[1])

    def ring_mm(self) -> tuple[float, float]:
        """Inner and outer radius of the measurement ring."""
        inner = self.radius_mm + self.voxel_mm + 2 * self.edge_width_mm
        return inner, inner + max(self.radius_mm, 2 * self.voxel_mm)

    def reach_mm(self) -> float:
        """Radius beyond which the lesion and its ring leave the image untouched."""
        return max(self.ring_mm()[1], self.radius_mm + 3 * self.edge_width_mm)

    def window(self, shape: tuple[int, ...]) -> tuple[tuple[slice | int, ...], np.ndarray]:
        """Index of the lesion's neighbourhood in an image of ``shape``, and each voxel's distance (mm)."""
        sy, sx = self._plane_spacing()
        reach = self.reach_mm()
        plane_axes = [a for a in range(len(shape)) if a != self.slice_axis]
        index: list[slice | int] = [0] * len(shape)
        coords = []
        for axis, step in zip(plane_axes, (sy, sx), strict=False):
            c = self.center[axis]
            half = math.ceil(reach / step) + 1
            lo, hi = max(0, c - half), min(shape[axis], c + half + 1)
            index[axis] = slice(lo, hi)
            coords.append((np.arange(lo, hi) - c) * step)
        if self.slice_axis is not None:
            index[self.slice_axis] = self.center[self.slice_axis]
        dist = np.hypot(coords[0][:, None], coords[1][None, :])
        return tuple(index), dist

    def profile(self, dist: np.ndarray) -> np.ndarray:
        """Lesion shape 0..1 at distance ``dist`` (mm) from its centre (zero beyond :meth:`reach_mm`)."""
        if self.edge == "smooth":
            shape = 0.5 * erfc((dist - self.radius_mm) / (math.sqrt(2) * self.edge_width_mm))
        else:
            shape = np.clip((self.radius_mm - dist) / self.voxel_mm + 0.5, 0.0, 1.0)
        return np.where(dist <= self.reach_mm(), shape, 0.0)


def _ring_stats(image: np.ndarray, lesion: Lesion) -> tuple[float, float, float]:
    """(core mean, ring mean, ring std) of ``image`` around ``lesion``."""
    index, dist = lesion.window(image.shape)
    patch = np.asarray(image[index], dtype=np.float64)
    inner, outer = lesion.ring_mm()
    core = dist <= lesion.radius_mm
    if not core.any():
        core = dist <= dist.min()
    ring = (dist >= inner) & (dist <= outer)
    return float(patch[core].mean()), float(patch[ring].mean()), float(patch[ring].std(ddof=1))


def _plane_distance(mask: np.ndarray, spacing_mm: Sequence[float], slice_axis: int | None) -> np.ndarray:
    """Distance (mm) of each body voxel to the body's boundary within its plane."""
    if slice_axis is None:
        return ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    plane_sp = [s for a, s in enumerate(spacing_mm) if a != slice_axis]
    moved = np.moveaxis(mask, slice_axis, 0)
    dist = np.stack([ndimage.distance_transform_edt(m, sampling=plane_sp) for m in moved])
    return np.moveaxis(dist, 0, slice_axis)


def plant_lesions(
    image: np.ndarray,
    spacing_mm: Sequence[float],
    rng: np.random.Generator,
    sizes_mm: Sequence[float] = SIZES_MM,
    contrasts: Sequence[float] = CONTRASTS,
    edges: Sequence[str] = EDGES,
    *,
    mask: np.ndarray | None = None,
    slice_axis: int | None = None,
    margin_mm: float = 2.0,
    avoid: Sequence[Lesion] = (),
) -> tuple[np.ndarray, list[Lesion]]:
    """One lesion per (size, contrast, edge) planted into a copy of ``image``; the lesions placed.

    ``slice_axis`` (3D only; default: the axis of largest spacing) is the axis across which lesions are
    2D discs; ``avoid`` lists lesions already in the image. Raises ValueError when the body has no room left.
    """
    image = np.asarray(image, dtype=np.float32)
    spacing_mm = tuple(float(s) for s in spacing_mm)
    if len(spacing_mm) != image.ndim or image.ndim not in (2, 3):
        raise ValueError(f"need a 2D or 3D image with one spacing per axis, got {image.shape}, {spacing_mm}")
    if image.ndim == 3 and slice_axis is None:
        sp = np.asarray(spacing_mm)
        slice_axis = int(np.flatnonzero(np.isclose(sp, sp.max()))[-1])
    if image.ndim == 2:
        slice_axis = None
    for edge in edges:
        if edge not in EDGES:
            raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    body = body_mask(image) if mask is None else np.asarray(mask, bool)
    depth = _plane_distance(body, spacing_mm, slice_axis)
    out = image.copy()
    placed: list[Lesion] = list(avoid)
    world = np.asarray(spacing_mm)
    for size, contrast, edge in product(sizes_mm, contrasts, edges):
        probe = Lesion((0,) * image.ndim, float(size), float(contrast), edge, 0.0, spacing_mm, slice_axis)
        reach = probe.reach_mm()
        allowed = np.argwhere(depth >= reach + margin_mm)
        best, best_cv = None, math.inf
        found = 0
        for _ in range(_TRIES):
            if found >= _CANDIDATES or len(allowed) == 0:
                break
            center = tuple(int(v) for v in allowed[rng.integers(len(allowed))])
            if any(
                np.linalg.norm((np.subtract(center, p.center)) * world) < reach + p.reach_mm() + margin_mm
                for p in placed
            ):
                continue
            found += 1
            candidate = Lesion(center, float(size), float(contrast), edge, 0.0, spacing_mm, slice_axis)
            index, dist = candidate.window(image.shape)
            near = image[index][dist <= reach]
            cv = float(near.std() / max(abs(float(near.mean())), 1e-12))
            if cv < best_cv:
                best, best_cv = candidate, cv
        if best is None:
            raise ValueError(
                f"no room for a {size} mm lesion: {len(placed)} placed; use a larger image or fewer lesions"
            )
        _, local_mean, _ = _ring_stats(image, best)
        lesion = Lesion(
            best.center, best.diameter_mm, best.contrast, edge, local_mean, spacing_mm, slice_axis
        )
        index, dist = lesion.window(image.shape)
        out[index] += np.float32(contrast * local_mean) * lesion.profile(dist).astype(np.float32)
        placed.append(lesion)
    return out, placed[len(avoid) :]


def lesion_metrics(
    reference: np.ndarray,
    classical: np.ndarray,
    enhanced: np.ndarray,
    lesions: Iterable[Lesion],
    *,
    without: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[dict]:
    """Per lesion: contrast and CNR on the reference, classical and enhanced images, and contrast kept.

    ``without``: the same three images made from the scan *without* lesions. When given, each contrast is
    paired: ``(core - ring)`` with the lesion minus ``(core - ring)`` without it, so tissue structure under
    the lesion cancels and "kept" measures the lesion alone. CNR is always the plain
    ``(core - ring) / sd(ring)``.
    """
    images = {"reference": reference, "classical": classical, "enhanced": enhanced}
    rows = []
    for lesion in lesions:
        row: dict = {
            "diameter_mm": lesion.diameter_mm,
            "contrast": lesion.contrast,
            "edge": lesion.edge,
            "center": list(lesion.center),
        }
        for i, (name, img) in enumerate(images.items()):
            core, ring, ring_sd = _ring_stats(img, lesion)
            row[f"cnr_{name}"] = (core - ring) / ring_sd if ring_sd > 0 else math.nan
            if without is not None:
                core0, ring0, _ = _ring_stats(without[i], lesion)
                core, ring = core - core0, ring - ring0
            row[f"contrast_{name}"] = core - ring
        ref_c = row["contrast_reference"]
        for name in ("classical", "enhanced"):
            row[f"kept_{name}"] = row[f"contrast_{name}"] / ref_c if ref_c != 0 else math.nan
        rows.append(row)
    return rows


def _plane_hessian(
    image: np.ndarray, sigma: Sequence[float], plane_axes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-smoothed second derivatives (yy, xx, xy) over the two plane axes."""
    y_axis, x_axis = plane_axes

    def derivative(*axes: int) -> np.ndarray:
        order = [0] * image.ndim
        for a in axes:
            order[a] += 1
        return ndimage.gaussian_filter(image, sigma, order=order)

    return derivative(y_axis, y_axis), derivative(x_axis, x_axis), derivative(y_axis, x_axis)


def count_blobs(
    diff: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    radii_mm: Sequence[float] = (1.0, 2.0, 4.0),
    z: float = 5.0,
    min_amplitude: float = 0.0,
    max_elongation: float = 3.0,
    min_roundness: float = 0.5,
    slice_axis: int | None = None,
) -> int:
    """Number of compact bright or dark blobs in a difference image, inside ``mask``, counted per plane."""
    diff = np.asarray(diff, dtype=np.float64)
    mask = np.asarray(mask, bool)
    if diff.shape != mask.shape or len(spacing_mm) != diff.ndim:
        raise ValueError(f"diff {diff.shape}, mask {mask.shape}, spacing {tuple(spacing_mm)} must agree")
    if diff.ndim == 3 and slice_axis is None:
        sp = np.asarray(spacing_mm)
        slice_axis = int(np.flatnonzero(np.isclose(sp, sp.max()))[-1])
    plane_axes = [a for a in range(diff.ndim) if a != slice_axis]
    if not mask.any():
        return 0
    floor = 1e-3 * float(np.abs(diff[mask]).max())  # noise-free inputs: ignore numerical dust
    plane_sp = np.array([spacing_mm[a] for a in plane_axes])
    found: list[tuple[float, int, np.ndarray]] = []  # (radius mm, plane index, centre mm) per detection
    for radius in radii_mm:
        sigma = [0.0] * diff.ndim
        for a in plane_axes:
            sigma[a] = radius / math.sqrt(2) / spacing_mm[a]
        s2 = float(np.prod([sigma[a] for a in plane_axes]))  # sigma^2 in voxels (geometric mean)
        hyy, hxx, hxy = _plane_hessian(diff, sigma, plane_axes)
        laplacian = -2.0 * s2 * (hyy + hxx)  # -2 s^2 LoG: the amplitude of a matched Gaussian blob
        inside = laplacian[mask]
        noise = 1.4826 * float(np.median(np.abs(inside - np.median(inside))))
        # Determinant of the Hessian, as an amplitude: equal to the LoG one for a round blob, ~0 on ridges
        response = 4.0 * s2 * np.sqrt(np.clip(hyy * hxx - hxy**2, 0.0, None))
        half_gap = np.sqrt(((hyy - hxx) / 2) ** 2 + hxy**2)
        mean_curv = np.abs(hyy + hxx) / 2
        roundness = (mean_curv - half_gap) / np.maximum(mean_curv + half_gap, 1e-30)  # |l_min| / |l_max|
        passes = (roundness >= min_roundness) & (response > max(z * noise, min_amplitude, floor))
        passes &= mask
        planes = [passes] if slice_axis is None else list(np.moveaxis(passes, slice_axis, 0))
        for k, plane in enumerate(planes):
            labels, n = ndimage.label(plane)
            for region in regionprops(labels) if n else []:
                if region.axis_major_length / max(region.axis_minor_length, 1.0) <= max_elongation:
                    found.append((float(radius), k, np.asarray(region.centroid) * plane_sp))
    # One blob per cluster: a detection within reach of a larger-scale one (a rim of a big blob, the same
    # blob at a neighbouring scale) is part of it.
    kept: list[tuple[float, int, np.ndarray]] = []
    for radius, k, centre in sorted(found, key=lambda d: -d[0]):
        if not any(k == k2 and np.linalg.norm(centre - c2) <= radius + r2 for r2, k2, c2 in kept):
            kept.append((radius, k, centre))
    return len(kept)


def run_lesion_panel(
    cases: Iterable[tuple[str, np.ndarray, Sequence[float]]],
    enhance_fn: Callable[[np.ndarray], np.ndarray],
    classical_fn: Callable[[np.ndarray], np.ndarray],
    degrade_fn: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
    *,
    sizes_mm: Sequence[float] = SIZES_MM,
    contrasts: Sequence[float] = CONTRASTS,
    edges: Sequence[str] = EDGES,
    per_image: int | None = None,
    min_blob_amplitude: float = 0.05,
) -> dict:
    """The lesion panel over ``(name, reference, spacing_mm)`` cases.

    ``degrade_fn`` maps a reference to its measurement; ``classical_fn`` and ``enhance_fn`` map the
    measurement back to the reference grid. With ``per_image`` the lesions are split over several copies
    of a case (each degraded and restored on its own) so that small 2D images have room for all of them.
    Contrast kept is paired with the lesion-free images (see :func:`lesion_metrics`); blobs count only above
    ``min_blob_amplitude`` (5 %, the panel's faintest lesion) of the reference's robust intensity scale.
    Returns ``{"lesions": rows, "blobs": rows, "summary": summarise_lesions(rows)}``.
    """
    combos = list(product(sizes_mm, contrasts, edges))
    step = per_image or len(combos)
    lesion_rows: list[dict] = []
    blob_rows: list[dict] = []
    for name, reference, spacing in cases:
        reference = np.asarray(reference, dtype=np.float32)
        body = body_mask(reference)
        measured = degrade_fn(reference)
        without = (reference, classical_fn(measured), enhance_fn(measured))
        inner = ndimage.binary_erosion(body, iterations=2)
        floor = min_blob_amplitude * intensity_scale(reference)
        blob_rows.append(
            {
                "case": name,
                "enhanced": count_blobs(without[2] - reference, inner, spacing, min_amplitude=floor),
                "classical": count_blobs(without[1] - reference, inner, spacing, min_amplitude=floor),
            }
        )
        for start in range(0, len(combos), step):
            group = combos[start : start + step]
            with_lesions, lesions = _plant_group(reference, spacing, rng, group, body)
            measured = degrade_fn(with_lesions)
            rows = lesion_metrics(
                with_lesions, classical_fn(measured), enhance_fn(measured), lesions, without=without
            )
            lesion_rows += [{"case": name, **row} for row in rows]
    return {"lesions": lesion_rows, "blobs": blob_rows, "summary": summarise_lesions(lesion_rows, blob_rows)}


def _plant_group(
    reference: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    group: Sequence[tuple[float, float, str]],
    body: np.ndarray,
) -> tuple[np.ndarray, list[Lesion]]:
    """Plant the (size, contrast, edge) combinations of ``group``, one lesion each."""
    image, lesions = reference, []
    for size, contrast, edge in group:
        image, new = plant_lesions(image, spacing, rng, [size], [contrast], [edge], mask=body, avoid=lesions)
        lesions += new
    return image, lesions


def summarise_lesions(rows: Sequence[dict], blob_rows: Sequence[dict] = ()) -> dict:
    """Per (diameter, contrast) means, and the issue's targets.

    Targets: lesions >= 4 mm keep >= 90 % of their contrast; no lesion loses more contrast than the classical
    image loses it (2 points of tolerance); no more blobs in enhanced - reference than in
    classical - reference.
    """
    groups: dict[tuple[float, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["diameter_mm"], row["contrast"]), []).append(row)
    table = []
    for (size, contrast), members in sorted(groups.items()):
        entry = {"diameter_mm": size, "contrast": contrast, "n": len(members)}
        for key in ("kept_enhanced", "kept_classical", "cnr_reference", "cnr_classical", "cnr_enhanced"):
            entry[key] = float(np.nanmean([m[key] for m in members]))
        table.append(entry)
    large = [r["kept_enhanced"] for r in rows if r["diameter_mm"] >= 4]
    worse = [r for r in rows if max(0.0, 1 - r["kept_enhanced"]) > max(0.0, 1 - r["kept_classical"]) + 0.02]
    blobs_e = sum(b["enhanced"] for b in blob_rows)
    blobs_c = sum(b["classical"] for b in blob_rows)
    return {
        "table": table,
        "min_kept_ge_4mm": float(min(large)) if large else math.nan,
        "kept_ge_4mm_ok": bool(large) and min(large) >= 0.9,
        "lesions_worse_than_classical": len(worse),
        "blobs_enhanced": int(blobs_e),
        "blobs_classical": int(blobs_c),
        "blobs_ok": blobs_e <= blobs_c,
    }
