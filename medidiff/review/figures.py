"""Review figures: oriented slices of a scan's before / enhanced / difference / uncertainty, one layout.

Every slice is taken from the volume reoriented to the closest RAS+ grid, so what is on screen follows the
anatomy whatever the voxel order on disk. Panels are sized in millimetres (the affine's spacing), so
anisotropic voxels keep their true aspect; each panel carries orientation labels and a colour bar with units.
Colour maps are fixed: grey for anatomy, a diverging map for differences, a perceptual map for uncertainty.
Intensity limits are computed once per volume (never per slice) so that slices can be compared honestly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medidiff.io import atomic
from medidiff.io.volume import Volume

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
CONVENTIONS: tuple[str, ...] = ("radiological", "neurological")

ANATOMY_CMAP = "gray"
DIFFERENCE_CMAP = "RdBu_r"
UNCERTAINTY_CMAP = "magma"
OVERLAY_COLOUR = "#00e5ff"
FLAGS_COLOUR = "#ff2020"  # hallucination flags: red fill and contour on the enhanced image

_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_POSITIVE = ("R", "A", "S")  # direction each axis of a RAS+ array increases towards
# view -> (fixed axis, horizontal axis, vertical axis, vertical screen-down direction)
_VIEW_AXES = {"axial": (2, 0, 1, "P"), "coronal": (1, 0, 2, "I"), "sagittal": (0, 1, 2, "I")}


class ReviewError(ValueError):
    """Volumes that cannot be shown together (different grids, wrong view name, ...)."""


@dataclass(frozen=True)
class SliceView:
    """One 2D slice in screen order (row 0 at the top), with the geometry needed to draw it truthfully."""

    image: np.ndarray  # (rows, cols) float32
    extent: tuple[float, float, float, float]  # imshow extent in mm: (left, right, bottom, top), origin upper
    labels: dict[str, str]  # anatomical direction at the screen's left / right / top / bottom
    view: str
    index: int
    count: int
    position_mm: float  # world coordinate (mm) of the slice centre along the fixed axis
    pixel_spacing: tuple[float, float]  # (row, column) spacing in mm
    oblique_deg: float  # how far the voxel grid is from the RAS grid it was snapped to


def canonical(vol: Volume) -> Volume:
    """The volume on the closest RAS+ voxel order (a flip/transpose view; no resampling)."""
    import nibabel as nib
    from nibabel import orientations as ornt

    current = ornt.io_orientation(vol.affine)
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(("R", "A", "S")))
    array = ornt.apply_orientation(vol.array, transform)
    affine = vol.affine @ ornt.inv_ornt_aff(transform, vol.array.shape)
    if tuple(nib.aff2axcodes(affine)) != _POSITIVE:  # pragma: no cover - nibabel guarantees this
        raise ReviewError(f"could not reorient a volume with affine\n{vol.affine}\nto RAS")
    return Volume(np.asarray(array, dtype=np.float32), affine, dict(vol.meta))


def _check_view(view: str, convention: str) -> None:
    if view not in VIEWS:
        raise ReviewError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    if convention not in CONVENTIONS:
        raise ReviewError(
            f"unknown display convention {convention!r}; choose one of {', '.join(CONVENTIONS)}"
        )


def orientation_labels(view: str, convention: str = "radiological") -> dict[str, str]:
    """Anatomical direction at each screen edge for a view of a RAS-reoriented volume.

    Radiological convention puts the patient's right on the screen's left (axial, coronal); sagittal views put
    anterior on the left in both conventions.
    """
    _check_view(view, convention)
    down = _VIEW_AXES[view][3]
    if view == "sagittal":
        right = "P"
    else:
        right = "L" if convention == "radiological" else "R"
    return {"left": _OPPOSITE[right], "right": right, "top": _OPPOSITE[down], "bottom": down}


def useful_views(vol: Volume) -> tuple[str, ...]:
    """Views whose slices are 2D images; all if none are.

    A single-slice scan has only its acquisition plane.
    """
    shape = canonical(vol).shape
    views = tuple(v for v in VIEWS if shape[_VIEW_AXES[v][1]] > 1 and shape[_VIEW_AXES[v][2]] > 1)
    return views or VIEWS


def slice_count(vol: Volume, view: str) -> int:
    """Number of slices of a RAS-reoriented volume along a view's fixed axis."""
    _check_view(view, "radiological")
    return int(canonical(vol).shape[_VIEW_AXES[view][0]])


