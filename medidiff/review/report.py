"""``OUT/report.html``: one self-contained page for reviewing a batch.

Inline base64 PNGs, no scripts, no links.

Per finished scan: the middle slice before (baseline back-projection), after (enhanced), their difference
and the sampling uncertainty, with the scan's metrics. Built from the manifest and the NIfTI outputs, so it
covers every scan of a resumed batch. Shows anonymous scan keys only, never patient data.

Panels are drawn by :mod:`medidiff.review.figures` (the notebooks' code): volumes reoriented to the
closest RAS order without resampling, radiological convention, true aspect from the affine spacing,
orientation letters, fixed colour maps with unit-labelled colour bars and one set of intensity limits per
scan.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io import atomic
from medidiff.io.volume import Volume
from medidiff.review.batch import BEFORE_LABELS, load_volume, trust_summary
from medidiff.review.figures import (
    ANATOMY_CMAP,
    DIFFERENCE_CMAP,
    UNCERTAINTY_CMAP,
    DisplayLimits,
    SliceView,
    _colourbar,
    _panel_size,
    canonical,
    check_same_grid,
    display_limits,
    draw_flag_overlay,
    draw_slice,
    oriented_slice,
)

PANELS = ("before", "after", "difference", "uncertainty", "flags")
BEFORE = BEFORE_LABELS
PANEL_WIDTH_IN = 2.2  # shown 220 px wide; rendered at PANEL_DPI for sharp text on high-density screens
PANEL_DPI = 200
_FIXED_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS axis each view slices across
_AXIS_NAME = {"axial": "S", "coronal": "A", "sagittal": "R"}


@dataclass(frozen=True)
class ScanPreview:
    """Oriented middle slices of one finished scan and the scan-wide display limits.

    Slices are in screen order with mm extents.
    """

    # before, after, difference (after − before), uncertainty, flags; as available
    slices: dict[str, SliceView]
    limits: DisplayLimits
    units: str = "a.u."
    uncertainty_label: str = "standard deviation"

    @property
    def caption(self) -> str:
        """Which slice is shown, e.g. ``axial 8/16 (S +3.0 mm)``."""
        sl = self.slices["after"]
        note = f" · oblique {sl.oblique_deg:.0f}°" if sl.oblique_deg >= 1.0 else ""
        return f"{sl.view} {sl.index + 1}/{sl.count} ({_AXIS_NAME[sl.view]} {sl.position_mm:+.1f} mm){note}"


def report_view(vol: Volume, task: str | None) -> str:
    """The view of a scan's panels: its acquisition plane for sr / recon (the plane across voxel axis 2);
    for through-plane SR a plane that contains the slice direction (the axis with the largest spacing)."""
    from nibabel import orientations as ornt

    to_ras = ornt.io_orientation(vol.affine)[:, 0]  # RAS axis of each voxel axis
    cshape = canonical(vol).shape
    if task == "sr_thick":
        slice_ras = int(to_ras[vol.slice_axis])
        candidates = [v for v in ("coronal", "sagittal", "axial") if _FIXED_AXIS[v] != slice_ras]
        flat = [v for v in candidates if all(cshape[a] > 1 for a in range(3) if a != _FIXED_AXIS[v])]
        return (flat or candidates)[0]
    slice_ras = int(to_ras[2])
    return next(v for v, axis in _FIXED_AXIS.items() if axis == slice_ras)


def _on_grid(reference: Volume, other: Volume | None) -> bool:
    """Whether ``other`` shares ``reference``'s voxel grid (panels that are subtracted or compared must)."""
    if other is None:
        return False
    try:
        check_same_grid({"after": reference, "other": other})
    except ValueError:
        return False
    return True