def oriented_slice(
    vol: Volume, view: str = "axial", index: int | None = None, convention: str = "radiological",
    *, assume_canonical: bool = False,
) -> SliceView:
    """Slice ``index`` (middle by default) of ``vol`` along ``view``, oriented for the screen.

    ``index`` counts along the RAS-reoriented axis (0 = most left / posterior / inferior).
    Pass ``assume_canonical=True`` when ``vol`` already came out of :func:`canonical` (saves the work).
    """
    import nibabel as nib

    _check_view(view, convention)
    cvol = vol if assume_canonical else canonical(vol)
    fixed, horizontal, vertical, _ = _VIEW_AXES[view]
    count = cvol.shape[fixed]
    index = count // 2 if index is None else int(index)
    if not 0 <= index < count:
        raise ReviewError(f"{view} slice {index} is outside 0..{count - 1}")
    labels = orientation_labels(view, convention)
    plane = np.take(cvol.array, index, axis=fixed).T  # rows = vertical axis, cols = horizontal axis
    if labels["right"] != _POSITIVE[horizontal]:
        plane = plane[:, ::-1]
    if labels["bottom"] != _POSITIVE[vertical]:
        plane = plane[::-1, :]
    spacing = cvol.spacing
    row_mm, col_mm = spacing[vertical], spacing[horizontal]
    rows, cols = plane.shape
    centre = np.array([(s - 1) / 2.0 for s in cvol.shape] + [1.0])
    centre[fixed] = index
    position = float((cvol.affine @ centre)[fixed])
    oblique = float(np.degrees(np.max(nib.affines.obliquity(cvol.affine))))
    return SliceView(
        image=np.ascontiguousarray(plane, dtype=np.float32),
        extent=(0.0, cols * col_mm, rows * row_mm, 0.0),
        labels=labels, view=view, index=index, count=count, position_mm=position,
        pixel_spacing=(row_mm, col_mm), oblique_deg=oblique,
    )


# ----------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class DisplayLimits:
    """Intensity limits for a whole scan, computed once so that every slice is shown on the same scale."""

    window: float
    level: float
    difference_max: float
    uncertainty_max: float | None
    uncertainty_threshold: float | None  # voxels above it are highlighted
    overlay_percentile: float | None

    @property
    def anatomy_range(self) -> tuple[float, float]:
        """(vmin, vmax) of the grey panels."""
        return window_range(self.window, self.level)


def window_range(window: float, level: float) -> tuple[float, float]:
    """(vmin, vmax) of a window/level pair."""
    half = max(float(window), 1e-12) / 2.0
    return float(level) - half, float(level) + half


def _sample(array: np.ndarray, max_voxels: int = 2_000_000) -> np.ndarray:
    """A deterministic strided subsample of a large array (percentiles of 10^7 voxels are slow)."""
    flat = np.asarray(array, dtype=np.float32).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size > max_voxels:
        flat = flat[:: int(np.ceil(flat.size / max_voxels))]
    return flat if flat.size else np.zeros(1, np.float32)