def scan_preview(output_root: Path, entry: dict[str, Any]) -> ScanPreview | None:
    """Middle slices of a finished scan, reoriented to the closest RAS order: before, after, difference and
    (when sampled) uncertainty, with display limits computed once over the whole volumes."""
    outputs = entry.get("outputs") or {}
    if entry.get("status") != "done" or not outputs.get("enhanced") or not outputs.get("baseline"):
        return None
    root = Path(output_root)
    after = canonical(load_volume(root / outputs["enhanced"]))
    before = canonical(load_volume(root / outputs["baseline"]))
    uncertainty = (
        canonical(load_volume(root / outputs["uncertainty"])) if outputs.get("uncertainty") else None
    )
    flags = canonical(load_volume(root / outputs["flags"])) if outputs.get("flags") else None
    paired = _on_grid(after, before)
    if not _on_grid(after, uncertainty):
        uncertainty = None
    if not _on_grid(after, flags):
        flags = None
    limits = display_limits(before if paired else after, after, uncertainty, overlay_percentile=None)
    view = report_view(after, entry.get("task"))
    slices = {"after": oriented_slice(after, view, assume_canonical=True)}
    slices["before"] = oriented_slice(before, view, assume_canonical=True)
    if paired:
        slices["difference"] = replace(slices["after"], image=slices["after"].image - slices["before"].image)
    if uncertainty is not None:
        slices["uncertainty"] = oriented_slice(uncertainty, view, assume_canonical=True)
    if flags is not None:
        slices["flags"] = oriented_slice(flags, view, assume_canonical=True)
    calibrated = bool((entry.get("trust") or {}).get("coverage"))
    label = (
        f"{100 * float(entry['trust']['coverage']):g}% interval half-width" if calibrated
        else "standard deviation"
    )
    panels = {name: slices[name] for name in PANELS if name in slices}
    return ScanPreview(panels, limits, uncertainty_label=label)


def _panel_rgb(
    name: str, sl: SliceView, limits: DisplayLimits, units: str, *,
    uncertainty_label: str = "standard deviation", flags: SliceView | None = None,
) -> np.ndarray:
    """One panel drawn by the review figures' code as uint8 RGB.

    True aspect, orientation letters, colour bar.

    With ``flags`` the slice is drawn with the flagged voxels in red (fill and contour) on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if name == "difference":
        cmap, vmin, vmax, label = DIFFERENCE_CMAP, -limits.difference_max, limits.difference_max, "difference"
    elif name == "uncertainty":
        cmap, vmin, vmax, label = UNCERTAINTY_CMAP, 0.0, limits.uncertainty_max or 1.0, uncertainty_label
    else:
        (vmin, vmax), cmap, label = limits.anatomy_range, ANATOMY_CMAP, "intensity"
    width, height = _panel_size(sl, PANEL_WIDTH_IN)
    fig = Figure(figsize=(width, height + 0.75), dpi=PANEL_DPI, layout="constrained", facecolor="white")
    ax = fig.subplots()
    image = draw_slice(ax, sl, cmap=cmap, vmin=vmin, vmax=vmax)
    if flags is not None:
        draw_flag_overlay(ax, flags)
    _colourbar(fig, image, ax, f"{label} ({units})")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def panel_images(preview: ScanPreview) -> dict[str, np.ndarray]:
    """uint8 RGB image per panel.

    Before, after, difference, uncertainty, flags over after; those available.
    """
    out = {}
    for name, sl in preview.slices.items():
        if name == "flags":
            out[name] = _panel_rgb("after", preview.slices["after"], preview.limits, preview.units, flags=sl)
        else:
            out[name] = _panel_rgb(name, sl, preview.limits, preview.units,
                                   uncertainty_label=preview.uncertainty_label)
    return out


def preview_strip(output_root: Path, entry: dict[str, Any]) -> np.ndarray | None:
    """The panels of a scan side by side (uint8 RGB), e.g. for an MLflow figure."""
    preview = scan_preview(output_root, entry)
    if preview is None:
        return None
    images = list(panel_images(preview).values())
    height = max(im.shape[0] for im in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 4), (0, 0)), constant_values=255) for im in images]
    return np.concatenate(padded, axis=1)


def _png_base64(rgb: np.ndarray) -> str:
    import matplotlib.image

    buf = io.BytesIO()
    matplotlib.image.imsave(buf, rgb, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px} h2{font-size:16px;margin:0 0 6px 0;word-break:break-all}
.scan{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0}
.panels{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0} figcaption{font-size:12px;color:#555;text-align:center}
img{width:220px;height:auto;border:1px solid #ccc;background:#fff}
table{border-collapse:collapse;font-size:13px;margin-top:6px} td,th{border:1px solid #ddd;padding:2px 8px}
.failed{color:#a00}
.verdict{font-weight:600;margin:4px 0} .verdict.ok{color:#070} .verdict.classical{color:#555}
.verdict.flagged{color:#b00}
"""


def render_report(output_root: Path, manifest: dict[str, Any]) -> str:
    """The report's HTML text."""
    scans = list(manifest.get("scans", {}).values())
    done = [s for s in scans if s.get("status") == "done"]
    failed = [s for s in scans if s.get("status") != "done"]
    params = {k: v for k, v in (manifest.get("params") or {}).items() if k != "model_identity"}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>medidiff enhance report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>medidiff enhance report</h1>",
        (
            f"<p>{len(done)} scan(s) enhanced, {len(failed)} failed. "
            f"Generated {html.escape(time.strftime('%Y-%m-%d %H:%M'))}."
            " Panels: middle slice of the operator back-projection (<b>before</b>), the enhanced image "
            "(<b>after</b>), after − before (<b>difference</b>, red = brighter) and the per-voxel standard "
            "deviation over samples or, with a calibrated model, the half-width of a per-voxel interval at "
            "the stated coverage (<b>uncertainty</b>), and the enhanced image with the hallucination flags "
            "in red (<b>flags</b>: structure the measurement does not support). Each scan starts with a "
            "one-line verdict, the gate's decision and predicted gain. Derived images are for research use, "
            "not primary diagnosis. Slices follow the anatomy whatever the voxel order "
            "on disk (radiological convention: the patient's right on the screen's left; letters mark the "
            "directions), are drawn in millimetres (true aspect) and share one intensity scale per scan.</p>"
        ),
        f"<p><small>settings: {html.escape(json.dumps(params, default=str))}</small></p>",
    ]
    for entry in sorted(done, key=lambda e: e["key"]):
        parts.append(_scan_section(output_root, entry))
    if failed:
        parts.append(
            "<div class='scan'><h2 class='failed'>failed scans</h2>"
            "<table><tr><th>scan</th><th>error</th></tr>"
        )
        for entry in sorted(failed, key=lambda e: e["key"]):
            parts.append(
                f"<tr><td>{html.escape(entry['key'])}</td><td>{html.escape(str(entry.get('error')))}</td></tr>"
            )
        parts.append("</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _scan_section(output_root: Path, entry: dict[str, Any]) -> str:
    """One finished scan: header, the four panels and its metrics table."""
    head = (
        f"<div class='scan'><h2>{html.escape(entry['key'])}</h2>"
        f"<div>{html.escape(str(entry.get('kind')))} · task {html.escape(str(entry.get('task')))} · "
        f"{float(entry.get('seconds') or 0):.1f} s"
    )
    problem = ""
    try:
        preview = scan_preview(output_root, entry)
        images = panel_images(preview) if preview else {}
        if preview:
            head += f" · {html.escape(preview.caption)}"
    except Exception as exc:  # noqa: BLE001 - an unreadable output shows as text, the report still renders
        images = {}
        problem = f"<p class='failed'>preview unavailable: {html.escape(type(exc).__name__)}</p>"
    head += f"</div>{problem}"
    summary = trust_summary(entry.get("metrics") or {}, entry.get("trust"), _gate_fields(entry))
    css = {"enhanced": "ok", "flagged": "flagged"}.get(summary["verdict"].split(":")[0], "classical")
    head += (
        f"<p class='verdict {css}'>verdict: {html.escape(summary['verdict'])}</p>"
        f"<div><small>gate: {html.escape(summary['gate'])} · uncertainty: {html.escape(summary['interval'])}"
        f" · flagged: {html.escape(summary['flagged'])}</small></div>"
    )
    calibrated = bool((entry.get("trust") or {}).get("coverage"))
    captions = {
        "before": BEFORE.get(str(entry.get("task")), "before"),
        "after": "after: enhanced",
        "difference": "after − before",
        "uncertainty": (
            "calibrated interval half-width" if calibrated else "uncertainty (SD over samples, uncalibrated)"
        ),
        "flags": "flags (red): check these regions",
    }
    figs = "".join(
        f"<figure><img alt='{name}' src='data:image/png;base64,{_png_base64(img)}'>"
        f"<figcaption>{html.escape(captions[name])}</figcaption></figure>"
        for name, img in images.items()
    )
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{'-' if v is None else f'{v:.4g}'}</td></tr>"
        for k, v in sorted((entry.get("metrics") or {}).items())
    )
    return (
        f"{head}<div class='panels'>{figs}</div>"
        f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table></div>"
    )


def _gate_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """The gate's decision and reason when the manifest entry records them (top level or under "gate")."""
    gate = dict(entry.get("gate") or {}) if isinstance(entry.get("gate"), dict) else {}
    for name in ("gate_decision", "gate_reason"):
        if entry.get(name) is not None:
            gate[name] = entry[name]
    return gate


def write_report(output_root: Path, manifest: dict[str, Any], path: Path | None = None) -> Path:
    """Write the report (atomically) to ``path`` or ``OUT/report.html``."""
    path = Path(path) if path else Path(output_root) / "report.html"
    return atomic.write_text(path, render_report(Path(output_root), manifest))