def default_window(vol: Volume, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """(window, level) spanning the ``low``..``high`` intensity percentiles of the volume."""
    lo, hi = np.percentile(_sample(vol.array), [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(hi - lo), float((hi + lo) / 2.0)


def display_limits(
    before: Volume, enhanced: Volume, uncertainty: Volume | None = None, *,
    window: float | None = None, level: float | None = None, overlay_percentile: float | None = 95.0,
) -> DisplayLimits:
    """Volume-wide limits: window/level from the enhanced scan, symmetric difference range, uncertainty range.

    The high-uncertainty threshold is the ``overlay_percentile`` of the uncertainty over the whole volume.
    """
    check_same_grid({"before": before, "enhanced": enhanced, "uncertainty": uncertainty})
    auto_window, auto_level = default_window(enhanced)
    diff = _sample(enhanced.array - before.array)
    diff_max = float(np.percentile(np.abs(diff), 99.5)) or float(np.abs(diff).max()) or 1.0
    unc_max = threshold = None
    if uncertainty is not None:
        sd = _sample(uncertainty.array)
        unc_max = float(np.percentile(sd, 99.5)) or float(sd.max()) or 1.0
        if overlay_percentile is not None:
            threshold = float(np.percentile(sd, overlay_percentile))
    return DisplayLimits(
        window=auto_window if window is None else float(window),
        level=auto_level if level is None else float(level),
        difference_max=diff_max, uncertainty_max=unc_max, uncertainty_threshold=threshold,
        overlay_percentile=overlay_percentile if uncertainty is not None else None,
    )


def check_same_grid(volumes: Mapping[str, Volume | None]) -> None:
    """Raise :class:`ReviewError` unless all given volumes share one shape and affine."""
    named = [(name, v) for name, v in volumes.items() if v is not None]
    if not named:
        return
    ref_name, ref = named[0]
    for name, vol in named[1:]:
        if vol.shape != ref.shape or not np.allclose(vol.affine, ref.affine, atol=1e-4):
            raise ReviewError(
                f"{name} (shape {vol.shape}) is not on the grid of {ref_name} (shape {ref.shape}); "
                "review panels must share one voxel grid"
            )


# ---------------------------------------------------------------------------------------------- drawing
def _outline(text: Any) -> None:
    text.set_path_effects([patheffects.withStroke(linewidth=2.5, foreground="black")])


def draw_slice(
    ax: Any, sl: SliceView, *, cmap: str, vmin: float, vmax: float, title: str | None = None,
    labels: bool = True,
) -> Any:
    """Draw one oriented slice in millimetres (true aspect) with orientation labels; returns the AxesImage."""
    image = ax.imshow(
        sl.image, cmap=cmap, vmin=vmin, vmax=vmax, extent=sl.extent, origin="upper",
        interpolation="nearest", aspect="equal",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    if title:
        ax.set_title(title, fontsize=9)
    if labels:
        spots = {"left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center"),
                 "top": (0.5, 0.98, "center", "top"), "bottom": (0.5, 0.02, "center", "bottom")}
        left, right, bottom, top = sl.extent
        if abs(bottom - top) < 0.3 * abs(right - left):  # a thin strip: top/bottom letters beside each other
            spots["top"] = (0.5, 0.98, "right", "top")
            spots["bottom"] = (0.5, 0.02, "left", "bottom")
        for edge, (x, y, ha, va) in spots.items():
            text = ax.text(x, y, sl.labels[edge], transform=ax.transAxes, ha=ha, va=va, color="white",
                           fontsize=9, fontweight="bold", gid=f"orientation-{edge}")
            _outline(text)
    return image


def _colourbar(fig: Figure, image: Any, ax: Any, label: str) -> Any:
    bar = fig.colorbar(image, ax=ax, orientation="horizontal", fraction=0.06, pad=0.03, shrink=0.9)
    bar.set_label(label, fontsize=8)
    bar.locator = MaxNLocator(nbins=4)
    bar.update_ticks()
    bar.ax.tick_params(labelsize=7)
    return bar


def _slice_caption(sl: SliceView) -> str:
    axis_name = {"axial": "S", "coronal": "A", "sagittal": "R"}[sl.view]
    note = f" · oblique {sl.oblique_deg:.0f}°" if sl.oblique_deg >= 1.0 else ""
    return f"{sl.view} {sl.index + 1}/{sl.count} ({axis_name} {sl.position_mm:+.1f} mm){note}"


def format_metrics(metrics: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """A compact one-line summary of a scan's numeric metrics."""
    parts = []
    for name, value in metrics.items():
        if keys is not None and name not in keys:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            continue
        parts.append(f"{name}={value:.4g}")
    return "  ".join(parts)


def draw_scan_row(
    fig: Figure, axes: list[Any], before: Volume, enhanced: Volume, uncertainty: Volume | None,
    limits: DisplayLimits, *, view: str, index: int | None, convention: str, overlay: bool,
    units: str, before_label: str, canonical_input: bool = False,
) -> SliceView:
    """Fill four axes with before / enhanced (+ overlay) / difference / uncertainty for one slice."""
    kw: dict[str, Any] = {"view": view, "index": index, "convention": convention,
                          "assume_canonical": canonical_input}
    sl_before = oriented_slice(before, **kw)
    sl_enh = oriented_slice(enhanced, **kw)
    vmin, vmax = limits.anatomy_range
    caption = _slice_caption(sl_enh)
    im = draw_slice(axes[0], sl_before, cmap=ANATOMY_CMAP, vmin=vmin, vmax=vmax,
                    title=f"{before_label}\n{caption}")
    _colourbar(fig, im, axes[0], f"intensity ({units}) · W {limits.window:.4g} L {limits.level:.4g}")

    enh_title = "enhanced"
    sl_unc = oriented_slice(uncertainty, **kw) if uncertainty is not None else None
    im = draw_slice(axes[1], sl_enh, cmap=ANATOMY_CMAP, vmin=vmin, vmax=vmax, title=None)
    if overlay and sl_unc is not None and limits.uncertainty_threshold is not None:
        mask = sl_unc.image > limits.uncertainty_threshold
        axes[1].imshow(np.ma.masked_where(~mask, mask.astype(np.float32)),
                       cmap=ListedColormap([OVERLAY_COLOUR]), vmin=0, vmax=1, alpha=0.45,
                       extent=sl_enh.extent, origin="upper", interpolation="nearest", aspect="equal",
                       gid="uncertainty-overlay")
        enh_title += f" · cyan: SD > p{limits.overlay_percentile:g}"
    axes[1].set_title(f"{enh_title}\n{caption}", fontsize=9)
    _colourbar(fig, im, axes[1], f"intensity ({units})")

    diff = replace(sl_enh, image=sl_enh.image - sl_before.image)
    dmax = limits.difference_max
    im = draw_slice(axes[2], diff, cmap=DIFFERENCE_CMAP, vmin=-dmax, vmax=dmax,
                    title=f"difference: enhanced − before\n{caption}")
    _colourbar(fig, im, axes[2], f"difference ({units})")

    if sl_unc is not None and limits.uncertainty_max is not None:
        im = draw_slice(axes[3], sl_unc, cmap=UNCERTAINTY_CMAP, vmin=0.0, vmax=limits.uncertainty_max,
                        title=f"uncertainty (SD over samples)\n{caption}")
        _colourbar(fig, im, axes[3], f"standard deviation ({units})")
    else:
        axes[3].set_axis_off()
        axes[3].text(0.5, 0.5, "no uncertainty map\n(enhance with --samples K > 1)", ha="center",
                     va="center", fontsize=9, transform=axes[3].transAxes)
    return sl_enh


def _panel_size(sl: SliceView, width_in: float = 3.0) -> tuple[float, float]:
    left, right, bottom, top = sl.extent
    ratio = abs(bottom - top) / max(abs(right - left), 1e-6)
    return width_in, float(np.clip(width_in * ratio, 0.3, 3.0 * width_in))


def draw_flag_overlay(ax: Any, flags_slice: SliceView) -> int:
    """Red translucent fill and red contour of the flagged voxels over an already drawn slice (same extent).

    Returns the number of flagged pixels in the slice."""
    mask = np.asarray(flags_slice.image) > 0.5
    if mask.any():
        ax.imshow(np.ma.masked_where(~mask, mask.astype(np.float32)), cmap=ListedColormap([FLAGS_COLOUR]),
                  vmin=0, vmax=1, alpha=0.35, extent=flags_slice.extent, origin="upper",
                  interpolation="nearest", aspect="equal", gid="flags-overlay")
        left, right, bottom, top = flags_slice.extent
        rows, cols = mask.shape
        xs = left + (np.arange(cols) + 0.5) * (right - left) / cols
        ys = top + (np.arange(rows) + 0.5) * (bottom - top) / rows
        ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[FLAGS_COLOUR], linewidths=0.8)
    return int(mask.sum())


def flags_figure(
    enhanced: Volume, flags: Volume, *, view: str = "axial", index: int | None = None,
    limits: DisplayLimits | None = None, title: str | None = None, dpi: int = 100,
) -> Figure:
    """The enhanced slice with the hallucination flags in red (fill and contour): where to look twice."""
    sl = oriented_slice(enhanced, view, index)
    fl = oriented_slice(flags, view, index)
    vmin, vmax = (limits or display_limits(enhanced, enhanced, None, overlay_percentile=None)).anatomy_range
    width, height = _panel_size(sl)
    fig = Figure(figsize=(width, height + 0.8), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    draw_slice(ax, sl, cmap=ANATOMY_CMAP, vmin=vmin, vmax=vmax)
    n = draw_flag_overlay(ax, fl)
    ax.set_title(f"{title + chr(10) if title else ''}enhanced · red: flagged ({n} px) · {_slice_caption(sl)}",
                 fontsize=9)
    return fig


def scan_figure(
    before: Volume, enhanced: Volume, uncertainty: Volume | None = None, *, view: str = "axial",
    index: int | None = None, limits: DisplayLimits | None = None, window: float | None = None,
    level: float | None = None, overlay: bool = True, overlay_percentile: float = 95.0,
    convention: str = "radiological", units: str = "a.u.", before_label: str = "before",
    title: str | None = None, metrics: Mapping[str, Any] | None = None, dpi: int = 100,
) -> Figure:
    """One slice of a scan as four panels.

    Before, enhanced (+ high-uncertainty overlay), difference, uncertainty.
    """
    if limits is None:
        limits = display_limits(before, enhanced, uncertainty, window=window, level=level,
                                overlay_percentile=overlay_percentile)
    width, height = _panel_size(oriented_slice(enhanced, view, index, convention))
    fig = Figure(figsize=(4 * width, height + 1.6), dpi=dpi, layout="constrained")
    axes = list(fig.subplots(1, 4))
    draw_scan_row(fig, axes, before, enhanced, uncertainty, limits, view=view, index=index,
                  convention=convention, overlay=overlay, units=units, before_label=before_label)
    _suptitle(fig, title, metrics)
    return fig


def middle_slices_figure(
    before: Volume, enhanced: Volume, uncertainty: Volume | None = None, *,
    views: tuple[str, ...] | None = None, limits: DisplayLimits | None = None, overlay: bool = True,
    overlay_percentile: float = 95.0, convention: str = "radiological", units: str = "a.u.",
    before_label: str = "before", title: str | None = None, metrics: Mapping[str, Any] | None = None,
    dpi: int = 100,
) -> Figure:
    """The middle slice of each view, one row per view, same four panels and limits as :func:`scan_figure`.

    ``views`` defaults to the views that show a 2D image (only the acquisition plane of a single-slice scan).
    """
    if views is None:
        views = useful_views(enhanced)
    if limits is None:
        limits = display_limits(before, enhanced, uncertainty, overlay_percentile=overlay_percentile)
    cb, ce = canonical(before), canonical(enhanced)
    cu = canonical(uncertainty) if uncertainty is not None else None
    sizes = [_panel_size(oriented_slice(ce, v, None, convention, assume_canonical=True)) for v in views]
    width = sizes[0][0]
    fig = Figure(figsize=(4 * width, sum(h + 1.4 for _, h in sizes) + 0.4), dpi=dpi, layout="constrained")
    grid = fig.subplots(len(views), 4, squeeze=False, height_ratios=[h + 1.4 for _, h in sizes])
    for row, view in enumerate(views):
        draw_scan_row(fig, list(grid[row]), cb, ce, cu, limits, view=view, index=None, convention=convention,
                      overlay=overlay, units=units, before_label=before_label, canonical_input=True)
    _suptitle(fig, title, metrics)
    return fig


def _suptitle(fig: Figure, title: str | None, metrics: Mapping[str, Any] | None) -> None:
    lines = [line for line in (title, format_metrics(metrics) if metrics else None) if line]
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)


# ------------------------------------------------------------------------------------------------ output
def figure_png(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure rendered as PNG bytes (no pyplot, no display backend needed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return buffer.getvalue()


def write_png(data: bytes | Figure, path: str | os.PathLike[str]) -> Path:
    """Write PNG bytes (or a figure) to ``path`` atomically: a temp file in the same folder, then a rename."""
    return atomic.write_bytes(Path(path), figure_png(data) if isinstance(data, Figure) else data)


def show(fig: Figure, dpi: int | None = None) -> None:
    """Display a figure in a notebook as a PNG.

    Works under any matplotlib backend, also when executed headless.
    """
    from IPython.display import Image, display

    display(Image(data=figure_png(fig, dpi)))
